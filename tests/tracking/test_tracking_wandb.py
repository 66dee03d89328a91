"""Weights & Biases offline runs (no network) and the online-mode key check."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from lorafleet.config import TrackingConfig
from lorafleet.tracking import MetricsLogger, WandbRun, WandbSettings, resolve_tracking_uri, start_or_resume_run, wandb_run_id


def read_wandb_records(path: Path) -> list:
    """Decode a ``.wandb`` transaction log into ``wandb_internal_pb2.Record`` messages.

    ``wandb.Api`` cannot read offline runs and wandb no longer ships a Python reader, so this
    follows the format: a 7-byte header (``:W&B``, magic, version) then LevelDB-log style
    32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def test_offline_wandb_run_next_to_mlflow(tracking_home, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = TrackingConfig(wandb="offline", wandb_project="lorafleet-tests", wandb_group="sweep-1")
    out = tmp_path / "out"
    settings = WandbSettings.from_config(cfg, name="banking77", config={"lora.r": 8, "training.learning_rate": 2e-4}, dir=str(out))
    assert settings.mode == "offline" and settings.run_id == wandb_run_id("banking77", "lorafleet-tests", "sweep-1")
    assert settings.run_id == wandb_run_id("banking77", "lorafleet-tests", "sweep-1")  # stable: a restarted worker resumes it

    run_id = start_or_resume_run(cfg, "banking77", {}, {})
    logger = MetricsLogger(resolve_tracking_uri(cfg), run_id, wandb=settings)
    for step in range(1, 5):
        logger.log({"train_loss": 1.0 / step, "learning_rate": 2e-4}, step=step)
    assert logger.close() == {"pending": 0, "errors": []}

    run_dirs = list((out / "wandb").glob(f"offline-run-*-{settings.run_id}"))
    assert len(run_dirs) == 1, list((out / "wandb").iterdir())
    log_file = run_dirs[0] / f"run-{settings.run_id}.wandb"
    assert log_file.is_file() and log_file.stat().st_size > 0

    # run.finish() returns a few ms before wandb-core's writer has flushed the log: wait for its exit record.
    deadline = time.monotonic() + 30
    while True:
        records = read_wandb_records(log_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "exit" in kinds, (kinds, log_file.stat().st_size)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == settings.run_id and runs[0].project == "lorafleet-tests" and runs[0].run_group == "sweep-1"
    config = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in runs[0].config.update}
    assert config["lora.r"] == 8
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            # wandb writes either `key` or `nested_key` (a path) depending on the version/setting.
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train_loss" in items:
                history[record.history.step.num] = items["train_loss"]
    assert history == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})


def test_wandb_off_and_online_without_key(monkeypatch, tracking_home, tmp_path):
    assert WandbSettings.from_config(TrackingConfig(), name="x", config={}, dir=str(tmp_path)) is None

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    online = TrackingConfig(wandb="online")
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        WandbSettings.from_config(online, name="x", config={}, dir=str(tmp_path))
    settings = WandbSettings(mode="online", project="p", entity=None, group=None, name="x", run_id=None, config={}, dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        WandbRun(settings)

    # A worker whose W&B cannot start keeps training and logging to MLflow.
    run_id = start_or_resume_run(TrackingConfig(), "no-wandb", {}, {})
    logger = MetricsLogger(resolve_tracking_uri(TrackingConfig()), run_id, wandb=settings)
    logger.log({"train_loss": 1.0}, step=1)
    report = logger.close()
    assert report["pending"] == 0
    assert any("WANDB_API_KEY" in e for e in report["errors"])
