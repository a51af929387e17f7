"""Run a fleet in one process tree: Flower's simulation engine on the Ray backend.

Ray is started here, bound to 127.0.0.1 (fedpeft/fleet/ray_local.py), with `client_cpus` CPUs
(and `client_gpus` GPUs) per virtual client so several clients train side by side, and it is shut
down when the run ends, whatever happens. With `ray_address` the run joins a running Ray cluster
instead: its nodes host the clients, and at the end this process only disconnects from it.
Ctrl-C stops the run the first time: the server loop sees `run_loop.STOP` within a poll, Flower's
runtime and Ray are shut down, the logs and the last checkpoint stay (resume with `--resume`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

from fedpeft.devices import load_fleet
from fedpeft.errors import UsageError, require
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


def backend_config(cfg: RunConfig | None = None, cpus: int | None = None) -> dict:
    """Flower's Ray backend settings: each client's resources, and how a private Ray starts (Flower
    passes `init_args` to `ray.init` only when Ray is not running yet, so they do nothing on a cluster)."""
    cfg = cfg or RunConfig()
    cpus = cpus or os.cpu_count() or 1
    gpus = _local_gpus() if cfg.client_gpus > 0 else 0
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                      "_node_ip_address": "127.0.0.1", "log_to_driver": False},
    }


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_env(cfg: RunConfig) -> dict:
    """Environment of every Ray worker of this run. A private Ray's workers inherit this process's
    environment; a cluster's are started by its raylets, so the run sends what they need."""
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"FEDPEFT_CACHE": cfg.cache_dir, "PYTHONPATH": pythonpath,
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")}


def check_ray_target(cfg: RunConfig) -> None:
    """Before anything slow starts: GPUs asked of a machine without CUDA (private Ray), or a cluster
    head that does not answer, is a one-line error."""
    if not cfg.ray_address:
        require(cfg.client_gpus == 0 or _local_gpus() > 0,
                f"client_gpus: {cfg.client_gpus} GPUs per client, but torch sees no CUDA GPU here "
                "(set client_gpus=0, or join a cluster with GPUs via ray_address)")
    elif cfg.ray_address != "auto":
        host, port = cfg.ray_address.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise UsageError(f"ray_address: no Ray head answers at {cfg.ray_address} ({exc.strerror or exc}); "
                             "start one with `ray start --head`") from None


def connect_ray(cfg: RunConfig) -> None:
    """Join the running cluster at `cfg.ray_address` (this process becomes its driver), or, without
    one, only keep the private Ray that Flower starts on 127.0.0.1."""
    import ray

    from fedpeft.fleet.ray_local import is_loopback, keep_on_loopback

    if not cfg.ray_address or is_loopback(cfg.ray_address):
        keep_on_loopback()  # a private Ray, or a head on this machine's loopback: stay there
    if not cfg.ray_address:
        return
    try:
        ray.init(address=cfg.ray_address, runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=False)
    except (ConnectionError, TimeoutError) as exc:
        raise UsageError(f"ray_address: cannot join the Ray cluster at {cfg.ray_address} ({first_line(exc)})") from None
    if cfg.client_gpus > 0 and not ray.cluster_resources().get("GPU", 0):
        ray.shutdown()  # disconnects this driver; the cluster keeps running
        raise UsageError(f"client_gpus: {cfg.client_gpus} GPUs per client, but the Ray cluster at "
                         f"{cfg.ray_address} advertises no GPU (set client_gpus=0)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    check_ray_target(cfg)
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
        connect_ray(cfg)
        run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_name="ray", backend_config=backend_config(cfg),
                       verbose_logging=verbose)
        if STOP.is_set():
            raise KeyboardInterrupt
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        driver["simulation_end_unix"] = time.time()
        if ray.is_initialized():
            # A private Ray stops here; on a cluster (ray_address) this only disconnects the driver:
            # the cluster's nodes keep running, and this run's client actors end with it.
            ray.shutdown()
        driver["ray_shutdown_s"] = time.time() - driver["simulation_end_unix"]
        if (Path(cfg.out) / run_timings.FILE).is_file():  # timers for experiments/benchmarks/sim_overhead.py
            run_timings.write_line(Path(cfg.out) / run_timings.FILE, driver)
    summary_path = Path(cfg.out) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
