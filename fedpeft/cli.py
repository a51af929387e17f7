"""The `fedpeft` command. Each subcommand lives in its own module under fedpeft/commands/ and
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"fedpeft {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fedpeft: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
