"""Keep Ray on 127.0.0.1 when it runs on this machine only.

Ray's behaviour worked around here (ray 2.55, `ray._private.services.resolve_ip_for_localhost`):
`ray.init(_node_ip_address="127.0.0.1")`, `ray start --node-ip-address 127.0.0.1` and an address
`127.0.0.1:PORT` are all rewritten to the machine's interface address whenever multi-node clusters
are enabled (the default on Linux), and Ray's gRPC servers then listen on every interface. With
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray keeps 127.0.0.1 and its servers listen on loopback only
(checked with psutil: GCS, raylet, workers and agents all on 127.0.0.1). That variable also makes
`ray start --address` refuse to add a node, so a second node on this machine (tests, a laptop
"cluster") is started with `python -m fedpeft.fleet.ray_local start --address 127.0.0.1:PORT ...`,
which passes Ray's check and leaves loopback addresses as they are.
"""
from __future__ import annotations

import os

ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(address: str) -> bool:
    """True for 'HOST:PORT' (or 'ray://HOST:PORT') whose host is this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


def keep_on_loopback() -> None:
    """This process and the Ray processes it starts keep 127.0.0.1 (see the module docstring)."""
    import ray._private.ray_constants as ray_constants

    os.environ[ENV] = "0"  # Ray processes started from here read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported Ray already


def _ray_cli_on_loopback() -> None:
    """Ray's own CLI (`ray start ...`) with loopback addresses left as given, so `--address
    127.0.0.1:PORT` adds a node to a loopback head; the processes it starts inherit ENV=0."""
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main

    os.environ[ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = True  # pass `ray start --address`'s platform check
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if host in LOOPBACK_HOSTS else resolve(host)
    main()


if __name__ == "__main__":
    _ray_cli_on_loopback()
