"""Crash-safe runs, through the real CLI and a real Flower simulation on Ray: a run SIGKILLed
mid-way resumes to exactly the adapter and logs of an uninterrupted run; Ctrl-C stops a run the
first time; a run directory is never silently overwritten."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpeft.fleet import deploy

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"wall_s", "node_id", "compute_wall_s", "worker_node"}  # what differs between two runs of one seed (worker_node: the Ray node id)


def fedpeft(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", *args]


def run_args(out: Path, cache: Path, rounds: int = 4) -> list[str]:
    return ["simulate", "--model", "mobilenet_v2_035", "--num-clients", "3", "--clients-per-round", "2",
            "--rounds", str(rounds), "--pretrain-epochs", "1", "--out", str(out), "--cache-dir", str(cache)]


def error_lines(stderr: str) -> list[str]:  # the torchvision shim's one warning line is not an error
    return [line for line in stderr.splitlines() if line.strip() and "RuntimeWarning" not in line]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def start(argv: list[str], log: Path) -> deploy.Proc:
    handle = open(log, "w")
    popen = subprocess.Popen(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=deploy.flower_env())
    return deploy.Proc.from_popen("fedpeft", popen, log_path=log)


def wait_for_rounds(proc: deploy.Proc, rounds_file: Path, count: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.refresh()  # remember Ray's processes while the parent lives
        if rounds_file.is_file() and len(rounds_file.read_text().splitlines()) >= count:
            return
        assert proc.is_running(), proc.read_log()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {count} rounds within {timeout} s: {proc.read_log()[-3000:]}")


@pytest.fixture
def tracked():
    procs: list[deploy.Proc] = []
    yield procs
    for proc in reversed(procs):
        deploy.stop(proc)
    left = [pid for proc in procs for pid in proc.pids()]
    assert not left, f"processes left: {left}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_run_killed_after_round_2_resumes_to_the_uninterrupted_result(tmp_path, tracked):
    cache = tmp_path / "cache"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(fedpeft(*run_args(whole, cache)), cwd=ROOT, capture_output=True, text=True,
                          env=deploy.flower_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = start(fedpeft(*run_args(killed, cache)), tmp_path / "killed.log")
    tracked.append(proc)
    wait_for_rounds(proc, killed / "rounds.jsonl", 3)  # rounds 0, 1, 2 written
    proc.refresh()
    os.kill(proc.pid, signal.SIGKILL)  # the server dies mid-run, without any chance to clean up
    proc.popen.wait(timeout=30)
    deploy.stop(proc)  # what the dead server left (Ray), by PID
    assert len(lines(killed / "rounds.jsonl")) < 5

    # A second plain run into the same directory is refused, with one line and exit 2.
    again = subprocess.run(fedpeft(*run_args(killed, cache)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr and len(error_lines(again.stderr)) == 1

    resumed = subprocess.run(fedpeft("simulate", "--resume", str(killed)), cwd=ROOT, capture_output=True, text=True,
                             env=deploy.flower_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(whole / "global_adapter.pt", weights_only=True)
    b = torch.load(killed / "global_adapter.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs"
    assert stable(lines(killed / "rounds.jsonl")) == stable(lines(whole / "rounds.jsonl"))
    clients_whole, clients_killed = lines(whole / "clients.jsonl"), lines(killed / "clients.jsonl")
    keys = [(r["round"], r["client_id"]) for r in clients_killed]
    assert len(keys) == len(set(keys)) == 8, keys  # 4 rounds x 2 clients, none duplicated or missing
    by_client = lambda records: sorted(stable(records), key=lambda r: (r["round"], r["client_id"]))  # noqa: E731
    assert by_client(clients_killed) == by_client(clients_whole)  # replies of one round arrive in any order


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_stops_a_run_the_first_time_and_keeps_its_logs(tmp_path, tracked):
    out = tmp_path / "run"
    proc = start(fedpeft(*run_args(out, tmp_path / "cache", rounds=20)), tmp_path / "run.log")
    tracked.append(proc)
    wait_for_rounds(proc, out / "rounds.jsonl", 2)
    proc.refresh()
    everything = proc.pids()
    os.kill(proc.pid, signal.SIGINT)  # one Ctrl-C
    assert proc.popen.wait(timeout=120) == 130, proc.read_log()[-3000:]
    deadline = time.monotonic() + 30
    while proc.pids() and time.monotonic() < deadline:  # Ray's processes wind down after the driver
        time.sleep(0.5)
    assert not proc.pids(), f"left after Ctrl-C: {proc.pids()} of {everything}"
    rounds = lines(out / "rounds.jsonl")  # still valid JSON lines
    assert 2 <= len(rounds) < 21 and torch.load(out / "checkpoint.pt", weights_only=True)["round"] == rounds[-1]["round"]


def test_out_is_checked_before_anything_starts(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    used = tmp_path / "used"
    used.mkdir()
    (used / "rounds.jsonl").write_text('{"round": 0}\n')
    for out, expected in ((a_file, "is a file"), (used, "--overwrite")):
        result = subprocess.run(fedpeft(*run_args(out, tmp_path / "cache")), cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(error_lines(result.stderr)) == 1, result.stderr
    result = subprocess.run(fedpeft("simulate", "--resume", str(tmp_path / "nothing")), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "no config.json" in result.stderr
