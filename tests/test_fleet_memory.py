"""experiments/benchmarks/fleet_memory.py: the sampler and the verdict (fast), and the small case
end to end (slow: pre-training into a fresh cache plus two Ray simulations, a few minutes on 2 cores)."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "fleet_memory.py"
MIB = 1024 * 1024


def load_script():
    spec = importlib.util.spec_from_file_location("fleet_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fm = load_script()


def fake_run(n, tree_mib=1000, driver_mib=500, rounds=2, ok=5, survivors=()):
    return {"num_clients": n, "rounds_planned": 2, "rounds_completed": rounds, "clients_ok": ok,
            "peak_tree_rss_bytes": tree_mib * MIB, "peak_driver_rss_bytes": driver_mib * MIB,
            "survivors_in_driver": list(survivors), "survivors_after_exit": []}


def test_verdict_can_fail():
    assert fm.compare(fake_run(4), fake_run(40, tree_mib=1400))["ok"]
    grew = fm.compare(fake_run(4), fake_run(40, tree_mib=1600))
    assert not grew["ok"] and not grew["within_limit"] and grew["ratio_tree"] == 1.6
    assert not fm.compare(fake_run(4), fake_run(40, rounds=1))["ok"]
    assert not fm.compare(fake_run(4, ok=0), fake_run(40))["ok"]
    assert not fm.compare(fake_run(4), fake_run(40, survivors=[{"pid": 1}]))["ok"]


def test_scale_verdict_checks_the_peak_and_the_wall_time():
    small, large = fake_run(50) | {"wall_s": 100.0}, fake_run(1000) | {"wall_s": 129.0}
    assert fm.compare_scale(small, large)["ok"] and fm.compare_scale(small, large)["ratio_wall"] == 1.29
    slow = fm.compare_scale(small, large | {"wall_s": 131.0})
    assert not slow["ok"] and "wall time" in slow["problems"][0]
    big = fm.compare_scale(fake_run(50, tree_mib=3000) | {"wall_s": 100.0}, fake_run(1000, tree_mib=4096) | {"wall_s": 100.0})
    assert not big["ok"] and "tree peak" in big["problems"][0]


def test_sampler_sums_children_and_sees_them_go():
    hold = 100 * MIB
    child = subprocess.Popen([sys.executable, "-c", f"b = b'x' * {hold}; import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).memory_info().rss < hold and time.monotonic() < deadline:
            time.sleep(0.1)
        with fm.TreeSampler(interval=0.05) as sampler:
            time.sleep(0.5)
        assert sampler.samples >= 3
        assert sampler.max_processes >= 2
        assert sampler.peak_tree >= sampler.peak_root + hold
        assert [p["pid"] for p in sampler.alive()] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert sampler.alive() == []


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet_memory")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_CACHE", str(cache))
        report = fm.run_benchmark(small=True, out=root / "fleet_memory.json", runs_dir=root / "runs",
                                  cache_dir=str(cache), timeout_s=900)
    print(fm.table(report))
    return report, root


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_small_fleet_memory_is_flat(small_report):
    report, root = small_report
    assert json.loads((root / "fleet_memory.json").read_text())["ratio_tree"] == report["ratio_tree"]
    small, large = report["runs"]
    assert (small["num_clients"], large["num_clients"]) == (4, 40)
    for run in report["runs"]:
        # the runs completed: every round, with client updates in each
        assert run["rounds_completed"] == run["rounds_planned"] == 2, run
        assert run["clients_ok"] > 0 and len(run["clients_ok_per_round"]) == 2, run
        assert all(n > 0 for n in run["clients_ok_per_round"]), run
        assert (Path(run["run_dir"]) / "summary.json").is_file()
        # the tree was measured (driver plus Ray's processes), not just the driver
        assert run["max_processes"] >= 3 and run["samples"] >= 10, run
        assert run["peak_tree_rss_bytes"] > run["peak_driver_rss_bytes"] > 0, run
        # Ray shut down: nothing seen in the tree outlived the run or the subprocess
        assert run["survivors_in_driver"] == [], run["survivors_in_driver"]
        assert run["survivors_after_exit"] == [], run["survivors_after_exit"]
    assert report["ratio_tree"] <= fm.LIMIT, fm.table(report)
    assert report["ratio_driver"] <= fm.LIMIT, fm.table(report)
    assert report["ok"], report["problems"]
