"""Loading the base model and tokenizer, 4-bit quantisation and PEFT wrapping.

Everything here is the libraries' own machinery (Transformers ``from_pretrained``,
bitsandbytes ``BitsAndBytesConfig``, PEFT ``get_peft_model``); this module only turns a
:class:`~lorafleet.config.FinetuneConfig` into their arguments. The same code runs on CPU
(float32, gloo) and GPU (bfloat16, NCCL): only the resolved dtypes differ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from lorafleet.config.train import FinetuneConfig, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def resolve_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU (bf16 matmuls are slow or unsupported on many CPUs)."""
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return _DTYPES[name]


def bnb_config(cfg: FinetuneConfig):
    """The ``BitsAndBytesConfig`` for method qlora.

    With FSDP the packed 4-bit weights must share the dtype of the other parameters so
    fully_shard can flatten them together, so ``bnb_4bit_quant_storage: auto`` resolves to
    the compute dtype (QLoRA+FSDP recipe from bitsandbytes/Answer.AI).
    """
    from transformers import BitsAndBytesConfig

    from lorafleet.train.availability import require_bitsandbytes

    require_bitsandbytes()
    q = cfg.quantization
    compute = resolve_dtype(q.bnb_4bit_compute_dtype, cfg.distributed.use_gpu)
    if q.bnb_4bit_quant_storage == "auto":
        storage = compute if cfg.distributed.strategy == "fsdp" else torch.uint8
    else:
        storage = _DTYPES[q.bnb_4bit_quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tok.pad_token is None:
        # Llama-family tokenizers ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_dtype(cfg: FinetuneConfig) -> torch.dtype:
    """The dtype the base is loaded in: ``model.dtype``, or for qlora a float ``bnb_4bit_quant_storage``
    (FSDP2 flattens the packed 4-bit weights with the other parameters of their group)."""
    dtype = resolve_dtype(cfg.model.dtype, cfg.distributed.use_gpu)
    if cfg.method == "qlora":
        storage = bnb_config(cfg).bnb_4bit_quant_storage
        if storage != torch.uint8:
            dtype = storage
    return dtype


def load_base_model(cfg: FinetuneConfig, device: torch.device):
    """The causal LM as configured (full precision, or NF4/FP4 for qlora), on ``device``."""
    from transformers import AutoModelForCausalLM

    m = cfg.model
    kwargs = dict(revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=load_dtype(cfg))
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if cfg.method == "qlora":
        kwargs["quantization_config"] = bnb_config(cfg)
        # bitsandbytes quantises while loading onto the target device.
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
    if cfg.method != "qlora":
        model.to(device)
    else:
        disable_bnb_cpu_inference_repack(model)
    model.config.use_cache = False
    return model


def build_empty_base_model(cfg: FinetuneConfig):
    """The causal LM with every parameter on the meta device (no memory) and real CPU buffers.

    Buffers computed in ``__init__`` and absent from checkpoints (rotary ``inv_freq``) keep
    their values (accelerate's ``init_empty_weights(include_buffers=False)``), so they can
    be restored after ``to_empty``. The global RNG is left untouched, so LoRA weights created
    next come out exactly as after ``from_pretrained``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    kwargs = dict(dtype=load_dtype(cfg), trust_remote_code=m.trust_remote_code)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # Transformers skips tying meta parameters; tie lm_head to embed_tokens as from_pretrained does
    # (a no-op unless config.tie_word_embeddings), so FSDP2 sees one shared parameter.
    model.tie_weights()
    model.config.use_cache = False
    return model


def checkpoint_files(model_cfg: ModelConfig) -> list[Path]:
    """The ``*.safetensors`` files of the base (a local folder, or the Hub snapshot, downloaded once per node)."""
    path = Path(model_cfg.name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_cfg.name_or_path, revision=model_cfg.revision,
                                      allow_patterns=["*.safetensors", "*.json"]))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():  # the single-file layout of save_pretrained
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


class SafetensorsRows:
    """Row ranges of named tensors read straight from safetensors files (memory-mapped, no full copy).

    ``safe_open(...).get_slice(name)[start:stop]`` reads only those rows, which is all one
    FSDP2 rank keeps of a dim-0-sharded parameter.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self._where: dict = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> list[int]:
        return list(self._where[key].get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        sl = self._where[key].get_slice(key)
        if not sl.get_shape():  # a 0-dim tensor has no rows to slice
            return self._where[key].get_tensor(key)
        return sl[start:stop]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# PEFT inserts these module names between a base module and its parameters; the checkpoint has neither.
_PEFT_INFIX = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def checkpoint_key(param_name: str) -> str:
    """The checkpoint key of a (possibly PEFT-wrapped) causal-LM parameter name.

    >>> checkpoint_key("model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    return _PEFT_INFIX.sub("", param_name)


def unmatched_base_keys(model, reader: SafetensorsRows) -> list[str]:
    """Parameters of the bare base model that no checkpoint tensor (by name and shape) fills.

    Tied parameters count as found when any of their names is in the checkpoint. Non-empty
    means the checkpoint layout differs from the modules (key renames or fused experts that
    ``from_pretrained`` converts while loading), so sharded loading cannot read it directly.
    """
    aliases: dict[int, list[tuple[str, torch.Size]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append((name, p.shape))
    return [names[0][0] for names in aliases.values()
            if not any(n in reader and reader.shape(n) == list(shape) for n, shape in names)]


@contextlib.contextmanager
def record_new_parameters():
    """Record the values of every parameter registered inside the block (e.g. by PEFT).

    PEFT creates LoRA weights on the CPU with the global RNG, then moves them to the device
    of the base layer, which is ``meta`` for an empty base: the values are lost. The
    dictionary yielded maps ``(module, name)`` to a tensor sharing the CPU storage the
    parameter was initialised in, so the exact same weights can be loaded after the model
    is materialised (``torch.nn.modules.module.register_module_parameter_registration_hook``).
    """
    from torch.nn.modules.module import register_module_parameter_registration_hook

    created: dict = {}

    def hook(module, name, param):
        if param is not None and param.device.type != "meta":
            created[(module, name)] = param.detach()

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield created
    finally:
        handle.remove()


def disable_bnb_cpu_inference_repack(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights in place during evaluation on CPU.

    bitsandbytes >= 0.48 (``Linear4bit.forward``, bitsandbytes/nn/modules.py) converts a
    layer's weight to a CPU-optimised layout the first time it runs in eval mode without
    grad on an AVX512-BF16 CPU, assigning ``weight.data`` and flagging the shared
    ``quant_state``. Under FSDP2 the assignment hits the gathered copy while the flag stays,
    so the first training step after an evaluation multiplies by mis-laid-out weights (seen
    here: loss 3.4 -> 7.6 right after the epoch-end eval). Training models opt out; serving
    (vLLM) and ``lorafleet eval`` do not go through this path.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def wrap_peft(model, cfg: FinetuneConfig):
    """Freeze the base and add LoRA adapters (methods lora/qlora); ``full`` returns the model unchanged."""
    if cfg.method == "full":
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lc = cfg.lora
    peft_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.lora_dropout,
        target_modules=lc.target_modules,
        modules_to_save=lc.modules_to_save,
        bias=lc.bias,
        use_rslora=lc.use_rslora,
        init_lora_weights=lc.init_lora_weights,
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise ValueError(f"LoRA could not be applied ({exc}). Linear module names in this model: {names}; "
                         f"set lora.target_modules to some of them or to 'all-linear'") from None
    if cfg.method == "qlora" or cfg.distributed.strategy == "fsdp":
        # FSDP2 flattens parameters per group; keep every parameter of a group in one dtype.
        _unify_trainable_dtype(model, resolve_dtype(cfg.model.dtype, cfg.distributed.use_gpu))
    from lorafleet.train.checkpoint import BASE_MUTATING_INITS, INITIAL_LORA_ATTR

    if isinstance(lc.init_lora_weights, str) and lc.init_lora_weights in BASE_MUTATING_INITS:
        # PiSSA/OLoRA moved B0 @ A0 out of the base weights into the adapter. Keep (A0, B0) so the
        # export can turn the trained adapter into a plain LoRA over the untouched base
        # (checkpoint.export_model). The init is a deterministic SVD/QR of the base, so a resumed
        # run recomputes the same values.
        setattr(model, INITIAL_LORA_ATTR, {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                           if ".lora_A." in n or ".lora_B." in n})
    return model


def _unify_trainable_dtype(model, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype and p.dtype.is_floating_point:
            p.data = p.data.to(dtype)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of the local module (shards count their local part)."""
    trainable = total = 0
    for p in model.parameters():
        n = _local_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _local_numel(p) -> int:
    # FSDP2 parameters are DTensors: count only this rank's shard.
    local = getattr(p, "to_local", None)
    return (local() if local else p).numel()
