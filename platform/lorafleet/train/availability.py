"""Availability checks for optional heavy/GPU-only packages, imported lazily.

Follows PEFT's ``is_bnb_4bit_available()`` pattern: the library imports on any machine,
and a config that needs a missing package fails early with an install hint.
"""

from __future__ import annotations

import importlib.util


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require_bitsandbytes() -> None:
    if not is_available("bitsandbytes"):
        raise ImportError("method qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45'")


def require_deepspeed() -> None:
    if not is_available("deepspeed"):
        raise ImportError("strategy deepspeed needs DeepSpeed (GPU profile): pip install -e '.[gpu]'")
