"""Crashes never mean retraining: a killed worker and a killed driver both resume from the
latest checkpoint (model shards, optimizer, scheduler, step, data position)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lorafleet.train import run_finetune
from testutils import REPO, banking_rows, write_rows
from train.test_finetune import CONFIG, make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("ft") / "bank.csv", banking_rows(600, seed=5))


def _wait_for_checkpoint(run_dir: Path, timeout_s: float = 300) -> bool:
    """Until Ray Train has *registered* a checkpoint of the run. Files appear in storage as each
    rank uploads; the checkpoint only counts once every rank has reported and the controller
    recorded it in its snapshot (Ray 2.60's checkpoint_manager_snapshot.json)."""
    deadline = time.time() + timeout_s
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return False


def _train_workers() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def test_sigkilled_worker_resumes_from_last_checkpoint(tiny_base, small_csv, tmp_path, work_home):
    cfg = make_cfg(tiny_base, small_csv, tmp_path / "out", "test-kill-worker", "training.max_steps=30",
                   "checkpoint.every_n_steps=5", "training.logging_steps=5", "tracking.enabled=false",
                   "training.generation_metrics=false", "checkpoint.max_failures=2")
    run_dir = Path(cfg.resolved_storage_path()) / cfg.run_name
    killed: list[int] = []

    def killer():
        if _wait_for_checkpoint(run_dir):
            workers = _train_workers()
            if workers:
                workers[-1].kill()  # SIGKILL, no chance to clean up
                killed.append(workers[-1].pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = run_finetune(cfg)
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert res["metrics"]["step"] == 30
    # The restarted worker group loaded a checkpoint instead of starting from step 0.
    assert res["resumed_from_step"] and res["resumed_from_step"] % 5 == 0, res["resumed_from_step"]
    assert res["metrics"]["resumed_from_step"] == res["resumed_from_step"]


def test_killed_driver_then_same_run_name_resumes(tiny_base, small_csv, tmp_path, work_home, ray_address):
    """SIGKILL the driver of `jobs/finetune.py` (connected to the session's Ray cluster); re-running
    the same command continues from the latest checkpoint and the same MLflow run."""
    sets = [f"model.name_or_path={tiny_base}", f"data.path={small_csv}", f"output_dir={tmp_path / 'out'}",
            "run_name=test-kill-driver", "training.max_steps=40", "checkpoint.every_n_steps=5", "training.logging_steps=5",
            "training.generation_metrics=false", "training.max_seq_length=128", "tracking.experiment_name=test-kill-driver"]
    cmd = [sys.executable, "jobs/finetune.py", "--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "LORAFLEET_HOME": str(work_home)}
    run_dir = work_home / "ray_results" / "test-kill-driver"
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_checkpoint(run_dir), "the first attempt never wrote a checkpoint"
    finally:
        first.kill()
        first.wait()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["metrics"]["step"] == 40
    assert res["resumed_from_step"] and res["resumed_from_step"] >= 5
    from mlflow.tracking import MlflowClient

    from lorafleet.config.train import TrackingConfig
    from lorafleet.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    exp = client.get_experiment_by_name("test-kill-driver")
    runs = client.search_runs([exp.experiment_id], "tags.`lorafleet.run_name` = 'test-kill-driver'")
    assert [r.info.run_id for r in runs] == [res["mlflow_run_id"]], "the resubmission should continue the same MLflow run"
