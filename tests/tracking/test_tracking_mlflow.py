"""MLflow runs, metrics, artifacts and registry against a real embedded sqlite store in tmp_path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from lorafleet.config import TrackingConfig
from lorafleet.tracking import (
    MetricsLogger,
    TrackingError,
    dataset_fingerprint_tag,
    download_adapter,
    finish_run,
    git_commit,
    list_registered_adapters,
    plot_loss_curve,
    register_adapter,
    resolve_artifact_location,
    resolve_tracking_uri,
    start_or_resume_run,
)


def test_default_locations_live_in_the_work_dir(tracking_home):
    cfg = TrackingConfig()
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tracking_home}/mlflow.db"
    assert tracking_home.is_dir()
    assert resolve_artifact_location(cfg) == (tracking_home / "mlartifacts").as_uri()
    assert resolve_artifact_location(TrackingConfig(mlflow_tracking_uri="http://mlflow:5000")) is None
    explicit = TrackingConfig(mlflow_tracking_uri="http://mlflow:5000", mlflow_artifact_location="s3://bucket/lorafleet")
    assert resolve_artifact_location(explicit) == "s3://bucket/lorafleet"


def test_unfinished_run_is_resumed_and_finished_run_is_not(tracking_home):
    cfg = TrackingConfig(experiment_name="resume", tags={"team": "nlp"})
    params = {"lora.r": 16, "lora.target_modules": ["q_proj", "v_proj"], "data.task": "banking77", "notes": "x" * 7000}
    run_id = start_or_resume_run(cfg, "banking77", params, {"lorafleet.task": "banking77"})

    # Driver crashed and the job was resubmitted: same run, same params, no error on re-logging.
    assert start_or_resume_run(cfg, "banking77", params, {}) == run_id
    # A failed attempt is resumed too, even with a changed param value and a new param.
    finish_run(cfg, run_id, {}, {}, status="FAILED")
    changed = {**params, "lora.r": 32, "training.seed": 7}
    assert start_or_resume_run(cfg, "banking77", changed, {}) == run_id

    client = MlflowClient(resolve_tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "banking77"
    assert run.data.params["lora.r"] == "16"  # MLflow params are immutable; the change is recorded instead
    assert run.data.params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert run.data.params["training.seed"] == "7"
    assert len(run.data.params["notes"]) == 6000
    assert run.data.tags["lorafleet.run_name"] == "banking77"
    assert run.data.tags["lorafleet.task"] == "banking77"
    assert run.data.tags["team"] == "nlp"
    assert run.data.tags["lorafleet.attempt"] == "3"
    assert run.data.tags["lorafleet.changed_params"] == "lora.r"

    finish_run(cfg, run_id, {"eval_loss": 0.5}, {})
    assert client.get_run(run_id).info.status == "FINISHED"
    new_run_id = start_or_resume_run(cfg, "banking77", params, {})
    assert new_run_id != run_id
    # Another name never picks up this run.
    assert start_or_resume_run(cfg, "other", {}, {}) not in (run_id, new_run_id)


def test_metrics_logger_logs_steps_by_run_id(tracking_home):
    cfg = TrackingConfig()
    run_id = start_or_resume_run(cfg, "metrics", {}, {})
    logger = MetricsLogger(resolve_tracking_uri(cfg), run_id)
    for step in range(1, 6):
        logger.log({"train_loss": np.float32(2.0 / step), "learning_rate": 1e-4, "epoch": step // 3, "phase": "train", "note": None}, step=step)
    logger.log({"eval_loss": 0.9, "eval/accuracy": 0.5}, step=5)
    report = logger.close()
    assert report == {"pending": 0, "errors": []}

    client = MlflowClient(resolve_tracking_uri(cfg))
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [m.value for m in history] == pytest.approx([2.0, 1.0, 2 / 3, 0.5, 0.4])
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/accuracy"] == 0.5 and "phase" not in metrics and "note" not in metrics
    assert logger.history[0] == {"step": 1, "train_loss": 2.0, "learning_rate": 1e-4, "epoch": 0.0}
    assert logger.history[-1] == {"step": 5, "eval_loss": 0.9, "eval/accuracy": 0.5}


def test_finish_register_list_download_round_trip(tracking_home, tmp_path, make_adapter, same_tree):
    cfg = TrackingConfig(experiment_name="registry", register_as="banking77-lora", tags={"team": "nlp"})
    uri = resolve_tracking_uri(cfg)
    version_tags = {"base_model": "tiny-llama", "method": "lora", "r": "8", "target_modules": "q_proj,v_proj", "task": "banking77"}

    sources = []
    for attempt in (1, 2):
        run_id = start_or_resume_run(cfg, f"banking77-{attempt}", {"lora.r": 8}, dataset_fingerprint_tag(f"fp{attempt}"))
        adapter = make_adapter(tmp_path / f"out{attempt}" / "adapter", seed=attempt)
        history = [{"step": s, "train_loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.8}]
        png = plot_loss_curve(history, str(tmp_path / f"out{attempt}" / "loss_curve.png"))
        result = tmp_path / f"out{attempt}" / "result.json"
        result.write_text('{"accuracy": 0.9}')
        finish_run(cfg, run_id, {"eval_loss": 0.8, "accuracy": 0.9}, {"adapter": str(adapter), "plots": png, "result": str(result)},
                   tags={"lorafleet.outcome": "ok"})
        name, version = register_adapter(cfg, run_id, tags=version_tags, description=f"attempt {attempt}")
        assert (name, version) == ("banking77-lora", str(attempt))
        sources.append((run_id, adapter))

    client = MlflowClient(uri)
    run_id, adapter = sources[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accuracy"] == 0.9
    assert run.data.tags["lorafleet.dataset_fingerprint"] == "fp1" and run.data.tags["lorafleet.outcome"] == "ok"
    assert sorted(a.path for a in client.list_artifacts(run_id, "adapter")) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss_curve.png"]
    assert [a.path for a in client.list_artifacts(run_id, "result")] == ["result/result.json"]
    # The embedded store keeps artifacts under the work dir, not in the current directory.
    assert (tracking_home / "mlartifacts" / run_id / "artifacts" / "adapter" / "adapter_config.json").is_file()

    client.set_registered_model_alias("banking77-lora", "champion", "2")
    rows = list_registered_adapters(uri)
    assert [(r["name"], r["version"]) for r in rows] == [("banking77-lora", "1"), ("banking77-lora", "2")]
    assert rows[0]["run_id"] == sources[0][0] and rows[0]["source"] == f"runs:/{sources[0][0]}/adapter"
    assert rows[0]["tags"] == {**version_tags, "team": "nlp"}
    assert rows[0]["aliases"] == [] and rows[1]["aliases"] == ["champion"]
    assert rows[1]["description"] == "attempt 2" and rows[1]["creation_timestamp"] > 0
    assert list_registered_adapters(uri, name="nope") == []

    local = download_adapter(uri, "models:/banking77-lora/1", str(tmp_path / "dl1"))
    assert same_tree(Path(local), sources[0][1])
    champion = download_adapter(uri, "models:/banking77-lora@champion", str(tmp_path / "dl2"))
    assert same_tree(Path(champion), sources[1][1])
    latest = download_adapter(uri, "models:/banking77-lora/latest", str(tmp_path / "dl3"))
    assert same_tree(Path(latest), sources[1][1])
    with pytest.raises(ValueError, match="models:/"):
        download_adapter(uri, "runs:/abc/adapter", str(tmp_path / "dl4"))


def test_finish_run_reports_failures_but_still_terminates(tracking_home, tmp_path):
    cfg = TrackingConfig(register_as="broken")
    run_id = start_or_resume_run(cfg, "broken", {}, {})
    with pytest.raises(TrackingError, match="does not exist"):
        finish_run(cfg, run_id, {"eval_loss": 1.0}, {"adapter": str(tmp_path / "missing")}, status="FAILED")
    client = MlflowClient(resolve_tracking_uri(cfg))
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(run_id).data.metrics["eval_loss"] == 1.0
    with pytest.raises(TrackingError, match="no artifacts under 'adapter'"):
        register_adapter(cfg, run_id)
    with pytest.raises(ValueError, match="register_as"):
        register_adapter(TrackingConfig(), run_id)


def test_git_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_commit(str(repo)) is None
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f.txt").write_text("x")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(str(repo)) == head
