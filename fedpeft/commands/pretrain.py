"""`fedpeft pretrain`: train the source-task model once and cache its checkpoint."""
from __future__ import annotations

from fedpeft import cli_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="pre-train a model on the source task (cached)")
    cli_options.add_model(parser)
    cli_options.add_task(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from fedpeft.models import build_model
    from fedpeft.pretrain import pretrained_checkpoint, source_accuracy

    task = cli_options.task_from_args(args)
    path = pretrained_checkpoint(args.model, task, input_size=args.input_size, epochs=args.pretrain_epochs,
                                 lr=args.pretrain_lr, seed=args.seed, cache=args.cache_dir, schedule=args.pretrain_schedule)
    model = build_model(args.model, num_classes=len(task.source_classes), input_size=args.input_size, checkpoint=path)
    print(f"checkpoint: {path}")
    print(f"source accuracy (train): {source_accuracy(model, task):.3f}")
    if task.source_test is not None:
        print(f"source accuracy (test):  {source_accuracy(model, task, 'test'):.3f}")
    return 0
