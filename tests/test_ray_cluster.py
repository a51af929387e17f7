"""`fedpeft simulate --ray-address`: a run on a Ray cluster that was already running.

The cluster is two nodes on this machine (a head and a second raylet), every address on
127.0.0.1, under a private temp dir; it is stopped by the PIDs of the processes it started
(never `ray stop`, which kills every Ray on the machine by name)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedpeft.errors import UsageError
from fedpeft.fleet.config import RunConfig

FLEET = '[[group]]\ndevice = "raspberry_pi_5"\ncount = 4\navailability = 1.0\n'


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_node(temp: Path, *args: str) -> None:
    """`ray start ...` through fedpeft.fleet.ray_local (keeps 127.0.0.1; see its docstring). Every
    port is given, so nothing collides with another Ray on this machine (fixed defaults: 10001, 52365)."""
    node_manager, object_manager, metrics, agent, agent_grpc, runtime_env = free_ports(6)
    cmd = [sys.executable, "-m", "fedpeft.fleet.ray_local", "start", *args, "--node-ip-address", "127.0.0.1",
           "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp), "--disable-usage-stats",
           "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
           "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def cluster_processes(temp: Path) -> list[psutil.Process]:
    """The processes `ray start` left (each names the temp dir on its command line) and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def raylet_node_ids(temp: Path) -> set[str]:
    ids = set()
    for proc in cluster_processes(temp):
        try:
            match = re.search(r"--node_id=([0-9a-f]+)", " ".join(proc.cmdline()))
        except psutil.Error:
            continue
        if proc.name() == "raylet" and match:
            ids.add(match.group(1))
    return ids


def stop_cluster(temp: Path) -> None:
    procs = cluster_processes(temp)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    assert not cluster_processes(temp), "Ray processes of the test cluster are still running"


@pytest.mark.slow
def test_simulation_runs_on_both_nodes_of_a_running_ray_cluster(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's unix sockets live under it
    (port, client_port) = free_ports(2)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    out, cache = tmp_path / "run", tmp_path.parent / "fleet-cache"  # test_fleet's cache: its checkpoint
    options = dict(model="mobilenet_v2_035", num_clients=4, rounds=1, pretrain_epochs=1, fleet=str(fleet),
                   trace="off", out=str(out), cache_dir=str(cache))
    from fedpeft.fleet import setup

    setup.checkpoint_for(RunConfig(**options))  # pre-trained (or found cached) before the cluster starts
    try:
        start_node(temp, "--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                   "--include-dashboard", "false")
        start_node(temp, "--address", f"127.0.0.1:{port}")
        nodes = raylet_node_ids(temp)
        assert len(nodes) == 2

        cmd = [sys.executable, "-m", "fedpeft", "simulate", "--ray-address", f"127.0.0.1:{port}",
               *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{port}" in done.stderr

        clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
        assert len(clients) == 4 and all(c["status"] == "ok" for c in clients), clients
        ran_on = {c["worker_node"].rsplit("/", 1)[1] for c in clients}
        assert ran_on == nodes, (ran_on, nodes)  # one CPU per node, one per client: both nodes trained
        assert all(c["train_device"] == "cpu" for c in clients)
        # The run disconnected and left the cluster it did not start running.
        assert raylet_node_ids(temp) == nodes
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_is_checked_before_anything_starts(tmp_path):
    with pytest.raises(UsageError, match="^ray_address: expected a Ray head's HOST:PORT"):
        RunConfig(ray_address="http://10.0.0.5")
    RunConfig(ray_address="10.0.0.5:6379")
    RunConfig(ray_address="[::1]:6379")
    with pytest.raises(UsageError, match="^client_cpus: must be > 0"):
        RunConfig(client_cpus=0)
    with pytest.raises(UsageError, match="^device: cuda needs client_gpus > 0"):
        RunConfig(device="cuda")
    with pytest.raises(UsageError, match="^device: unknown value 'tpu'"):
        RunConfig(device="tpu")


def test_an_unreachable_head_is_one_line_exit_2(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedpeft", "simulate", "--ray-address", f"127.0.0.1:{port}",
                           "--out", str(tmp_path / "run"), "--num-clients", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"ray_address: no Ray head answers at 127.0.0.1:{port}" in done.stderr
    assert time.perf_counter() - started < 60


def test_client_gpus_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fedpeft.fleet.simulation import check_ray_target

    with pytest.raises(UsageError, match="^client_gpus: 0.5 GPUs per client, but torch sees no CUDA GPU"):
        check_ray_target(RunConfig(client_gpus=0.5, out=str(tmp_path / "run")))


PRIVATE_RAY = """
import json, time, psutil, ray
from fedpeft.fleet.ray_local import keep_on_loopback
from fedpeft.fleet.simulation import backend_config
keep_on_loopback()  # what run_fleet does before Flower starts its private Ray
ray.init(**{**backend_config(cpus=1)["init_args"]})
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
me = psutil.Process()
tree = {p.pid for p in me.children(recursive=True)} | {me.pid}
print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.pid in tree and c.status == "LISTEN"})))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_private_ray_listens_on_loopback_only():
    done = subprocess.run([sys.executable, "-c", PRIVATE_RAY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    addresses = json.loads(done.stdout.strip().splitlines()[-1])
    assert addresses and set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
