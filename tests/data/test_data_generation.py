"""Greedy generation on a tiny random Llama: order, determinism, batch-size invariance (left
padding), PEFT-wrapped models, and evaluate_generation's records."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data import Example, evaluate_generation, generate_completions, get_task
from lorafleet.data.tokenize import encode_prompts

PROMPTS = [
    "Query: I am still waiting on my card.\nIntent:",
    "Query: Why was I charged a fee for this payment? Please tell me.\nIntent:",
    "Query: Hi\nIntent:",
    "Question: Where?\nA. here\nB. there\nAnswer:",
    "Query: The exchange rate looks wrong to me.\nIntent:",
]


def _one_by_one(model, tokenizer, prompts, max_new_tokens):
    """Reference: each prompt alone, no padding, straight through model.generate."""
    out = []
    for ids in encode_prompts(tokenizer, prompts):
        gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True))
    return out


def test_generate_is_ordered_deterministic_and_batch_size_invariant(tiny_llama, tokenizer):
    tiny_llama.train()  # generation must switch to eval and give the mode back
    side = tokenizer.padding_side
    first = generate_completions(tiny_llama, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    assert tiny_llama.training and tokenizer.padding_side == side
    tiny_llama.eval()
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)
    assert len(set(first)) > 1  # the prompts really lead to different continuations
    assert generate_completions(tiny_llama, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4) == first
    assert generate_completions(tiny_llama, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1) == first
    assert generate_completions(tiny_llama, tokenizer, PROMPTS[::-1], max_new_tokens=8, batch_size=3) == first[::-1]
    with torch.no_grad():
        assert _one_by_one(tiny_llama, tokenizer, PROMPTS, 8) == first
    assert generate_completions(tiny_llama, tokenizer, [], max_new_tokens=8) == []


def test_peft_wrapped_model_generates_like_its_base(tokenizer):
    from peft import LoraConfig, get_peft_model

    from data_helpers import make_llama

    base_out = generate_completions(make_llama(tokenizer, seed=1), tokenizer, PROMPTS[:3], max_new_tokens=6)
    peft_model = get_peft_model(make_llama(tokenizer, seed=1),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    # Fresh LoRA weights (B = 0) leave the function unchanged, so the outputs must match exactly.
    assert generate_completions(peft_model, tokenizer, PROMPTS[:3], max_new_tokens=6, batch_size=2) == base_out


def test_evaluate_generation_records_and_metrics(tiny_llama, tokenizer):
    spec = get_task("banking77")
    examples = [Example(prompt=f"Query: {q}\nIntent:", completion=" card_arrival", input=q, reference="card_arrival")
                for q in ("Where is my card?", "My card has not come.", "Card still missing")]
    metrics, records = evaluate_generation(tiny_llama, tokenizer, spec, examples, batch_size=2, max_new_tokens=5)
    assert set(metrics) == {"accuracy", "macro_f1"} and 0.0 <= metrics["accuracy"] <= 1.0
    assert [r["input"] for r in records] == [e.input for e in examples]
    assert all(set(r) == {"input", "prediction", "reference", "prompt"} and "\n" not in r["prediction"] for r in records)
    raw = generate_completions(tiny_llama, tokenizer, [e.prompt for e in examples], max_new_tokens=5)
    assert [r["prediction"] for r in records] == [t.strip().split("\n")[0].strip() for t in raw]
    chat_metrics, chat_records = evaluate_generation(tiny_llama, tokenizer, "chat", examples[:1], max_new_tokens=3)
    assert chat_metrics == {} and len(chat_records) == 1


def test_bad_arguments_are_refused(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        generate_completions(tiny_llama, tokenizer, PROMPTS, max_new_tokens=4, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(tiny_llama, tokenizer, PROMPTS, max_new_tokens=0)


def _synced_worker(rank: int, world: int, port: int, folder: str, prompts: list[str], out: str) -> None:
    """One rank of a 2-process gloo group: greedy generation with synced_gpus on its own prompts."""
    import json

    import torch.distributed as dist
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        texts = generate_completions(model, tok, prompts, max_new_tokens=6, batch_size=1, synced_gpus=True)
        with open(out, "w") as f:
            json.dump(texts, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch + transformers: ~15-40 s on 2 cores
def test_synced_gpus_ranks_with_uneven_batches_finish_together(tiny_llama, tokenizer, tmp_path):
    """Two real processes (gloo): rank 0 has 3 batches, rank 1 has 1. With synced_gpus every
    generate step is a collective, so rank 1 must keep stepping (throw-away batches) until rank 0
    is done; otherwise rank 0 would wait forever. Each rank still gets its own right answers."""
    import json
    import socket

    import torch.multiprocessing as mp

    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shards = [PROMPTS[:3], PROMPTS[3:4]]
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_synced_worker, args=(r, 2, port, str(folder), shards[r], outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank hung or failed"
    expected = generate_completions(tiny_llama, tokenizer, PROMPTS[:4], max_new_tokens=6)
    assert json.load(open(outs[0])) + json.load(open(outs[1])) == expected
