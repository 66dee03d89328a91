"""Data-parallel wrapping inside a Ray Train worker: FSDP2, DDP or DeepSpeed ZeRO.

FSDP2 follows Ray Train's FSDP2 guide and torchtitan: ``fully_shard`` on every decoder
layer, then on the causal LM itself. It is applied directly (not through
``ray.train.torch.prepare_model(parallel_strategy="fsdp")``, which refuses CPU, nor
through accelerate, which silently falls back to DDP on multi-CPU), so the same code
shards on gloo/CPU and NCCL/GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorafleet.config.train import FinetuneConfig
from lorafleet.train.model import resolve_dtype

log = logging.getLogger(__name__)

_MP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Transformers ``*ForCausalLM`` module inside a (possibly PEFT-wrapped) model.

    FSDP2's root must be the module whose ``forward`` runs for both training and
    ``generate`` so its pre-forward hook gathers the root parameters (embeddings, norm,
    lm_head); PEFT's wrappers call into this module for both.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found via Transformers' ``_no_split_modules`` class names."""
    lm = causal_lm_of(model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        # Fallback for models without _no_split_modules: the largest ModuleList.
        lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise ValueError(f"could not find decoder layers to shard in {type(lm).__name__}; use distributed.strategy ddp")
    return layers


def apply_fsdp2(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it (the original object: PEFT APIs keep working)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    d = cfg.distributed
    kwargs: dict = {"reshard_after_forward": d.fsdp_reshard_after_forward}
    if d.use_gpu:
        # Mixed parameter dtypes (bf16 base, fp32 LoRA) are cast to one compute dtype for
        # the all-gather; gradients are reduced in fp32.
        compute = _MP.get(cfg.training.mixed_precision) or resolve_dtype(cfg.model.dtype, True)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    if d.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        if cfg.training.torch_compile:
            layer.compile()
        fully_shard(layer, **kwargs)
    fully_shard(causal_lm_of(model), **kwargs)
    return model


def apply_ddp(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    if cfg.training.torch_compile:
        for layer in decoder_layers(model):
            layer.compile()
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The user model behind DDP / DeepSpeed wrappers (FSDP2 does not wrap)."""
    return getattr(model, "module", model)


def deepspeed_config(cfg: FinetuneConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for ``strategy: deepspeed`` (validated even where DeepSpeed cannot run)."""
    ds = cfg.distributed.deepspeed
    t = cfg.training
    conf: dict = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": t.mixed_precision == "bf16" or (t.mixed_precision == "no" and cfg.model.dtype in ("auto", "bfloat16"))},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
    }
    if t.max_grad_norm:
        conf["gradient_clipping"] = t.max_grad_norm
    if ds.offload_optimizer != "none":
        conf["zero_optimization"]["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        conf["zero_optimization"]["offload_param"] = {"device": ds.offload_param}
    conf.update(ds.extra)
    return conf


def apply_deepspeed(model: nn.Module, optimizer, scheduler, cfg: FinetuneConfig, world_size: int):
    """``deepspeed.initialize`` on the PEFT model (GPU only; config checked by the pydantic model)."""
    from lorafleet.train.availability import require_deepspeed

    require_deepspeed()
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine, optimizer, scheduler
