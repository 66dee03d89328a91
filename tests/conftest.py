"""Session-wide fixtures: one work dir (MLflow store, Ray storage), one local Ray cluster,
one tiny pre-trained base model. Built once per test session and shared, because each
costs tens of seconds on a 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testutils import banking_rows

# Whichever fixture starts the session's Ray, its Train controllers get a start timeout that
# survives a loaded 2-core machine (Ray's default is 60 s).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")

@pytest.fixture(scope="session")
def work_home(tmp_path_factory) -> Path:
    """LORAFLEET_HOME for the whole session: embedded MLflow store, Ray storage, outputs."""
    home = tmp_path_factory.mktemp("lorafleet-home")
    os.environ["LORAFLEET_HOME"] = str(home)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    return home


@pytest.fixture(scope="session")
def ray_cluster(work_home):
    """One local Ray for the session. 8 logical CPUs on 2 cores: Train controllers and
    trial functions hold slots of their own (see README troubleshooting)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, log_to_driver=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, ray_address, work_home) -> Path:
    """A tiny Llama (4 layers, hidden 128, head_dim 64) pre-trained briefly on banking77 queries
    through the real Ray Train job (method full, task raw_text, DDP on 2 workers), built with the
    exact command users run: `lorafleet base build --out DIR --corpus FILE`."""
    d = tmp_path_factory.mktemp("base")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in banking_rows(4000, seed=1)) + "\n", encoding="utf-8")
    cli = Path(sys.executable).with_name("lorafleet")
    proc = subprocess.run([str(cli), "base", "build", "--out", str(d / "base"), "--corpus", str(corpus),
                           "--set", "architecture.vocab_size=2048", "--set", "pretrain.num_epochs=3",
                           "--set", "tracking.experiment_name=test-base"],
                          env={**os.environ, "RAY_ADDRESS": ray_address, "LORAFLEET_HOME": str(work_home)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert info["parameters"] > 1_000_000 and info["pretrain_eval_loss"] < 5.0, info
    assert (d / "base" / "model.safetensors").is_file() and (d / "base" / "tokenizer.json").is_file()
    return d / "base"
