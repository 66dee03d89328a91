"""Offline evaluation and export of adapters (single process, no Ray).

Uses the same task formatting (``lorafleet.data``) and metric code as the training loop,
so numbers from ``lorafleet eval`` and from training are comparable.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_for_inference(base: str, adapter: str | None, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tok


def evaluate_adapter(base: str, adapter: str | None, task: str, data: str, limit: int | None = None,
                     predictions: str | None = None, batch_size: int = 32, columns: dict | None = None) -> dict:
    """Metrics of base (+ adapter) on every row of ``data`` (first ``limit``), by greedy generation."""
    from lorafleet.data import evaluate_generation, get_task, load_eval_examples

    spec = get_task(task)
    model, tok = load_for_inference(base, adapter)
    examples = load_eval_examples(spec, data, columns=columns or None, limit=limit, tokenizer=tok)
    metrics, preds = evaluate_generation(model, tok, spec, examples, batch_size=batch_size)
    if predictions:
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions, "w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps({k: p[k] for k in ("input", "prediction", "reference")}, ensure_ascii=False) + "\n")
    return {"task": spec.name, "examples": len(examples), "adapter": adapter or "none", **metrics}


def merge_adapter(base: str, adapter: str, out: str) -> str:
    """``lorafleet export --merge``: fold the LoRA weights into the base and save a full model."""
    model, tok = load_for_inference(base, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
