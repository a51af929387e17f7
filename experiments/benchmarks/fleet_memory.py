"""Peak memory of a simulated fleet as the number of virtual clients grows.

    .venv/bin/python experiments/benchmarks/fleet_memory.py [--small | --scale] [--out runs/benchmarks/fleet_memory.json]

Runs the same fleet configuration (mobilenet_v2_035, 10 clients sampled per round, 3 rounds)
with 20 and with 200 virtual clients and compares the peak resident memory of the whole process
tree: the driver (Flower's ServerApp and simulation engine) plus every process below it (Ray's
GCS, raylet, and the Ray workers that train the clients). Virtual clients keep no state between
rounds, so the peak should not grow with the number of clients: the check is that 200 clients
need at most 1.5x the memory of 20.

How it measures:
  * The pre-trained checkpoint is built (or found in the cache) first, in this process, so
    pre-training never counts.
  * Each configuration runs in a fresh subprocess (this script with --one N), so Ray starts
    clean and the driver's own memory owes nothing to the previous run.
  * In that subprocess a background thread samples every 0.2 s: the RSS of the driver and of
    each process in psutil's Process().children(recursive=True), summed per sample; the
    maximum sum is the tree peak, the driver's maximum is reported apart. Every process the
    subprocess starts also carries a unique environment tag, and about once a second the
    sampler looks for tagged processes outside the tree: when Ray shuts down, its workers are
    orphaned (re-parented to init) for a few seconds before they exit, and they still count
    (listed as escaped_tree in the JSON).
  * After the run, every process seen in the tree must be gone within 15 s (Ray shut down;
    teardown_s says how long it took), and once the subprocess has exited no tagged process may
    be left; any survivor is reported (and then killed by pid, so a failed run leaves nothing).
Summed RSS counts shared pages (libraries, Ray's object store) once per process that maps
them, so it overstates the true footprint; it is the same overstatement at both sizes.

--small: 4 vs 40 clients, 4 per round, 2 rounds (what tests/test_fleet_memory.py runs).
--scale: 50 vs 1000 clients, 50 per round, 3 rounds (issue 11): the 1000-client tree must peak
under 4 GiB and its wall time (run_fleet, from config to summary) stay within 1.3x of the
50-client fleet's; both ratios are printed. With the default digits data a 1000-client fleet's
partitions hold 1-2 examples (one small step each), the 50-client fleet's about 27.
Writes a JSON file with both runs, the ratios and the verdict; exits 1 when a run did not
complete, a process survived, or the tree peak grew by more than 1.5x.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MIB = 1024 * 1024
LIMIT = 1.5
TAG_VAR = "FEDPEFT_FLEET_MEMORY_TAG"
RESULT_PREFIX = "FLEET_MEMORY_RESULT "

FULL = {"sizes": (20, 200), "clients_per_round": 10, "rounds": 3}
SMALL = {"sizes": (4, 40), "clients_per_round": 4, "rounds": 2}
SCALE = {"sizes": (50, 1000), "clients_per_round": 50, "rounds": 3}
SCALE_PEAK_BYTES = 4 * 1024 ** 3  # the 1000-client tree's peak must stay under this
SCALE_WALL_LIMIT = 1.3  # 1000-client wall time / 50-client wall time
DEFAULTS = {"model": "mobilenet_v2_035", "pretrain_epochs": 1, "batch_size": 32}


# --------------------------------------------------------------------------- sampling

def _tagged(tag: str, exclude: set[int] = frozenset()) -> list[psutil.Process]:
    """Live processes whose environment carries `tag` (same user only; others are unreadable)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude:
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


class TreeSampler:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, tag: str | None = None, scan_every: int = 5):
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.tag = tag
        self.scan_every = scan_every  # the (slower) scan for tagged processes, every n samples
        self.peak_tree = 0
        self.peak_root = 0
        self.peak_processes = 0  # processes in the sample that set the tree peak
        self.max_processes = 0
        self.at_peak: list[tuple[str, int]] = []  # (name, rss) of each process in the peak sample
        self.samples = 0
        self.seen: dict[tuple[int, float], str] = {}  # (pid, create_time) -> name
        self.escaped: dict[tuple[int, float], str] = {}  # tagged, alive, but not below root
        self._t0 = time.monotonic()
        self._extra: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look, so a very short run still has a sample

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        below = {p.pid for p in procs}
        if self.tag and self.samples % self.scan_every == 0:
            for proc in _tagged(self.tag, exclude=below):
                try:  # born after the listing above, still below root: counted from the next sample on
                    if self.root.pid in {parent.pid for parent in proc.parents()}:
                        continue
                except psutil.Error:
                    continue
                self._extra.setdefault(proc.pid, proc)
        procs += [p for pid, p in self._extra.items() if pid not in below]
        total, counted, root_rss, parts = 0, 0, 0, []
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                key = (proc.pid, proc.create_time())
                self.seen.setdefault(key, proc.name())
            except (psutil.Error, OSError):
                continue  # exited (or became a zombie) between listing and reading
            if proc.pid not in below and key not in self.escaped:
                try:
                    ppid = proc.ppid()
                except psutil.Error:
                    ppid = None
                self.escaped[key] = f"{self.seen[key]} (pid {proc.pid}, ppid {ppid}, at {time.monotonic() - self._t0:.1f} s)"
            total += rss
            counted += 1
            parts.append((self.seen[key], rss))
            if proc.pid == self.root.pid:
                root_rss = rss
        self.samples += 1
        self.max_processes = max(self.max_processes, counted)
        self.peak_root = max(self.peak_root, root_rss)
        if total > self.peak_tree:
            self.peak_tree, self.peak_processes, self.at_peak = total, counted, parts

    def alive(self) -> list[dict]:
        """Processes seen in the tree (the root aside) that still run."""
        out = []
        for (pid, created), name in self.seen.items():
            if pid == self.root.pid:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append({"pid": pid, "name": name, "cmdline": " ".join(proc.cmdline())[:200]})
            except (psutil.Error, OSError):
                continue
        return out


# --------------------------------------------------------------------------- one run (subprocess)

def run_one(num_clients: int, clients_per_round: int, rounds: int, model: str, pretrain_epochs: int,
            batch_size: int, run_out: str, cache_dir: str, interval: float = 0.2, grace_s: float = 15.0) -> dict:
    """Run one fleet in this process while sampling this process tree; return the measurements."""
    import fedpeft  # noqa: F401  (torchvision shim first)
    from fedpeft.fleet.config import RunConfig
    from fedpeft.fleet.simulation import run_fleet

    cfg = RunConfig(model=model, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds,
                    pretrain_epochs=pretrain_epochs, batch_size=batch_size, out=run_out, cache_dir=cache_dir,
                    overwrite=True)  # a repeat of one size reuses its run directory
    started = time.perf_counter()
    with TreeSampler(interval=interval, tag=os.environ.get(TAG_VAR)) as sampler:
        summary = run_fleet(cfg)
    wall_s = time.perf_counter() - started
    ended = time.monotonic()  # Ray's shutdown returns before all its processes are gone: allow grace_s
    lingering = survivors = sampler.alive()
    while survivors and time.monotonic() < ended + grace_s:
        time.sleep(0.25)
        survivors = sampler.alive()
    teardown_s = time.monotonic() - ended
    per_round = [r for r in summary.get("per_round", []) if r.get("round", 0) >= 1]
    return {
        "num_clients": num_clients,
        "clients_per_round": clients_per_round,
        "rounds_planned": rounds,
        "peak_tree_rss_bytes": sampler.peak_tree,
        "peak_driver_rss_bytes": sampler.peak_root,
        "driver_maxrss_kernel_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "processes_at_peak": sampler.peak_processes,
        "rss_mib_at_peak": [f"{name} {rss / MIB:.0f}" for name, rss in sorted(sampler.at_peak, key=lambda p: -p[1])],
        "max_processes": sampler.max_processes,
        "processes_seen": len(sampler.seen),
        "escaped_tree": sorted(sampler.escaped.values()),
        "lingering_after_run": len(lingering),  # still alive when run_fleet returned
        "teardown_s": round(teardown_s, 2),  # until none of them was left (or grace_s ran out)
        "samples": sampler.samples,
        "wall_s": round(wall_s, 2),
        "rounds_completed": summary.get("rounds", 0),
        "clients_ok": summary.get("status_counts", {}).get("ok", 0),
        "clients_ok_per_round": [r.get("clients_ok", 0) for r in per_round],
        "status_counts": summary.get("status_counts", {}),
        "final_accuracy": summary.get("final_accuracy"),
        "survivors_in_driver": survivors,
        "run_dir": summary.get("run_dir", run_out),
    }


# --------------------------------------------------------------------------- orchestration

def pretrain(model: str, pretrain_epochs: int, batch_size: int, cache_dir: str) -> Path:
    """Build (or find) the cached checkpoint every run will load, before anything is measured."""
    import fedpeft  # noqa: F401
    from fedpeft.fleet import setup
    from fedpeft.fleet.config import RunConfig

    cfg = RunConfig(model=model, num_clients=1, pretrain_epochs=pretrain_epochs, batch_size=batch_size,
                    cache_dir=cache_dir)
    return setup.checkpoint_for(cfg)


def measure(num_clients: int, clients_per_round: int, rounds: int, run_out: Path, cache_dir: str,
            model: str = DEFAULTS["model"], pretrain_epochs: int = DEFAULTS["pretrain_epochs"],
            batch_size: int = DEFAULTS["batch_size"], timeout_s: float = 1800.0, log=None) -> dict:
    """Run one configuration in a fresh subprocess; return its measurements plus a survivor check."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VAR: tag, "PYTHONUNBUFFERED": "1"})
    if cache_dir:
        env["FEDPEFT_CACHE"] = cache_dir
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(num_clients),
           "--clients-per-round", str(clients_per_round), "--rounds", str(rounds), "--model", model,
           "--pretrain-epochs", str(pretrain_epochs), "--batch-size", str(batch_size),
           "--run-out", str(run_out), "--cache-dir", cache_dir or ""]
    log(f"  {num_clients} clients: running (fresh subprocess) ...")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stdout, stderr = None, exc.stdout or "", exc.stderr or ""
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    elapsed = time.perf_counter() - started
    run_out.mkdir(parents=True, exist_ok=True)
    (run_out / "fleet_memory.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    time.sleep(1.0)  # let the kernel finish reaping what the subprocess's exit orphaned
    leftovers = _tagged(tag)
    survivors = []
    for p in leftovers:
        try:
            survivors.append({"pid": p.pid, "name": p.name(), "cmdline": " ".join(p.cmdline())[:200]})
            p.kill()  # ours (it carries this run's tag): leave nothing behind
        except psutil.Error:
            pass
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if returncode != 0 or not lines:
        tail = "\n".join((stdout + "\n" + stderr).strip().splitlines()[-30:])
        why = "timed out" if returncode is None else f"exit status {returncode}"
        raise RuntimeError(f"fleet of {num_clients} clients: {why}; log {run_out / 'fleet_memory.log'}\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["survivors_after_exit"] = survivors
    result["subprocess_s"] = round(elapsed, 2)
    return result


def compare(small: dict, large: dict) -> dict:
    tree = large["peak_tree_rss_bytes"] / small["peak_tree_rss_bytes"]
    driver = large["peak_driver_rss_bytes"] / small["peak_driver_rss_bytes"]
    problems = []
    for r in (small, large):
        if r["rounds_completed"] != r["rounds_planned"] or r["clients_ok"] <= 0:
            problems.append(f"{r['num_clients']} clients: {r['rounds_completed']}/{r['rounds_planned']} rounds, "
                            f"{r['clients_ok']} client updates ok")
        if r["survivors_in_driver"] or r["survivors_after_exit"]:
            problems.append(f"{r['num_clients']} clients: processes survived the run: "
                            f"{r['survivors_in_driver'] + r['survivors_after_exit']}")
    if tree > LIMIT:
        problems.append(f"tree peak grew {tree:.2f}x (limit {LIMIT}x)")
    return {"ratio_tree": round(tree, 3), "ratio_driver": round(driver, 3), "limit": LIMIT,
            "within_limit": tree <= LIMIT, "ok": not problems, "problems": problems}


def compare_scale(small: dict, large: dict) -> dict:
    """The scale case's verdict: compare()'s, plus the large tree's peak under SCALE_PEAK_BYTES and
    the wall-time ratio within SCALE_WALL_LIMIT."""
    out = compare(small, large)
    wall = large["wall_s"] / small["wall_s"]
    if large["peak_tree_rss_bytes"] >= SCALE_PEAK_BYTES:
        out["problems"].append(f"{large['num_clients']} clients: tree peak {large['peak_tree_rss_bytes'] / MIB:.0f} MiB "
                               f"(limit {SCALE_PEAK_BYTES / MIB:.0f} MiB)")
    if wall > SCALE_WALL_LIMIT:
        out["problems"].append(f"wall time grew {wall:.2f}x (limit {SCALE_WALL_LIMIT}x)")
    out.update(ratio_wall=round(wall, 3), wall_limit=SCALE_WALL_LIMIT, peak_limit_bytes=SCALE_PEAK_BYTES,
               ok=not out["problems"])
    return out


def run_benchmark(small: bool | str, out: Path, runs_dir: Path | None = None, cache_dir: str = "",
                  model: str = DEFAULTS["model"], pretrain_epochs: int = DEFAULTS["pretrain_epochs"],
                  batch_size: int = DEFAULTS["batch_size"], timeout_s: float = 1800.0, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    name = small if isinstance(small, str) else ("small" if small else "full")
    case = {"small": SMALL, "full": FULL, "scale": SCALE}[name]
    runs_dir = runs_dir or out.with_suffix("")
    started = time.perf_counter()
    t0 = time.perf_counter()
    checkpoint = pretrain(model, pretrain_epochs, batch_size, cache_dir)
    log(f"pretrained checkpoint ready ({time.perf_counter() - t0:.1f} s): {checkpoint}")
    results = [measure(n, case["clients_per_round"], case["rounds"], runs_dir / f"clients_{n}", cache_dir,
                       model=model, pretrain_epochs=pretrain_epochs, batch_size=batch_size, timeout_s=timeout_s, log=log)
               for n in case["sizes"]]
    report = {
        "benchmark": "fleet_memory",
        "case": name,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "platform": platform.platform(), "python": platform.python_version()},
        "config": {"model": model, "clients_per_round": case["clients_per_round"], "rounds": case["rounds"],
                   "pretrain_epochs": pretrain_epochs, "batch_size": batch_size, "sizes": list(case["sizes"]),
                   "sample_interval_s": 0.2},
        "runs": results,
        **(compare_scale if name == "scale" else compare)(results[0], results[-1]),
        "total_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"fleet memory ({report['case']}): {cfg['model']}, {cfg['clients_per_round']} clients per round, "
             f"{cfg['rounds']} rounds, {report['machine']['cpus']} CPUs",
             f"{'clients':>7}  {'tree peak MiB':>13}  {'driver peak MiB':>15}  {'procs':>5}  {'wall s':>7}  "
             f"{'rounds':>6}  {'updates ok':>10}  {'teardown s':>10}  {'survivors':>9}"]
    for r in report["runs"]:
        survivors = len(r["survivors_in_driver"]) + len(r["survivors_after_exit"])
        lines.append(f"{r['num_clients']:>7}  {r['peak_tree_rss_bytes'] / MIB:>13.1f}  "
                     f"{r['peak_driver_rss_bytes'] / MIB:>15.1f}  {r['processes_at_peak']:>5}  {r['wall_s']:>7.1f}  "
                     f"{r['rounds_completed']:>3}/{r['rounds_planned']:<2}  {r['clients_ok']:>10}  {r['teardown_s']:>10.1f}  "
                     f"{survivors:>9}")
    small, large = report["runs"][0]["num_clients"], report["runs"][-1]["num_clients"]
    verdict = "yes" if report["within_limit"] else "NO"
    lines.append(f"ratio {large} vs {small} clients: tree {report['ratio_tree']:.2f}x, driver "
                 f"{report['ratio_driver']:.2f}x; tree within {report['limit']}x: {verdict}")
    if "ratio_wall" in report:
        large = report["runs"][-1]
        lines.append(f"scale: {large['num_clients']} clients peak {large['peak_tree_rss_bytes'] / MIB:.0f} MiB "
                     f"(limit {report['peak_limit_bytes'] / MIB:.0f}); wall {report['ratio_wall']:.2f}x of "
                     f"{small} clients (limit {report['wall_limit']}x); tree memory {report['ratio_tree']:.2f}x")
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="4 vs 40 clients, 4 per round, 2 rounds")
    p.add_argument("--scale", action="store_true", help="50 vs 1000 clients, 50 per round, 3 rounds")
    p.add_argument("--out", default="runs/benchmarks/fleet_memory.json", help="JSON results file")
    p.add_argument("--runs-dir", default=None, help="run folders (default: --out without its suffix)")
    p.add_argument("--cache-dir", default="", help="pre-train cache (default $FEDPEFT_CACHE or ~/.cache/fedpeft)")
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--pretrain-epochs", type=int, default=DEFAULTS["pretrain_epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    # internal: one configuration, measured in this (fresh) process
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--clients-per-round", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        result = run_one(args.one, args.clients_per_round, args.rounds, args.model, args.pretrain_epochs,
                         args.batch_size, args.run_out, args.cache_dir)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    out = Path(args.out)
    report = run_benchmark("scale" if args.scale else args.small, out, Path(args.runs_dir) if args.runs_dir else None, args.cache_dir,
                           model=args.model, pretrain_epochs=args.pretrain_epochs, batch_size=args.batch_size,
                           timeout_s=args.timeout)
    print(table(report))
    print(f"\nwrote {out.resolve()} ({report['total_s']:.0f} s)", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
