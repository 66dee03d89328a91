"""Fixtures for the serving tests: a tiny base and decisive adapters built in-process (no Ray),
their offline PEFT + Transformers outputs, and an MLflow registry holding one adapter.

The base is a 2-layer Llama (hidden 128, 2 heads of dimension 64, the size vLLM's CPU
attention accepts) with a BPE tokenizer trained on banking77 queries and a short plain-torch
language-model pre-training, so its own greedy outputs are not coin flips. Each adapter is
trained with plain PEFT for a few dozen steps to answer every query with its own phrase, so
the adapter that answered is obvious from the text.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest

from serve_helpers import (
    ADMIN_KEY, APP, BASE, LOCAL_ADAPTERS, MAX_MODEL_LEN, PREFIX, PROMPT_SUFFIX, TARGETS, TOKEN_CAP, ServeAssets, Served, free_port,
    offline_greedy, train_adapter, train_base,
)
from testutils import banking_rows


@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory) -> ServeAssets:
    """Tiny base + 4 adapters + offline expectations (built once per session, ~30 s)."""
    import torch

    # Tiny matmuls: one thread is ~3x faster than two on a busy 2-core machine (no OpenMP
    # spinning against other processes). Restored afterwards for the rest of the session.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_assets(tmp_path_factory.mktemp("serve-assets"))
    finally:
        torch.set_num_threads(threads)


def _build_assets(root: Path) -> ServeAssets:
    rows = banking_rows(4000, seed=3)
    lines = [r["text"] for r in rows]
    base = root / "base"
    train_base(base, lines, steps=150)
    queries = lines[:400]
    adapters = {}
    for i, (name, target) in enumerate(TARGETS.items()):
        adapters[name] = root / "adapters" / name
        train_adapter(base, adapters[name], target, queries, seed=i)
    prompts = [q + PROMPT_SUFFIX for q in (lines[1000], lines[1001], lines[1002])]
    messages = [{"role": "user", "content": lines[1003]}]
    from transformers import AutoTokenizer

    chat_prompt = AutoTokenizer.from_pretrained(base).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assets = ServeAssets(root, base, adapters, prompts, messages, chat_prompt=chat_prompt)
    tok = AutoTokenizer.from_pretrained(base)
    for name in ["base", *TARGETS]:
        path = None if name == "base" else adapters[name]
        ids = offline_greedy(base, path, prompts)
        ids.update(offline_greedy(base, path, [chat_prompt], add_special_tokens=False))
        assets.expected_ids[name] = ids
        assets.expected_text[name] = {p: tok.decode(t, skip_special_tokens=True) for p, t in ids.items()}
    return assets


@pytest.fixture(scope="session")
def mlflow_adapter(serve_assets, tmp_path_factory) -> tuple[str, str, str]:
    """The delta adapter registered in a fresh sqlite MLflow store: (tracking_uri, "models:/.../1", "models:/...@champion")."""
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("serve-mlflow")
    uri = f"sqlite:///{home}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serve-test", artifact_location=(home / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(serve_assets.adapters["delta"]), artifact_path="adapter")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("serve-test-delta")
    mv = client.create_model_version("serve-test-delta", source=f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("serve-test-delta", "champion", mv.version)
    return uri, f"models:/serve-test-delta/{mv.version}", "models:/serve-test-delta@champion"


@pytest.fixture
def copy_adapter(serve_assets):
    """Factory: copy an adapter folder somewhere (for path-rule tests)."""
    def copy(name: str, dst: Path) -> Path:
        shutil.copytree(serve_assets.adapters[name], dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def served(serve_assets, mlflow_adapter, tmp_path_factory, ray_cluster):
    """One Ray Serve app for the session: two server replicas (each a vLLM engine) on the tiny base, the config's
    adapters (three local, one from MLflow under two URIs), anonymous calls allowed, an admin key,
    and a SQLite tenant registry in a temporary state dir. It runs on the session's one Ray (ray_cluster)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from lorafleet.serve.app import app_from_config
    from lorafleet.serve.config import ServeConfig

    tracking_uri, version_uri, alias_uri = mlflow_adapter
    client = _get_global_client(raise_if_no_controller_running=False)
    started_serve = client is None
    if started_serve:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        port = client.http_config.port
    uploads, outside = tmp_path_factory.mktemp("uploads"), tmp_path_factory.mktemp("outside")
    adapters = [{"name": n, "source": str(serve_assets.adapters[n])} for n in LOCAL_ADAPTERS]
    adapters += [{"name": "delta", "source": version_uri}, {"name": "delta-champion", "source": alias_uri}]
    cfg = ServeConfig(
        model=str(serve_assets.base), served_model_name=BASE, adapters=adapters,
        allowed_local_roots=[str(serve_assets.root / "adapters"), str(uploads)], mlflow_tracking_uri=tracking_uri,
        adapter_cache_dir=str(tmp_path_factory.mktemp("adapter-cache")),
        engine={"max_model_len": MAX_MODEL_LEN, "max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 8, "max_num_seqs": 4,
                "kv_cache_memory_bytes": 64 * 2**20, "tool_call_parser": "hermes", "json_whitespace": False},
        # Two engines on a 2-core machine: one OpenMP thread each, unpinned, instead of both
        # binding every core and spinning against each other.
        deployment={"num_replicas": 2, "max_ongoing_requests": 4, "health_check_period_s": 5,
                    "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}},
        limits={"max_tokens": TOKEN_CAP, "max_body_bytes": 65536, "max_queued_requests": 8},
        tenancy={"state_dir": str(tmp_path_factory.mktemp("serve-state")), "admin_key": ADMIN_KEY, "allow_anonymous": True,
                 "poll_interval_s": 0.5, "max_adapter_bytes": 20 * 2**20},
        # uploads past limits.max_body_bytes (64 KiB) but small enough to reach every quota in seconds
        files={"max_file_bytes": 256 * 1024, "max_line_bytes": 16 * 1024, "max_files": 4, "max_total_bytes": 512 * 1024},
        # jobs are accepted and stay `validating_files` (test_fine_tuning_api checks the API's shapes); the app of
        # test_fine_tuning_e2e runs them
        fine_tuning={"run_jobs": False},
    )

    closed = []

    def close() -> None:
        """Delete the app (and Serve, if this fixture started it); idempotent and tolerant of a Ray already gone."""
        if closed:
            return
        closed.append(True)
        try:
            serve.delete(APP)
            if started_serve:
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - teardown: another fixture may have stopped Ray first
            print(f"serve app teardown: {exc!r}")

    def deploy() -> float:
        started = time.monotonic()
        serve.run(app_from_config(cfg), name=APP, route_prefix=PREFIX)
        return time.monotonic() - started

    def restart() -> float:
        serve.delete(APP)
        return deploy()

    try:
        startup_s = deploy()
        print(f"\nlorafleet app with 2 vLLM replicas up in {startup_s:.1f}s on port {port}")
        yield Served(f"http://127.0.0.1:{port}{PREFIX}", cfg, startup_s, defaultdict(set), uploads, outside, restart, close)
    finally:
        close()
