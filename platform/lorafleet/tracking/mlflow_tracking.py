"""MLflow tracking and model registry for fine-tuning runs.

Who calls what:

* The Ray Train **driver** calls :func:`start_or_resume_run` before training and
  :func:`finish_run` / :func:`register_adapter` after it.
* Rank 0 of the training **workers** logs step metrics with :class:`MetricsLogger`,
  given only the tracking URI and the run id (workers may live on other nodes).

Nothing here touches MLflow's global state (``mlflow.set_tracking_uri``, the active
run): every call goes through an ``MlflowClient`` built from an explicit URI, so the
functions are safe in any process and in parallel.

Example::

    cfg = TrackingConfig(register_as="banking77-lora")
    run_id = start_or_resume_run(cfg, "banking77", params={"lora.r": 16}, tags={"lorafleet.task": "banking77"})
    logger = MetricsLogger(resolve_tracking_uri(cfg), run_id)
    logger.log({"train_loss": 2.3}, step=1)
    logger.close()
    finish_run(cfg, run_id, {"eval_loss": 1.2}, {"adapter": "/out/adapter"})
    name, version = register_adapter(cfg, run_id, tags={"base_model": "tiny"})
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lorafleet.config.train import TrackingConfig
from lorafleet.tracking.locations import resolve_artifact_location, resolve_tracking_uri
from lorafleet.tracking.provenance import GIT_COMMIT_TAG, git_commit

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lorafleet.tracking.wandb_tracking import WandbSettings

log = logging.getLogger(__name__)

TAG_PREFIX = "lorafleet."
RUN_NAME_TAG = "lorafleet.run_name"
ATTEMPT_TAG = "lorafleet.attempt"

# Limits of the MLflow REST API / stores (mlflow.utils.validation); copied so that
# importing this module does not import mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Errors that retrying cannot fix (bad metric name or value, deleted run): such a
# batch is dropped instead of blocking the ones behind it forever.
_PERMANENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
_UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")


class TrackingError(RuntimeError):
    """A tracking operation could not be completed (the message lists every failure)."""


def _client(tracking_uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _error_code(exc: BaseException) -> Optional[str]:
    return getattr(exc, "error_code", None)


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Id of experiment ``cfg.experiment_name``; created (with :func:`resolve_artifact_location`) if missing, restored if deleted."""
    from mlflow.exceptions import MlflowException

    client = _client(resolve_tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        try:
            return client.create_experiment(cfg.experiment_name, artifact_location=resolve_artifact_location(cfg))
        except MlflowException as exc:  # another process created it first
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ---------------------------------------------------------------------------- names and values


def _mlflow_key(key: Any) -> str:
    """A valid MLflow param/metric name: bad characters become ``_``, no empty/``.``/``..`` path parts."""
    parts = [p for p in _BAD_NAME_CHARS.sub("_", str(key)).split("/") if p not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def _tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VAL_LENGTH]


def _as_float(value: Any) -> Optional[float]:
    """float for real numbers (Python, numpy, 0-d tensors); None for anything else (str, bool, None...)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Real) or hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------- runs


def start_or_resume_run(cfg: TrackingConfig, run_name: str, params: dict[str, object], tags: dict[str, str]) -> str:
    """Create the MLflow run of ``run_name`` or resume its unfinished one; return the run id.

    An unfinished run (RUNNING, FAILED or KILLED) tagged ``lorafleet.run_name=run_name``
    in the experiment is reused and set back to RUNNING, so a resubmitted job after a
    driver crash keeps one MLflow run. A FINISHED run is never reopened: the next
    call creates a new run. ``params`` keys are flattened dotted paths; values are
    stringified and truncated to MLflow's limit. Params the run already has are left
    alone (MLflow forbids changing them; a changed value is warned about and recorded
    in the ``lorafleet.changed_params`` tag). Run tags are ``cfg.tags``, ``tags``,
    ``lorafleet.run_name``, ``lorafleet.attempt`` and ``lorafleet.git_commit``.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    if "'" in run_name or "`" in run_name or not run_name:
        raise ValueError(f"run_name must be non-empty and contain no quotes or backticks (got {run_name!r})")
    client = _client(resolve_tracking_uri(cfg))
    experiment_id = ensure_experiment(cfg)

    previous = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    unfinished = [r for r in previous if r.info.status in _UNFINISHED and r.data.tags.get(RUN_NAME_TAG) == run_name]
    all_tags = {**cfg.tags, **tags, RUN_NAME_TAG: run_name}
    if GIT_COMMIT_TAG not in all_tags:
        commit = git_commit()
        if commit:
            all_tags[GIT_COMMIT_TAG] = commit

    if unfinished:
        run = unfinished[0]
        run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        existing_params = run.data.params
        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1") or 1) + 1
        log.info("resuming MLflow run %s (%s, attempt %d)", run_id, run_name, attempt)
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags={k: _tag_value(v) for k, v in all_tags.items()})
        run_id = run.info.run_id
        existing_params = {}
        attempt = 1
        log.info("created MLflow run %s (%s) in experiment %s", run_id, run_name, experiment_id)
    all_tags[ATTEMPT_TAG] = str(attempt)

    new_params: dict[str, str] = {}
    changed: list[str] = []
    for key, value in params.items():
        key, text = _mlflow_key(key), _param_value(value)
        if key in existing_params:
            if existing_params[key] != text:
                changed.append(key)
        else:
            new_params[key] = text
    if changed:
        log.warning(
            "MLflow run %s already has different values for params %s; MLflow cannot change params, "
            "so the run keeps its first values (use a new run_name to track a changed config)", run_id, changed,
        )
        all_tags["lorafleet.changed_params"] = ",".join(sorted(changed))

    param_items = [Param(k, v) for k, v in new_params.items()]
    for i in range(0, len(param_items), MAX_PARAMS_TAGS_PER_BATCH):
        batch = param_items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
        try:
            client.log_batch(run_id, params=batch, synchronous=True)
        except MlflowException:
            # A concurrent writer may have logged some of them: fall back to one by one.
            for param in batch:
                try:
                    client.log_param(run_id, param.key, param.value, synchronous=True)
                except MlflowException as exc:
                    log.warning("could not log param %s=%r to run %s: %s", param.key, param.value, run_id, exc)
    tag_items = [RunTag(k, _tag_value(v)) for k, v in all_tags.items()]
    for i in range(0, len(tag_items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tag_items[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
    return run_id


def finish_run(
    cfg: TrackingConfig,
    run_id: str,
    final_metrics: dict[str, float],
    artifacts: dict[str, str],
    status: str = "FINISHED",
    tags: Optional[dict[str, str]] = None,
    step: int = 0,
) -> None:
    """Log final metrics, tags and artifacts to ``run_id`` and mark it terminated with ``status``.

    ``artifacts`` maps an artifact folder to a local file or folder:
    ``{"adapter": "/out/adapter"}`` uploads the folder's contents under ``adapter/``;
    ``{"plots": "/out/loss_curve.png"}`` puts the file at ``plots/loss_curve.png``.
    ``final_metrics`` are logged at ``step`` (non-numeric values skipped).
    Every part is attempted even if an earlier one fails; the run is terminated in
    any case, then a :class:`TrackingError` lists what failed (the driver decides
    whether that fails the job: training output is already on disk by then).
    """
    from mlflow.entities import Metric, RunTag

    if status not in _TERMINAL:
        raise ValueError(f"status must be one of {_TERMINAL} (got {status!r})")
    client = _client(resolve_tracking_uri(cfg))
    errors: list[str] = []

    timestamp = _now_ms()
    metrics = [Metric(_mlflow_key(k), v, timestamp, step) for k, v in ((k, _as_float(v)) for k, v in final_metrics.items()) if v is not None]
    all_tags = [RunTag(k, _tag_value(v)) for k, v in {**cfg.tags, **(tags or {})}.items()]
    try:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH], synchronous=True)
        for i in range(0, len(all_tags), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=all_tags[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
    except Exception as exc:  # noqa: BLE001 - reported below with the other failures
        errors.append(f"final metrics/tags: {exc}")

    for artifact_path, local in artifacts.items():
        local_path = Path(local)
        try:
            if local_path.is_dir():
                client.log_artifacts(run_id, str(local_path), artifact_path=artifact_path)
            elif local_path.is_file():
                client.log_artifact(run_id, str(local_path), artifact_path=artifact_path)
            else:
                errors.append(f"artifact {artifact_path!r}: local path {str(local_path)!r} does not exist")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"artifact {artifact_path!r} from {str(local_path)!r}: {exc}")

    try:
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"set status {status}: {exc}")
    if errors:
        raise TrackingError(f"finishing MLflow run {run_id} at {resolve_tracking_uri(cfg)} partly failed: " + "; ".join(errors))


# ---------------------------------------------------------------------------- registry


def register_adapter(
    cfg: TrackingConfig,
    run_id: str,
    artifact_path: str = "adapter",
    tags: Optional[dict[str, str]] = None,
    description: Optional[str] = None,
) -> tuple[str, str]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``cfg.register_as``.

    Version tags are ``cfg.tags`` plus ``tags`` (e.g. base_model, method, r,
    target_modules, task). No alias is moved: promote a version explicitly with
    ``MlflowClient.set_registered_model_alias(name, "champion", version)``.
    Returns ``(name, version)``.
    """
    from mlflow.exceptions import MlflowException

    if not cfg.register_as:
        raise ValueError("tracking.register_as is not set: give the registered model name (e.g. register_as: banking77-lora) to register the adapter")
    name = cfg.register_as
    client = _client(resolve_tracking_uri(cfg))
    if not client.list_artifacts(run_id, artifact_path):
        raise TrackingError(
            f"run {run_id} has no artifacts under {artifact_path!r}; log the adapter first "
            f"(finish_run(..., artifacts={{{artifact_path!r}: '/path/to/adapter'}}))"
        )
    try:
        client.create_registered_model(name, tags={"lorafleet.kind": "lora_adapter"})
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {k: _tag_value(v) for k, v in {**cfg.tags, **(tags or {})}.items()}
    model_version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=version_tags, description=description,
    )
    log.info("registered %s version %s from run %s", name, model_version.version, run_id)
    return name, str(model_version.version)


def list_registered_adapters(tracking_uri: str, name: Optional[str] = None) -> list[dict]:
    """One dict per registered model version (all models, or only ``name``), sorted by name then version.

    Keys: name, version, run_id, source, tags, aliases, description, status, creation_timestamp (ms).
    """
    client = _client(tracking_uri)
    if name is not None and "'" in name:
        raise ValueError(f"registered model name must not contain quotes (got {name!r})")
    filter_string = f"name = '{name}'" if name is not None else None
    versions, page_token = [], None
    while True:
        page = client.search_model_versions(filter_string, max_results=1000, page_token=page_token)
        versions.extend(page)
        page_token = page.token
        if not page_token:
            break
    # search_model_versions leaves ModelVersion.aliases empty on some stores (sqlalchemy);
    # the registered model carries the {alias: version} map.
    aliases: dict[tuple[str, str], set[str]] = {}
    for model_name in sorted({mv.name for mv in versions}):
        for alias, alias_version in (client.get_registered_model(model_name).aliases or {}).items():
            aliases.setdefault((model_name, str(alias_version)), set()).add(alias)
    rows = [
        {
            "name": mv.name,
            "version": str(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
            "tags": dict(mv.tags or {}),
            "aliases": sorted(set(mv.aliases or []) | aliases.get((mv.name, str(mv.version)), set())),
            "description": mv.description,
            "status": mv.status,
            "creation_timestamp": mv.creation_timestamp,
        }
        for mv in versions
    ]
    return sorted(rows, key=lambda row: (row["name"], int(row["version"])))


def download_adapter(tracking_uri: str, model_uri: str, dst: str) -> str:
    """Download ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``models:/<name>/latest`` into ``dst``.

    Returns the local folder holding the adapter files (``<dst>/<artifact folder>``).
    """
    import mlflow.artifacts

    match = _MODELS_URI.match(model_uri)
    if not match:
        raise ValueError(f"model_uri must look like models:/<name>/<version> or models:/<name>@<alias> (got {model_uri!r})")
    client = _client(tracking_uri)
    name, version, alias = match["name"], match["version"], match["alias"]
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    elif version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise TrackingError(f"registered model {name!r} has no versions at {tracking_uri}")
        version = str(max(int(mv.version) for mv in versions))
    # NOTE: mlflow.artifacts.download_artifacts("models:/...", tracking_uri=...) looks the version up
    # in the *global* registry URI (ModelsArtifactRepository._get_model_uri_infos uses
    # mlflow.get_registry_uri()), so resolve the version here and download its source directly.
    source = client.get_model_version_download_uri(name, str(version))
    Path(dst).mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)


# ---------------------------------------------------------------------------- step metrics


class MetricsLogger:
    """Step metrics of one run, logged by a training worker from ``tracking_uri`` + ``run_id`` alone.

    ``log`` never blocks on the network and never raises: metrics go to an in-memory
    buffer that a background thread sends with ``MlflowClient.log_batch``. When the
    tracking server is unreachable the buffer is kept and retried (after 1 s, 2 s, 4 s...
    capped at 30 s; MLflow's own HTTP retries, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    run inside that thread and hide for minutes that the server is back, so training
    workers set it to 0), so a server that goes down mid-run loses nothing as long as
    it comes back before :meth:`close` gives up. ``flush_retry_s`` is how long
    :meth:`flush` / :meth:`close` keep retrying before returning with metrics still
    pending. Batches MLflow rejects as invalid are dropped and reported in ``errors``.

    Example::

        logger = MetricsLogger(tracking_uri, run_id)
        logger.log({"train_loss": 1.9, "learning_rate": 2e-4}, step=10)
        report = logger.close()          # {"pending": 0, "errors": []}
        plot_loss_curve(logger.history, "loss.png")
    """

    _RETRY_MIN_S = 1.0
    _RETRY_MAX_S = 30.0

    def __init__(self, tracking_uri: str, run_id: str, wandb: "WandbSettings | None" = None, flush_retry_s: float = 30.0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_retry_s = flush_retry_s
        self.history: list[dict] = []
        self.errors: list[str] = []
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp_ms, step)
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._stop = False
        self._hurry = False  # flush() waiting: retry quickly
        self._next_attempt = 0.0  # time.monotonic() before which the sender does not retry
        self._retry_s = self._RETRY_MIN_S
        self._client = None
        self._wandb = None
        if wandb is not None:
            try:
                from lorafleet.tracking.wandb_tracking import WandbRun

                self._wandb = WandbRun(wandb)
            except Exception as exc:  # noqa: BLE001 - W&B must not stop training
                self._record_error(f"W&B disabled, init failed: {exc}")

    # -- public

    def prepare(self) -> None:
        """Import MLflow and open the store now, before training, instead of in the sender thread
        during the first steps (on a small machine that import steals the training's CPU). An
        unreachable store is not an error here: the sender retries as usual."""
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            self._client.get_run(self.run_id)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            log.info("MetricsLogger(run %s): store not reachable yet (%s); metrics are buffered", self.run_id, exc)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record numeric ``metrics`` at optimizer ``step``; non-numeric values are ignored."""
        numeric = {}
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                numeric[str(key)] = number
        if not numeric:
            return
        step = int(step)
        self.history.append({"step": step, **numeric})
        timestamp = _now_ms()
        with self._cond:
            if self._closed:
                self._record_error(f"log() after close() ignored (step {step})")
            else:
                self._pending.extend((_mlflow_key(k), v, timestamp, step) for k, v in numeric.items())
                self._ensure_thread()
                self._cond.notify_all()
        if self._wandb is not None:
            try:
                self._wandb.log(numeric, step)
            except Exception as exc:  # noqa: BLE001
                self._record_error(f"W&B log at step {step}: {exc}")

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Send buffered metrics, retrying for up to ``timeout_s`` (default ``flush_retry_s``); True if nothing is pending."""
        deadline = time.monotonic() + (self.flush_retry_s if timeout_s is None else timeout_s)
        with self._cond:
            if not self._pending:
                return True
            self._ensure_thread()
            self._hurry = True
            self._next_attempt = 0.0
            self._cond.notify_all()
            try:
                while self._pending and not self._stop:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                self._hurry = False
            return not self._pending

    def close(self, timeout_s: Optional[float] = None) -> dict:
        """Flush (see :meth:`flush`), stop the sender, finish W&B; returns ``{"pending": n_unsent, "errors": [...]}``."""
        if not self._closed:
            self.flush(timeout_s)
            with self._cond:
                self._closed = True
                self._stop = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=5)
            if self._wandb is not None:
                try:
                    self._wandb.finish()
                except Exception as exc:  # noqa: BLE001
                    self._record_error(f"W&B finish: {exc}")
            pending = len(self._pending)
            if pending:
                log.warning("MetricsLogger closed with %d metric values not sent to %s (run %s)", pending, self.tracking_uri, self.run_id)
        with self._cond:
            return {"pending": len(self._pending), "errors": list(self.errors)}

    @property
    def pending(self) -> int:
        """Metric values buffered but not yet accepted by MLflow."""
        with self._cond:
            return len(self._pending)

    # -- sender thread

    def _record_error(self, message: str) -> None:
        # Keep the first errors and the latest ones; a server down for hours must not grow this forever.
        if len(self.errors) >= 100:
            del self.errors[50]
        self.errors.append(message)
        log.warning("MetricsLogger(run %s): %s", self.run_id, message)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{self.run_id[:8]}", daemon=True)
            self._thread.start()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    if self._pending:
                        wait_s = self._next_attempt - time.monotonic()
                        if wait_s <= 0:
                            break
                        self._cond.wait(wait_s)
                    else:
                        self._cond.wait()
                if self._stop:
                    return
                batch = self._pending[:MAX_METRICS_PER_BATCH]
            error = self._send(batch)
            with self._cond:
                if error is None:
                    del self._pending[: len(batch)]
                    self._retry_s = self._RETRY_MIN_S
                    self._next_attempt = 0.0
                elif error[1]:  # permanent: drop it, keep the rest moving
                    del self._pending[: len(batch)]
                    self._record_error(f"dropped {len(batch)} metric values MLflow rejected: {error[0]}")
                else:
                    if self._retry_s == self._RETRY_MIN_S:  # first failure of an outage
                        self._record_error(f"MLflow unreachable, buffering {len(self._pending)} metric values: {error[0]}")
                    self._next_attempt = time.monotonic() + (min(self._retry_s, 0.5) if self._hurry else self._retry_s)
                    self._retry_s = min(self._retry_s * 2, self._RETRY_MAX_S)
                self._cond.notify_all()

    def _send(self, batch: list[tuple[str, float, int, int]]) -> Optional[tuple[str, bool]]:
        """None on success, else (message, permanent)."""
        try:
            from mlflow.entities import Metric

            if self._client is None:
                self._client = _client(self.tracking_uri)
            metrics = [Metric(key, value, ts, step) for key, value, ts, step in batch]
            self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            return None
        except Exception as exc:  # noqa: BLE001 - anything from the network or store is retried
            return f"{type(exc).__name__}: {exc}"[:2000], _error_code(exc) in _PERMANENT_ERROR_CODES
