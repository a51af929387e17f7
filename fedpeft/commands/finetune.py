"""`fedpeft finetune`: one device adapts the pre-trained model with one method (centralized)."""
from __future__ import annotations

import json
import sys
import time

from fedpeft import cli_options
from fedpeft.cli_options import positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="adapt the pre-trained model with one method on one device")
    cli_options.add_model(parser)
    cli_options.add_method(parser)
    cli_options.add_task(parser)
    parser.add_argument("--epochs", type=positive_int, default=3, help="local epochs on the target data (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    parser.add_argument("--export-peft", metavar="DIR", help="LoRA/DoRA: write the adapter in peft's format (default none)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help=cli_options.FORMAT_HELP)
    parser.add_argument("--json", action="store_const", dest="format", const="json",
                        help="the same as --format json (default off)")
    cli_options.add_device(parser)
    parser.set_defaults(func=run)


def finetune(args) -> dict:
    from fedpeft.methods import make_method
    from fedpeft.models import build_model
    from fedpeft.pretrain import pretrained_checkpoint
    from fedpeft.train import evaluate, require_bn_batches, resolve_device, train

    method = make_method(args.method, **cli_options.method_hparams(args))  # bad hyper-parameters fail before any work
    device = resolve_device(args.device)  # no CUDA for --device cuda fails before any work too
    task = cli_options.task_from_args(args)
    target = task.target_train
    if args.batch_size < 2 or len(target) < 2:
        # Batches of one are only fatal for methods that train BatchNorm statistics, which is a
        # property of the adapter: attach to an untrained model (cheap) to fail before pretraining.
        probe = method.attach(build_model(args.model, num_classes=task.num_classes, input_size=args.input_size,
                                          seed=args.seed))
        require_bn_batches(args.method, probe.trains_bn_stats, len(target), args.batch_size)
    checkpoint = pretrained_checkpoint(args.model, task, input_size=args.input_size, epochs=args.pretrain_epochs,
                                       lr=args.pretrain_lr, seed=args.seed, cache=args.cache_dir, schedule=args.pretrain_schedule)
    model = build_model(args.model, num_classes=task.num_classes, input_size=args.input_size,
                        checkpoint=checkpoint, seed=args.seed)
    calibration = target.images[: min(64, len(target))]
    adapter = method.attach(model, calibration=calibration)  # on the CPU: the same mask as a CPU run
    adapter.model.to(device)  # evaluate and train follow the model
    before = evaluate(adapter.model, task.target_test.images, task.target_test.labels)

    def progress(step, total, loss):
        if sys.stderr.isatty() or step == total or step % 20 == 0:
            print(f"\r{args.method}: step {step}/{total} loss {loss:.3f}", end="" if step < total else "\n",
                  file=sys.stderr, flush=True)

    start = time.perf_counter()
    result = train(adapter, target.images, target.labels, epochs=args.epochs, batch_size=args.batch_size,
                   seed=args.seed, progress=progress)
    wall = time.perf_counter() - start
    after = evaluate(adapter.model, task.target_test.images, task.target_test.labels)
    adapter.model.to("cpu")  # the delta and the peft export are read on the CPU
    if args.export_peft:
        if not hasattr(adapter, "export_peft"):
            from fedpeft.errors import UsageError

            raise UsageError(f"export-peft: only lora and dora adapters have peft's format, not {args.method}")
        adapter.export_peft(args.export_peft)
    params_total = sum(p.numel() for p in adapter.model.parameters())
    out = {
        "model": args.model, "method": args.method, "task": task.name, "hparams": method.hparams(),
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "loss_before": before.loss, "loss_after": after.loss, "train_loss": result.loss,
        "params_total": params_total, "params_trainable": adapter.num_trainable(),
        "delta_bytes": adapter.delta_bytes(), "steps": result.steps, "wall_s": round(wall, 2),
    }
    if hasattr(adapter, "realised_density"):  # TaskEdge: the mask's true share of its target weights
        out["realised_density"] = adapter.realised_density
    return out


def run(args) -> int:
    out = finetune(args)
    if args.format == "json":
        print(json.dumps(out))
        return 0
    print(f"task             {out['task']}")
    print(f"model / method   {out['model']} / {out['method']}")
    print(f"accuracy         {out['accuracy_before']:.3f} -> {out['accuracy_after']:.3f} (target test set)")
    print(f"trainable params {out['params_trainable']:,} of {out['params_total']:,} "
          f"({100 * out['params_trainable'] / out['params_total']:.2f}%)")
    if "realised_density" in out:
        print(f"mask density     {out['realised_density']:.4%} realised ({out['hparams']['density']:.4%} requested)")
    print(f"delta bytes      {out['delta_bytes']:,}")
    print(f"train time       {out['wall_s']} s ({out['steps']} steps)")
    return 0
