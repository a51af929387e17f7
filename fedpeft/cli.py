"""The `fedpeft` command. Each subcommand lives in its own module under fedpeft/commands/ and
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import threading
import time

from fedpeft.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block before an error; users asked for one clear line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedpeft", description="Federated edge fine-tuning simulator.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    import fedpeft.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fedpeft.commands.{info.name}")
        module.register(subparsers)
    return parser


def quiet_known_warnings() -> None:
    """Dependency notices that say nothing to a fedpeft user, hidden unless the user asked for
    warnings (`python -W ...`, PYTHONWARNINGS): the torchvision shim's note (a known, handled
    mismatch; README "Workarounds"). bitsandbytes' CPU notice is silenced in fedpeft/__init__.py,
    Flower's run_simulation notice in fedpeft/fleet/simulation.py."""
    if sys.warnoptions:
        return
    import warnings

    from fedpeft._torchvision_compat import TorchvisionOpsWarning

    warnings.filterwarnings("ignore", category=TorchvisionOpsWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"fedpeft {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fedpeft: interrupted\n")
        exit_if_threads_linger(130)
        return 130


def exit_if_threads_linger(code: int, grace_s: float = 5.0) -> None:
    """After Ctrl-C in a simulation, Flower's runtime worker threads (not daemons) can stay blocked
    in a call to a Ray actor that Ray's shutdown already killed, and the interpreter would wait for
    them forever. Our own work is done and flushed by then: give them `grace_s`, then exit."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
