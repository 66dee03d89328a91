"""Experiment tracking and adapter registry: MLflow (runs, step metrics, model registry), optional W&B, loss plots.

mlflow, wandb and matplotlib are imported only when used, so importing this package is cheap.
"""

from lorafleet.tracking.locations import pinned_tracking, resolve_artifact_location, resolve_tracking_uri, warn_if_node_local
from lorafleet.tracking.mlflow_tracking import (
    MetricsLogger,
    TrackingError,
    download_adapter,
    ensure_experiment,
    finish_run,
    list_registered_adapters,
    register_adapter,
    start_or_resume_run,
)
from lorafleet.tracking.provenance import dataset_fingerprint_tag, git_commit
from lorafleet.tracking.plots import plot_loss_curve
from lorafleet.tracking.wandb_tracking import WandbRun, WandbSettings, wandb_run_id

__all__ = [
    "MetricsLogger", "TrackingError", "WandbRun", "WandbSettings", "dataset_fingerprint_tag", "download_adapter",
    "ensure_experiment", "finish_run", "git_commit", "list_registered_adapters", "plot_loss_curve", "pinned_tracking",
    "register_adapter", "resolve_artifact_location", "resolve_tracking_uri", "start_or_resume_run", "wandb_run_id", "warn_if_node_local",
]
