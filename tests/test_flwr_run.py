"""`flwr run .` end to end, through Flower's own processes on 127.0.0.1: a local simulation
federation and a deployed SuperLink with two SuperNodes. Every process a test starts is tracked
by PID and stopped by PID in a finalizer, even when the test fails."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import fields
from pathlib import Path

import psutil
import pytest

from fedpeft.fleet import deploy
from fedpeft.fleet.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": "mobilenet_v2_035", "pretrain-epochs": 1, "batch-size": 32}


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One pre-training cache for the module: the first run pre-trains, the next reuses it."""
    return tmp_path_factory.mktemp("fedpeft-cache")


@pytest.fixture
def started(request):
    """Register every Proc a test starts; the finalizer stops them all by PID (newest first) and
    checks that none of them, nor anything they spawned, is left."""
    procs: list[deploy.Proc] = []

    def finalize():
        pids = set()
        for proc in procs:
            proc.refresh()
            pids |= proc.pids()
        for proc in reversed(procs):
            deploy.stop(proc)
        left = _alive(pids)
        assert not left, f"processes left after stop(): {left}"

    request.addfinalizer(finalize)
    return procs


# -- fast checks ---------------------------------------------------------------------------------

def test_app_config_table_lists_every_run_config_field():
    """`--run-config` can only override keys in [tool.flwr.app.config] (Flower rejects others),
    and RunConfig rejects unknown keys: the table must be exactly RunConfig's fields."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields_ = {f.name.replace("_", "-") for f in fields(RunConfig)}
    assert set(table) - fields_ == set(), "keys RunConfig would reject"
    assert fields_ - set(table) == set(), "RunConfig fields `flwr run --run-config` cannot set"
    assert RunConfig.from_mapping(table).to_dict() == RunConfig().to_dict()  # same defaults


def test_flwr_config_is_what_flower_reads(tmp_path, monkeypatch):
    """Both kinds of connection, parsed by Flower's own reader."""
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    deploy.write_flwr_config(tmp_path, "local-sim", simulation_options={"num-supernodes": 3})
    conn = read_superlink_connection("local-sim")
    assert conn.address == ":local:"
    assert conn.options.num_supernodes == 3
    assert conn.options.backend.client_resources.num_cpus == 1
    assert conn.options.backend.client_resources.num_gpus == 0.0
    assert read_superlink_connection(None).name == "local-sim"  # also the default

    deploy.write_flwr_config(tmp_path, "edge", address="127.0.0.1:9999")
    conn = read_superlink_connection("edge")
    assert (conn.address, conn.insecure) == ("127.0.0.1:9999", True)
    with pytest.raises(ValueError):
        deploy.write_flwr_config(tmp_path, "bad name")


def test_fab_leaves_out_venv_runs_and_caches(tmp_path):
    """What `flwr run .` packs: the app's code, not .venv/, runs/ or caches. Flower 1.42 keeps
    .py/.toml/.md/.yaml/.json/.jsonl files, drops .venv/, __pycache__/, test_*.py and
    whatever the app's .gitignore ignores."""
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    for needed in ("pyproject.toml", "clients/client_app.py", "strategies/server_app.py", "fedpeft/devices.toml"):
        assert needed in names
    top = {name.split("/")[0] for name in names}
    assert not top & {".venv", "runs", ".fedpeft-cache", ".git", ".pytest_cache", "build"}
    assert not [n for n in names if n.startswith("tests/test_") or "__pycache__" in n]

    # The same rules on planted files: results and caches in ignored folders stay out.
    files = {".gitignore": (ROOT / ".gitignore").read_bytes(), "pyproject.toml": (ROOT / "pyproject.toml").read_bytes(),
             "clients/client_app.py": b"", "strategies/server_app.py": b"",
             ".venv/lib/python3.11/site-packages/x/__init__.py": b"", ".venv/pyvenv.toml": b"",
             "runs/latest/clients.jsonl": b"{}\n", "runs/latest/summary.json": b"{}",
             ".fedpeft-cache/tests/profile.json": b"{}", "fedpeft/__pycache__/x.py": b""}
    planted = zipfile.ZipFile(io.BytesIO(build_fab_from_files(files)[0])).namelist()
    assert sorted(planted) == [".info/CONTENT", "clients/client_app.py", "pyproject.toml", "strategies/server_app.py"]


def test_stop_ends_a_process_tree_by_pid(tmp_path, started):
    """stop() ends the process and its children (here one ignoring SIGTERM) by PID."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); time.sleep(120)")
    popen = subprocess.Popen([sys.executable, "-c", code])
    proc = deploy.Proc.from_popen("sleeper", popen)
    started.append(proc)
    deadline = time.monotonic() + 10
    while not proc.seen and time.monotonic() < deadline:  # wait for the child to exist
        time.sleep(0.1)
        proc.refresh()
    pids = proc.pids()
    assert len(pids) == 2
    deploy.stop(proc, timeout=2)
    assert _alive(pids) == []


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(420)
def test_flwr_run_local_simulation(tmp_path, cache_dir):
    """`flwr run .` on a local simulation federation: completes, writes the run log, and the
    detached SuperLink it leaves behind (and everything under it) is stopped."""
    home = tmp_path / "flwr-home"
    deploy.write_flwr_config(home, "local-sim", simulation_options={"num-supernodes": 3})
    out = tmp_path / "run"
    config = {**SMALL, "num-clients": 3, "rounds": 2, "out": str(out), "cache-dir": str(cache_dir)}
    result = deploy.run_flwr(ROOT, "local-sim", config, home, timeout=360)
    log = result.completed.stdout + result.completed.stderr
    assert result.completed.returncode == 0, log[-4000:]
    assert "Successfully started run" in log
    assert len(result.superlink_pids) == 1, "the detached local SuperLink was not found"
    assert _alive(result.pids) == [], "processes left behind by `flwr run`"

    lines = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["client_id"]) for r in lines) == [(r, c) for r in (1, 2) for c in range(3)]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(isinstance(r["accuracy"], float) and 0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    assert (out / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_flwr_run_deployed_superlink_and_two_supernodes(tmp_path, cache_dir, started):
    """A real SuperLink and two SuperNodes on 127.0.0.1, each SuperNode naming its device; each
    client trains as the device its node config names."""
    link = deploy.start_superlink(tmp_path / "superlink")
    started.append(link)
    devices = ["raspberry_pi_5", "jetson_orin_nano"]
    nodes = []
    for pid, device in enumerate(devices):
        node = deploy.start_supernode(link.address, {"partition-id": pid, "num-partitions": 2, "device": device},
                                      log_dir=tmp_path / "supernodes")
        started.append(node)
        nodes.append(node)
    home = tmp_path / "flwr-home"
    deploy.write_flwr_config(home, "edge", address=link.address)
    out = tmp_path / "run"
    config = {**SMALL, "num-clients": 2, "rounds": 1, "out": str(out), "cache-dir": str(cache_dir)}
    result = deploy.run_flwr(ROOT, "edge", config, home, timeout=360)
    log = result.completed.stdout + result.completed.stderr
    assert result.completed.returncode == 0, log[-4000:]
    assert result.superlink_pids == []  # a deployed SuperLink is ours to stop, not flwr's
    assert link.is_running() and all(n.is_running() for n in nodes)

    records = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert sorted((r["client_id"], r["device"], r["status"]) for r in records) == [
        (0, "raspberry_pi_5", "ok"), (1, "jetson_orin_nano", "ok")]
    # Each SuperNode's log names its node id; the run log must give that node the device its
    # own --node-config named.
    by_node = {r["node_id"]: r["device"] for r in records}
    for node, device in zip(nodes, devices):
        match = re.search(r"SuperNode ID: (\d+)", node.read_log())
        assert match, node.read_log()[-2000:]
        assert by_node[int(match.group(1))] == device
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["round"] == 1 and rounds[-1]["clients_ok"] == 2
