"""One adapter, four tasks: jobs/finetune.py trains jobs/configs/mixture-lora.yaml (banking77 and DialogSum from the
shared data, generated claims and chat rows) on 2 FSDP2 workers of the session's Ray; MLflow gets every dataset's
metrics and the mixture, the adapter is registered, and `lorafleet eval --config` scores it and the base on every
dataset's held-out rows in one call: the adapter beats the base on each task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.sample_data import claim_rows
from testutils import DIALOGSUM, REPO, banking_rows, write_rows

pytestmark = pytest.mark.slow
CONFIG = REPO / "jobs" / "configs" / "mixture-lora.yaml"


def chat_rows(n: int) -> list[dict]:
    """Conversations in OpenAI's `messages` format: a customer's query, the assistant names its topic."""
    return [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": "This is about " + r["category"].replace("_", " ") + "."}]}
            for r in banking_rows(n, seed=11)]


@pytest.fixture(scope="module")
def mixture_run(tiny_base, tmp_path_factory, ray_address, work_home):
    d = tmp_path_factory.mktemp("mixture")
    chat = d / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(300)))
    sets = [f"model.name_or_path={tiny_base}", f"output_dir={d / 'out'}", "run_name=test-mixture",
            f"data.mixture.0.path={write_rows(d / 'banking.csv', banking_rows(1500, seed=5))}",
            f"data.mixture.1.path={DIALOGSUM}", "data.mixture.1.max_train_samples=200",
            f"data.mixture.2.path={write_rows(d / 'claims.csv', claim_rows(60))}", f"data.mixture.3.path={chat}",
            "data.max_eval_samples=32", "data.mixture.1.max_eval_samples=8", "training.max_steps=60",
            "training.logging_steps=10", "checkpoint.every_n_steps=30", "training.learning_rate=2e-3",
            "tracking.experiment_name=test-mixture", "tracking.register_as=test-mixture-adapter"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "LORAFLEET_HOME": str(work_home)}
    proc = subprocess.run([sys.executable, "jobs/finetune.py", "--config", str(CONFIG), *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((d / "out" / "result.json").read_text())

    def evaluate(adapter: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "lorafleet.cli", "eval", "--config", str(CONFIG), "--adapter", adapter,
                              *[a for s in sets for a in ("--set", s)], "--batch-size", "16"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return json.loads(out.stdout[out.stdout.index("{"):])

    return res, evaluate(res["adapter_path"]), evaluate("none")


def test_training_reports_every_dataset_and_mlflow_keeps_them(mixture_run):
    from mlflow.tracking import MlflowClient

    from lorafleet.config.train import TrackingConfig
    from lorafleet.tracking import resolve_tracking_uri

    res, _, _ = mixture_run
    m = res["metrics"]
    assert res["task"] == "banking77+dialogsum+claims+chat" and m["world_size"] == 2
    for key in ("eval/banking77/accuracy", "eval/banking77/macro_f1", "eval/dialogsum/rouge_l", "eval/claims/accuracy",
                "eval/chat/loss", "eval/banking77/loss", "eval_loss", "eval_score"):
        assert key in m, key
    # the score is the weighted mean of each dataset's first metric (chat has none: weights renormalised)
    expected = (0.4 * m["eval/banking77/accuracy"] + 0.3 * m["eval/dialogsum/rouge_l"] + 0.15 * m["eval/claims/accuracy"]) / 0.85
    assert m["eval_score"] == pytest.approx(expected)
    stats = res["data_stats"]
    assert stats["dialogsum/train_examples"] == 200 and stats["banking77/drawn"] > stats["claims/drawn"] > 0
    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.tags["lorafleet.mixture"] == "banking77:0.4,dialogsum:0.3,claims:0.15,chat:0.15"
    assert run.data.metrics["eval/dialogsum/rouge_l"] == pytest.approx(m["eval/dialogsum/rouge_l"])
    assert len(client.get_metric_history(res["mlflow_run_id"], "eval/banking77/accuracy")) >= 1
    version = client.get_model_version("test-mixture-adapter", res["registered_version"])
    assert version.tags["task"] == "banking77+dialogsum+claims+chat" and "prompt_template" not in version.tags
    prompt = json.loads((Path(res["adapter_path"]) / "lorafleet_prompt.json").read_text())
    assert prompt["kind"] == "mixture" and "Query: {text}" in prompt["description"]


def test_the_adapter_beats_the_base_on_every_task(mixture_run):
    res, tuned, base = mixture_run
    assert set(tuned["tasks"]) == set(base["tasks"]) == {"banking77", "dialogsum", "claims", "chat"}
    assert tuned["tasks"]["banking77"]["examples"] == 32 and tuned["tasks"]["dialogsum"]["examples"] == 8
    for name, metric in (("banking77", "accuracy"), ("dialogsum", "rouge_l"), ("claims", "accuracy")):
        assert tuned["tasks"][name][metric] > base["tasks"][name][metric], (name, tuned["tasks"][name], base["tasks"][name])
    for name in tuned["tasks"]:
        assert tuned["tasks"][name]["loss"] < base["tasks"][name]["loss"], name
    assert tuned["eval_score"] > base["eval_score"]
    # the same rows, model and metric code as training's final validation
    assert tuned["tasks"]["claims"]["accuracy"] == pytest.approx(res["metrics"]["eval/claims/accuracy"])
    assert tuned["tasks"]["chat"]["loss"] == pytest.approx(res["metrics"]["eval/chat/loss"], rel=1e-3)
