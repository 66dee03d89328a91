"""Crashes never mean retraining: a killed worker and a killed driver both resume from the
latest checkpoint (model shards, optimizer, scheduler, step, data position), a corrupt or
half-written latest checkpoint is passed over for the newest complete one, and a resumed run
ends with the same adapter as an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lorafleet.train import run_finetune
from testutils import REPO, banking_rows, record_scenario, registered_steps, reliability_only, write_rows
from train.test_finetune import CONFIG, make_cfg

pytestmark = pytest.mark.slow


EVERY, TOTAL = 5, 30
# Shared by the interrupted runs and the uninterrupted reference; checkpoint.* does not change training.
SETS = [f"training.max_steps={TOTAL}", f"checkpoint.every_n_steps={EVERY}", "checkpoint.keep=4", "training.logging_steps=1",
        "tracking.enabled=false", "training.generation_metrics=false", "checkpoint.max_failures=2"]


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("ft") / "bank.csv", banking_rows(600, seed=5))


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, small_csv, tmp_path_factory, work_home) -> dict:
    """The run every interrupted one must end up equal to: same config and seed, no fault.
    Its adapter weights are read now, as test_corrupt_latest_checkpoint re-runs this run name."""
    from safetensors.torch import load_file

    cfg = make_cfg(tiny_base, small_csv, tmp_path_factory.mktemp("uninterrupted"), "test-uninterrupted", *SETS)
    started = time.monotonic()
    res = run_finetune(cfg)
    return {"cfg": cfg, "res": res, "run_s": time.monotonic() - started,
            "weights": load_file(Path(res["adapter_path"]) / "adapter_model.safetensors")}


def _same_as_uninterrupted(res: dict, uninterrupted: dict) -> tuple[float, float]:
    """|eval loss delta| and max |adapter weight delta| against the uninterrupted run.

    Resuming restores the fp32 shards, AdamW moments, LR schedule and data position exactly (same
    seed, LoRA dropout 0), so only float reduction order could make a difference: the 1e-3 allowed
    on the eval loss is far above that, and well below what the last checkpoint interval of
    training moves it by (see eval_loss_change_over_last_interval in the report)."""
    from safetensors.torch import load_file

    delta = abs(res["metrics"]["eval_loss"] - uninterrupted["res"]["metrics"]["eval_loss"])
    assert delta < 1e-3, (res["metrics"]["eval_loss"], uninterrupted["res"]["metrics"]["eval_loss"])
    weights, reference = load_file(Path(res["adapter_path"]) / "adapter_model.safetensors"), uninterrupted["weights"]
    assert weights.keys() == reference.keys()
    return delta, max(float((weights[k] - reference[k]).abs().max()) for k in weights)


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


def _session_train_workers(ray) -> list[psutil.Process]:
    """Ray Train worker processes of this session's Ray only (other sessions may share the machine)."""
    node = ray._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    procs = []
    for p in raylet.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def _printed_step(log_file: Path) -> int:
    """Last "step N/M" progress line rank 0 logged (one per logging step, to the worker's stderr)."""
    steps = re.findall(r"^step (\d+)/", log_file.read_text(errors="replace"), re.M)
    return int(steps[-1]) if steps else 0


def test_sigkilled_worker_resumes_from_last_checkpoint(small_csv, tiny_base, tmp_path, ray_cluster, uninterrupted):
    """SIGKILL a random worker at a random step after the first checkpoint: the run redoes at most
    one checkpoint interval and ends with the adapter of the uninterrupted run."""
    cfg = make_cfg(tiny_base, small_csv, tmp_path / "out", "test-kill-worker", *SETS)
    run_dir = Path(cfg.resolved_storage_path()) / cfg.run_name
    seed = int(os.environ.get("LORAFLEET_FAULT_SEED", "17"))
    rng = random.Random(seed)
    target, victim_rank = rng.randint(EVERY + 1, TOTAL - 1), rng.randrange(2)
    print(f"fault seed {seed}: SIGKILL rank {victim_rank} once step {target} is reached")
    logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())
    killed: dict = {}

    def reached(rank0_log: Path) -> int:
        return max([_printed_step(rank0_log), *registered_steps(run_dir)])

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not registered_steps(run_dir):
            time.sleep(0.1)
        while time.time() < deadline:
            workers = _session_train_workers(ray_cluster)
            outs = {w.pid: next(logs.glob(f"worker-*-{w.pid}.err"), None) for w in workers}
            rank0 = [w for w in workers if outs[w.pid] and _printed_step(outs[w.pid])]
            if len(workers) == 2 and rank0 and reached(outs[rank0[0].pid]) >= target:
                victim = rank0[0] if victim_rank == 0 else next(w for w in workers if w is not rank0[0])
                victim.kill()  # SIGKILL, no chance to clean up
                time.sleep(2)  # rank 0 cannot finish another step alone; a report both ranks made is registered by now
                killed.update(step=reached(outs[rank0[0].pid]), checkpoint=max(registered_steps(run_dir)))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    started = time.monotonic()
    res = run_finetune(cfg)
    run_s = time.monotonic() - started
    thread.join(timeout=5)
    assert killed, "no training worker was killed"
    assert res["metrics"]["step"] == TOTAL
    # The restarted worker group loaded the newest complete checkpoint: the last one Ray registered
    # before the kill, or a newer one every rank had written that Ray had not registered yet.
    assert res["resumed_from_step"] == res["metrics"]["resumed_from_step"]
    assert killed["checkpoint"] <= res["resumed_from_step"] <= killed["step"], (res["resumed_from_step"], killed)
    redone = killed["step"] - res["resumed_from_step"]
    assert 0 <= redone <= EVERY, killed
    delta, weight_delta = _same_as_uninterrupted(res, uninterrupted)
    reference = uninterrupted["res"]
    record_scenario("training", "SIGKILL a training worker", load=f"{TOTAL} steps, 2 workers FSDP2, checkpoint every {EVERY}",
                    faults=f"SIGKILL rank {victim_rank} at step {killed['step']} (random target {target}, seed {seed})",
                    lost=f"{redone} step(s), redone", outcome=f"resumed from step {res['resumed_from_step']}, redid {redone} "
                    f"step(s); eval loss {res['metrics']['eval_loss']:.5f} vs {reference['metrics']['eval_loss']:.5f} uninterrupted",
                    killed_at_step=killed["step"], resumed_from_step=res["resumed_from_step"], steps_redone=redone,
                    eval_loss_delta=delta, adapter_max_abs_weight_delta=weight_delta,
                    eval_loss_change_over_last_interval=_eval_loss_change(reference, TOTAL - EVERY),
                    run_s=round(run_s, 1), uninterrupted_run_s=round(uninterrupted["run_s"], 1))


# `make test` checks the detection and the fallback on real checkpoints in tests/train/test_checkpoint_fallback.py.
@reliability_only
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(uninterrupted):
    """The finished reference run's latest checkpoint gets a truncated shard, then (second round)
    its replacement loses a rank's manifest: each re-run of the run name resumes from the newest
    complete checkpoint, redoes the steps after it, and ends with the same adapter."""
    cfg = uninterrupted["cfg"]
    run_dir = Path(cfg.resolved_storage_path()) / cfg.run_name
    assert registered_steps(run_dir) == [15, 20, 25, 30]  # keep=4

    latest = Path(uninterrupted["res"]["checkpoint_path"])
    shard = latest / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    started = time.monotonic()
    second = run_finetune(cfg)
    second_s = time.monotonic() - started
    assert second["resumed_from_step"] == TOTAL - EVERY and second["metrics"]["step"] == TOTAL, second["resumed_from_step"]
    second_delta, _ = _same_as_uninterrupted(second, uninterrupted)

    half_written = Path(second["checkpoint_path"])
    assert half_written != latest
    (half_written / "lorafleet_manifest.rank1.json").unlink()
    started = time.monotonic()
    third = run_finetune(cfg)
    third_s = time.monotonic() - started
    # Skipped both the half-written and the truncated step-30 checkpoints.
    assert third["resumed_from_step"] == TOTAL - EVERY and third["metrics"]["step"] == TOTAL, third["resumed_from_step"]
    third_delta, weight_delta = _same_as_uninterrupted(third, uninterrupted)
    assert (Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors").is_file()

    reference = uninterrupted["res"]["metrics"]["eval_loss"]
    load = f"{TOTAL} steps, 2 workers FSDP2, checkpoint every {EVERY}, keep 4"
    record_scenario("training", "corrupt latest checkpoint (truncated shard)", load=load,
                    faults=f"step-{TOTAL} checkpoint: rank 1's DCP shard cut to half its size; run name re-run",
                    lost=f"{EVERY} steps (redone)", outcome=f"resumed from step {TOTAL - EVERY} (previous complete checkpoint), "
                    f"finished step {TOTAL}; eval loss {second['metrics']['eval_loss']:.5f} vs {reference:.5f} uninterrupted",
                    resumed_from_step=second["resumed_from_step"], steps_redone=EVERY, rerun_s=round(second_s, 1),
                    eval_loss_delta=second_delta)
    record_scenario("training", "half-written latest checkpoint (a rank's manifest missing)", load=load,
                    faults=f"the new step-{TOTAL} checkpoint loses rank 1's manifest, the truncated one is still there; "
                    "run name re-run", lost=f"{EVERY} steps (redone)", outcome=f"skipped both bad step-{TOTAL} checkpoints, "
                    f"resumed from step {TOTAL - EVERY}, finished step {TOTAL}; eval loss {third['metrics']['eval_loss']:.5f} "
                    f"vs {reference:.5f} uninterrupted", resumed_from_step=third["resumed_from_step"], steps_redone=EVERY,
                    rerun_s=round(third_s, 1), eval_loss_delta=third_delta, adapter_max_abs_weight_delta=weight_delta)


def _eval_loss_change(res: dict, since_step: int) -> float:
    """How much the eval loss moved between the last evaluation at or before ``since_step`` and the end."""
    evals = [h for h in res["history"] if "eval_loss" in h]
    return abs(evals[-1]["eval_loss"] - [h for h in evals if h["step"] <= since_step][-1]["eval_loss"])


# `make test` covers a killed driver through `ray job submit` (tests/cluster/test_job_submit.py).
@reliability_only
def test_killed_driver_then_same_run_name_resumes(tiny_base, small_csv, tmp_path, work_home, ray_address):
    """SIGKILL the driver of `jobs/finetune.py` (connected to the session's Ray cluster); re-running
    the same command continues from the newest complete checkpoint and the same MLflow run, even
    when Ray has no record of it (the driver died before Ray registered a checkpoint; Ray's own
    restore from a registered checkpoint is tests/cluster/test_job_submit.py's case)."""
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
    registered = max(registered_steps(run_dir))
    # As if the driver had died before Ray's controller recorded any checkpoint (its snapshot is
    # what Ray restores from): the complete checkpoints the workers wrote must still be found.
    (run_dir / "checkpoint_manager_snapshot.json").unlink()
    started = time.monotonic()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    resubmit_s = time.monotonic() - started
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["metrics"]["step"] == 40
    assert res["resumed_from_step"] and res["resumed_from_step"] >= registered
    from mlflow.tracking import MlflowClient

    from lorafleet.config.train import TrackingConfig
    from lorafleet.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    exp = client.get_experiment_by_name("test-kill-driver")
    runs = client.search_runs([exp.experiment_id], "tags.`lorafleet.run_name` = 'test-kill-driver'")
    assert [r.info.run_id for r in runs] == [res["mlflow_run_id"]], "the resubmission should continue the same MLflow run"
    record_scenario("training", "SIGKILL the driver, resubmit the same run name", load="40 steps, 2 workers FSDP2, checkpoint every 5",
                    faults=f"SIGKILL jobs/finetune.py after the step-{registered} checkpoint, Ray's checkpoint record deleted; same command re-run",
                    lost="steps after the last checkpoint (redone)", outcome=f"resumed from step {res['resumed_from_step']} in the "
                    "same MLflow run, finished step 40", checkpoint_at_kill=registered, resumed_from_step=res["resumed_from_step"],
                    resubmit_s=round(resubmit_s, 1))
