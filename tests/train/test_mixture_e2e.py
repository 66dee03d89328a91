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


# Six intents, so the tiny base learns them within the test's budget (all 77 take an epoch of banking77).
INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "change_pin", "cancel_transfer")


def intent_rows() -> list[dict]:
    return [r for r in banking_rows(None) if r["category"] in INTENTS]


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
            f"data.mixture.0.path={write_rows(d / 'banking.csv', intent_rows())}",
            f"data.mixture.1.path={DIALOGSUM}", "data.mixture.1.max_train_samples=200",
            f"data.mixture.2.path={write_rows(d / 'claims.csv', claim_rows(60))}", f"data.mixture.3.path={chat}",
            "data.max_eval_samples=32", "data.mixture.1.max_eval_samples=8", "training.max_steps=100",
            "data.mixture.0.weight=0.35", "data.mixture.1.weight=0.2", "data.mixture.2.weight=0.3", "data.mixture.3.weight=0.15",
            "training.logging_steps=10", "checkpoint.every_n_steps=50", "training.learning_rate=3e-3",
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
    expected = (0.35 * m["eval/banking77/accuracy"] + 0.2 * m["eval/dialogsum/rouge_l"] + 0.3 * m["eval/claims/accuracy"]) / 0.85
    assert m["eval_score"] == pytest.approx(expected)
    assert res["data_stats"]["dialogsum/train_examples"] == 200
    drawn = [m[f"data/{n}/drawn"] for n in ("banking77", "dialogsum", "claims", "chat")]
    assert sum(drawn) == m["data/features"] and drawn[0] > drawn[2] > drawn[1] > drawn[3] > 0  # by weight
    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.tags["lorafleet.mixture"] == "banking77:0.35,dialogsum:0.2,claims:0.3,chat:0.15"
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
    # (generation batches differ from training's sharded ones: at most a near-tie row may flip)
    assert abs(tuned["tasks"]["claims"]["accuracy"] - res["metrics"]["eval/claims/accuracy"]) <= 1 / tuned["tasks"]["claims"]["examples"] + 1e-9
    assert tuned["tasks"]["chat"]["loss"] == pytest.approx(res["metrics"]["eval/chat/loss"], rel=1e-3)
