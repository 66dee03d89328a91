"""A packed batch trains exactly what the same examples train unpacked: through a real tiny Llama, the
token loss sum and the LoRA gradients of packed rows equal those of the examples one per padded row.
That holds only if attention stays within each example and positions restart, so it is checked for
each attention implementation the packing path supports (eager, sdpa), and shown to fail when the
packed batch is run with its padding mask (attention then crosses examples)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data import collate_batch, pack_features
from lorafleet.train.loop import backward_token_normalised
from test_loss_normalisation import PAD, assert_same_grads, grads, lora_model
from tiny_models import feature

# Mixed lengths (prompt, completion), as banking77 queries beside dialogues: 40 tokens fit rows of 48.
SHAPES = [(30, 10), (5, 2), (8, 1), (20, 6), (6, 3), (3, 1), (12, 12), (4, 2), (9, 4)]
FEATURES = [feature(p, c, seed=s) for s, (p, c) in enumerate(SHAPES)]
MAX_LEN = 48


def model_with(attn: str):
    model = lora_model()
    model.get_base_model().set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(attn):
    rows = pack_features(FEATURES, MAX_LEN)
    assert len(rows) < len(FEATURES) and max(len(r["input_ids"]) for r in rows) <= MAX_LEN
    assert any(sum(p == 0 for p in r["position_ids"]) >= 3 for r in rows)  # rows really hold several examples
    packed, unpacked = collate_batch(rows, PAD), collate_batch(FEATURES, PAD)
    cpu = torch.device("cpu")

    want_model, got_model = model_with(attn), model_with(attn)
    want_sum, want_targets, want_tokens = backward_token_normalised(want_model, [unpacked], cpu)
    got_sum, got_targets, got_tokens = backward_token_normalised(got_model, [packed], cpu)
    assert got_targets == want_targets == sum(c for _, c in SHAPES)
    # tokens/s counts real tokens only, packed or not (padding of the packed rows excluded).
    assert got_tokens == want_tokens == sum(len(f["input_ids"]) for f in FEATURES)
    assert got_sum == pytest.approx(want_sum, rel=1e-5)
    assert_same_grads(grads(got_model), grads(want_model))

    # The oracle can tell: with the padding mask, or with the KV cache Transformers builds by default
    # (config.use_cache), it does not split the rows and later examples of a row attend to earlier ones.
    def loss_sum(**inputs) -> float:
        with torch.no_grad():
            logits = model_with(attn)(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                      **inputs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), packed["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()

    assert loss_sum(use_cache=False) == pytest.approx(want_sum, rel=1e-5)
    assert loss_sum(use_cache=False, attention_mask=packed["attention_mask"]) != pytest.approx(want_sum, rel=1e-3)
    assert loss_sum() != pytest.approx(want_sum, rel=1e-3)
