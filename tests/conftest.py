"""Session-wide fixtures: one work dir (MLflow store, Ray storage), one local Ray cluster,
one tiny pre-trained base model. Built once per test session and shared, because each
costs tens of seconds on a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testutils import banking_rows

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
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, ray_cluster) -> Path:
    """A tiny Llama (4 layers, hidden 128, head_dim 64) pre-trained briefly on banking77 queries
    through the real Ray Train job (method full, task raw_text, DDP on 2 workers)."""
    from lorafleet.base.build import ArchitectureConfig, BaseBuildConfig, PretrainConfig, build_base
    from lorafleet.config.train import TrackingConfig

    d = tmp_path_factory.mktemp("base")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in banking_rows(4000, seed=1)) + "\n", encoding="utf-8")
    cfg = BaseBuildConfig(out=str(d / "base"), corpus=[str(corpus)],
                          architecture=ArchitectureConfig(vocab_size=2048),
                          pretrain=PretrainConfig(num_epochs=2, per_device_batch_size=16, max_seq_length=64),
                          tracking=TrackingConfig(experiment_name="test-base"))
    info = build_base(cfg)
    assert info["pretrain_metrics"]["eval_loss"] < 6.0, info
    return d / "base"
