"""The Ray Serve application builder: ``import_path: lorafleet.serve.app:build_app``.

``serve run serve/tiny-cpu.yaml`` and ``serve deploy`` call :func:`build_app` with the
application's ``args`` (a :class:`ServeConfig` as a dict); Python code can pass a
``ServeConfig`` to :func:`app_from_config` and ``serve.run`` the result.

The app is one deployment, ``LoRAServer`` (:mod:`lorafleet.serve.server`): each replica is the
FastAPI ingress and holds one vLLM engine with every adapter available (docs/serving.md).

Example::

    from ray import serve
    from lorafleet.serve.app import app_from_config
    serve.run(app_from_config(cfg), name="lorafleet", route_prefix="/")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

from ray import serve
from ray.serve import Application

from lorafleet.config.base import validate_config
from lorafleet.serve.config import ServeConfig, ingress_mismatch

log = logging.getLogger(__name__)

SERVER_DEPLOYMENT = "LoRAServer"
MANAGEMENT_HEADROOM = 32  # concurrent non-generation calls (health, metrics, /v1/adapters, /admin) per replica beyond the admission bound


def deployment_options(cfg: ServeConfig) -> dict:
    """Ray Serve options of the one deployment, derived from the config."""
    d = cfg.deployment
    # Each replica admits max_ongoing_requests + limits.max_queued_requests generation requests
    # (vLLM runs up to max_num_seqs and queues the rest) and answers 503 + Retry-After past that
    # (server.py). Serve's own per-replica limit sits above it, with room for health checks and
    # management calls, so that the OpenAI-shaped 503 is what clients see.
    admitted = d.max_ongoing_requests + cfg.limits.max_queued_requests
    replicas = d.num_replicas or d.autoscaling.max_replicas
    options = {
        "name": SERVER_DEPLOYMENT,
        "max_ongoing_requests": admitted + MANAGEMENT_HEADROOM,
        # Serve's router holds every request briefly while it picks a replica, so a burst fills this
        # queue even when the replicas have room: it is sized for bursts, the replicas bound the load.
        "max_queued_requests": max(1024, 4 * (admitted + MANAGEMENT_HEADROOM) * replicas),
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 30,
    }
    if d.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = d.max_replicas_per_node
    if d.env_vars:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(d.env_vars)}
    if d.autoscaling is not None:
        options["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        options["num_replicas"] = d.num_replicas
    return options


def app_from_config(cfg: ServeConfig, root: Optional[Path] = None) -> Application:
    """The bound application for ``cfg`` (relative paths resolved against ``root`` / the cwd)."""
    from lorafleet.serve.server import LoRAServer

    cfg = cfg.absolute(root)
    differs, why = ingress_mismatch(cfg.deployment.ingress, os.environ)
    if differs:
        log.warning("%s: Serve uses what the cluster's nodes were started with; start them with it", why)
    # The admin key leaves the driver only as its digest (read here from the config or the environment).
    digest = cfg.tenancy.admin_digest()
    cfg = cfg.model_copy(update={"tenancy": cfg.tenancy.model_copy(update={"admin_key": None, "admin_key_sha256": digest})})
    return serve.deployment(LoRAServer).options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))


def build_app(args: Union[dict, ServeConfig]) -> Application:
    """Application builder for Serve config files: ``args`` is a ServeConfig (dict).

    Invalid args fail the deploy with every problem listed (ConfigError).
    """
    cfg = args if isinstance(args, ServeConfig) else validate_config(ServeConfig, dict(args or {}), "serve application args")
    return app_from_config(cfg)
