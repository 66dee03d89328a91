"""vLLM's CPU LoRA ops, patched by lorafleet.serve.vllm_cpu_lora: a row without an adapter
(index -1) gets no LoRA update, every other row gets exactly what vLLM's own op gives it; and,
as the control, vLLM's own op does give the -1 rows the last slot's adapter. The ops are
called directly on small tensors, the way vLLM's CPU punica wrapper calls them (shrink into
a rank-wide buffer, then expand into the layer's output). The served path (base answers in a
batch mixed with adapters equal the base offline) is test_serve_app.py's mixed-batch test."""

from __future__ import annotations

import pytest
import torch
import vllm

from lorafleet.serve import vllm_cpu_lora  # importing it patches vLLM's ops in this process, as in the engine's worker

pytestmark = pytest.mark.skipif(vllm.__version__ != vllm_cpu_lora.PINNED_VLLM, reason="the patch is pinned to another vLLM")

SLOTS, RANK, IN, OUT, SCALE = 3, 4, 16, 24, 0.5
INDICES = torch.tensor([-1, 0, 2, -1, 1, 2])  # per row: the adapter slot, -1 for a base-model row


def tensors(seed: int = 0, out_width: int = OUT):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=g)  # vLLM's stacked lora_A per slot
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)  # stacked lora_B
    x = torch.randn(len(INDICES), IN, generator=g)
    y = torch.randn(len(INDICES), out_width, generator=g)  # what the base layer computed
    return a, b, x, y


def lora_pass(ops, a, b, x, y, indices, offset=None):
    """y plus each row's LoRA update through ``ops`` (bgmv_expand, or bgmv_expand_slice at ``offset``)."""
    buffer = torch.full((len(indices), RANK), 7.0)  # not zero: shrink must overwrite it
    ops("bgmv_shrink")(x, a, buffer, indices, SCALE)
    out = y.clone()
    if offset is None:
        ops("bgmv_expand")(buffer, b, out, indices, True)
    else:
        ops("bgmv_expand_slice")(buffer, b, out, indices, offset, OUT, True)
    return out


def by_hand(a, b, x, y, indices, offset=0):
    out = y.clone()
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[row, offset:offset + OUT] += SCALE * (x[row] @ a[slot, 0].T) @ b[slot, 0].T
    return out


def patched(name):
    from vllm.lora.punica_wrapper import punica_cpu

    return getattr(punica_cpu, name)  # what vLLM's CPU punica wrapper calls


def test_the_patch_is_active_where_vllms_cpu_punica_wrapper_looks():
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    state = vllm_cpu_lora.CPULoRAPatch().lorafleet_cpu_lora_patch_state()
    assert state["active"] and state["vllm"] == vllm_cpu_lora.PINNED_VLLM and "49656" in state["upstream"]
    for name in vllm_cpu_lora.OPS:
        assert patched(name) is getattr(lora_ops, name) is getattr(torch_ops, name) is not vllm_cpu_lora.ORIGINAL[name]
    assert vllm_cpu_lora.apply()["active"] and patched("bgmv_shrink").__wrapped__ is vllm_cpu_lora.ORIGINAL["bgmv_shrink"]  # once


@pytest.mark.parametrize("offset", [None, 8], ids=["bgmv_expand", "bgmv_expand_slice"])
def test_base_rows_get_no_lora_update_and_adapter_rows_are_unchanged(offset):
    a, b, x, y = tensors(out_width=OUT if offset is None else OUT + 16)
    ours = lora_pass(patched, a, b, x, y, INDICES, offset)
    vllms = lora_pass(lambda name: vllm_cpu_lora.ORIGINAL[name], a, b, x, y, INDICES, offset)
    base = INDICES < 0
    assert torch.equal(ours[base], y[base])  # not one bit of LoRA on a base row
    torch.testing.assert_close(ours[~base], vllms[~base])  # adapter rows: what vLLM's own op gives
    torch.testing.assert_close(ours, by_hand(a, b, x, y, INDICES, offset or 0))


@pytest.mark.parametrize("offset", [None, 8], ids=["bgmv_expand", "bgmv_expand_slice"])
def test_control_vllms_own_ops_give_base_rows_the_last_slots_update(offset):
    a, b, x, y = tensors(out_width=OUT if offset is None else OUT + 16)
    vllms = lora_pass(lambda name: vllm_cpu_lora.ORIGINAL[name], a, b, x, y, INDICES, offset)
    base = INDICES < 0
    assert not torch.allclose(vllms[base], y[base])  # contaminated: this is the bug the patch fixes
    as_last = torch.where(base, SLOTS - 1, INDICES)
    torch.testing.assert_close(vllms, by_hand(a, b, x, y, as_last, offset or 0))


def test_prefill_ops_per_sequence_mask_base_sequences_too():
    """The sgmv_* ops (prefill: one index per sequence) expand the indices and call the patched bgmv_*."""
    from vllm.lora.ops.torch_ops import lora_ops

    a, b, x, y = tensors()
    seq_slots, seq_lens = torch.tensor([-1, 1, -1]), torch.tensor([2, 3, 1])
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    buffer = torch.full((len(x), RANK), 7.0)
    lora_ops.sgmv_shrink(x, a, buffer, starts, seq_lens, seq_slots, 3, 3, len(x), SCALE)
    out = y.clone()
    lora_ops.sgmv_expand(buffer, b, out, starts, seq_lens, seq_slots, 3, 3, len(x), True)
    torch.testing.assert_close(out, by_hand(a, b, x, y, torch.repeat_interleave(seq_slots, seq_lens)))
    assert torch.equal(out[:2], y[:2]) and torch.equal(out[5:], y[5:])


def test_a_batch_of_base_rows_alone_is_left_as_the_base_computed_it():
    a, b, x, y = tensors()
    none = torch.full((len(x),), -1)
    assert torch.equal(lora_pass(patched, a, b, x, y, none), y)
    # not even a NaN in a slot's weights reaches a base row: nothing is gathered for it
    a[-1].fill_(float("nan"))
    assert torch.equal(lora_pass(patched, a, b, x, y, none), y)


def test_other_vllm_releases_and_devices_are_left_alone():
    assert vllm_cpu_lora.why_not(vllm_cpu_lora.PINNED_VLLM, "cpu") is None
    assert "0.33.0" in vllm_cpu_lora.why_not("0.33.0", "cpu") and "49656" in vllm_cpu_lora.why_not("0.33.0", "cpu")
    assert "cuda" in vllm_cpu_lora.why_not(vllm_cpu_lora.PINNED_VLLM, "cuda")
