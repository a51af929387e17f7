"""Run a fleet in one process tree: Flower's simulation engine on the Ray backend.

Ray is started here, bound to 127.0.0.1, with one CPU per virtual client so several clients
train side by side on a small machine, and it is shut down when the run ends, whatever happens.
Ctrl-C stops the run the first time: the server loop sees `run_loop.STOP` within a poll, Flower's
runtime and Ray are shut down, the logs and the last checkpoint stay (resume with `--resume`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

from fedpeft.devices import load_fleet
from fedpeft.errors import require
from fedpeft.fleet import setup
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.traces import load_trace
from fedpeft.paths import cache_dir


def resolved(cfg: RunConfig) -> RunConfig:
    """Absolute paths (Ray workers may run elsewhere), the fleet's real size, a checked trace file."""
    num_clients = len(load_fleet(cfg.fleet)) if cfg.fleet else cfg.num_clients
    require(cfg.clients_per_round <= num_clients,
            f"clients_per_round: {cfg.clients_per_round} is more than the fleet's {num_clients} clients")
    cfg = replace(cfg, out=str(Path(cfg.out).resolve()), cache_dir=str(cache_dir(cfg.cache_dir or None).resolve()),
                  fleet=str(Path(cfg.fleet).resolve()) if cfg.fleet else "", num_clients=num_clients,
                  trace=str(Path(cfg.trace).resolve()) if cfg.trace not in ("", "off") else cfg.trace)
    if cfg.trace not in ("", "off"):
        load_trace(cfg.trace, setup.fleet_for(cfg))  # a bad row is named now, not after Ray started
    return cfg


def backend_config(cpus: int | None = None) -> dict:
    cpus = cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "_node_ip_address": "127.0.0.1", "log_to_driver": False},
    }


def _not_the_run_simulation_notice(record: logging.LogRecord) -> bool:
    """Flower logs a five-line deprecation notice for `run_simulation` on every run. `flwr run` is
    no substitute for an in-process run driven from Python, so the notice says nothing to our users."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def _stop_on_sigint(stop: threading.Event):
    """On Ctrl-C, tell the server loop to stop (it runs in Flower's own thread, which a
    KeyboardInterrupt in the main thread never reaches) and interrupt the main thread as usual.
    Returns the previous handler (None when not on the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, handler)


def run_fleet(cfg: RunConfig, verbose: bool = False) -> dict:
    import ray
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from strategies.server_app import make_server_app

    from fedpeft.fleet.runlog import check_out_dir, check_same_run
    from strategies.run_loop import STOP
    from fedpeft.fleet import flower_workarounds
    from strategies import run_timings

    started = time.perf_counter()
    cfg = resolved(cfg)
    check_out_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)  # before anything slow starts
    if cfg.resume:
        check_same_run(cfg.out, cfg.to_dict())
    os.environ["FEDPEFT_CACHE"] = cfg.cache_dir  # Ray workers inherit it
    # Ray warns at every start that a future version stops overriding CUDA_VISIBLE_DEVICES when
    # num_gpus=0; opting into that behaviour now is what a CPU fleet wants anyway.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    pretrain_started = time.perf_counter()
    setup.checkpoint_for(cfg)  # pre-train before Ray starts, so every client finds it cached
    driver = {"kind": "driver", "before_pretrain_s": pretrain_started - started,
              "pretrain_s": time.perf_counter() - pretrain_started}
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*run_simulation.*")
        logging.getLogger("flwr").addFilter(_not_the_run_simulation_notice)
    STOP.clear()
    previous = _stop_on_sigint(STOP)
    flower_workarounds.apply()  # Flower's per-node message scan is quadratic in the fleet's size
    driver["simulation_start_unix"] = time.time()
    try:
        run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_name="ray", backend_config=backend_config(),
                       verbose_logging=verbose)
        if STOP.is_set():
            raise KeyboardInterrupt
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        driver["simulation_end_unix"] = time.time()
        if ray.is_initialized():
            ray.shutdown()
        driver["ray_shutdown_s"] = time.time() - driver["simulation_end_unix"]
        if (Path(cfg.out) / run_timings.FILE).is_file():  # timers for experiments/benchmarks/sim_overhead.py
            run_timings.write_line(Path(cfg.out) / run_timings.FILE, driver)
    summary_path = Path(cfg.out) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
