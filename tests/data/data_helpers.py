"""Builders shared by the data package tests: a tiny byte-level BPE tokenizer trained in memory
and a tiny random Llama sized to it (import as `from data_helpers import ...`)."""

from __future__ import annotations

import random
from pathlib import Path

from lorafleet.data.tasks import BANKING77_LABELS

# The real datasets beside the project (tests only; the library never reads ../shared).
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BANKING_CSV = SHARED_DATA / "banking77" / "train.csv"
DIALOGSUM = SHARED_DATA / "dialogsum" / "dialogsum.dev.jsonl"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SENTENCES = [
    "I am still waiting on my card.", "How do I top up my account?", "My transfer has not arrived yet.",
    "Why was I charged a fee for this payment?", "Can I get a refund for this purchase?",
    "The exchange rate looks wrong to me.", "I lost my phone and my card was in it.",
    "Hello, how are you doing today?", "I have been having trouble breathing lately.",
    "The cat sat on the mat while the dogs were running.", "Which answer is right: A, B, C, D or E?",
    "Please summarise the dialogue in one sentence.", "Thank you for your help, goodbye.",
]


def make_tokenizer(chat_template: str | None = None):
    """A ~600-token byte-level BPE tokenizer with <s>, </s>, <pad>, <unk> (any text is encodable)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = list(_SENTENCES) + list(BANKING77_LABELS)
    lines += [f"Query: {rng.choice(_SENTENCES)}\nIntent: {rng.choice(BANKING77_LABELS)}" for _ in range(200)]
    lines += [f"Question: {rng.choice(_SENTENCES)}\nA. yes\nB. no\nAnswer: {rng.choice('ABCDE')}" for _ in range(100)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=600, min_frequency=2, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_llama(tokenizer, seed: int = 0):
    """A tiny random LlamaForCausalLM (2 layers, hidden 128, 2 heads, 1 KV head) for this tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()
