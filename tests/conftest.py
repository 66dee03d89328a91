"""Session-wide fixtures: one work dir (MLflow store, Ray storage), one local Ray cluster,
one tiny pre-trained base model. Built once per test session and shared, because each
costs tens of seconds on a 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

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
        # address="local": a new cluster even when a `ray start` one runs on this machine (ray.init
        # would otherwise join it, and refuse num_cpus).
        ray.init(address="local", num_cpus=8, log_to_driver=False, _node_ip_address="127.0.0.1",
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


# --------------------------------------------------------------------------- PostgreSQL

DEFAULT_PG_URL = "postgresql://root@127.0.0.1:5432/test"


def _with_database(url: str, database: str, user: Optional[str] = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture
def postgres_db():
    """URL of a fresh PostgreSQL database (dropped afterwards); skips when no server answers.

    Tries ``$LORAFLEET_TEST_PG_URL`` (default postgresql://root@127.0.0.1:5432/test), then the same as user postgres.
    """
    psycopg2 = pytest.importorskip("psycopg2")
    base = os.environ.get("LORAFLEET_TEST_PG_URL", DEFAULT_PG_URL)
    candidates = [base, _with_database(base, urlsplit(base).path.lstrip("/") or "postgres", user="postgres")]
    admin, admin_url, failures = None, None, []
    for url in candidates:
        try:
            admin = psycopg2.connect(url, connect_timeout=3)
            admin_url = url
            break
        except psycopg2.OperationalError as exc:
            failures.append(f"{url}: {str(exc).strip()}")
    if admin is None:
        pytest.skip("no PostgreSQL server answered (set LORAFLEET_TEST_PG_URL): " + " | ".join(failures))
    admin.autocommit = True
    name = f"lorafleet_mlflow_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2.
        yield _with_database(admin_url, name).replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
