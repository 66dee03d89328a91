"""End-to-end fine-tuning through the real Ray Train job on the session's tiny base:
LoRA with FSDP2 (sharding shown), QLoRA, MLflow tracking + registry, W&B offline,
evaluation CLI, merge export, and bad input failing before any worker starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.config import FinetuneConfig, load_config
from lorafleet.train import run_finetune
from testutils import REPO, banking_rows, write_rows

pytestmark = pytest.mark.slow
CONFIG = REPO / "jobs" / "configs" / "banking77-lora.yaml"


def make_cfg(base: Path, data: Path, out: Path, run_name: str, *sets: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIG, [f"model.name_or_path={base}", f"data.path={data}", f"output_dir={out}",
                                                f"run_name={run_name}", "training.max_seq_length=128", *sets])


@pytest.fixture(scope="module")
def banking_csv(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "banking.csv", banking_rows(1200, seed=3))


@pytest.fixture(scope="module")
def trained(tiny_base, banking_csv, tmp_path_factory, work_home):
    """One tracked, registered LoRA run with FSDP2 on 2 workers, W&B offline."""
    out = tmp_path_factory.mktemp("lora-out")
    cfg = make_cfg(tiny_base, banking_csv, out, "test-lora-fsdp", "training.max_steps=40", "training.logging_steps=5",
                   "checkpoint.every_n_steps=20", "data.max_eval_samples=64", "tracking.register_as=test-intent",
                   "tracking.wandb=offline", "tracking.experiment_name=test-train")
    return cfg, run_finetune(cfg)


def test_result_json_and_adapter_folder(trained):
    cfg, res = trained
    out = Path(cfg.output_dir)
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["adapter_path"] == str(out / "adapter") == res["adapter_path"]
    assert on_disk["mlflow_run_id"] and on_disk["registered_model"] == "test-intent" and on_disk["registered_version"]
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lorafleet_prompt.json"} <= files
    prompt = json.loads((out / "adapter" / "lorafleet_prompt.json").read_text())
    assert (prompt["task"], prompt["template"]) == ("banking77", "Query: {text}\nIntent:")  # what the server applies to chat
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    m = res["metrics"]
    assert m["step"] == 40 and m["world_size"] == 2
    assert m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0
    assert {"eval_loss", "eval_accuracy", "eval_macro_f1"} <= set(m)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_fsdp_really_shards_the_model(trained, tiny_base):
    """Each of the 2 ranks holds about half of the parameters (FSDP2 fully_shard per layer + root)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, res = trained
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_base).parameters())
    lora_params = sum(t.numel() for t in load_file(Path(res["adapter_path"]) / "adapter_model.safetensors").values())
    total = base_params + lora_params
    local = res["metrics"]["params/local"]
    assert 0.4 * total < local < 0.6 * total, (local, total)
    assert res["metrics"]["params/trainable_local"] < lora_params


def test_loss_goes_down_and_adapter_changes_the_output(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, res = trained
    final_metrics = json.loads(Path(cfg.output_dir, "result.json").read_text())["metrics"]
    state = [h for h in _history(res) if "train_loss" in h]
    assert state[-1]["train_loss"] < state[0]["train_loss"] * 0.8, state
    tok = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = tok("Query: I lost my card\nIntent:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        peft = PeftModel.from_pretrained(base, res["adapter_path"])
        after = peft(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert final_metrics["eval_loss"] < 10


def _history(res) -> list[dict]:
    from lorafleet.train.checkpoint import read_train_state

    return read_train_state(res["checkpoint_path"]).history


def test_mlflow_run_params_metrics_artifacts_and_registry(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lorafleet.tracking import list_registered_adapters, resolve_tracking_uri

    cfg, res = trained
    client = MlflowClient(resolve_tracking_uri(cfg.tracking))
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == str(cfg.lora.r) and run.data.params["distributed.strategy"] == "fsdp"
    assert run.data.tags["lorafleet.dataset_fingerprint"] == res["dataset_fingerprint"]
    assert "lorafleet.git_commit" in run.data.tags
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) >= 8 and sorted(m.step for m in losses)[-1] == 40
    assert "eval_accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/loss_curve.png"}
    versions = list_registered_adapters(resolve_tracking_uri(cfg.tracking), "test-intent")
    v = [x for x in versions if x["run_id"] == run.info.run_id][0]
    assert v["tags"]["base_model"] == cfg.model.name_or_path
    assert v["tags"]["method"] == "lora" and v["tags"]["r"] == str(cfg.lora.r) and v["tags"]["task"] == "banking77"
    assert v["tags"]["target_modules"] == "all-linear"
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking))
    local = mlflow.artifacts.download_artifacts(f"models:/test-intent/{res['registered_version']}")
    assert (Path(local) / "adapter_model.safetensors").is_file()


def test_wandb_offline_run_written(trained):
    cfg, _ = trained
    runs = list(Path(cfg.output_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0


def test_adapters_list_cli(trained, work_home):
    out = subprocess.run([sys.executable, "-m", "lorafleet.cli", "adapters", "list", "--json"], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "LORAFLEET_HOME": str(work_home)}).stdout
    names = {(r["name"], r["tags"].get("task")) for r in json.loads(out)}
    assert ("test-intent", "banking77") in names


def test_eval_cli_predictions_in_input_order(trained, tiny_base, banking_csv, tmp_path):
    _, res = trained
    rows = banking_rows(1200, seed=3)[:12]
    data = write_rows(tmp_path / "eval.csv", rows)
    preds = tmp_path / "preds.jsonl"
    out = subprocess.run([sys.executable, "-m", "lorafleet.cli", "eval", "--base", str(tiny_base), "--adapter", res["adapter_path"],
                          "--task", "banking77", "--data", str(data), "--limit", "10", "--predictions", str(preds)],
                         capture_output=True, text=True, check=True).stdout
    metrics = json.loads(out)
    assert metrics["examples"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0 and "macro_f1" in metrics
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["input"] for p in lines] == [r["text"] for r in rows[:10]]
    assert [p["reference"] for p in lines] == [r["category"] for r in rows[:10]]
    base_only = subprocess.run([sys.executable, "-m", "lorafleet.cli", "eval", "--base", str(tiny_base), "--adapter", "none",
                                "--task", "banking77", "--data", str(data), "--limit", "10"], capture_output=True, text=True, check=True)
    assert json.loads(base_only.stdout)["adapter"] == "none"


def test_export_merge_matches_adapter(trained, tiny_base, tmp_path):
    from lorafleet.evaluate import load_for_inference

    _, res = trained
    out = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "lorafleet.cli", "export", "--base", str(tiny_base), "--adapter", res["adapter_path"],
                    "--merge", "--out", str(out)], check=True, capture_output=True)
    peft_model, tok = load_for_inference(str(tiny_base), res["adapter_path"])
    merged, _ = load_for_inference(str(out), None)
    ids = tok("Query: my card is lost\nIntent:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)


def test_qlora_nf4_trains_with_fsdp(tiny_base, banking_csv, tmp_path, work_home):
    cfg = make_cfg(tiny_base, banking_csv, tmp_path / "q", "test-qlora", "method=qlora", "training.max_steps=16",
                   "training.logging_steps=4", "checkpoint.every_n_steps=8", "data.max_eval_samples=16", "tracking.enabled=false")
    res = run_finetune(cfg)
    losses = [h["train_loss"] for h in _history(res) if "train_loss" in h]
    assert losses[-1] < losses[0], losses
    conf = json.loads((Path(res["adapter_path"]) / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == str(tiny_base)
    assert res["metrics"]["params/local"] < res["metrics"]["params/trainable_local"] * 100


def test_bad_data_fails_before_training(tiny_base, tmp_path, work_home):
    bad = tmp_path / "bad.csv"
    bad.write_text("utterance,intent\nhello,greet\n")
    cfg = make_cfg(tiny_base, bad, tmp_path / "o", "test-bad-data")
    with pytest.raises(ValueError, match="data.columns"):
        run_finetune(cfg)
