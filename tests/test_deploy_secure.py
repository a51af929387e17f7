"""A secure Flower deployment on 127.0.0.1: TLS (our own CA) and SuperNode authentication.

The slow test runs a real SuperLink with `--ssl-* --enable-supernode-auth`, registers node keys
through the Control API, runs a short fedpeft job on two authenticated SuperNodes and shows that
a node with an unregistered key, a node without the CA certificate, a node without a key and an
`--insecure` node are all refused. Every process is tracked and stopped by PID (the `started` fixture)."""
from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from fedpeft.fleet import deploy
from test_flwr_run import ROOT, SMALL, _alive, cache_dir, started  # noqa: F401 (shared fixtures)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> deploy.DeploymentKeys:
    return deploy.make_certs(tmp_path_factory.mktemp("pki"), nodes=["node-0", "node-1", "no-ca", "rogue"])


# -- fast checks ---------------------------------------------------------------------------------

def test_make_certs_writes_what_flower_loads(keys):
    """The certificate chain verifies for 127.0.0.1, and the node keys load with the very
    functions flower-supernode (`--auth-supernode-private-key`) and `flwr supernode register` use."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    sec = keys.security
    assert sec.supernode_auth and all(p.is_file() for p in (sec.ca_cert, sec.server_cert, sec.server_key))
    assert subprocess.run(["openssl", "verify", "-CAfile", str(sec.ca_cert), str(sec.server_cert)],
                          capture_output=True).returncode == 0
    cert = x509.load_pem_x509_certificate(sec.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name, private in keys.node_keys.items():
        key = load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(keys.public_key(name)) == public_key_to_bytes(key.public_key())
        assert private.stat().st_mode & 0o077 == 0, f"{name}: private key readable by others"
    assert len({p.read_bytes() for p in keys.node_keys.values()}) == 4  # distinct keys
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        deploy.make_certs(keys.directory, nodes=["node-0"])


def test_command_lines_and_connection(keys, tmp_path, monkeypatch):
    """One place builds each side's transport flags; the CLI connection is what Flower reads."""
    from flwr.cli.flower_config import read_superlink_connection

    sec = keys.security
    assert deploy.superlink_args(None) == ["--insecure"]
    assert deploy.superlink_args(sec) == ["--ssl-ca-certfile", str(sec.ca_cert), "--ssl-certfile", str(sec.server_cert),
                                          "--ssl-keyfile", str(sec.server_key), "--enable-supernode-auth"]
    with pytest.raises(ValueError):
        deploy.superlink_args(deploy.Security(sec.ca_cert))  # no server certificate
    node_key = keys.node_keys["node-0"]
    assert deploy.supernode_args(None) == ["--insecure"]
    assert deploy.supernode_args(sec.client_side(), node_key) == [
        "--root-certificates", str(sec.ca_cert), "--auth-supernode-private-key", str(node_key)]
    assert deploy.supernode_args(deploy.Security(None), node_key) == ["--auth-supernode-private-key", str(node_key)]
    with pytest.raises(ValueError):
        deploy.supernode_args(None, node_key)  # node auth without TLS

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    deploy.write_flwr_config(tmp_path, "secure", address="127.0.0.1:9999", security=sec.client_side())
    conn = read_superlink_connection("secure")
    assert (conn.address, conn.insecure, conn.root_certificates) == ("127.0.0.1:9999", False, str(sec.ca_cert))
    deploy.write_flwr_config(tmp_path, "plain", address="127.0.0.1:9999")
    assert read_superlink_connection("plain").insecure is True


# -- end to end ----------------------------------------------------------------------------------

def _wait_exit(proc: deploy.Proc, timeout: float) -> int | None:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _wait_for(predicate, timeout: float, interval: float = 1.0):
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes (the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tls_and_supernode_auth_deployment(tmp_path, keys, cache_dir, started):  # noqa: F811
    """TLS + node auth on 127.0.0.1: two registered SuperNodes run a 1-round job; an unregistered
    key, a node without our CA certificate, a node without a key and an --insecure node never get in."""
    sec = keys.security
    link = deploy.start_superlink(tmp_path / "superlink", security=sec)
    started.append(link)
    # Only HTTPS, and only for whoever trusts our CA.
    with urllib.request.urlopen(f"https://{link.address}/health", timeout=5,
                                context=ssl.create_default_context(cafile=str(sec.ca_cert))) as resp:
        assert resp.status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://{link.address}/health", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{link.address}/health", timeout=5, context=ssl.create_default_context())

    home = tmp_path / "flwr-home"  # the launching machine: the CA certificate, nothing secret
    deploy.write_flwr_config(home, "edge", address=link.address, security=sec.client_side())
    node_ids = {name: deploy.register_supernode(keys.public_key(name), "edge", home)
                for name in ("node-0", "node-1", "no-ca")}  # "rogue" is never registered
    assert len(set(node_ids.values())) == 3
    assert deploy.list_supernodes("edge", home) == {i: "registered" for i in node_ids.values()}

    logs = tmp_path / "supernodes"
    cfg = {"partition-id": 1, "num-partitions": 2}
    refused = {  # started first: they must be refused while the real nodes come up
        "rogue": deploy.start_supernode(link.address, cfg, log_dir=logs, ready_timeout=None, security=sec.client_side(),
                                        auth_key=keys.node_keys["rogue"]),
        # a registered key, but the node trusts only the system CA store, not ours
        "no-ca": deploy.start_supernode(link.address, cfg, log_dir=logs, ready_timeout=None,
                                        security=deploy.Security(None), auth_key=keys.node_keys["no-ca"]),
        # no key at all: without --enable-supernode-auth it would register itself and get in
        "no-key": deploy.start_supernode(link.address, cfg, log_dir=logs, ready_timeout=None, security=sec.client_side()),
        "insecure": deploy.start_supernode(link.address, cfg, log_dir=logs, ready_timeout=None),
    }
    started.extend(refused.values())
    devices = ["raspberry_pi_5", "jetson_orin_nano"]
    nodes = []
    for part, device in enumerate(devices):
        node = deploy.start_supernode(link.address, {"partition-id": part, "num-partitions": 2, "device": device},
                                      log_dir=logs, security=sec.client_side(), auth_key=keys.node_keys[f"node-{part}"])
        started.append(node)
        nodes.append(node)

    # (a) unregistered key, (b) no CA certificate, and no key: each node gives up with Flower's
    # "could not connect" exit code (305, in its log; status 1), for its own reason.
    for name, reason in (("rogue", "Failed to activate SuperNode"), ("no-ca", "CERTIFICATE_VERIFY_FAILED"),
                         ("no-key", "SuperNode authentication is enabled. All SuperNodes must be registered")):
        status, text = _wait_exit(refused[name], 90), refused[name].read_log()
        assert status == 1 and f"Exit Code: {deploy.REFUSED_EXIT_CODE}" in text, (name, status, text[-2000:])
        assert reason in text and "SuperNode ID" not in text, (name, text[-2000:])
    # (c) plain HTTP against the HTTPS port: it keeps retrying and never gets in.
    assert _wait_for(lambda: "Connection attempt failed" in refused["insecure"].read_log(), 60)
    assert refused["insecure"].is_running()

    def both_online():  # the real nodes go online; nobody else ever appears
        listed = deploy.list_supernodes("edge", home)
        return listed if listed.get(node_ids["node-0"]) == listed.get(node_ids["node-1"]) == "online" else None
    listed = _wait_for(both_online, 60) or deploy.list_supernodes("edge", home)
    assert listed == {node_ids["node-0"]: "online", node_ids["node-1"]: "online", node_ids["no-ca"]: "registered"}

    out = tmp_path / "run"
    config = {**SMALL, "num-clients": 2, "rounds": 1, "out": str(out), "cache-dir": str(cache_dir)}
    result = deploy.run_flwr(ROOT, "edge", config, home, timeout=720)
    log = result.completed.stdout + result.completed.stderr
    assert result.completed.returncode == 0, log[-4000:]
    assert result.superlink_pids == []
    assert link.is_running() and all(n.is_running() for n in nodes)

    records = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert sorted((r["node_id"], r["device"], r["status"]) for r in records) == sorted(
        [(node_ids["node-0"], "raspberry_pi_5", "ok"), (node_ids["node-1"], "jetson_orin_nano", "ok")])
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["round"] == 1 and rounds[-1]["clients_ok"] == 2
    # Still nobody else got in.
    assert set(deploy.list_supernodes("edge", home)) == set(node_ids.values())
    assert refused["insecure"].is_running() and "SuperNode ID" not in refused["insecure"].read_log()
