"""TLS and SuperNode authentication for the Flower deployments `deploy.py` starts.

`Security` is the TLS material of one SuperLink. It turns into command-line flags in exactly
one place each: `superlink_args` (SuperLink), `supernode_args` (SuperNode), `connection_lines`
(the flwr CLI's connection in config.toml). `None` instead of a `Security` means the insecure
(plain HTTP) deployment, as before.

Flower 1.42 facts this relies on (read from the installed flwr package, checked on loopback):
- The SuperLink serves Fleet (/v1/fleet), Control (/v1/control), ServerAppIo (/v1/runtime) and
  /health on one port; with `--ssl-*` all of it is HTTPS. `--enable-supernode-auth` requires TLS.
- SuperNode auth signs every Fleet request with the node's EC private key; the SuperLink only
  accepts public keys registered through the Control API (`flwr supernode register`). Without
  `--enable-supernode-auth`, a SuperNode started without a key registers itself and gets in. The key
  files are OpenSSH format: `--auth-supernode-private-key` is read with
  `load_ssh_private_key`, `register` reads the public key with `load_ssh_public_key` and takes
  NIST curves only. `experiments/deploy/make_certs.sh` writes them (ECDSA secp384r1).
- A refused SuperNode logs Flower's exit code 305 ("Failed to initialize the connection to the
  SuperLink") and exits with status 1: "Failed to activate SuperNode" for an unregistered key,
  "CERTIFICATE_VERIFY_FAILED" when it lacks the CA certificate, "must be registered via the CLI"
  without any key. An
  `--insecure` SuperNode against a TLS SuperLink keeps retrying and never connects.
- The Control API has no accounts here: whoever can reach the port can start runs and register keys.
"""
from __future__ import annotations

import json
import os
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CERT_SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "deploy" / "make_certs.sh"
# flower-supernode logs "Exit Code: 305" (could not connect to the SuperLink), then exits with status 1.
REFUSED_EXIT_CODE = 305


@dataclass(frozen=True)
class Security:
    """TLS for one SuperLink and whoever connects to it.

    `ca_cert`: the CA certificate that signed the SuperLink's certificate, handed to SuperNodes
    (`--root-certificates`) and the flwr CLI (`root-certificates`); None: they trust the system's
    CA store instead (what a SuperNode without our CA does). `server_cert`/`server_key`: the
    SuperLink's own certificate and key (only the SuperLink needs them). `supernode_auth`: the
    SuperLink accepts only SuperNodes whose public key was registered."""

    ca_cert: Path | None
    server_cert: Path | None = None
    server_key: Path | None = None
    supernode_auth: bool = False

    def client_side(self) -> "Security":
        """What a SuperNode or the flwr CLI gets: the CA certificate, no server key."""
        return Security(self.ca_cert)


@dataclass(frozen=True)
class DeploymentKeys:
    """What `make_certs` wrote: the SuperLink's TLS material (with node auth on) and one key
    pair per node name (`node_keys[name]` is the private key, `public_key(name)` its .pub)."""

    directory: Path
    security: Security
    node_keys: dict[str, Path] = field(default_factory=dict)

    def public_key(self, name: str) -> Path:
        return self.node_keys[name].with_name(self.node_keys[name].name + ".pub")


def superlink_args(security: Security | None) -> list[str]:
    """The SuperLink's transport flags: `--insecure`, or TLS (and node auth)."""
    if security is None:
        return ["--insecure"]
    missing = [n for n in ("ca_cert", "server_cert", "server_key") if getattr(security, n) is None]
    if missing:
        raise ValueError(f"a TLS SuperLink needs {', '.join(missing)}")
    args = ["--ssl-ca-certfile", str(security.ca_cert), "--ssl-certfile", str(security.server_cert),
            "--ssl-keyfile", str(security.server_key)]
    return args + (["--enable-supernode-auth"] if security.supernode_auth else [])


def supernode_args(security: Security | None, auth_key: str | Path | None = None) -> list[str]:
    """A SuperNode's transport flags: `--insecure`, or TLS verified against `security.ca_cert`
    (the system CA store when None), plus its private key for SuperNode auth."""
    if security is None:
        if auth_key is not None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --insecure with a key)")
        return ["--insecure"]
    args = ["--root-certificates", str(security.ca_cert)] if security.ca_cert else []
    return args + (["--auth-supernode-private-key", str(auth_key)] if auth_key else [])


def connection_lines(security: Security | None, insecure: bool = True) -> list[str]:
    """The TLS keys of a `[superlink.<name>]` connection in $FLWR_HOME/config.toml: `insecure`
    when there is no `security`, else TLS with its CA certificate (the system store if None)."""
    if security is None:
        return [f"insecure = {'true' if insecure else 'false'}"]
    lines = ["insecure = false"]
    if security.ca_cert:  # a JSON string is a valid TOML basic string
        lines.append(f"root-certificates = {json.dumps(str(Path(security.ca_cert).resolve()))}")
    return lines


def health_url(port: int, host: str, security: Security | None) -> tuple[str, ssl.SSLContext | None]:
    """Where a service's /health answers, and the TLS context that verifies it."""
    if security is None:
        return f"http://{host}:{port}/health", None
    context = ssl.create_default_context(cafile=str(security.ca_cert) if security.ca_cert else None)
    return f"https://{host}:{port}/health", context


def make_certs(out_dir: str | Path, nodes: tuple[str, ...] | list[str] = ("node-0", "node-1"),
               san: str = "IP:127.0.0.1,DNS:localhost", days: int = 365) -> DeploymentKeys:
    """Run `experiments/deploy/make_certs.sh`: a CA, the SuperLink certificate for `san` and an
    ECDSA secp384r1 key pair (OpenSSH format) per node name, under `out_dir` (must not hold
    them already). Needs openssl (and ssh-keygen, else Python's cryptography)."""
    out = Path(out_dir).resolve()
    if not CERT_SCRIPT.is_file():
        raise FileNotFoundError(f"{CERT_SCRIPT} not found (it ships with the repository, not the wheel)")
    env = {**os.environ, "SAN": san, "DAYS": str(int(days))}
    done = subprocess.run(["bash", str(CERT_SCRIPT), str(out), *nodes], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"make_certs.sh failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    security = Security(out / "ca.crt", out / "server.pem", out / "server.key", supernode_auth=True)
    return DeploymentKeys(out, security, {name: out / "keys" / name for name in nodes})


# -- the flwr CLI's SuperNode commands ------------------------------------------------------------

def _flwr_json(args: list[str], flwr_home: str | Path, timeout: float) -> dict:
    from fedpeft.fleet.deploy import _bin, flower_env  # deploy imports this module

    cmd = [_bin("flwr"), *args, "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=flower_env({"FLWR_HOME": str(Path(flwr_home).resolve())}))
    start = done.stdout.find("{")
    try:
        reply = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return reply


def register_supernode(public_key: str | Path, federation: str, flwr_home: str | Path,
                       timeout: float = 60.0) -> int:
    """`flwr supernode register <public_key> <federation>`: the node id the SuperLink assigned."""
    reply = _flwr_json(["supernode", "register", str(Path(public_key).resolve()), federation], flwr_home, timeout)
    return int(reply["node-id"])


def list_supernodes(federation: str, flwr_home: str | Path, timeout: float = 60.0) -> dict[int, str]:
    """`flwr supernode list <federation>`: {node id: status} ("registered", "online", "offline",
    "unregistered") of every SuperNode the SuperLink knows."""
    reply = _flwr_json(["supernode", "list", federation, "--verbose"], flwr_home, timeout)
    return {int(node["node-id"]): node["status"] for node in reply.get("nodes", [])}
