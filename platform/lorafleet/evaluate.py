"""Offline evaluation and export of adapters (single process, no Ray).

Uses the same task formatting (``lorafleet.data``) and metric code as the training loop,
so numbers from ``lorafleet eval`` and from training are comparable. Both run on the GPU in
bfloat16 where CUDA is available (else the CPU in float32) unless told otherwise; export
writes the merged model in the base's own dtype unless told otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise ValueError(f"--device {device!r}: only auto, cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for a GPU but CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered 0-{torch.cuda.device_count() - 1}")
    return str(parsed)


def base_dtype_name(base: str) -> str:
    """The dtype a Transformers model folder says its weights are in (``dtype``/``torch_dtype`` in config.json); float32 if none."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(base)
    dtype = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def resolve_dtype(dtype: str, device: str, *, base: str | None = None):
    """The torch dtype for ``--dtype``: ``auto`` is the base's dtype when ``base`` is given (export),
    else bfloat16 on a GPU and float32 on CPU (evaluation)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = base_dtype_name(base) if base else ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, dtype)


def load_for_inference(base: str, adapter: str | None, device: str = "cpu", dtype=None):
    """Base (+ PEFT adapter) in eval mode on ``device`` in ``dtype`` (a torch dtype; default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32).to(device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tok


def generate_with_progress(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                           synced_gpus: bool = False, show: bool = True, desc: str = "generating",
                           add_bos=True) -> list[str]:
    """``generate_completions`` over ``prompts`` with a progress bar (or log lines) counting prompts.

    Prompts go longest first in chunks of a few batches, the order ``generate_completions``
    itself uses, so the batches (and greedy outputs) are the same as one call over all of them.
    Every rank must call it with the same number of prompts when ``synced_gpus`` is set.
    """
    from lorafleet.data import encode_prompts, generate_completions
    from lorafleet.data.tokenize import bos_flags
    from lorafleet.progress import Progress

    flags = bos_flags(add_bos, len(prompts))  # each example's ``bos``
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts, flags)]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    chunk = batch_size * 4
    outputs = [""] * len(prompts)
    with Progress(len(prompts), desc, unit="prompt", enabled=show) as bar:
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            texts = generate_completions(model, tokenizer, [prompts[i] for i in part], max_new_tokens,
                                         batch_size=batch_size, synced_gpus=synced_gpus, add_bos=[flags[i] for i in part])
            for i, text in zip(part, texts):
                outputs[i] = text
            bar.update(len(part))
    return outputs


def evaluate_adapter(base: str, adapter: str | None, task: str, data: str, limit: int | None = None,
                     predictions: str | None = None, batch_size: int = 32, columns: dict | None = None,
                     device: str = "auto", dtype: str = "auto") -> dict:
    """Metrics of base (+ adapter) on every row of ``data`` (first ``limit``), by greedy generation."""
    from lorafleet.data import clean_prediction, compute_metrics, get_task, load_eval_examples

    spec = get_task(task)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model, tok = load_for_inference(base, adapter, device, torch_dtype)
    examples = load_eval_examples(spec, data, columns=columns or None, limit=limit, tokenizer=tok)
    raw = generate_with_progress(model, tok, [e.prompt for e in examples], spec.max_new_tokens, batch_size,
                                 desc=f"eval {spec.name}", add_bos=[e.bos for e in examples])
    preds = [clean_prediction(spec, text) for text in raw]
    metrics = compute_metrics(spec, preds, [e.reference for e in examples]) if examples else {}
    if predictions:
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions, "w", encoding="utf-8") as f:
            for e, p in zip(examples, preds):
                f.write(json.dumps({"input": e.input, "prediction": p, "reference": e.reference}, ensure_ascii=False) + "\n")
    return {"task": spec.name, "examples": len(examples), "adapter": adapter or "none", "device": device,
            "dtype": str(torch_dtype).removeprefix("torch."), **metrics}


def merge_adapter(base: str, adapter: str, out: str, device: str = "auto", dtype: str = "auto") -> str:
    """``lorafleet export --merge``: fold the LoRA weights into the base and save a full model.

    The merge runs on ``device`` in ``dtype``; ``auto`` keeps the base's own dtype (its
    config.json), so a bf16 base gives a bf16 merged model of the same size on disk.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, base=base)
    model, tok = load_for_inference(base, adapter, device, torch_dtype)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def validation_loss(model, tokenizer, features: list[dict], batch_size: int) -> float | None:
    """Mean next-token loss per target token over ``features`` (teacher forcing), as training's ``eval_loss``."""
    import torch

    from lorafleet.data import collate_batch
    from lorafleet.train.loop import target_token_count, token_loss_sum

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate_batch(features[i:i + batch_size], tokenizer.pad_token_id).items()}
            total += token_loss_sum(model, batch).item()
            tokens += target_token_count(batch["labels"])
    return total / tokens if tokens else None


def evaluate_config(config, adapter: str | None, base: str | None = None, limit: int | None = None,
                    predictions: str | None = None, batch_size: int = 32, device: str = "auto", dtype: str = "auto") -> dict:
    """Metrics of base (+ adapter) on the held-out rows of every dataset of a fine-tune config (one task, a task
    mixture, custom tasks): the rows training validated on (same files, seed and 80/20 split), each dataset's
    ``max_eval_samples`` (or ``limit``) of them generated and scored, and the loss over all of them. Keys as in
    training: ``tasks.<name>`` holds each dataset's ``loss`` and metrics; a mixture adds ``eval_score``."""
    from lorafleet.data import clean_prediction, tokenize_examples
    from lorafleet.data.mixture import SCORE_METRIC, load_training_data, mixture_score

    base = base or config.model.name_or_path
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model, tok = load_for_inference(base, adapter, device, torch_dtype)
    data = load_training_data(config.data, tokenizer=tok)
    limits = [limit or d.max_eval_samples for d in config.data.datasets()]
    tasks, flat, records = {}, {}, []
    for part, n in zip(data.parts, limits):
        spec, rows = part.task, part.data.validation
        feats, _ = tokenize_examples(rows, tok, config.training.max_seq_length, spec)
        scored = rows[:n] if n else rows
        result: dict = {"task": spec.name, "examples": len(scored), "loss": validation_loss(model, tok, feats, batch_size)}
        if spec.generation_metrics and scored:
            raw = generate_with_progress(model, tok, [e.prompt for e in scored], spec.max_new_tokens, batch_size,
                                         desc=f"eval {part.name}", add_bos=[e.bos for e in scored])
            preds = [clean_prediction(spec, text) for text in raw]
            result.update(spec.compute_metrics(preds, [e.reference for e in scored]))
            records += [{"dataset": part.name, "input": e.input, "prediction": p, "reference": e.reference}
                        for e, p in zip(scored, preds)]
        tasks[part.name] = result
        flat.update({f"eval/{part.name}/{k}": v for k, v in result.items() if isinstance(v, float)})
    if predictions:
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out = {"data": data.name, "adapter": adapter or "none", "base": base, "device": device,
           "dtype": str(torch_dtype).removeprefix("torch."), "tasks": tasks}
    if data.mixture and (score := mixture_score(data.parts, flat)) is not None:
        out[SCORE_METRIC] = score
    return out
