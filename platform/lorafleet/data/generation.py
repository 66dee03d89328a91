"""Greedy generation on evaluation prompts and the task metrics of what comes out.

Prompts are tokenised exactly as in training (bos + prompt ids, no eos) and LEFT-padded so
every row of a batch continues from its last prompt token. Works with a plain Transformers
causal LM, a PEFT-wrapped one and, with ``synced_gpus=True``, an FSDP-sharded one.

Example::

    metrics, records = evaluate_generation(model, tokenizer, get_task("banking77"), data.validation[:200])
    metrics            # {'accuracy': ..., 'macro_f1': ...}
    records[0]         # {'input': ..., 'prediction': ..., 'reference': ..., 'prompt': ...}
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from lorafleet.data.metrics import compute_metrics
from lorafleet.data.rows import Example
from lorafleet.data.tasks import TaskSpec, get_task, task_kind
from lorafleet.data.tokenize import encode_prompts


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device  # under FSDP2 a DTensor reports its local device
    except StopIteration:
        return torch.device("cpu")


def _calls_needed(n_calls: int, device: torch.device) -> int:
    """The most ``generate`` calls any rank makes: with ``synced_gpus`` every rank must make as many
    calls as the busiest one, or the ranks with more batches wait forever in a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n_calls
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([n_calls], dtype=torch.long, device=on)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] input_ids and attention_mask with padding on the left."""
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, longest - len(r):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_completions(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                         batch_size: int = 16, synced_gpus: bool = False,
                         add_bos: Union[bool, Sequence[bool]] = True) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text, special tokens removed), in input order.
    ``add_bos``: as :func:`encode_prompts` (each example's ``bos``).

    ``synced_gpus`` is passed to ``model.generate``; set it under FSDP/ZeRO-3 so all ranks keep
    stepping together. Ranks may then hold different numbers of prompts: the ones with fewer
    batches run throw-away batches until the busiest rank is done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; generation needs one to pad and stop")
    ids = encode_prompts(tokenizer, prompts, add_bos)
    # Longest first, so each batch holds prompts of similar length (less padding); outputs are re-ordered after.
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)
    n_calls = _calls_needed(len(batches), device) if synced_gpus else len(batches)
    filler = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad]

    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for call in range(n_calls):
            batch = batches[call] if call < len(batches) else None
            rows = [ids[i] for i in batch] if batch else [filler]
            input_ids, attention_mask = _left_pad(rows, pad)
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad, eos_token_id=eos, synced_gpus=synced_gpus,
            )
            if batch is None:
                continue  # throw-away batch that only keeps this rank in step
            texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text
    finally:
        model.train(was_training)
    return outputs


def clean_prediction(kind: Any, text: str) -> str:
    """A generated answer as stored in predictions (``kind``: a kind name or a task): the first line for
    classification and mcqa (the answer is one line), otherwise the stripped text."""
    return task_kind(kind).clean_prediction(text)


def evaluate_generation(model: Any, tokenizer: Any, task: Union[TaskSpec, str], examples: list[Example],
                        batch_size: int = 16, max_new_tokens: Optional[int] = None,
                        synced_gpus: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Generate for each example and score it: ``(compute_metrics(...), records)`` where records are
    ``{"input", "prediction", "reference", "prompt"}`` in example order. Chat and raw text give ``{}``
    as metrics (their loss/perplexity come from training)."""
    spec = get_task(task) if isinstance(task, str) else task
    raw = generate_completions(model, tokenizer, [e.prompt for e in examples],
                               max_new_tokens if max_new_tokens is not None else spec.max_new_tokens,
                               batch_size=batch_size, synced_gpus=synced_gpus, add_bos=[e.bos for e in examples])
    predictions = [clean_prediction(spec, text) for text in raw]
    records = [{"input": e.input, "prediction": p, "reference": e.reference, "prompt": e.prompt}
               for e, p in zip(examples, predictions)]
    metrics = compute_metrics(spec, predictions, [e.reference for e in examples]) if examples else {}
    return metrics, records
