"""Data-parallel wrapping inside a Ray Train worker: FSDP2, DDP or DeepSpeed ZeRO.

FSDP2 follows Ray Train's FSDP2 guide and torchtitan: ``fully_shard`` on every decoder
layer, then on the causal LM itself. It is applied directly (not through
``ray.train.torch.prepare_model(parallel_strategy="fsdp")``, which refuses CPU, nor
through accelerate, which silently falls back to DDP on multi-CPU), so the same code
shards on gloo/CPU and NCCL/GPU.
"""

from __future__ import annotations

import logging
import math

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


BASE_DERIVED_INITS = ("pissa", "olora")  # LoRA initialisations PEFT computes from the base weights themselves


def load_fsdp2_model(cfg: FinetuneConfig, device: torch.device) -> nn.Module | None:
    """The PEFT-wrapped base, sharded with FSDP2, without any rank ever holding the full model.

    The recipe of torchtitan and torchtune's FSDP2 recipes: build the model on the meta
    device, add the adapters, ``fully_shard`` it (no memory yet), ``to_empty`` allocates only
    this rank's shards, then each rank reads only its own dim-0 rows of every tensor from
    the safetensors files (no rank 0 holding everything, no broadcast). LoRA weights get the
    exact values ``wrap_peft`` drew from the RNG, so training matches the full-load path.
    Method qlora too: the linear layers become 4-bit on meta, and each rank quantises one
    checkpoint weight at a time and keeps its rows of the packed NF4 data
    (:mod:`lorafleet.train.quantized_loading`).

    Returns None (the caller then loads the full model as before, with a warning) where the
    checkpoint cannot be read this way: an adapter initialisation computed from the base's weights
    (pissa / olora: an SVD / QR of each weight, which meta tensors do not have), no safetensors
    files, or checkpoint keys that ``from_pretrained`` would rename or fuse while loading.
    """
    from lorafleet.train.model import (SafetensorsRows, build_empty_base_model, checkpoint_files,
                                       disable_bnb_cpu_inference_repack, load_dtype, record_new_parameters,
                                       unmatched_base_keys, wrap_peft)
    from lorafleet.train.quantized_loading import make_empty_4bit

    if cfg.method != "full" and cfg.lora.init_lora_weights in BASE_DERIVED_INITS:
        log.warning("lora.init_lora_weights %r is computed from the full base weights: every rank loads the full model before "
                    "FSDP2 shards it", cfg.lora.init_lora_weights)
        return None
    files = checkpoint_files(cfg.model)
    if not files:
        log.warning("no *.safetensors in %s: every rank loads the full model before FSDP2 shards it", cfg.model.name_or_path)
        return None
    base = build_empty_base_model(cfg)
    with SafetensorsRows(files) as reader:
        missing = unmatched_base_keys(base, reader)
        if missing:
            log.warning("%d parameters of %s have no same-named, same-shaped tensor in its safetensors (e.g. %s): "
                        "every rank loads the full model before FSDP2 shards it", len(missing),
                        cfg.model.name_or_path, missing[:3])
            return None
        dtype = load_dtype(cfg)
        quantized = make_empty_4bit(base, cfg, device, dtype) if cfg.method == "qlora" else {}
        with record_new_parameters() as created:
            model = wrap_peft(base, cfg)
        apply_fsdp2(model, cfg, device)
        _materialise(model, cfg, device)
        if quantized:
            disable_bnb_cpu_inference_repack(model)  # as load_base_model does for qlora
        loaded = _load_shards(causal_lm_of(model), reader, created, quantized, device, dtype)
    log.info("FSDP2 sharded loading: %d tensors, %.1f MB on this rank", *loaded)
    return model


def _materialise(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> None:
    """Allocate this rank's shards (``to_empty``) and put back the buffers ``__init__`` computed."""
    buffers = [(mod, name, buf) for mod in model.modules() for name, buf in mod.named_buffers(recurse=False)
               if buf is not None and buf.device.type != "meta"]
    # With CPU offload FSDP2 keeps the sharded parameters on the CPU; buffers stay on the device.
    model.to_empty(device=torch.device("cpu") if cfg.distributed.fsdp_cpu_offload else device)
    for mod, name, buf in buffers:
        setattr(mod, name, buf.to(device))


def _load_shards(lm: nn.Module, reader, created: dict, quantized: dict, device: torch.device,
                 dtype: torch.dtype) -> tuple[int, float]:
    """Fill every parameter's local shard: recorded initial values (adapters), checkpoint rows, or
    for a 4-bit weight (``quantized``: see ``make_empty_4bit``) rows of its quantised checkpoint tensor."""
    from torch.distributed.tensor import DTensor, Shard

    from lorafleet.train.model import checkpoint_key
    from lorafleet.train.quantized_loading import quantize_weight, release_freed_host_memory

    owner = {id(m.weight): quantized[id(m)] for m in lm.modules() if id(m) in quantized}

    initial = {}
    for (mod, name), value in created.items():
        p = getattr(mod, name, None)
        if isinstance(p, nn.Parameter):
            initial[id(p)] = value
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    n_bytes = 0
    with torch.no_grad():
        for pid, (p, names) in groups.items():
            if pid in initial:
                full = initial[pid]
                shape, rows = list(full.shape), (lambda a, b, full=full: full[a:b])
            else:
                key = next((checkpoint_key(n) for n in names if checkpoint_key(n) in reader), None)
                if key is None:
                    raise ValueError(f"parameter {names[0]} is neither in the checkpoint nor created by PEFT; "
                                     f"set distributed.strategy ddp to load this model in full")
                shape, rows = reader.shape(key), (lambda a, b, key=key: reader.rows(key, a, b))
                if pid in owner:  # one full weight in flight, quantised; this rank keeps its rows of the packed data
                    packed = quantize_weight(reader.rows(key, 0, shape[0]), owner[pid], device, dtype)
                    release_freed_host_memory()
                    shape, rows = list(packed.shape), (lambda a, b, packed=packed: packed[a:b])
            if shape != list(p.shape):
                raise ValueError(f"{names[0]}: checkpoint shape {shape} != model shape {list(p.shape)}")
            if isinstance(p, DTensor):
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(f"{names[0]}: sharded loading reads dim-0 shards, got {p.placements} on a {p.device_mesh.ndim}-D mesh")
                local = p.to_local()
                # FSDP2 shards dim 0 like torch.chunk: ceil(n / world) rows per rank, the last ones short or empty.
                chunk = math.ceil(p.shape[0] / p.device_mesh.size()) if p.dim() else 0
                start = min(p.device_mesh.get_local_rank() * chunk, p.shape[0] if p.dim() else 0)
                local.copy_(rows(start, start + local.shape[0]) if p.dim() else rows(0, 0))
            else:
                local = p
                p.copy_(rows(0, p.shape[0] if p.dim() else 0))
            n_bytes += local.numel() * local.element_size()
    return len(groups), n_bytes / 2**20


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
