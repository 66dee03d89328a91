"""Tiny models built in the test process (no Ray, no pre-training): for tests of the training
step, the adapter export and the eval/export CLI that need a real Transformers + PEFT model
but not a useful one. The session's ``tiny_base`` (tests/conftest.py) is the pre-trained one."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.config import FinetuneConfig

LINES = [f"order {i} of {w} shipped to {c} on day {i % 7}" for i, (w, c) in
         enumerate([(w, c) for w in ("apples", "pears", "plums", "figs", "limes") for c in ("Oslo", "Lima", "Rome", "Kyiv")])]


def tiny_llama(vocab_size: int = 96, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(conf).to(dtype)


def save_tiny_base(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A Transformers model folder (config, safetensors in ``dtype``, BPE tokenizer) of a random tiny Llama."""
    from lorafleet.base.build import train_tokenizer

    tok = train_tokenizer(LINES * 3, vocab_size=300)
    model = tiny_llama(vocab_size=len(tok), dtype=dtype)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def finetune_cfg(*, strategy: str = "ddp", num_workers: int = 1, **lora) -> FinetuneConfig:
    return FinetuneConfig.model_validate({
        "model": {"name_or_path": "unused"}, "data": {"task": "banking77"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **lora},
        "distributed": {"strategy": strategy, "num_workers": num_workers},
    })


def feature(prompt_len: int, completion_len: int, seed: int, vocab_size: int = 96) -> dict:
    """One training feature as ``tokenize_examples`` makes it: labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (prompt_len + completion_len,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]}
