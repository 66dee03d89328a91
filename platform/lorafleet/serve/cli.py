"""``lorafleet serve --config FILE [--set key.path=value ...]``: the server in one command.

Starts a local Ray on 127.0.0.1 (or joins the cluster in ``RAY_ADDRESS``), starts Serve's
HTTP proxy on ``host:port`` from the config, deploys the app, prints where it listens and
blocks. Ctrl-C (or SIGTERM) deletes the app and, if this command started Ray, stops it.

FILE is a Serve config file (``serve/tiny-cpu.yaml``: the lorafleet application's args are
used) or a bare ``ServeConfig`` YAML.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Iterable

from lorafleet.config.base import ConfigError
from lorafleet.serve.config import ingress_mismatch
from lorafleet.ray_local import start_local_ray

log = logging.getLogger(__name__)

APP_NAME = "lorafleet"


def ingress_env(cfg, environ=os.environ) -> dict[str, str]:
    """The environment this process must have for the Ray it starts to run ``deployment.ingress``;
    ConfigError when that cannot be, or is too late (ray.serve already imported with other values)."""
    differs, why = ingress_mismatch(cfg.deployment.ingress, environ)
    if not differs:
        return {}
    if environ.get("RAY_ADDRESS"):
        log.warning("%s: joining the cluster in RAY_ADDRESS, whose nodes keep the setting they were started with; "
                    "start them with it", why)
        return {}
    if "ray.serve" in sys.modules:
        raise ConfigError("deployment.ingress", [f"{why}, set before Ray Serve is imported; set them in the environment of this process"])
    return differs


def _start_ray(cfg) -> bool:
    """Join RAY_ADDRESS or start a loopback-only local Ray; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    d = cfg.deployment
    replicas = d.num_replicas or (d.autoscaling.max_replicas if d.autoscaling else 1)
    # Logical CPUs beyond the replicas' own: Serve's controller and proxy need slots too.
    start_local_ray(max(os.cpu_count() or 1, int(replicas * d.num_cpus) + 2), log_to_driver=True)
    return True


def serve_main(config_path: str, overrides: Iterable[str] = ()) -> int:
    """Run the server until interrupted. Returns the process exit code (2: bad config, 1: deploy failed)."""
    from lorafleet.serve.config import load_serve_config

    try:
        cfg = load_serve_config(config_path, list(overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        os.environ.update(ingress_env(cfg))  # before Ray Serve is imported here and before Ray starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from lorafleet.serve.app import app_from_config

    started_ray = _start_ray(cfg)
    stop = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main_thread else None
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        try:
            serve.run(app_from_config(cfg), name=APP_NAME, route_prefix=cfg.route_prefix)
        except Exception as exc:  # noqa: BLE001 - deploy failures (bad adapter, engine start) end the command
            print(f"error: deploying the app failed: {exc}", file=sys.stderr)
            return 1
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        print(f"lorafleet serving {cfg.base_model_name} + {len(cfg.adapters)} adapter(s) at {url}/v1 "
              f"(models: {url}/v1/models, metrics: {url}/metrics). Ctrl-C stops.", flush=True)
        while not stop.wait(1.0):
            pass
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
            # A second Ctrl-C (or a wrapper forwarding the signal again) must not abort the
            # clean-up half way and leave Serve replicas or a local Ray behind.
            previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping lorafleet serve ...", file=sys.stderr, flush=True)
        try:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("stopping Serve: %s", exc)
        if started_ray:
            ray.shutdown()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_int)
