"""The one way lorafleet starts a Ray cluster of its own (when no RAY_ADDRESS names one).

Such a cluster is for this machine: the node address and the dashboard (with its job API) are
the loopback address, and Ray's token authentication is on (a token in ``~/.ray/auth_token`` is
made on first use). Ray's gRPC servers (GCS, raylet, workers) listen on every interface
whatever the node address; with the token on, they too refuse callers without it. Ray >= 2.52
turns tokens on for a new local ``ray.init`` unless ``RAY_AUTH_MODE`` says otherwise; this
module is the one place that relies on it, and says so loudly when it was turned off.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """``ray.init`` a new loopback-only, token-authenticated cluster with ``num_cpus`` logical CPUs."""
    import ray

    # Ray reads RAY_AUTH_MODE when it is imported: with it unset, a new local cluster gets
    # tokens (ray.init's enable_token_auth_by_default); setting it here would be too late.
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s: this local Ray cluster runs WITHOUT token authentication; any local process may use it", mode)
    # address="local": a new cluster even when a `ray start` one runs on this machine; without it
    # ray.init joins that one (RAY_ADDRESS unset is not enough) and then refuses num_cpus.
    init_kwargs.setdefault("address", "local")
    ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **init_kwargs)
