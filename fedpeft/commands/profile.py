"""`fedpeft profile`: memory by category, FLOPs and payload of one training step.

    fedpeft profile --model mobilenet_v2 --method lora --rank 4 --format json
    fedpeft profile --models mobilenet_v2,resnet18 --methods fft,lora --csv costs.csv

A matrix run (more than one (model, method) pair) always writes a CSV: --csv FILE, else
`profile_matrix.csv` in the current directory; stderr says where.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from fedpeft import cli_options as opts
from fedpeft.cli_options import positive_int
from fedpeft.errors import UsageError
from fedpeft.names import FLOP_CONVENTIONS, METHOD_NAMES, MODEL_NAMES

DEFAULT_MATRIX_CSV = "profile_matrix.csv"
CATEGORY_ORDER = ("parameter", "buffer", "gradient", "activation", "temporary", "optimizer_state", "other")


def register(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="memory, FLOPs and payload of one training step of a method")
    parser.add_argument("--model", help=f"model to profile, {opts.one_of(MODEL_NAMES)} (default mobilenet_v2)")
    parser.add_argument("--models", help="comma-separated models: profile every (model, method) pair (default none)")
    parser.add_argument("--method", help=f"method to profile, {opts.one_of(METHOD_NAMES)} (default lora)")
    parser.add_argument("--methods", help="comma-separated methods: profile every (model, method) pair (default none)")
    opts.add_method_hparams(parser)
    parser.add_argument("--input-size", type=positive_int, default=32, help=opts.INPUT_SIZE_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batch size (default 8)")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classifier outputs (default 10)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help=opts.FORMAT_HELP)
    parser.add_argument("--flop-convention", choices=list(FLOP_CONVENTIONS), default="exact",
                        help="exact: groups-aware conv backward; paper: PyTorch's stock count as in the seed paper "
                             "(default exact)")
    parser.add_argument("--csv", metavar="FILE",
                        help=f"also write one CSV row per (model, method) (default none; a matrix run writes "
                             f"./{DEFAULT_MATRIX_CSV})")
    parser.add_argument("--cache-dir", help=opts.CACHE_DIR_HELP)
    parser.add_argument("--no-cache", action="store_true",
                        help="profile again, neither reading nor writing the cache (default off: use the cache)")
    opts.add_device(parser)
    parser.set_defaults(func=run)


def _names(single: str | None, many: str | None, default: str, what: str) -> list[str]:
    if single and many:
        raise UsageError(f"{what}: give --{what} or --{what}s, not both")
    if many is not None:
        names = [n.strip() for n in many.split(",") if n.strip()]
        if not names:
            raise UsageError(f"{what}s: expected a comma-separated list, got {many!r}")
        return names
    return [single or default]


def hparams_from_args(args) -> dict:
    return {k: v for k, v in {"rank": args.rank, "alpha": args.alpha, "density": args.density, "nm": args.nm}.items()
            if v is not None}


def run(args) -> int:
    from fedpeft.errors import choice

    models = _names(args.model, args.models, "mobilenet_v2", "model")
    methods = _names(args.method, args.methods, "lora", "method")
    for m in models:
        choice("model", m, MODEL_NAMES)
    for m in methods:
        choice("method", m, METHOD_NAMES)

    from fedpeft.profiling import profile_step  # torch, peft: only once the names are known good

    hparams = hparams_from_args(args)
    results = []
    for model in models:
        for method in methods:
            cost = profile_step(model, method, hparams, args.input_size, args.batch_size, args.num_classes,
                                convention=args.flop_convention, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                device=args.device)
            results.append(cost.to_dict())
    csv_path = Path(args.csv) if args.csv else (Path(DEFAULT_MATRIX_CSV) if len(results) > 1 else None)
    if csv_path is not None:
        write_csv(results, csv_path)
    if args.format == "json":
        print(json.dumps(results[0] if len(results) == 1 else results, indent=None))
    elif len(results) == 1:
        print(detail_table(results[0]))
    else:
        print(matrix_table(results))
    if csv_path is not None:
        print(f"wrote {csv_path.resolve() if not args.csv else csv_path} ({len(results)} rows)", file=sys.stderr)
    return 0


# -- output ------------------------------------------------------------------------------------

def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def human_flops(n: int) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


def detail_table(r: dict) -> str:
    mem, flops = r["memory"], r["flops"]
    pct = 100 * r["params_trainable"] / max(1, r["params_total"])
    lines = [
        f"model / method    {r['model']} / {r['method']}  ({', '.join(f'{k}={v}' for k, v in r['hparams'].items())})",
        f"input             batch {r['batch_size']} x 3 x {r['input_size']} x {r['input_size']}, {r['num_classes']} classes, {r['dtype']}"
        f"{'' if r.get('device', 'cpu') == 'cpu' else ', on ' + r['device']}",
        f"parameters        {r['params_trainable']:,} trainable of {r['params_total']:,} ({pct:.2f}%)",
        f"payload           {r['payload_bytes']:,} B ({human_bytes(r['payload_bytes'])})",
        *([f"mask density      {r['realised_density']:.4%} realised ({r['hparams']['density']:.4%} requested)"]
          if "realised_density" in r else []),
        "",
        f"memory            {'at peak':>14} {'own max':>14}",
    ]
    for cat in CATEGORY_ORDER:
        lines.append(f"  {cat:<15} {human_bytes(mem['by_category'][cat]):>14} {human_bytes(mem['category_max'][cat]):>14}")
    lines.append(f"  {'total':<15} {human_bytes(mem['peak_bytes']):>14} {human_bytes(mem['category_max_sum']):>14}")
    lines.append("  (at peak: breakdown at the true peak; own max: each category's maximum, the seed paper's sum)")
    lines += [
        "",
        f"FLOPs per step ({r['flop_convention']} convention)",
        f"  forward         {flops['forward']:>16,}  {human_flops(flops['forward'])}",
        f"  backward        {flops['backward']:>16,}  {human_flops(flops['backward'])}",
        f"  optimizer       {flops['optimizer']:>16,}  {human_flops(flops['optimizer'])}",
        f"  total           {flops['total']:>16,}  {human_flops(flops['total'])}",
        "",
        f"profiled in {r['profile_seconds']} s{' (cached)' if r['cached'] else ''}",
    ]
    return "\n".join(lines)


def matrix_table(results: list[dict]) -> str:
    head = f"{'model':<20} {'method':<14} {'trainable':>10} {'payload':>11} {'peak mem':>11} {'max-sum mem':>11} {'fwd':>11} {'bwd':>11} {'opt':>11} {'total':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        m, f = r["memory"], r["flops"]
        lines.append(
            f"{r['model']:<20} {r['method']:<14} {r['params_trainable']:>10,} {human_bytes(r['payload_bytes']):>11} "
            f"{human_bytes(m['peak_bytes']):>11} {human_bytes(m['category_max_sum']):>11} "
            f"{human_flops(f['forward']):>11} {human_flops(f['backward']):>11} {human_flops(f['optimizer']):>11} {human_flops(f['total']):>11}"
        )
    lines.append(f"(FLOPs: {results[0]['flop_convention']} convention; batch {results[0]['batch_size']}, input {results[0]['input_size']})")
    return "\n".join(lines)


def csv_row(r: dict) -> dict:
    row = {k: r[k] for k in ("model", "method", "input_size", "batch_size", "num_classes", "dtype", "flop_convention",
                             "params_total", "params_trainable", "payload_bytes")}
    row["hparams"] = json.dumps(r["hparams"], sort_keys=True)
    row["peak_bytes"] = r["memory"]["peak_bytes"]
    for cat in CATEGORY_ORDER:
        row[f"peak_{cat}"] = r["memory"]["by_category"][cat]
    for cat in CATEGORY_ORDER:
        row[f"max_{cat}"] = r["memory"]["category_max"][cat]
    row["category_max_sum"] = r["memory"]["category_max_sum"]
    for conv, flops in sorted(r["flops_by_convention"].items()):
        for part in ("forward", "backward", "optimizer", "total"):
            row[f"flops_{part}_{conv}"] = flops[part]
    row["realised_density"] = r.get("realised_density", "")  # TaskEdge only
    row["profile_seconds"] = r["profile_seconds"]
    return row


def write_csv(results: list[dict], path: Path) -> None:
    rows = [csv_row(r) for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
