"""`fedpeft demo`: the README's first command. A fleet of 10 mixed edge devices adapts a
MobileNetV2, pre-trained on clean handwritten digits, to impulse-noise digits with LoRA over a
few rounds, then prints the cost table. Everything is offline."""
from __future__ import annotations

from fedpeft.commands import simulate


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the offline demo: 10 edge devices, LoRA, digits under impulse noise")
    simulate.add_run_options(parser, default_out="runs/demo", overwrite=True)
    # The demo's directory is its own: a second `make demo` replaces it instead of refusing.
    parser.set_defaults(func=simulate.run, overwrite=True)
