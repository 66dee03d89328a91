"""Tracking through a real `mlflow server`: an outage mid-run, and a PostgreSQL backend store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lorafleet.config import TrackingConfig
from lorafleet.tracking import (
    MetricsLogger,
    download_adapter,
    finish_run,
    list_registered_adapters,
    plot_loss_curve,
    register_adapter,
    start_or_resume_run,
)


@pytest.fixture
def fast_failing_http(monkeypatch):
    # MLflow's REST client retries a refused connection 7 times with exponential backoff (minutes).
    # The logger runs those retries in its sender thread, so training would not block either way;
    # turning them off makes the outage reach the logger's own buffer within the test's time.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_metrics_survive_a_tracking_server_outage(mlflow_server, fast_failing_http, tracking_home):
    server = mlflow_server()
    cfg = TrackingConfig(mlflow_tracking_uri=server.url, experiment_name="outage")
    run_id = start_or_resume_run(cfg, "outage", {"lora.r": 8}, {})
    logger = MetricsLogger(server.url, run_id, flush_retry_s=60)

    for step in range(0, 5):
        logger.log({"train_loss": 10.0 - step}, step=step)
    assert logger.flush(timeout_s=30)

    server.kill()  # crash: no goodbye
    started = time.monotonic()
    for step in range(5, 10):
        logger.log({"train_loss": 10.0 - step}, step=step)
    assert time.monotonic() - started < 1.0, "log() must not wait for the dead server"
    assert wait_until(lambda: any("unreachable" in e for e in logger.errors), timeout_s=15), logger.errors
    assert logger.pending == 5
    assert not logger.flush(timeout_s=1)

    mlflow_server(backend_store_uri=server.backend_store_uri, port=server.port)  # same store, same port
    logger.log({"train_loss": 0.0}, step=10)
    assert logger.flush(), logger.errors
    assert logger.close()["pending"] == 0

    history = MlflowClient(server.url).get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 10.0 - s) for s in range(11)]


@pytest.mark.postgres
def test_full_flow_through_server_with_postgres_store(postgres_db, mlflow_server, tmp_path, make_adapter, same_tree):
    server = mlflow_server(backend_store_uri=postgres_db)
    cfg = TrackingConfig(mlflow_tracking_uri=server.url, experiment_name="pg", register_as="pg-adapter")
    run_id = start_or_resume_run(cfg, "pg-run", {"lora.r": 4, "model.name_or_path": "tiny"}, {"lorafleet.task": "classification"})
    assert start_or_resume_run(cfg, "pg-run", {"lora.r": 4}, {}) == run_id

    logger = MetricsLogger(server.url, run_id)
    for step in range(1, 4):
        logger.log({"train_loss": 1.0 / step}, step=step)
    assert logger.close() == {"pending": 0, "errors": []}

    adapter = make_adapter(tmp_path / "out" / "adapter", seed=3)
    png = plot_loss_curve(logger.history, str(tmp_path / "out" / "loss_curve.png"))
    finish_run(cfg, run_id, {"eval_loss": 0.7}, {"adapter": str(adapter), "plots": png})
    name, version = register_adapter(cfg, run_id, tags={"task": "classification", "r": "4"})
    assert (name, version) == ("pg-adapter", "1")

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "4" and run.data.metrics["eval_loss"] == 0.7
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    # Uploads went through the server (--serve-artifacts) into its artifacts destination.
    stored = list(Path(server.artifacts_destination).rglob("adapter_model.safetensors"))
    assert len(stored) == 1

    rows = list_registered_adapters(server.url, name="pg-adapter")
    assert [(r["version"], r["run_id"], r["tags"]) for r in rows] == [("1", run_id, {"task": "classification", "r": "4"})]
    local = download_adapter(server.url, "models:/pg-adapter/1", str(tmp_path / "dl"))
    assert same_tree(Path(local), adapter)
