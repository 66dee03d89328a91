"""The one place a ``ServeConfig`` becomes vLLM engine arguments.

Everything that differs between a CPU and a GPU engine is decided here and only here (dtype, eager
mode, on CPU the worker extension of vllm_cpu_lora.py); the rest of the server runs the same code on both.

Example::

    setup = engine_setup(cfg)                 # device detected from the vLLM platform
    engine = AsyncLLM.from_engine_args(setup.args)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

from lorafleet.serve.config import ServeConfig


def detect_device() -> str:
    """``cpu`` or ``cuda`` (or another vLLM platform's device type) of this process."""
    from vllm.platforms import current_platform

    return current_platform.device_type


@dataclass(frozen=True)
class EngineSetup:
    """Engine arguments and the device they were made for."""

    device: str
    args: Any  # vllm.engine.arg_utils.AsyncEngineArgs


def engine_setup(cfg: ServeConfig, device: Optional[str] = None) -> EngineSetup:
    """vLLM ``AsyncEngineArgs`` for ``cfg`` on ``device`` (default: detected)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    device = device or detect_device()
    on_cpu = device == "cpu"
    e = cfg.engine
    dtype = e.dtype
    if dtype == "auto":
        # bfloat16 kills vLLM's CPU worker with SIGILL on CPUs without AVX512-BF16.
        dtype = "float32" if on_cpu else "bfloat16"
    enforce_eager = e.enforce_eager if e.enforce_eager is not None else on_cpu
    args = AsyncEngineArgs(
        model=cfg.model,
        tokenizer=cfg.tokenizer,
        served_model_name=[cfg.base_model_name],
        dtype=dtype,
        max_model_len=e.max_model_len,
        enable_lora=True,
        max_loras=e.max_loras,
        max_cpu_loras=e.max_cpu_loras,
        max_lora_rank=e.max_lora_rank,
        max_num_seqs=e.max_num_seqs,
        gpu_memory_utilization=e.gpu_memory_utilization,
        kv_cache_memory_bytes=e.kv_cache_memory_bytes,
        enforce_eager=enforce_eager,
        worker_extension_cls="lorafleet.serve.vllm_cpu_lora.CPULoRAPatch" if on_cpu else "",  # imported in vLLM's worker: patches it
        seed=e.seed,
        max_logprobs=e.max_logprobs,
        disable_log_stats=not e.log_engine_stats,
        enable_log_requests=False,
        # The server's cap is vLLM's ceiling too: a request without max_tokens gets min(cap, room left).
        override_generation_config={"max_new_tokens": cfg.limits.max_tokens},
        # vLLM accepts disable_any_whitespace only with a named backend; xgrammar is its default choice.
        structured_outputs_config=(StructuredOutputsConfig() if e.json_whitespace
                                   else StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)),
    )
    return EngineSetup(device=device, args=args)


def frontend_args(cfg: ServeConfig, setup: EngineSetup) -> argparse.Namespace:
    """The flat namespace vLLM's ``init_app_state`` reads: vLLM's own ``FrontendArgs`` defaults, the
    few this server exposes, and the engine arguments (what ``vllm serve``'s parser produces and
    ``ray.serve.llm`` builds the same way)."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    e = cfg.engine
    # vLLM 0.32 uses a tool parser only with auto tool choice on (vllm/parser/parser_manager.py),
    # and a named tool_choice needs the parser: one setting turns both on.
    front = FrontendArgs(tool_call_parser=e.tool_call_parser, enable_auto_tool_choice=e.tool_call_parser is not None,
                         chat_template=e.chat_template)
    return argparse.Namespace(**(vars(front) | vars(setup.args)))
