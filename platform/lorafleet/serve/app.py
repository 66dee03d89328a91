"""The Ray Serve application builder: ``import_path: lorafleet.serve.app:build_app``.

``serve run serve/tiny-cpu.yaml`` and ``serve deploy`` call :func:`build_app` with the
application's ``args`` (a :class:`ServeConfig` as a dict); Python code can pass a
``ServeConfig`` to :func:`app_from_config` and ``serve.run`` the result.

The app is two deployments: ``OpenAIIngress`` (HTTP, cheap, routing by ``model``) bound to
``LoRAEngine`` (one vLLM engine per replica, every adapter available on every replica).

Example::

    from ray import serve
    from lorafleet.serve.app import app_from_config
    serve.run(app_from_config(cfg), name="lorafleet", route_prefix="/")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ray import serve
from ray.serve import Application

from lorafleet.config.base import validate_config
from lorafleet.serve.config import ServeConfig
from lorafleet.serve.deployment import EngineDeployment, OpenAIIngress

ENGINE_DEPLOYMENT = "LoRAEngine"
INGRESS_DEPLOYMENT = "OpenAIIngress"


def deployment_options(cfg: ServeConfig) -> tuple[dict, dict]:
    """Ray Serve options of (engine, ingress) derived from the config."""
    d = cfg.deployment
    engine = {
        "name": ENGINE_DEPLOYMENT,
        "max_ongoing_requests": d.max_ongoing_requests,
        # Requests beyond replicas x max_ongoing_requests wait here; past this bound the
        # ingress's handle raises BackPressureError, answered as a 503.
        "max_queued_requests": cfg.limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 30,
    }
    if d.env_vars:
        engine["ray_actor_options"]["runtime_env"] = {"env_vars": dict(d.env_vars)}
    if d.autoscaling is not None:
        engine["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        engine["num_replicas"] = d.num_replicas
    replicas = d.num_replicas or (d.autoscaling.max_replicas if d.autoscaling else 1)
    ingress = {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": d.ingress_replicas,
        # The ingress only routes; it must admit more than the engines hold so that the
        # queue bound (and its 503) is the engine handle's, not an opaque proxy timeout.
        "max_ongoing_requests": max(1000, 2 * (replicas * d.max_ongoing_requests + cfg.limits.max_queued_requests)),
        "ray_actor_options": {"num_cpus": 0},
    }
    return engine, ingress


def app_from_config(cfg: ServeConfig, root: Optional[Path] = None) -> Application:
    """The bound application for ``cfg`` (relative paths resolved against ``root`` / the cwd)."""
    cfg = cfg.absolute(root)
    # The admin key leaves the driver only as its digest (read here from the config or the environment).
    digest = cfg.tenancy.admin_digest()
    cfg = cfg.model_copy(update={"tenancy": cfg.tenancy.model_copy(update={"admin_key": None, "admin_key_sha256": digest})})
    engine_opts, ingress_opts = deployment_options(cfg)
    data = cfg.model_dump(mode="json")
    engine = serve.deployment(EngineDeployment).options(**engine_opts).bind(data)
    return serve.deployment(OpenAIIngress).options(**ingress_opts).bind(data, engine)


def build_app(args: Union[dict, ServeConfig]) -> Application:
    """Application builder for Serve config files: ``args`` is a ServeConfig (dict).

    Invalid args fail the deploy with every problem listed (ConfigError).
    """
    cfg = args if isinstance(args, ServeConfig) else validate_config(ServeConfig, dict(args or {}), "serve application args")
    return app_from_config(cfg)
