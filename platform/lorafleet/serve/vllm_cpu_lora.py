"""Version-pinned patch of vLLM's CPU LoRA ops: rows without an adapter (index -1) get no LoRA update.

vLLM 0.32's CPU ops read -1 as the last slot: base rows batched with adapter rows get (and pay for) an
adapter's update (vLLM PR 49656, open). Loaded in vLLM's engine-core worker as ``worker_extension_cls``
(engine.py, CPU only); ``/admin/engines`` shows the state the worker reports. See docs/serving.md.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

log = logging.getLogger(__name__)
PINNED_VLLM, UPSTREAM = "0.32.0", "https://github.com/vllm-project/vllm/pull/49656"
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
ORIGINAL: dict[str, Callable] = {}  # op name -> vLLM's own function, once patched
_state: dict = {"active": False, "reason": "not applied"}


def masked(op: Callable, zero_skipped: bool) -> Callable:
    """``op`` (inputs, weights, output, indices, ...) on the rows with index >= 0; ``zero_skipped``: zero the others' output."""
    @functools.wraps(op)
    def run(inputs, weights, output, indices, *args, **kwargs):
        keep = indices >= 0
        if bool(keep.all()):  # no base row: vLLM's op as it is
            return op(inputs, weights, output, indices, *args, **kwargs)
        if zero_skipped:
            output[~keep, : weights.size(-2)] = 0
        if bool(keep.any()):
            part = output[keep]
            op(inputs[keep], weights, part, indices[keep], *args, **kwargs)
            output[keep] = part
    return run


def why_not(version: str, device: str) -> Optional[str]:
    """Why vllm ``version`` on ``device`` must not be patched (None: it must)."""
    if version != PINNED_VLLM:  # a new release may carry the fix, or move the ops
        return f"vllm {version} is not {PINNED_VLLM}, the release this patch was written for (check {UPSTREAM})"
    return None if device == "cpu" else f"device {device}: vLLM's {device} LoRA kernels skip rows without an adapter"


def apply() -> dict:
    """Patch this process's vLLM CPU LoRA ops where :func:`why_not` allows (once); the patch's state."""
    global _state
    import vllm
    from vllm.lora.ops import torch_ops  # its lora_ops submodule holds the ops; punica_cpu imported their names
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    reason = why_not(vllm.__version__, current_platform.device_type)
    for name in OPS if reason is None and not ORIGINAL else ():
        ORIGINAL[name] = getattr(torch_ops.lora_ops, name)
        patched = masked(ORIGINAL[name], zero_skipped=name == "bgmv_shrink")
        for module in (torch_ops.lora_ops, torch_ops, punica_cpu):  # sgmv_* find bgmv_* in lora_ops
            setattr(module, name, patched)
    _state = {"active": reason is None, "vllm": vllm.__version__, "upstream": UPSTREAM, **({"reason": reason} if reason else {})}
    (log.info if reason is None else log.warning)("lorafleet's vLLM CPU LoRA patch: %s", _state)
    return dict(_state)


class CPULoRAPatch:
    """vLLM worker extension (``worker_extension_cls``): importing it patches the worker's process."""
    def lorafleet_cpu_lora_patch_state(self) -> dict:
        return dict(_state)


apply()
