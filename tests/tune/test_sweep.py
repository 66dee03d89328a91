"""Ray Tune sweeps where every trial is its own Ray Train run: ASHA early stopping, a failing
trial that does not end the sweep, the best adapter registered, and resume after the sweep's
driver is killed without re-running finished trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafleet.config import ConfigError, load_config
from lorafleet.config.sweep import SweepConfig
from lorafleet.tune import derive_max_concurrent_trials
from testutils import REPO, banking_rows, record_scenario, write_rows


def test_concurrency_is_derived_from_cluster_resources():
    cfg = load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml",
                      ["finetune.distributed.use_gpu=true", "finetune.distributed.num_workers=4",
                       "finetune.distributed.resources_per_worker={GPU: 1, CPU: 8}"])
    n, why = derive_max_concurrent_trials(cfg.sweep, cfg.finetune, {"GPU": 12.0, "CPU": 96.0})
    assert n == 3 and "12 GPU" in why and "4 workers x 1 GPU" in why
    cfg.sweep.max_concurrent_trials = 2
    assert derive_max_concurrent_trials(cfg.sweep, cfg.finetune, {"GPU": 12.0})[0] == 2


def test_space_paths_and_ranges_are_checked_before_anything_runs(tmp_path):
    data = yaml.safe_load((REPO / "jobs/configs/banking77-sweep.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    data["sweep"]["space"] = {"lora.lora_dropout": {"uniform": [0.1, 0.0]}, "lora.r": {"choice": []}}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(SweepConfig, bad)
    assert "low < high (got [0.1, 0.0])" in str(exc.value) and "sweep.space.lora.r" in str(exc.value)
    # Paths are checked with every other problem of the file (here: a bad fine-tune key too)...
    data["sweep"]["space"] = {"lora.rank": {"choice": [4]}, "lora.dropout": {"choice": [0.1]}}
    data["finetune"]["lora"] = {"alpha": 16}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(SweepConfig, bad)
    msg = str(exc.value)
    assert "'lora.rank': unknown key" in msg and "'lora.dropout': unknown key" in msg and "finetune.lora.alpha: unknown key" in msg
    # ...and both ends of ranges against the fine-tune model, all keys at once.
    del data["finetune"]["lora"]
    data["sweep"]["space"] = {"training.warmup_ratio": {"uniform": [0.1, 2.0]}, "lora.r": {"choice": [4, 0]}}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(SweepConfig, bad)
    msg = str(exc.value)
    assert "training.warmup_ratio: Input should be less than 1 (got 2.0)" in msg and "sweep.space['lora.r'] value 0" in msg


def test_metric_must_be_one_the_task_reports():
    with pytest.raises(ConfigError, match=r"'eval_rouge_l' is never reported for task 'banking77'"):
        load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml", ["sweep.metric=eval_rouge_l"])
    with pytest.raises(ConfigError, match="needs finetune.training.generation_metrics: true"):
        load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml", ["finetune.training.generation_metrics=false"])


def test_trials_use_the_mlflow_store_the_driver_resolved(tmp_path, monkeypatch):
    """A trial may run on another node, whose own default work dir (another disk, another sqlite
    file) would silently split the sweep's runs: the driver's resolved store is pinned into the
    trial config, and a file store on a multi-node cluster is warned about."""
    from lorafleet.tracking import resolve_artifact_location, resolve_tracking_uri, warn_if_node_local
    from lorafleet.tune.sweep import prepare_trial_base

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "driver-home"))
    cfg = load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml")
    monkeypatch.setattr("lorafleet.train.trainer.resolve_local_paths", lambda ft: ft)
    base = prepare_trial_base(cfg)
    driver_uri = f"sqlite:///{tmp_path / 'driver-home'}/mlflow.db"
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "other-node-home"))  # what a trial elsewhere would see
    assert resolve_tracking_uri(base.tracking) == driver_uri
    assert resolve_artifact_location(base.tracking) == (tmp_path / "driver-home" / "mlartifacts").as_uri()
    assert resolve_tracking_uri(cfg.finetune.tracking) != driver_uri  # unpinned, it would have split

    assert "every node shares" in warn_if_node_local(driver_uri, nodes=3)
    assert warn_if_node_local(driver_uri, nodes=1) is None
    assert warn_if_node_local("postgresql://db/mlflow", nodes=3) is None
    assert warn_if_node_local("http://mlflow:5000", nodes=3) is None


def test_optuna_search_is_a_config_choice():
    from ray.tune.search.optuna import OptunaSearch

    from lorafleet.tune.sweep import _search_alg

    cfg = load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml", ["sweep.search=optuna"])
    assert isinstance(_search_alg(cfg.sweep, "max"), OptunaSearch)


def test_random_and_grid_search_respect_the_concurrency_limit():
    from lorafleet.tune.sweep import _search_alg

    cfg = load_config(SweepConfig, REPO / "jobs/configs/banking77-sweep.yaml")
    assert _search_alg(cfg.sweep, "max", 3).max_concurrent == 3


def _span(out: Path, tmp_path: Path, trial_id: str, work_home: Path) -> tuple[float, float]:
    """(first, last) report time of a trial, from Tune's per-trial result.json lines."""
    trial_dir = next((work_home / "tune_results" / "test-sweep").glob(f"_trial_{trial_id}_*"))
    stamps = [json.loads(line)["timestamp"] for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return min(stamps), max(stamps)


def _sweep_yaml(tmp_path: Path, base: Path, data: Path) -> Path:
    cfg = {
        "sweep": {
            "name": "test-sweep", "metric": "eval_loss", "search": "grid", "num_samples": 1, "eval_every_n_steps": 4,
            # One trial at a time with 2 FSDP workers each: what two cores hold, and it leaves work
            # to resume after the first trial finishes.
            "max_concurrent_trials": 1,
            "space": {
                # [nonexistent_proj] is valid config but no such module exists: that trial fails in its workers.
                "lora.target_modules": {"grid": ["attention", "all-linear", ["nonexistent_proj"]]},
                "training.learning_rate": {"grid": [3.0e-3, 1.0e-5]},
            },
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        },
        "finetune": {
            "method": "lora", "model": {"name_or_path": str(base)},
            "lora": {"r": 8, "lora_alpha": 16},
            "data": {"task": "banking77", "path": str(data), "max_eval_samples": 16},
            "training": {"max_steps": 16, "per_device_batch_size": 16, "max_seq_length": 128, "generation_metrics": False},
            "distributed": {"num_workers": 2, "strategy": "fsdp"},
            "checkpoint": {"every_n_steps": 8, "max_failures": 0},
            "tracking": {"experiment_name": "test-sweep", "register_as": "test-sweep-best"},
            "output_dir": str(tmp_path / "sweep-out"),
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text("# python jobs/sweep.py --config sweep.yaml\n" + yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sweep_asha_failure_registration_and_resume(tiny_base, tmp_path, work_home, ray_address):
    data = write_rows(tmp_path / "bank.csv", banking_rows(800, seed=11))
    config = _sweep_yaml(tmp_path, tiny_base, data)
    out = tmp_path / "sweep-out"
    env = {**os.environ, "RAY_ADDRESS": ray_address, "LORAFLEET_HOME": str(work_home)}
    cmd = [sys.executable, "jobs/sweep.py", "--config", str(config)]

    # Attempt 1: kill the sweep's driver once a trial has finished (and Tune has had time to record it).
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    finished: dict[str, float] = {}
    try:
        while time.time() < deadline and not finished and first.poll() is None:
            finished = {p.parent.name: p.stat().st_mtime for p in out.glob("trials/*/result.json")}
            time.sleep(0.5)
        assert finished, "no trial finished in the first attempt"
        time.sleep(6)  # > TUNE_GLOBAL_CHECKPOINT_S: the experiment state includes the finished trial
        finished = {p.parent.name: p.stat().st_mtime for p in out.glob("trials/*/result.json")}
    finally:
        first.kill()
        first.wait()
    interrupted = first.returncode != 0
    assert interrupted, "the first attempt finished before it could be interrupted; make the sweep longer"

    # Attempt 2: the same command resumes.
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout
    assert "| trial | status | eval_loss |" in second.stdout

    result = json.loads((out / "result.json").read_text())
    trials = result["trials"]
    assert len(trials) == 6
    statuses = [t["status"] for t in trials]
    assert statuses.count("error") == 2, trials  # both nonexistent_proj trials, and the sweep went on
    assert all("nonexistent_proj" in str(t["params"]) for t in trials if t["status"] == "error"), trials
    assert "early_stopped" in statuses, trials  # ASHA stopped at least one trial
    assert statuses.count("completed") >= 1
    # max_concurrent_trials=1: no two trials' runs overlapped in time.
    spans = sorted((_span(out, tmp_path, t["trial_id"], work_home)) for t in trials if t["status"] != "error")
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    # Trials finished in attempt 1 were not run again: their outputs are untouched.
    for trial_id, mtime in finished.items():
        assert (out / "trials" / trial_id / "result.json").stat().st_mtime == mtime, trial_id

    best = result["best"]
    completed = [t for t in trials if t["status"] == "completed"]
    assert best["metric"] == min(t["metric"] for t in completed)
    assert best["registered_model"] == "test-sweep-best" and best["registered_version"]
    from mlflow.tracking import MlflowClient

    from lorafleet.config.train import TrackingConfig
    from lorafleet.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    mv = client.get_model_version("test-sweep-best", best["registered_version"])
    assert mv.tags["sweep"] == "test-sweep"
    assert mv.tags["hp.training.learning_rate"] == str(best["params"]["training.learning_rate"])
    assert mv.tags["hp.lora.target_modules"] == str(best["params"]["lora.target_modules"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_error"] == 2
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {c.data.tags["lorafleet.trial_id"]: c for c in children}
    assert set(by_trial) == {t["trial_id"] for t in trials}
    for t in trials:
        c = by_trial[t["trial_id"]]
        expected = {"completed": "FINISHED", "early_stopped": "KILLED", "error": "FAILED"}[t["status"]]
        assert c.info.status == expected, (t, c.info.status)
        if t["status"] == "early_stopped":
            assert c.data.tags["lorafleet.early_stopped"] == "true"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/sweep_metric_vs_params.png"}
    record_scenario("training", "crashed sweep trials, sweep driver killed and resumed",
                    load=f"{len(trials)} trials one at a time, 2 FSDP workers each, ASHA",
                    faults="2 trials crash in their workers (no such module); sweep driver SIGKILLed after a trial finished",
                    lost="nothing: finished trials not re-run", outcome=f"{statuses.count('completed')} completed, "
                    f"{statuses.count('early_stopped')} early-stopped, 2 errors recorded; best trial registered as version "
                    f"{best['registered_version']}", trials=len(trials), trial_errors=statuses.count("error"),
                    finished_before_kill=len(finished))
