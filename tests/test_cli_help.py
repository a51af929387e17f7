"""Every option of every subcommand says its default and its allowed values in --help, and options
shared by several commands are spelled and explained the same way (issue 12 item 6)."""
import argparse

from fedpeft import names
from fedpeft.cli import build_parser
from fedpeft.fleet.config import AGGREGATORS, BUDGET_POLICIES, CODECS, LORA_MODES, STRAGGLER_POLICIES, TASKEDGE_MASKS

# Options whose values RunConfig or the command checks (not argparse): their help must list them.
ALLOWED = {
    "model": names.MODEL_NAMES, "method": names.METHOD_NAMES, "corruption": names.CORRUPTION_NAMES,
    "dataset": names.DATASET_NAMES, "task": names.TASK_NAMES, "partition": names.PARTITION_SCHEMES,
    "flop_convention": names.FLOP_CONVENTIONS, "lora_mode": LORA_MODES, "taskedge_mask": TASKEDGE_MASKS,
    "budget_policy": BUDGET_POLICIES, "upload_codec": CODECS, "aggregator": AGGREGATORS,
    "straggler_policy": STRAGGLER_POLICIES, "format": ("table", "json"),
}
# Flags several commands share: one help text everywhere.
SHARED = ("--rank", "--alpha", "--nm", "--input-size", "--cache-dir", "--seed", "--format", "--data-dir")


def commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def options(parser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action, (action.help or "").replace("%%", "%")


def test_every_option_shows_its_default_and_allowed_values():
    missing = []
    found = set()
    for name, parser in commands().items():
        for action, text in options(parser):
            flag = f"{name} {action.option_strings[0]}"
            if "default" not in text:
                missing.append(f"{flag}: no default in {text!r}")
            if action.nargs == 0:  # an on/off flag (--json, --overwrite): no value to choose
                allowed = []
            elif isinstance(action.choices, range):
                allowed = [f"{action.choices[0]}-{action.choices[-1]}"]
            else:
                allowed = list(action.choices or ALLOWED.get(action.dest, ()))
            found.add(action.dest) if action.dest in ALLOWED else None
            missing += [f"{flag}: allowed value {v!r} not in {text!r}" for v in allowed if str(v) not in text]
    assert not missing, "\n".join(missing)
    assert found == set(ALLOWED)  # every listed option exists somewhere (the check above ran on it)


def test_shared_options_read_the_same_in_every_command():
    texts: dict[str, dict[str, str]] = {}
    for name, parser in commands().items():
        for action, text in options(parser):
            for flag in action.option_strings:
                texts.setdefault(flag, {})[name] = text
    for flag in SHARED:
        assert len(texts[flag]) >= 2, flag
        assert len(set(texts[flag].values())) == 1, f"{flag} reads differently: {texts[flag]}"
    # the same option name never means an on/off flag in one command and a value in another
    for name, parser in commands().items():
        for action, _ in options(parser):
            for other, other_parser in commands().items():
                same = [a for a, _ in options(other_parser) if action.option_strings[0] in a.option_strings]
                assert all((a.nargs == 0) == (action.nargs == 0) for a in same), (name, other, action.option_strings)


def test_help_renders_for_every_command(capsys):
    for name, parser in commands().items():
        parser.print_help()
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fedpeft {name}") and "(default" in out
