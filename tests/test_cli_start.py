"""Fast start (issue 11 item 7): `fedpeft --help`, `fedpeft devices`, every `--help` and every bad
argument answer without importing torch, Flower or Ray. Each case runs in a fresh interpreter and
reports which heavy packages ended up in sys.modules. (Timings: experiments/benchmarks/cli_start.py.)"""
import json
import os
import subprocess
import sys

import pytest

from fedpeft import names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "torchvision", "flwr", "ray", "peft", "transformers", "galore_torch", "bitsandbytes")
COMMANDS = ("compare", "demo", "devices", "finetune", "pretrain", "profile", "simulate")

# Runs fedpeft's main in this interpreter, then prints its exit code and the heavy top-level
# packages imported on the way.
PROBE = f"""
import json, sys
from fedpeft.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))}}))
"""


def probe(argv, cwd):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def bad_inputs(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("rounds = [")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[group]]\ndevice = "nope"\ncount = 1\n')
    return [
        ["finetune", "--model", "vgg"],
        ["finetune", "--rank", "0"],
        ["finetune", "--method", "taskedge", "--nm", "4:2"],
        ["pretrain", "--severity", "9"],
        ["profile", "--model", "vgg"],
        ["profile", "--models", "resnet18", "--model", "resnet18"],
        ["profile", "--batch-size", "0"],
        ["simulate", "--lora-mode", "mean"],
        ["simulate", "--set", "colour=red"],
        ["simulate", "--num-clients", "-3"],
        ["simulate", "--num-clients", "200", "--clients-per-round", "500"],
        ["simulate", "--set", "aggregator=median", "--method", "taskedge"],
        ["simulate", "--config", str(bad_toml)],
        ["simulate", "--fleet", str(fleet)],
        ["compare", "--methods", "fft,nope"],
        ["demo", "--rounds", "0"],
        ["devices", "--fleet", str(tmp_path / "missing.toml")],
        ["nonsense"],
    ]


@pytest.mark.parametrize("argv", [["--help"], ["devices"], ["devices", "--format", "json"]]
                         + [[c, "--help"] for c in COMMANDS])
def test_help_and_devices_import_no_heavy_package(argv, tmp_path):
    result, _ = probe(argv, tmp_path)
    assert result["code"] == 0
    assert result["heavy"] == [], f"fedpeft {' '.join(argv)} imported {result['heavy']}"


def test_bad_input_errors_import_no_heavy_package(tmp_path):
    for argv in bad_inputs(tmp_path):
        result, err = probe(argv, tmp_path)
        assert result["code"] == 2, (argv, err)
        assert err.count("\n") == 1 and "error:" in err, (argv, err)
        assert result["heavy"] == [], f"fedpeft {' '.join(argv)} imported {result['heavy']} before: {err.strip()}"


def test_cheap_names_equal_the_real_registries():
    from fedpeft.data.corruptions import CORRUPTIONS, SEVERITIES
    from fedpeft.data.datasets import DATASETS
    from fedpeft.data.partition import SCHEMES
    from fedpeft.data.tasks import TASKS
    from fedpeft.methods import METHODS
    from fedpeft.methods.taskedge import DEFAULT_DENSITY, DEFAULT_LORA_DENSITY
    from fedpeft.models import MODELS
    from fedpeft.profiling.flops import CONVENTIONS

    assert names.MODEL_NAMES == tuple(MODELS)
    assert names.METHOD_NAMES == tuple(METHODS)
    assert names.CORRUPTION_NAMES == tuple(CORRUPTIONS)
    assert names.SEVERITIES == tuple(SEVERITIES)
    assert names.PARTITION_SCHEMES == tuple(SCHEMES)
    assert names.TASK_NAMES == tuple(TASKS)
    assert names.DATASET_NAMES == tuple(DATASETS)
    assert names.FLOP_CONVENTIONS == tuple(CONVENTIONS)
    assert (names.TASKEDGE_DENSITY, names.TASKEDGE_LORA_DENSITY) == (DEFAULT_DENSITY, DEFAULT_LORA_DENSITY)
