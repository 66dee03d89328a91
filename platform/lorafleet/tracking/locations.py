"""Where MLflow runs and artifacts go: the tracking URI and artifact root a config resolves to,
pinned for processes on other nodes, and a warning when a file store cannot be shared."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from lorafleet.config.train import TrackingConfig, default_work_dir

log = logging.getLogger(__name__)



def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store
    ``sqlite:///<work dir>/mlflow.db`` (folder created)."""
    if cfg.mlflow_tracking_uri:
        return cfg.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    work_dir = default_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work_dir}/mlflow.db"


def resolve_artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Artifact root for a new experiment.

    ``cfg.mlflow_artifact_location`` when set; ``<work dir>/mlartifacts`` for the
    embedded sqlite store (``<db folder>/mlartifacts`` for another sqlite file);
    None for tracking servers and other stores, which pick their own (a server with
    ``--serve-artifacts`` proxies uploads, so workers need no shared disk).
    """
    if cfg.mlflow_artifact_location:
        return cfg.mlflow_artifact_location
    if not cfg.mlflow_tracking_uri:
        return (default_work_dir() / "mlartifacts").as_uri()
    uri = cfg.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def pinned_tracking(cfg: TrackingConfig) -> dict[str, Optional[str]]:
    """The tracking URI and artifact location as resolved on this machine, to pin into a config
    that runs elsewhere (a Tune trial on another node would otherwise resolve its own defaults:
    another node's work dir, another sqlite file). Empty when tracking is off."""
    if not cfg.enabled:
        return {}
    return {"mlflow_tracking_uri": resolve_tracking_uri(cfg), "mlflow_artifact_location": resolve_artifact_location(cfg)}


def warn_if_node_local(tracking_uri: str, nodes: int) -> Optional[str]:
    """A warning (logged and returned) when a file-based MLflow store is used on a multi-node Ray
    cluster: workers and trials on other nodes write to that path on their own disk unless it is
    a shared filesystem."""
    if nodes < 2 or not (tracking_uri.startswith(("sqlite:///", "file:")) or "://" not in tracking_uri):
        return None
    if tracking_uri == "sqlite:///:memory:":
        return None
    msg = (f"MLflow store {tracking_uri} is a file on this node, and the Ray cluster has {nodes} nodes: runs on other "
           f"nodes only reach it if that path is on a filesystem every node shares. Otherwise set "
           f"tracking.mlflow_tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server or a postgresql:// URL")
    log.warning(msg)
    return msg
