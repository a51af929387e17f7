"""`fedpeft devices`: list the device catalog (or the clients of a fleet file)."""
from __future__ import annotations

import json
import sys

from fedpeft.cli_options import FORMAT_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "devices", help="list the device catalog",
        description="List the edge-device catalog (RAM for training, sustained FLOP/s, link rates, power, "
                    "availability). With --fleet, list the clients a fleet file defines.")
    parser.add_argument("--format", choices=["table", "json"], default="table", help=FORMAT_HELP)
    parser.add_argument("--catalog", metavar="PATH", default=None,
                        help="a catalog TOML instead of the packaged one (default: fedpeft/devices.toml)")
    parser.add_argument("--fleet", metavar="PATH", default=None,
                        help="list the clients of this fleet file instead (default none: the catalog)")
    parser.set_defaults(func=run)


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _row(device) -> list[str]:
    return [
        device.name,
        device.kind,
        _human_bytes(device.ram_train_bytes),
        f"{device.flops_per_s / 1e9:.3g}",
        f"{device.uplink_bps / 1e6:.3g}",
        f"{device.downlink_bps / 1e6:.3g}",
        f"{device.power_w:.3g}",
        f"{device.availability:.2f}",
    ]


_HEADER = ["device", "kind", "ram_train", "GFLOP/s", "up Mbit/s", "down Mbit/s", "power W", "avail"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    from fedpeft.devices import load_catalog, load_fleet

    catalog = load_catalog(args.catalog)
    if args.fleet:
        clients = load_fleet(args.fleet, catalog=catalog)
        if args.format == "json":
            json.dump([c.to_dict() for c in clients], sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            rows = [[str(c.client_id)] + _row(c.device) + [",".join(sorted(c.overrides)) or "-"] for c in clients]
            sys.stdout.write(_table(["client"] + _HEADER + ["overrides"], rows) + "\n")
        return 0
    if args.format == "json":
        json.dump({name: d.to_dict() for name, d in catalog.items()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        rows = [_row(d) + [d.description] for d in catalog.values()]
        sys.stdout.write(_table(_HEADER + ["description"], rows) + "\n")
        sys.stdout.write("ram_train = RAM left for training tensors; GFLOP/s = sustained fp32 training; "
                         "sources and estimates: fedpeft/devices.toml\n")
    return 0
