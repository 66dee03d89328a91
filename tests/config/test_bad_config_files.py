"""Config files with several mistakes, run the way users run them (the job scripts and the
serve CLI): exit status 2, every problem listed in one message, nothing started (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from testutils import REPO, record_scenario

CASES = {
    "train": (["jobs/finetune.py"], {
        "run_name": "x", "model": {"name_or_path": "m", "revison": "main"}, "data": {"task": "banking77", "val_fraction": 1.5},
        "training": {"epochs": 3, "learning_rate": -1}, "lora": {"r": 0}},
        ["model.revison: unknown key", "data.val_fraction", "training.epochs: unknown key", "training.learning_rate", "lora.r"]),
    "sweep": (["jobs/sweep.py"], {
        "sweep": {"name": "s", "metric": "eval_accuracy", "num_samples": 0, "space": {"lora.rank": {"choice": [8]}, "training.learning_rate": {"loguniform": [1e-3, 1e-4]}}},
        "finetune": {"model": {"name_or_path": "m"}, "data": {"task": "banking77"}, "lora": {"r": 8, "dropout": 0.1}}},
        ["num_samples", "lora.rank", "loguniform", "lora.dropout: unknown key"]),
    "serve": (["-m", "lorafleet.cli", "serve"], {
        "model": "m", "port": 70000, "engin": {}, "engine": {"max_loras": 8, "max_cpu_loras": 4, "max_lora_rank": 12},
        "deployment": {"num_replicas": 0}},
        ["port", "engin: unknown key", "max_cpu_loras (4) must be >= engine.max_loras (8)", "max_lora_rank (12)", "num_replicas"]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_config_with_many_mistakes_lists_them_all_and_starts_nothing(kind, tmp_path):
    command, content, expected = CASES[kind]
    path = tmp_path / f"bad-{kind}.yaml"
    path.write_text(yaml.safe_dump(content))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, *command, "--config", str(path)], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-2000:]
    missing = [e for e in expected if e not in out]
    assert not missing, (missing, out[-3000:])
    assert "Traceback" not in out and "Started a local Ray instance" not in out and "ray.init" not in out
    record_scenario("bad input", f"{kind} config file with {len(expected)} mistakes", bad_inputs=", ".join(expected), lost="nothing",
                    outcome="exit 2 before anything starts; one message lists every problem")
