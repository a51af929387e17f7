"""`fedpeft compare`: the same fleet once per method, side by side."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from fedpeft.commands.simulate import add_run_options, config_from_args
from fedpeft.errors import choice
from fedpeft.names import METHOD_NAMES


def register(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="run the same fleet per method and compare costs")
    parser.add_argument("--methods", default="fft,bn_head,lora,dora,galore,taskedge",
                        help=f"comma-separated methods, each {', '.join(METHOD_NAMES)} "
                             "(default fft,bn_head,lora,dora,galore,taskedge)")
    add_run_options(parser, default_out="runs/compare")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fedpeft.fleet.runlog import check_out_dir

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        choice("methods", m, METHOD_NAMES)
    base = config_from_args(args, method=methods[0])
    out = Path(base.out)
    for method in methods:  # every run directory checked before the first run starts
        check_out_dir(out / method, overwrite=base.overwrite)

    from fedpeft.fleet.simulation import run_fleet
    from fedpeft.report import compare, compare_table

    run_dirs = {}
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {method}", file=sys.stderr)
        cfg = replace(base, method=method, out=str(out / method))
        run_fleet(cfg, verbose=args.verbose)
        run_dirs[method] = out / method
    rows = compare(run_dirs, out)
    print(compare_table(rows))
    print(f"\nwrote {out.resolve()}/ (compare.csv, compare.json, compare.png, one run dir per method)", file=sys.stderr)
    return 0
