"""One short real run of the job script on the session's Ray (FSDP2, 2 workers, gradient
accumulation, PiSSA init, packing) on a random tiny base built here: the progress line of each
logging step reaches the job's output once, with an ETA, the examples are trained packed into
fewer rows, and the PiSSA adapter comes out as a plain LoRA that the server's validation accepts
and that changes the untouched base's outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from testutils import REPO, banking_rows, write_rows
from tiny_models import save_tiny_base

pytestmark = pytest.mark.slow


def test_pissa_fsdp_run_logs_progress_once_and_exports_a_servable_lora(ray_address, work_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet.serve.validation import BaseModelSpec, inspect_adapter

    base = save_tiny_base(tmp_path / "base")
    data = write_rows(tmp_path / "train.csv", banking_rows(160, seed=7))
    out = tmp_path / "out"
    sets = {"model.name_or_path": base, "data.path": data, "output_dir": out, "run_name": "test-options-pissa",
            "lora.init_lora_weights": "pissa", "lora.r": 4, "lora.lora_alpha": 8, "lora.target_modules": "[q_proj,v_proj]",
            "training.max_steps": 6, "training.logging_steps": 2, "training.per_device_batch_size": 4,
            "training.gradient_accumulation_steps": 2, "training.learning_rate": 0.01, "data.max_eval_samples": 8,
            "checkpoint.every_n_steps": 100, "tracking.enabled": "false", "training.packing": "true"}
    argv = [sys.executable, "jobs/finetune.py", "--config", "jobs/configs/banking77-lora.yaml"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": ray_address, "LORAFLEET_HOME": str(work_home)})
    output = p.stdout + p.stderr
    assert p.returncode == 0, output[-4000:]

    for step in (2, 4, 6):
        lines = [ln for ln in output.splitlines() if re.search(rf"\bstep {step}/6 \(", ln)]
        assert len(lines) == 1, (step, lines)
        assert re.search(r"loss \d+\.\d{4} .* elapsed \d+:\d\d eta \d+:\d\d", lines[0]), lines[0]

    result = json.loads((out / "result.json").read_text())
    assert 0 < result["metrics"]["train_loss"] < 20
    m = result["metrics"]
    assert m["data/packed_rows"] < m["data/features"], m  # rows of 128 tokens hold several of the shorter queries
    assert 0 < m["eval_loss"] < 20
    adapter = out / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["init_lora_weights"] is True and conf["r"] == 8
    info = inspect_adapter(adapter, BaseModelSpec.from_model(str(base)), max_lora_rank=16, max_bytes=10**8)
    assert info.rank == 8

    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.tensor([[plain.config.bos_token_id, 40, 41, 42, 43]])
    with torch.no_grad():
        assert (tuned(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-3
