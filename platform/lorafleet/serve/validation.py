"""Admission checks for LoRA adapters: decide before the engine loads a folder whether it may be served.

vLLM loads an adapter lazily, on the first request that names it, and reports a bad one
late and vaguely (a shape error deep in a worker, or weights silently applied to the wrong
base). :func:`inspect_adapter` refuses such folders up front, reading only what it needs:
the directory listing, ``adapter_config.json`` and the safetensors header (tensor shapes,
never tensor data). Nothing from the folder is ever imported or unpickled.

Every refusal is an :class:`AdapterRefused` carrying an HTTP status, a stable error code
and a message that says what is wrong and how to fix it. The checks run cheapest first:

1. the folder exists (404 ``adapter_not_found``) and is a directory;
2. no symlink points outside the folder and the allowed roots (403 ``path_not_allowed``);
3. the files together fit in ``max_bytes`` (413 ``adapter_too_large``);
4. weights are safetensors only, no pickle files (``unsafe_weights_format``);
5. ``adapter_config.json`` is a plain LoRA config (no DoRA, ``modules_to_save``, biases or other
   PEFT features vLLM does not implement);
6. the adapter was trained on this base (``base_model_mismatch``): by name, or by the
   architecture fingerprint in an optional ``lorafleet_base.json``;
7. its rank fits the engine (``rank_too_large``);
8. its ``target_modules`` exist in the base (``unknown_target_module``);
9. every tensor is a ``lora_A``/``lora_B`` pair whose shapes fit the base layer it adapts
   (``corrupt_weights``, ``unsupported_tensor``, ``shape_mismatch``);
10. an optional ``lorafleet_prompt.json`` (the training prompt format the server applies to chat
    requests, :mod:`lorafleet.data.prompt_format`) is well formed (``invalid_prompt_format``).

The base is described by a :class:`BaseModelSpec`, built from the model's config alone
(the model is instantiated on PyTorch's meta device, so no weights are read or allocated).

Example::

    base = BaseModelSpec.from_model("/models/tiny-llama", served_name="tiny")
    try:
        info = inspect_adapter(Path("/adapters/banking77"), base, max_lora_rank=16,
                               max_bytes=200 * 10**6, allowed_roots=["/adapters"])
    except AdapterRefused as exc:
        return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=exc.status)
    print(info.rank, info.target_modules)           # 8 ['q_proj', 'v_proj']
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lorafleet.serve.adapters import AdapterError, inside_roots

FINGERPRINT_FILE = "lorafleet_base.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The config fields that decide whether weights trained on one base fit another.
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# The only tensor names vLLM loads as LoRA weights of a linear layer.
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Adapter config fields vLLM refuses (see vllm.lora.peft_helper.PEFTHelper): field -> whether its value is servable.
# init_lora_weights strings other than these modify the base weights when PEFT loads the adapter (PiSSA, OLoRA, LoftQ, ...).
_SERVABLE_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_SERVABLE = {
    "bias": lambda v: v == "none",
    "lora_bias": lambda v: not v,
    "init_lora_weights": lambda v: not isinstance(v, str) or v.lower() in _SERVABLE_INITS,
    "alora_invocation_tokens": lambda v: not v,
    "layer_replication": lambda v: not v,
    "use_bdlora": lambda v: not v,
    "use_qalora": lambda v: not v,
}


class AdapterRefused(AdapterError):
    """An adapter that must not be served: ``status`` is the HTTP status, ``code`` a stable error code."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_adapter"):
        super().__init__(message)
        self.status = status
        self.code = code


# --------------------------------------------------------------------------- the base model


def base_fingerprint(config: dict) -> str:
    """sha256 of the architecture-defining fields of a model's ``config.json`` (those present)."""
    fields = {k: config[k] for k in FINGERPRINT_FIELDS if k in config}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _last_component(name: str) -> str:
    """``/a/b/tiny`` -> ``tiny``; ``org/Name`` -> ``Name``."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def _module_suffix(module: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class BaseModelSpec:
    """What adapters are checked against: the base's names, its fingerprint and the shape of every linear layer."""

    names: frozenset[str]
    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (out_features, in_features)

    @classmethod
    def from_model(cls, model: str, served_name: str | None = None, aliases: Iterable[str] = ()) -> BaseModelSpec:
        """Describe ``model`` (a local folder or hub name) from its config alone: no weights are read."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        shapes = {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
        names = frozenset(n for n in (model, _last_component(model), served_name, *aliases) if n)
        return cls(names=names, fingerprint=base_fingerprint(config.to_dict()), linear_shapes=shapes)

    def module_suffixes(self) -> set[str]:
        """The last components of the linear layers' paths, e.g. ``{"q_proj", "lm_head", ...}``."""
        return {_module_suffix(m) for m in self.linear_shapes}


# --------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class AdapterInfo:
    """What an accepted adapter is, as found in its files."""

    rank: int  # the largest rank among its tensors
    lora_alpha: float
    target_modules: list[str]  # sorted distinct module suffixes found in the tensors, e.g. ["q_proj", "v_proj"]
    size_bytes: int
    base_model: str | None  # adapter_config base_model_name_or_path
    prompt_format: dict | None = None  # lorafleet_prompt.json, checked


def inspect_adapter(folder: Path, base: BaseModelSpec, *, max_lora_rank: int, max_bytes: int,
                    allowed_roots: Sequence[str] = ()) -> AdapterInfo:
    """Check that ``folder`` holds a LoRA adapter servable over ``base``; raise :class:`AdapterRefused` if not."""
    folder = Path(folder)
    _check_is_folder(folder)
    files = _walk_checking_links(folder, allowed_roots)
    size = _check_size(folder, files, max_bytes)
    _check_weight_format(folder, files)
    cfg = _read_config(folder)
    _check_config(cfg)
    _check_base(folder, cfg, base)
    _check_ranks(cfg, max_lora_rank)
    _check_target_modules(cfg, base)
    shapes = _read_tensor_shapes(folder / WEIGHTS_FILE)
    ranks = _check_tensors(shapes, cfg, base, max_lora_rank)
    return AdapterInfo(rank=max(ranks.values()), lora_alpha=float(cfg["lora_alpha"]),
                       target_modules=sorted({_module_suffix(m) for m in ranks}),
                       size_bytes=size, base_model=cfg.get("base_model_name_or_path"), prompt_format=read_prompt(folder))


def read_prompt(folder: Path) -> dict | None:
    """The adapter's checked prompt format (None: it has none); a malformed file is refused."""
    from lorafleet.data.prompt_format import read_prompt_format

    try:
        return read_prompt_format(folder)
    except ValueError as exc:
        raise AdapterRefused(f"{exc} (fix the file, or delete it to serve the adapter without a prompt format)", code="invalid_prompt_format") from None


def _check_is_folder(folder: Path) -> None:
    if not folder.exists():
        raise AdapterRefused(f"adapter folder {folder} does not exist", status=404, code="adapter_not_found")
    if not folder.is_dir():
        raise AdapterRefused(f"{folder} is not a folder; give the PEFT adapter folder (the one holding {CONFIG_FILE})")


def _walk_checking_links(folder: Path, allowed_roots: Sequence[str]) -> list[Path]:
    """Every file in ``folder``, relative to it (directory symlinks are not followed), after checking each symlink."""
    real_folder = folder.resolve(strict=True)
    files = []
    for dirpath, dirnames, filenames in os.walk(real_folder, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                _check_link(folder / path.relative_to(real_folder), path, real_folder, allowed_roots)
        files += [(Path(dirpath) / name).relative_to(real_folder) for name in filenames]
    return files


def _check_link(shown: Path, link: Path, real_folder: Path, allowed_roots: Sequence[str]) -> None:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        raise AdapterRefused(f"{shown} is a broken symlink (it points to {os.readlink(link)}, which does not exist or loops); "
                             "remove it or copy the real file into the adapter folder") from None
    if not target.is_relative_to(real_folder) and not inside_roots(link, list(allowed_roots)):
        raise AdapterRefused(f"{shown} is a symlink to {target}, outside the adapter folder and outside the allowed roots "
                             f"{list(allowed_roots)}; copy the file into the adapter folder instead of linking to it",
                             status=403, code="path_not_allowed")


def _check_size(folder: Path, files: list[Path], max_bytes: int) -> int:
    size = sum((folder / f).stat().st_size for f in files)
    if size > max_bytes:
        raise AdapterRefused(f"the adapter's files take {_mb(size)}, above the limit of {_mb(max_bytes)}; remove files the "
                             "adapter does not need (optimizer states, checkpoints) or raise the size limit",
                             status=413, code="adapter_too_large")
    return size


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB ({n} bytes)"


def _check_weight_format(folder: Path, files: list[Path]) -> None:
    pickled = sorted(str(f) for f in files if f.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise AdapterRefused(f"the adapter folder holds pickle-based files ({', '.join(pickled)}): only safetensors weights are "
                             "loaded, because unpickling can run arbitrary code. Convert with PEFT: PeftModel.from_pretrained(base, "
                             "folder).save_pretrained(new_folder, safe_serialization=True), and serve new_folder",
                             code="unsafe_weights_format")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterRefused(f"{folder} has no {WEIGHTS_FILE}; save the adapter with PEFT's save_pretrained(folder), "
                             "which writes safetensors by default")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterRefused(f"{folder} has no {CONFIG_FILE}; it must be a folder written by PEFT's save_pretrained")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRefused(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterRefused(f"{CONFIG_FILE} must hold a JSON object, found {type(cfg).__name__}")
    return cfg


def _check_config(cfg: dict) -> None:
    """A plain LoRA config, without the PEFT features vLLM does not implement."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterRefused(f"{CONFIG_FILE} has peft_type {cfg.get('peft_type')!r}; only LoRA adapters are served, and the "
                             'config must say so with "peft_type": "LORA" (PEFT writes it for every LoraConfig)')
    if cfg.get("use_dora"):
        raise AdapterRefused(f"{CONFIG_FILE} has use_dora true; DoRA adapters cannot be served, train with use_dora=False")
    if cfg.get("modules_to_save"):
        raise AdapterRefused(f"{CONFIG_FILE} has modules_to_save {cfg['modules_to_save']}: vLLM serves LoRA weights only, so the "
                             "served model would differ from the trained one; train without modules_to_save")
    if not _positive(cfg.get("r"), int):
        raise AdapterRefused(f"{CONFIG_FILE} has r={cfg.get('r')!r}; it must be a positive integer (the LoRA rank)")
    if not _positive(cfg.get("lora_alpha"), (int, float)):
        raise AdapterRefused(f"{CONFIG_FILE} has lora_alpha={cfg.get('lora_alpha')!r}; it must be a positive number")
    if not isinstance(cfg.get("target_modules"), (list, str)):
        raise AdapterRefused(f"{CONFIG_FILE} has target_modules={cfg.get('target_modules')!r}; vLLM needs the list (or regex) "
                             "of adapted modules")
    unsupported = [f"{key}={cfg[key]!r}" for key, ok in _SERVABLE.items() if key in cfg and not ok(cfg[key])]
    if unsupported:
        raise AdapterRefused(f"{CONFIG_FILE} sets {', '.join(unsupported)}: vLLM cannot serve these PEFT features (biases, "
                             "base-modifying inits, aLoRA, layer replication, BD-LoRA, QALoRA); train a plain LoRA without them")


def _positive(value: object, types: type | tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool) and value > 0


def _check_base(folder: Path, cfg: dict, base: BaseModelSpec) -> None:
    claimed = cfg.get("base_model_name_or_path")
    if claimed and (claimed in base.names or _last_component(claimed) in {_last_component(n) for n in base.names}):
        return
    if _read_fingerprint(folder) == base.fingerprint:
        return
    said = f"was trained on {claimed!r}" if claimed else "does not say which base it was trained on (no base_model_name_or_path)"
    raise AdapterRefused(f"the adapter {said}, but this server's base model is {sorted(base.names)}; serve it over its own base, "
                         f"or, if the base is the same model under another name, add {FINGERPRINT_FILE} with "
                         f'{{"base_fingerprint": "{base.fingerprint}"}} to the adapter folder', code="base_model_mismatch")


def _read_fingerprint(folder: Path) -> str | None:
    try:
        data = json.loads((folder / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("base_fingerprint") if isinstance(data, dict) else None


def _rank_pattern(cfg: dict) -> dict[str, int]:
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_positive(r, int) for r in pattern.values()):
        raise AdapterRefused(f"{CONFIG_FILE} has rank_pattern {pattern!r}; it must map module names to positive integer ranks")
    return pattern


def _check_ranks(cfg: dict, max_lora_rank: int) -> None:
    ranks = {"r": cfg["r"], **{f"rank_pattern[{k!r}]": r for k, r in _rank_pattern(cfg).items()}}
    too_large = [f"{k}={r}" for k, r in ranks.items() if r > max_lora_rank]
    if too_large:
        raise AdapterRefused(f"the adapter's rank ({', '.join(too_large)}) is above this server's limit of {max_lora_rank}; "
                             "raise engine.max_lora_rank or train with a smaller r", code="rank_too_large")


def _check_target_modules(cfg: dict, base: BaseModelSpec) -> None:
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):  # a string is a regex (or "all-linear"): the tensor check covers it
        return
    unknown = [t for t in targets if not (isinstance(t, str) and any(m == t or m.endswith("." + t) for m in base.linear_shapes))]
    if unknown:
        raise AdapterRefused(f"target_modules {unknown} name no linear layer of the base model; its linear layers are "
                             f"{sorted(base.module_suffixes())}", code="unknown_target_module")


def _read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; its message is what matters
        raise AdapterRefused(f"{path.name} cannot be read as safetensors ({exc}); the file is corrupt or truncated, "
                             "save the adapter again", code="corrupt_weights") from None


def _expected_rank(module: str, cfg: dict) -> int:
    """The rank PEFT gives ``module``: the first rank_pattern key matching its name (as PEFT matches), else ``r``."""
    for key, rank in _rank_pattern(cfg).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        except re.error as exc:
            raise AdapterRefused(f"{CONFIG_FILE} has rank_pattern key {key!r}, which is not a valid regex: {exc}") from None
    return cfg["r"]


def _check_tensors(shapes: dict[str, tuple[int, ...]], cfg: dict, base: BaseModelSpec, max_lora_rank: int) -> dict[str, int]:
    """Check every tensor against the base layer it adapts; return module -> rank."""
    if not shapes:
        raise AdapterRefused(f"{WEIGHTS_FILE} holds no tensors; save the trained adapter again")
    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if not match:
            raise AdapterRefused(f"{WEIGHTS_FILE} holds tensor {key!r}, which vLLM does not load: only base_model.model.<module>"
                                 ".lora_A.weight / .lora_B.weight are served (no adapter name such as .default. in the key, no "
                                 "embedding LoRA, biases or modules_to_save weights); save with PEFT's save_pretrained",
                                 code="unsupported_tensor")
        module = match["module"]
        if module not in base.linear_shapes:
            raise AdapterRefused(f"tensor {key!r} adapts {module!r}, which is not a linear layer of the base model",
                                 code="unknown_target_module")
        pairs.setdefault(module, {})[match["part"]] = (key, shape)
    return {module: _check_pair(module, pair, cfg, base, max_lora_rank) for module, pair in pairs.items()}


def _check_pair(module: str, pair: dict[str, tuple[str, tuple[int, ...]]], cfg: dict, base: BaseModelSpec, max_lora_rank: int) -> int:
    """Check one module's lora_A (r, in) and lora_B (out, r) against the base layer (out, in); return r."""
    for part, other in (("A", "B"), ("B", "A")):
        if other not in pair:
            raise AdapterRefused(f"{WEIGHTS_FILE} has lora_{part} but no lora_{other} for {module!r} ({pair[part][0]!r}); "
                                 "the file is incomplete, save the adapter again", code="shape_mismatch")
    (key_a, shape_a), (key_b, shape_b) = pair["A"], pair["B"]
    out_features, in_features = base.linear_shapes[module]
    if len(shape_a) != 2:
        raise _shape_mismatch(key_a, shape_a, ["r", in_features], module, base)
    rank = shape_a[0]
    for key, shape, expected in ((key_a, shape_a, (rank, in_features)), (key_b, shape_b, (out_features, rank))):
        if shape != expected:
            raise _shape_mismatch(key, shape, list(expected), module, base)
    if rank > max_lora_rank:
        raise AdapterRefused(f"tensor {key_a!r} has rank {rank}, above this server's limit of {max_lora_rank}; raise "
                             "engine.max_lora_rank or train with a smaller r", code="rank_too_large")
    configured = _expected_rank(module, cfg)
    if rank != configured:
        raise AdapterRefused(f"tensor {key_a!r} has rank {rank}, but {CONFIG_FILE} gives {module!r} rank {configured} (r or "
                             "rank_pattern); the config does not belong to these weights", code="shape_mismatch")
    return rank


def _shape_mismatch(key: str, shape: tuple[int, ...], expected: list, module: str, base: BaseModelSpec) -> AdapterRefused:
    out_features, in_features = base.linear_shapes[module]
    return AdapterRefused(f"tensor {key!r} has shape {list(shape)}, but the base layer {module!r} ({in_features} -> {out_features} "
                          f"features) needs {expected}; the adapter was trained on a different base model", code="shape_mismatch")
