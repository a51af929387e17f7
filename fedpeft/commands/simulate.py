"""`fedpeft simulate`: a fleet of budgeted edge devices adapting one model with Flower on Ray."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from fedpeft import cli_options as opts
from fedpeft.cli_options import positive_int
from fedpeft.errors import UsageError, require
from fedpeft.fleet.config import (AGGREGATORS, AUTO, BUDGET_POLICIES, CODECS, DEVICES, LORA_MODES, STRAGGLER_POLICIES,
                                  TASKEDGE_MASKS, RunConfig)
from fedpeft.names import CORRUPTION_NAMES, DATASET_NAMES, METHOD_NAMES, MODEL_NAMES, PARTITION_SCHEMES, TASK_NAMES

# CLI flag -> RunConfig field, for the options most runs change.
FLAGS = {
    "model": str, "method": str, "rank": int, "alpha": float, "density": float, "nm": str,
    "num_clients": int, "clients_per_round": int, "rounds": int, "local_epochs": int, "batch_size": int,
    "lora_mode": str, "taskedge_mask": str, "budget_policy": str, "upload_codec": str, "max_flops_per_round": float,
    "fleet": str, "dataset": str, "data_dir": str, "task": str, "corruption": str, "severity": int,
    "partition": str, "pretrain_epochs": int, "pretrain_schedule": str, "pretrain_lr": float, "seed": int, "out": str, "cache_dir": str, "input_size": int,
    "aggregator": str, "clip_norm": float, "clip_median_multiple": float, "reject_norm_multiple": float,
    "round_timeout_s": float, "poison_clients": str,
    "trace": str, "round_deadline_s": float, "straggler_policy": str, "over_selection": float, "target_accuracy": float,
    "ray_address": str, "client_cpus": float, "client_gpus": float, "device": str, "evaluate_every": int,
}
HELP = {
    # the same words as finetune/profile/pretrain for the options they share (fedpeft/cli_options.py)
    "model": opts.one_of(MODEL_NAMES),
    "method": f"{opts.one_of((*METHOD_NAMES, AUTO))}; auto: each device the first of method_order that fits it",
    "rank": opts.RANK_HELP, "alpha": opts.ALPHA_HELP, "nm": opts.NM_HELP, "input_size": opts.INPUT_SIZE_HELP,
    "cache_dir": opts.CACHE_DIR_HELP, "seed": "random seed (default 0)",
    "dataset": f"{opts.one_of(DATASET_NAMES)} (digits: offline, scikit-learn)",
    "data_dir": "CIFAR-10 root holding cifar-10-batches-py (default none)",
    "task": f"{opts.one_of(TASK_NAMES)}; shift: clean -> corrupted, unseen: some classes -> all",
    "corruption": opts.one_of(CORRUPTION_NAMES), "severity": "corruption severity 1-5",
    "partition": f"{opts.one_of(PARTITION_SCHEMES)}: how the target data is split over the clients",
    "pretrain_epochs": f"source-task epochs (default: the schedule's own, {opts.SCHEDULE_EPOCHS})",
    "pretrain_schedule": opts.PRETRAIN_SCHEDULE_HELP, "pretrain_lr": opts.PRETRAIN_LR_HELP,
    "local_epochs": "local epochs per client and round",
    "out": "run directory for the logs, summary and plots",
    "lora_mode": f"one of {', '.join(LORA_MODES)}",
    "density": "TaskEdge mask density in (0, 1]; 0: the method's own (taskedge 0.001, taskedge_lora 0.01) (default 0)",
    "taskedge_mask": f"one of {', '.join(TASKEDGE_MASKS)}: each client's own mask, or one mask the server builds",
    "budget_policy": f"one of {', '.join(BUDGET_POLICIES)}",
    "upload_codec": f"one of {', '.join(CODECS)}", "fleet": "fleet TOML file (default none: a mixed fleet of --num-clients)",
    "clients_per_round": "clients sampled per round, at most the fleet's size (0: all)",
    "max_flops_per_round": "per-client FLOP budget per round (0: none)",
    "aggregator": f"one of {', '.join(AGGREGATORS)} (default fedavg)",
    "clip_norm": "clip every update to this L2 norm (0: off)",
    "clip_median_multiple": "clip every update to this multiple of the round's median norm (0: off)",
    "reject_norm_multiple": "reject updates over this multiple of the other clients' median norm (default 10; 0: off)",
    "round_timeout_s": "longest wait for nodes and replies in a round, seconds (default 600)",
    "poison_clients": "fault injection: these client ids upload poisoned updates (comma-separated)",
    "trace": "availability/budget trace, CSV or JSON (fedpeft/fleet/traces.py); '' generates one, 'off': always on",
    "round_deadline_s": "a round closes this many simulated seconds after it starts (0: no deadline)",
    "straggler_policy": f"one of {', '.join(STRAGGLER_POLICIES)}: discard a client late for the deadline, or have it "
                        "train only the steps that fit",
    "over_selection": "sample (1 + this) x clients-per-round, keep the first clients-per-round to finish (0: off)",
    "target_accuracy": "accuracy for the time/energy/bytes-to-accuracy answers (0: 95%% of the run's best)",
    "ray_address": "run on the Ray cluster whose head is HOST:PORT (e.g. 10.0.0.5:6379) instead of a private Ray "
                   "(default: a private Ray on 127.0.0.1)",
    "client_cpus": "Ray CPUs per virtual client (default 1)",
    "client_gpus": "Ray GPUs per virtual client, a fraction allowed (default 0; needs CUDA or a cluster's GPUs)",
    "device": f"one of {', '.join(DEVICES)}: where clients train; cuda needs --client-gpus > 0 (default cpu)",
    "evaluate_every": "evaluate the global model after every N rounds (round 0 too; the last round always; "
                      "0: the last round only)",
}


# argparse types checked as finetune/profile check the same options (a bad value answers before torch loads)
TYPES = {"alpha": opts.positive_float, "nm": opts.nm_pattern, "pretrain_lr": opts.positive_float}


def add_run_options(parser, default_out: str = "runs/latest", overwrite: bool = False,
                    presets: dict | None = None) -> None:
    """The run's options. `presets`: RunConfig fields whose default this command changes (the
    demo's), shown as the default in --help and applied unless the option or --config sets them."""
    presets = presets or {}
    parser.add_argument("--config", help="TOML file of run settings (flat keys, as in RunConfig; default none)")
    defaults = RunConfig.__dataclass_fields__
    for name, kind in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = default_out if name == "out" else presets.get(name, defaults[name].default)
        shown = "''" if default == "" else default
        text = HELP.get(name, name.replace("_", " "))
        kind = TYPES.get(name, positive_int if kind is int and name not in ("seed", "clients_per_round", "evaluate_every")
                         else kind)
        parser.add_argument(flag, dest=name, type=kind,
                            help=text if "(default" in text else f"{text} (default {shown})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run setting, repeatable (default none; keys as in RunConfig)")
    parser.add_argument("--overwrite", action="store_true", default=True if overwrite else None,
                        help="replace the logs of a previous run in --out "
                             f"(default: {'replace' if overwrite else 'refuse'})")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs (default off)")
    parser.set_defaults(default_out=default_out, resume=None, presets=presets)


def config_from_args(args, **forced) -> RunConfig:
    values: dict = {"out": args.default_out, **getattr(args, "presets", {})}
    if args.config:
        path = Path(args.config)
        require(path.is_file(), f"config: no such file {args.config!r}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config: {args.config} is not valid TOML ({exc})") from None
        values.update(data.get("run", data))
    for item in args.set:
        key, sep, value = item.partition("=")
        require(bool(sep), f"set: expected KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    values.update({k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    if args.overwrite:
        values["overwrite"] = True
    values.update(forced)
    return RunConfig.from_mapping(values)


def resumed_config(run_dir: str) -> RunConfig:
    """The settings of the run in `run_dir`, to continue it from its checkpoint."""
    from fedpeft.fleet.runlog import read_run_config

    return RunConfig.from_mapping({**read_run_config(run_dir), "out": run_dir, "resume": True, "overwrite": False})


def no_client_trained(run_dir: Path) -> str | None:
    """Why nothing trained, when no client of any round >= 1 finished `ok` (None when one did)."""
    from fedpeft.report import read_jsonl

    lines = [r for r in read_jsonl(run_dir / "clients.jsonl") if r.get("round", 0) >= 1]
    if any(r.get("status") == "ok" for r in lines):
        return None
    errors = [r.get("error") or r.get("status") for r in lines]
    common = max(set(errors), key=errors.count) if errors else "no client was sampled"
    return f"no client trained in any round ({len(lines)} client-rounds); most common reason: {common}"


def register(subparsers) -> None:
    parser = subparsers.add_parser("simulate", help="simulate a fleet of edge devices (Flower on Ray)")
    add_run_options(parser)
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete round "
                                                         "(its own settings; other options are ignored; default none)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fedpeft.fleet.runlog import check_out_dir

    cfg = resumed_config(args.resume) if args.resume else config_from_args(args)
    check_out_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)  # a bad --out answers before torch/Ray load

    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import run_table

    summary = run_fleet(cfg, verbose=args.verbose)
    print(run_table(summary))
    if summary.get("taskedge_density"):
        density = summary["taskedge_density"]
        print(f"taskedge: realised density {density['realised']:.4%} of the masked weights "
              f"(requested {density['requested']:.4%})")
    print(f"\nwrote {Path(cfg.out).resolve()}/ (clients.jsonl, rounds.jsonl, summary.json, plots)", file=sys.stderr)
    reason = no_client_trained(Path(cfg.out))
    if reason:
        print(f"fedpeft: error: {reason}", file=sys.stderr)
        return 1
    return 0


