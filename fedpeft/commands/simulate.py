"""`fedpeft simulate`: a fleet of budgeted edge devices adapting one model with Flower on Ray."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from fedpeft.cli_options import positive_int
from fedpeft.errors import UsageError, require
from fedpeft.fleet.config import BUDGET_POLICIES, CODECS, LORA_MODES, TASKEDGE_MASKS, RunConfig

# CLI flag -> RunConfig field, for the options most runs change.
FLAGS = {
    "model": str, "method": str, "rank": int, "alpha": float, "density": float, "nm": str,
    "num_clients": int, "clients_per_round": int, "rounds": int, "local_epochs": int, "batch_size": int,
    "lora_mode": str, "taskedge_mask": str, "budget_policy": str, "upload_codec": str, "max_flops_per_round": float,
    "fleet": str, "dataset": str, "data_dir": str, "task": str, "corruption": str, "severity": int,
    "partition": str, "pretrain_epochs": int, "seed": int, "out": str, "cache_dir": str, "input_size": int,
}
HELP = {
    "lora_mode": f"one of {', '.join(LORA_MODES)}",
    "taskedge_mask": f"one of {', '.join(TASKEDGE_MASKS)}: each client's own mask, or one mask the server builds",
    "budget_policy": f"one of {', '.join(BUDGET_POLICIES)}",
    "upload_codec": f"one of {', '.join(CODECS)}", "fleet": "fleet TOML file (default: a mixed fleet)",
    "clients_per_round": "clients sampled per round (0: all)", "max_flops_per_round": "per-client FLOP budget per round (0: none)",
}


def add_run_options(parser, default_out: str = "runs/latest") -> None:
    parser.add_argument("--config", help="TOML file of run settings (flat keys, as in RunConfig)")
    for name, kind in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=positive_int if kind is int and name not in ("seed", "clients_per_round") else kind,
                            help=HELP.get(name))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other run setting")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    parser.set_defaults(default_out=default_out)


def config_from_args(args, **forced) -> RunConfig:
    values: dict = {"out": args.default_out}
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
    values.update(forced)
    return RunConfig.from_mapping(values)


def register(subparsers) -> None:
    parser = subparsers.add_parser("simulate", help="simulate a fleet of edge devices (Flower on Ray)")
    add_run_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import run_table

    cfg = config_from_args(args)
    summary = run_fleet(cfg, verbose=args.verbose)
    print(run_table(summary))
    print(f"\nwrote {Path(cfg.out).resolve()}/ (clients.jsonl, rounds.jsonl, summary.json, plots)", file=sys.stderr)
    return 0


