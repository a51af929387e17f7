"""Start and stop Flower's own processes (SuperLink, SuperNodes, `flwr run`) on 127.0.0.1.

Everything started here is tracked by PID (with its start time, so a reused PID is never
mistaken for ours) together with every process it spawns, and stopped by PID: terminate,
wait, kill if needed. Nothing is ever looked up or killed by process name alone.

Flower 1.42 facts this relies on (read from the installed flwr package):
- A SuperLink serves one HTTP API (Fleet, Control and ServerAppIo) on `--host/--port`; it
  spawns a detached `flower-superexec` child that starts `flwr-serverapp` per run. A SuperNode
  serves its runtime API on `--port` (default 9094) and spawns `flwr-clientapp` processes the
  same way. `flower-superexec` is a direct child, so the process tree still finds it.
- `flwr run . <conn>` against a connection whose address is ":local:" starts a *detached*
  `flower-superlink --simulation ... --log-file $FLWR_HOME/local-superlink/superlink.log
  --port $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT` (default 39091) unless one already answers on that
  port, and leaves it running. `run_flwr` gives every call its own port (so it never reuses a
  SuperLink someone else started) and stops the one it caused afterwards.
- Connections live in `$FLWR_HOME/config.toml` under `[superlink.<name>]`.
TLS and SuperNode authentication (`security=`/`auth_key=` below): see deploy_security.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedpeft.fleet.deploy_security import (  # noqa: F401 (re-exported: one import for callers)
    REFUSED_EXIT_CODE, DeploymentKeys, Security, connection_lines, health_url, list_supernodes,
    make_certs, register_supernode, superlink_args, supernode_args)

HOST = "127.0.0.1"
LOCAL_ADDRESS = ":local:"  # Flower's magic address: a local simulation SuperLink started on demand


def _bin(name: str) -> str:
    """The console script next to this interpreter (the virtualenv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it for 127.0.0.1:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def flower_env(extra: dict | None = None) -> dict:
    """Environment for Flower processes: no runtime `uv` install (it would pull CUDA torch), no
    update check (no network), and Ray (local simulations) kept on the loopback address."""
    env = os.environ.copy()
    # `flwr run` and the SuperLink start further Flower scripts by bare name: find this venv's.
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update({
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Ray otherwise binds to the machine's interface address; with this unset-able cluster
        # switch off, `ray.init` uses 127.0.0.1 (checked with ray 2.55).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


# -- process tracking ---------------------------------------------------------------------------

def _identity(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


@dataclass
class Proc:
    """A process we started (or caused), its log, and every descendant seen so far."""

    name: str
    pid: int
    create_time: float
    log_path: Path | None = None
    address: str = ""  # host:port it serves, if any
    popen: subprocess.Popen | None = None
    seen: set = field(default_factory=set)  # {(pid, create_time)} of descendants ever seen

    @classmethod
    def from_popen(cls, name: str, popen: subprocess.Popen, **kw) -> "Proc":
        try:
            created = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            created = 0.0
        return cls(name=name, pid=popen.pid, create_time=created, popen=popen, **kw)

    def process(self) -> psutil.Process | None:
        """The live process, only if the PID still belongs to the one we started."""
        try:
            proc = psutil.Process(self.pid)
            if self.create_time and abs(proc.create_time() - self.create_time) > 0.01:
                return None  # the PID was reused by something else
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def is_running(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.process() is not None

    def refresh(self) -> None:
        """Remember the current descendants, so they can be stopped even after re-parenting."""
        proc = self.process()
        if proc is None:
            return
        try:
            children = proc.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            ident = _identity(child)
            if ident:
                self.seen.add(ident)

    def pids(self) -> set[int]:
        """This process and every descendant seen, that are still alive (same PID and start time)."""
        alive = set()
        if self.process() is not None:
            alive.add(self.pid)
        for pid, created in self.seen:
            if _alive(pid, created):
                alive.add(pid)
        return alive

    def read_log(self) -> str:
        if self.log_path and self.log_path.is_file():
            return self.log_path.read_text(errors="replace")
        return ""


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) <= 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tracked(pid: int, created: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - created) <= 0.01 else None
    except psutil.Error:
        return None


def stop(proc: Proc | None, timeout: float = 10.0) -> None:
    """Stop a process and every descendant ever seen: SIGTERM, wait, SIGKILL what is left.

    By PID only, checked against each process's start time."""
    if proc is None:
        return
    proc.refresh()
    targets = []
    root = proc.process()
    if root is not None:
        targets.append(root)
    for pid, created in sorted(proc.seen):
        p = _tracked(pid, created)
        if p is not None:
            targets.append(p)
    for p in targets:  # parent first: Flower's processes shut their children down on SIGTERM
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(targets, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.popen is not None:
        try:
            proc.popen.wait(timeout=5)  # reap our direct child
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.popen.stdout, proc.popen.stderr):
            if stream:
                stream.close()


class _Watcher:
    """Polls a Proc's process tree in the background, so short-lived or re-parented
    descendants (a detached SuperLink, Ray workers) are remembered while they exist."""

    def __init__(self, procs: list[Proc], interval: float = 0.25):
        self.procs, self.interval = procs, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in list(self.procs):
                proc.refresh()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for proc in self.procs:
            proc.refresh()


# -- starting Flower's services -----------------------------------------------------------------

def _popen(cmd: list[str], log_path: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Own session: a Ctrl-C in the terminal that runs the tests does not reach it directly;
        # stop() ends it and its tree by PID.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd) if cwd else None, start_new_session=True)


def _wait_http_ok(url: str, context, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running():
            raise RuntimeError(f"{proc.name} exited early; log {proc.log_path}:\n{proc.read_log()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=context) as resp:  # noqa: S310 (loopback)
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout:.0f}s; log {proc.log_path}")


def _launch(name: str, cmd: list[str], log_path: Path, env: dict, cwd: Path, port: int, ready_timeout: float,
            security: Security | None = None) -> Proc:
    """Start a Flower service; return once its /health on 127.0.0.1:`port` answers (over TLS if
    `security`; stopped if it never does), or at once if `ready_timeout` is None."""
    popen = _popen(cmd, log_path, flower_env(env), cwd=cwd)
    proc = Proc.from_popen(name, popen, log_path=log_path, address=f"{HOST}:{port}")
    if ready_timeout is None:
        return proc
    try:
        _wait_http_ok(*health_url(port, HOST, security), proc=proc, timeout=ready_timeout)
    except BaseException:
        stop(proc)
        raise
    return proc


def start_superlink(state_dir: str | Path, port_base: int | None = None, env: dict | None = None,
                    ready_timeout: float = 60.0, security: Security | None = None) -> Proc:
    """A SuperLink on 127.0.0.1 with its state in `state_dir`/state.db, runtime dependency
    installation off. Flower 1.42 serves Fleet, Control and ServerAppIo on one HTTP port:
    `port_base`, or a free port when None. `security`: TLS (and SuperNode auth if
    `security.supernode_auth`); None: `--insecure`. Returns once /health answers."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port_base or free_port()
    cmd = [_bin("flower-superlink"), *superlink_args(security), "--database", str(state_dir / "state.db"),
           "--disable-runtime-dependency-installation", "--host", HOST, "--port", str(port)]
    log_path = state_dir / "superlink.log"
    # Its own FLWR_HOME: the SuperLink unpacks each run's FAB under $FLWR_HOME/apps.
    env = {"FLWR_HOME": str(state_dir / "flwr-home"), **(env or {})}
    return _launch("flower-superlink", cmd, log_path, env, state_dir, port, ready_timeout, security)


def format_node_config(node_config: dict) -> str:
    """`{"partition-id": 0, "device": "raspberry_pi_5"}` -> 'partition-id=0 device="raspberry_pi_5"'."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f'{key}="{value}"')
    return " ".join(parts)


def start_supernode(superlink_address: str, node_config: dict, port: int | None = None,
                    log_dir: str | Path | None = None, env: dict | None = None,
                    ready_timeout: float | None = 60.0, security: Security | None = None,
                    auth_key: str | Path | None = None) -> Proc:
    """A SuperNode connected to `superlink_address` (host:port), its runtime API on 127.0.0.1:`port`
    (a free port when None). `security`: TLS against `security.ca_cert` (None: the system CA
    store), `auth_key`: its private key for node auth; no `security`: `--insecure`. Returns once
    its runtime API's (plain HTTP) /health answers, or at once if `ready_timeout` is None (for a
    node meant to be refused: it logs REFUSED_EXIT_CODE and exits, maybe before /health answers)."""
    port = port or free_port()
    node_cfg = format_node_config(node_config)
    cmd = [_bin("flower-supernode"), *supernode_args(security, auth_key), "--superlink", superlink_address,
           "--node-config", node_cfg, "--host", HOST, "--port", str(port)]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fedpeft-supernode-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"supernode-{port}.log"
    env = {"FLWR_HOME": str(log_dir / f"flwr-home-{port}"), **(env or {})}
    return _launch("flower-supernode", cmd, log_path, env, log_dir, port, ready_timeout)


# -- the Flower CLI -----------------------------------------------------------------------------

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_flwr_config(flwr_home: str | Path, federation_name: str, address: str | None = None,
                      simulation_options: dict | None = None, insecure: bool = True,
                      security: Security | None = None) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection, also the default one.

    - `address` given ("127.0.0.1:PORT"): a deployed SuperLink, `insecure = true`; with
      `security`, TLS instead (`insecure = false`, `root-certificates` = its CA certificate).
    - otherwise: a local simulation (address ":local:"), with `options.num-supernodes` and one CPU,
      no GPU per virtual client (Flower's default, 2 CPUs, serializes clients on a small machine).
      `simulation_options` keys: num-supernodes (default 2), num-cpus (1), num-gpus (0.0),
      init-num-cpus (unset: all). Flower 1.42 still honours `options.*` but prints a deprecation
      note; `run_flwr(..., federation_config=...)` is the newer way to pass the same.
    Flower reads this file via FLWR_HOME, so give each test or experiment its own directory."""
    home = Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    name = federation_name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"federation name must be letters, digits, '-' or '_', got {name!r}")
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    if address:
        lines += [f"address = {_toml_value(address)}", *connection_lines(security, insecure)]
    else:
        opts = dict(simulation_options or {})
        lines += [f'address = "{LOCAL_ADDRESS}"',
                  f"options.num-supernodes = {int(opts.pop('num-supernodes', 2))}",
                  f"options.backend.client-resources.num-cpus = {int(opts.pop('num-cpus', 1))}",
                  f"options.backend.client-resources.num-gpus = {_toml_value(float(opts.pop('num-gpus', 0.0)))}"]
        if "init-num-cpus" in opts:
            lines.append(f"options.backend.init-args.num-cpus = {int(opts.pop('init-num-cpus'))}")
        if opts:
            raise ValueError(f"unknown simulation options: {', '.join(sorted(opts))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def format_run_config(run_config: dict) -> str:
    """{"rounds": 2, "out": "/tmp/x"} -> 'rounds=2 out="/tmp/x"' (Flower parses each value as TOML)."""
    parts = []
    for key, value in run_config.items():
        if isinstance(value, str) and (" " in value or "'" in value or '"' in value):
            raise ValueError(f"run config {key}: values with spaces or quotes cannot travel on the CLI")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


@dataclass
class FlwrRun:
    """What `run_flwr` saw: the CLI's result and the processes it caused (all stopped by then)."""

    completed: subprocess.CompletedProcess
    superlink_pids: list[int]  # detached local SuperLink(s) that `flwr run` left behind
    pids: set[int]  # every process seen in the tree, the flwr CLI included
    wall_s: float


def _is_local_superlink_for(proc: psutil.Process, flwr_home: Path, port: int) -> bool:
    """The detached SuperLink `flwr run` starts for a local simulation: flower-superlink with our
    FLWR_HOME's log file and our port on its command line (the name alone is not enough)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    if not cmd or not any(Path(part).name == "flower-superlink" for part in cmd[:2]):
        return False
    joined = " ".join(cmd)
    return str(flwr_home / "local-superlink") in joined and f"--port {port}" in joined


def run_flwr(app_dir: str | Path, federation: str, run_config: dict, flwr_home: str | Path,
             timeout: float = 600.0, federation_config: dict | None = None, env: dict | None = None,
             stream: bool = True) -> FlwrRun:
    """`flwr run <app_dir> <federation> --run-config "..." --stream`, then stop what it left.

    A local simulation connection makes `flwr run` start a detached `flower-superlink` that
    outlives it. It is found by PID: a background watcher records the whole process tree under
    the `flwr` process while it runs (the SuperLink is its child until `flwr` exits), and each
    candidate is confirmed by its command line naming this FLWR_HOME and this call's own port.
    As a fallback, a process scan matches the same two strings. All of them, and everything they
    spawned (SuperExec, the simulation, Ray), are stopped by PID before this returns, even on
    timeout or error. Raises subprocess.TimeoutExpired (after cleanup) past `timeout`."""
    home = Path(flwr_home).resolve()
    http_port, control_port = free_port(), free_port()
    extra = {"FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": http_port,
             "FLWR_LOCAL_CONTROL_API_PORT": control_port, **(env or {})}
    cache = run_config.get("cache-dir") or run_config.get("cache_dir")
    if cache:
        extra.setdefault("FEDPEFT_CACHE", str(cache))
    cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), federation]
    if run_config:
        cmd += ["--run-config", format_run_config(run_config)]
    if federation_config:
        cmd += ["--federation-config", format_run_config(federation_config)]
    if stream:
        cmd.append("--stream")
    started = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env=flower_env(extra), cwd=str(Path(app_dir).resolve()), text=True,
                             start_new_session=True)
    root = Proc.from_popen("flwr run", popen)
    tracked = [root]
    superlinks: list[Proc] = []
    timed_out = False
    out = err = ""
    try:
        with _Watcher(tracked):
            try:
                out, err = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        # The SuperLink(s) this call caused: seen in the tree, confirmed by command line; then a
        # scan for any that escaped the watcher (started and re-parented between two polls).
        candidates = {pid: created for pid, created in root.seen}
        for p in psutil.process_iter(["pid"]):
            ident = _identity(p)
            if ident and _is_local_superlink_for(p, home, http_port):
                candidates.setdefault(*ident)
        for pid, created in candidates.items():
            p = _tracked(pid, created)
            if p is not None and _is_local_superlink_for(p, home, http_port):
                link = Proc(name="flower-superlink (local)", pid=pid, create_time=created,
                            log_path=home / "local-superlink" / "superlink.log", address=f"{HOST}:{http_port}")
                link.refresh()
                superlinks.append(link)
    finally:
        if timed_out or popen.poll() is None:
            stop(root)
            out2, err2 = popen.communicate()
            out, err = out + (out2 or ""), err + (err2 or "")
        for link in superlinks:
            stop(link)
        stop(root)  # anything else still alive in the tree it left
    pids = {root.pid} | {pid for pid, _ in root.seen}
    for link in superlinks:
        pids |= {link.pid} | {pid for pid, _ in link.seen}
    wall = time.perf_counter() - started
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    completed = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    return FlwrRun(completed, [link.pid for link in superlinks], pids, wall)
