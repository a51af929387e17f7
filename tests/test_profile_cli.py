"""`fedpeft profile`: the JSON contract, tables, CSV, and one-line errors with exit code 2."""
import csv
import json
import os
import subprocess
import sys

import pytest

from fedpeft.cli import main

SIX = ("fft", "bn_head", "lora", "dora", "galore", "taskedge")
CATEGORIES = {"parameter", "buffer", "gradient", "activation", "temporary", "optimizer_state", "other"}
# The torchvision import shim (fedpeft/_torchvision_compat.py) warns once per process on this
# machine; filter exactly that warning so stderr holds only what the command itself says.
PYTHON = [sys.executable, "-W", "ignore:torchvision's C++ ops:RuntimeWarning", "-m", "fedpeft"]


def run_cli(*args, timeout=300):
    return subprocess.run([*PYTHON, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def check_contract(obj, method):
    assert obj["model"] == "mobilenet_v2" and obj["method"] == method
    for key in ("params_total", "params_trainable", "payload_bytes"):
        assert isinstance(obj[key], int) and obj[key] > 0, key
    mem = obj["memory"]
    assert isinstance(mem["peak_bytes"], int) and mem["peak_bytes"] > 0
    assert set(mem["by_category"]) == CATEGORIES and set(mem["category_max"]) == CATEGORIES
    assert sum(mem["by_category"].values()) == mem["peak_bytes"]
    assert all(isinstance(v, int) for v in [*mem["by_category"].values(), *mem["category_max"].values()])
    flops = obj["flops"]
    assert set(flops) >= {"forward", "backward", "optimizer", "total"}
    assert all(isinstance(flops[k], int) and flops[k] > 0 for k in ("forward", "backward", "optimizer", "total"))
    assert flops["total"] == flops["forward"] + flops["backward"] + flops["optimizer"]
    traffic = obj["traffic"]  # bytes moved per phase (fedpeft/profiling/traffic.py), for the roofline
    assert all(isinstance(traffic[k], int) and traffic[k] > 0 for k in ("forward", "backward", "optimizer", "total"))
    assert traffic["total"] == traffic["forward"] + traffic["backward"] + traffic["optimizer"] == sum(traffic["bucket_bytes"])


@pytest.mark.slow
def test_json_contract_for_all_six_methods(tmp_path):
    for method in SIX:
        proc = run_cli("profile", "--model", "mobilenet_v2", "--method", method, "--rank", "4",
                       "--input-size", "32", "--batch-size", "8", "--num-classes", "10",
                       "--format", "json", "--cache-dir", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        check_contract(json.loads(proc.stdout), method)


def test_matrix_json_table_and_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_csv = tmp_path / "costs.csv"
    common = ["--models", "mobilenet_v2", "--methods", "fft,lora", "--cache-dir", str(tmp_path)]
    assert main(["profile", *common, "--format", "json", "--csv", str(out_csv)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in results] == ["fft", "lora"]
    for r in results:
        check_contract(r, r["method"])
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["method"] for r in rows] == ["fft", "lora"]
    assert int(rows[0]["flops_backward_paper"]) > int(rows[0]["flops_backward_exact"])
    assert not (tmp_path / "profile_matrix.csv").exists()  # --csv given: only there

    assert main(["profile", *common]) == 0  # served from the cache this time
    captured = capsys.readouterr()
    table = captured.out
    assert "fft" in table and "lora" in table and "peak mem" in table
    # without --csv a matrix run still writes its CSV, to ./profile_matrix.csv, and says so
    default_csv = tmp_path / "profile_matrix.csv"
    assert [r["method"] for r in csv.DictReader(open(default_csv))] == ["fft", "lora"]
    assert "profile_matrix.csv" in captured.err and str(tmp_path) in captured.err

    default_csv.unlink()
    assert main(["profile", "--model", "mobilenet_v2", "--method", "lora", "--cache-dir", str(tmp_path)]) == 0
    detail = capsys.readouterr().out
    for word in ("optimizer_state", "activation", "forward", "backward", "payload", "(cached)"):
        assert word in detail
    assert not default_csv.exists()  # a single profile writes no CSV unless asked


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope"], "model"),
    (["--method", "nope"], "method"),
    (["--models", "mobilenet_v2,nope"], "nope"),
    (["--batch-size", "0"], "batch-size"),
    (["--batch-size", "-2"], "batch-size"),
    (["--input-size", "0"], "input-size"),
    (["--input-size", "8"], "input_size"),
    (["--input-size", "32", "--batch-size", "1", "--method", "fft"], "batch_size"),
    (["--rank", "0"], "rank"),
    (["--model", "a", "--models", "b"], "model"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path, capsys):
    try:
        code = main(["profile", *args, "--cache-dir", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedpeft") and needle in lines[0]


def test_bad_input_in_a_real_process(tmp_path):
    proc = run_cli("profile", "--model", "mobilenet_v2", "--input-size", "8", "--cache-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "input_size" in lines[0] and "32" in lines[0]
