"""The one checkpoint format: resume, fault tolerance and export all go through here.

A training checkpoint folder (one per ``ray.train.report``) holds::

    dcp/                    torch.distributed.checkpoint: model (trainable params only for
                            LoRA/QLoRA) + optimizer state, one shard file per rank
    trainer_state.json      step, epoch, micro-batch position in the epoch, scheduler
                            state, tokens seen, metric history (rank 0)
    adapter/                only in the final checkpoint: the exported PEFT adapter (or
                            full model for method full) in safetensors
    lorafleet_manifest.rank<R>.json
                            written last by each rank R: size and sha256 of every file
                            that rank wrote, and the world size

Every rank writes its own shard to a local temporary folder; Ray Train merges the
folders of all ranks into one checkpoint directory in the run's storage path.
``torch.distributed.checkpoint.state_dict`` makes the same code work for FSDP2 (DTensor
shards), DDP and single-process models, so a run can even resume on another world size.

A checkpoint is complete when every rank's manifest is there and every file matches it
(:func:`verify_checkpoint`); one killed mid-write or mid-upload lacks a manifest or has a
short file. Resuming (:func:`choose_resume_checkpoint`) skips such a checkpoint for the
newest complete one of the run, so ``checkpoint.keep`` must be at least 2 for a fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DCP_DIR = "dcp"
ADAPTER_DIR = "adapter"
MANIFEST = "lorafleet_manifest.rank{rank}.json"
# init_lora_weights values that change the base weights (PEFT subtracts the adapter's start from them);
# train.model.wrap_peft keeps their initial LoRA weights on the model under INITIAL_LORA_ATTR.
BASE_MUTATING_INITS = ("pissa", "olora")
INITIAL_LORA_ATTR = "lorafleet_initial_lora"


@dataclass
class TrainState:
    """Where training stands. ``micro_step_in_epoch`` is the data position used to skip batches on resume."""

    global_step: int = 0
    epoch: int = 0
    micro_step_in_epoch: int = 0
    tokens_seen: int = 0
    resumed_from_step: int | None = None
    history: list[dict] = field(default_factory=list)
    scheduler: dict = field(default_factory=dict)
    finished: bool = False
    tracking: dict = field(default_factory=dict)  # final checkpoint: rank 0's MetricsLogger.close() report


def _options(trainable_only: bool, full: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full, cpu_offload=full, strict=strict)


def save_training_checkpoint(path: str | Path, model, optimizer, scheduler, state: TrainState, trainable_only: bool) -> None:
    """Collective: every rank calls it with its own local ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
    write_train_state(path, state, scheduler)


def write_train_state(path: str | Path, state: TrainState, scheduler) -> None:
    """Rank 0 writes ``trainer_state.json`` (step, data position, scheduler...) into ``path``."""
    if _rank() == 0:
        state.scheduler = scheduler.state_dict() if scheduler is not None else {}
        (Path(path) / STATE_FILE).write_text(json.dumps(asdict(state)))


def load_training_checkpoint(path: str | Path, model, optimizer, scheduler, trainable_only: bool) -> TrainState:
    """Collective: restore model/optimizer shards in place and return the saved :class:`TrainState`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file() or not (path / DCP_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {STATE_FILE} or {DCP_DIR}/.metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path / DCP_DIR))
    # A LoRA checkpoint holds only trainable parameters, so frozen base weights are "missing"
    # by design: load non-strictly, then insist that every trainable parameter was restored.
    result = set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                            options=_options(trainable_only, strict=not trainable_only))
    trainable = {_param_name(n) for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]}")
    state = TrainState(**json.loads(state_file.read_text()))
    if scheduler is not None and state.scheduler:
        scheduler.load_state_dict(state.scheduler)
    return state


def read_train_state(path: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text()))


def write_manifest(path: str | Path) -> None:
    """Every rank, after everything else it puts in the checkpoint folder ``path``: the proof that its part is complete.

    Written to a temporary name and renamed, so a manifest is never itself half-written. Ray
    uploads files in no particular order, so the sizes and hashes (not the manifest's mere
    presence) are what show that an upload finished.
    """
    path = Path(path)
    rank = _rank()
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    target = path / MANIFEST.format(rank=rank)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "world_size": world, "files": files}))
    os.replace(tmp, target)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when checkpoint folder ``path`` is complete, else what is wrong with it."""
    path = Path(path)
    manifests = {}
    for f in path.glob(MANIFEST.format(rank="*")):
        try:
            m = json.loads(f.read_text())
            manifests[int(m["rank"])] = m
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable manifest {f.name}: {exc}"
    if 0 not in manifests:
        return "no manifest of rank 0 (half-written)"
    world = manifests[0]["world_size"]
    missing = sorted(set(range(world)) - set(manifests))
    if missing:
        return f"no manifest of rank(s) {missing} of {world} (half-written)"
    if STATE_FILE not in manifests[0]["files"]:
        return f"rank 0 wrote no {STATE_FILE}"
    for rank in range(world):
        for name, expected in manifests[rank]["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} (rank {rank}) is missing"
            if f.stat().st_size != expected["size"]:
                return f"{name} (rank {rank}) has {f.stat().st_size} bytes, not {expected['size']}"
            if _sha256(f) != expected["sha256"]:
                return f"{name} (rank {rank}) does not match its sha256"
    return None


def choose_resume_checkpoint(latest, run_uri: str | None = None):
    """Collective: the checkpoint every rank resumes from, given Ray's ``latest`` (a
    ``ray.train.Checkpoint``, or None when Ray has none for the run) and the run's storage folder.

    The newest complete checkpoint of the run: of ``latest`` and the other ``checkpoint_*``
    folders beside it in the run's storage (Ray names them by creation time), the newest that
    verifies. That is usually ``latest``; an older one when ``latest`` is corrupt or
    half-written; a newer one when every rank wrote it but the worker group died before Ray's
    controller registered it (so a kill never costs more than one checkpoint interval). Any
    choice other than ``latest`` is logged with the reason. If none verifies, every rank
    raises: silently starting over at step 0 would throw away the run's progress; delete the
    run's storage folder (or pick a new run_name) to do that on purpose.

    With no ``latest`` (the driver, or the first worker group, died before Ray registered the
    run's first checkpoint) ``run_uri`` is searched the same way: a complete checkpoint there is
    resumed from (logged), otherwise the run starts at step 0 (None). Rank 0 decides and
    broadcasts, so all ranks load the same checkpoint even if the storage changes under them.
    """
    if latest is None and not run_uri:
        return None
    choice = [None]
    if _rank() == 0:
        try:
            if latest is not None:
                fs, run_dir = latest.filesystem, posixpath.dirname(latest.path.rstrip("/"))
            else:
                from pyarrow.fs import FileSystem

                fs, run_dir = FileSystem.from_uri(run_uri)
            choice[0] = {"path": _newest_complete(fs, run_dir, latest.path if latest is not None else None)}
        except Exception as exc:  # noqa: BLE001 - every rank raises it, instead of waiting in broadcast for rank 0
            choice[0] = {"error": str(exc)}
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if "error" in choice[0]:
        raise RuntimeError(choice[0]["error"])
    path = choice[0]["path"]
    if latest is None:
        from ray.train import Checkpoint

        if path is None:
            return None
        from pyarrow.fs import FileSystem

        return Checkpoint(path=path, filesystem=FileSystem.from_uri(run_uri)[0])
    if path == latest.path:
        return latest
    return type(latest)(path=path, filesystem=latest.filesystem)


def _newest_complete(fs, run_dir: str, latest_path: str | None) -> str | None:
    """Path of the checkpoint to resume from (see :func:`choose_resume_checkpoint`); rank 0 only."""
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    if latest_path is None and fs.get_file_info(run_dir).type != FileType.Directory:
        return None  # a new run
    candidates = sorted((i.path for i in fs.get_file_info(FileSelector(run_dir))
                         if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    if latest_path is not None and latest_path not in candidates:
        candidates.append(latest_path)
    rejected = []
    for path in candidates:
        with Checkpoint(path=path, filesystem=fs).as_directory() as d:
            problem = verify_checkpoint(d)
            if problem is None:
                if latest_path is None:
                    log.warning("resuming from %s (step %d): Ray has no registered checkpoint for this run (its driver or "
                                "first worker group died before Ray's controller recorded one), but this one is complete",
                                path, read_train_state(d).global_step)
                elif path != latest_path:
                    log.warning("resuming from %s (step %d), not from Ray's latest registered checkpoint %s: %s", path,
                                read_train_state(d).global_step, latest_path,
                                "; ".join(rejected) if rejected else "it is newer, complete but unregistered (the worker group "
                                "died before Ray's controller recorded it)")
                return path
        rejected.append(f"{path}: {problem}")
    if latest_path is None:
        if rejected:
            log.warning("starting at step 0: no complete checkpoint in %s (%s)", run_dir, "; ".join(rejected))
        return None
    raise RuntimeError("no complete checkpoint to resume from: " + "; ".join(rejected) +
                       f". Delete {run_dir} (or choose a new run_name) to start over from step 0")


def export_model(path: str | Path, model, tokenizer, method: str, prompt_format: dict | None = None) -> None:
    """Write the final adapter (PEFT folder) or, for method full, the whole model.

    Collective (the full state dict is gathered from all shards); rank 0 writes.
    Output is safetensors only: ``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable by ``PeftModel.from_pretrained`` and by vLLM; with ``prompt_format`` (the task's
    :meth:`~lorafleet.data.tasks.TaskSpec.prompt_format`) also ``lorafleet_prompt.json``, which
    the server applies to chat requests (:mod:`lorafleet.data.prompt_format`).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable_only = method != "full"
    sd = get_model_state_dict(model, options=_options(trainable_only, full=dist.is_initialized()))
    if _rank() != 0:
        return
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    from lorafleet.train.parallel import unwrap

    target = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    initial = getattr(target, INITIAL_LORA_ATTR, None)
    if initial:
        sd = to_plain_lora(sd, initial)
    target.save_pretrained(str(path), state_dict=sd, safe_serialization=True)
    if initial:
        _double_rank_in_config(path / "adapter_config.json")
    if prompt_format is not None:
        from lorafleet.data.prompt_format import write_prompt_format

        write_prompt_format(path, prompt_format)
    if method == "full":
        tokenizer.save_pretrained(str(path))
        # Generation-time settings: the training loop turned the KV cache off.
        cfg_file = path / "config.json"
        conf = json.loads(cfg_file.read_text())
        conf["use_cache"] = True
        cfg_file.write_text(json.dumps(conf, indent=2))


def to_plain_lora(state_dict: dict, initial: dict) -> dict:
    """A PiSSA/OLoRA adapter's state dict as a plain LoRA over the original base.

    Training ran on W_res = W - s B0 A0 with the adapter B A, so the model is
    W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]: the same update as a LoRA of rank 2r with
    A' = cat(A, A0) and B' = cat(B, -B0) (PEFT's ``LoraModel.subtract_mutated_init``, done on
    the gathered state dict because the trained model may be sharded). The scale s is kept by
    doubling lora_alpha with r (:func:`_double_rank_in_config`).
    """
    initial = {_param_name(k): v for k, v in initial.items()}
    out = {}
    for key, value in state_dict.items():
        name = _param_name(key)
        if ".lora_A." in name or ".lora_B." in name:
            if name not in initial:
                raise RuntimeError(f"no initial value kept for {name}: cannot convert the adapter to a plain LoRA")
            start = initial[name].to(value.device, value.dtype)
            value = torch.cat([value, start], dim=0) if ".lora_A." in name else torch.cat([value, -start], dim=1)
        out[key] = value.contiguous()
    return out


def _double_rank_in_config(config_file: Path) -> None:
    """The adapter config of :func:`to_plain_lora`'s output: rank 2r, same scale, a plain LoRA init."""
    conf = json.loads(config_file.read_text())
    conf["r"] *= 2
    # scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA: keep it with the doubled rank.
    conf["lora_alpha"] *= 2 ** 0.5 if conf.get("use_rslora") else 2
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            conf[key] = {k: v * 2 for k, v in conf[key].items()}
    conf["init_lora_weights"] = True
    config_file.write_text(json.dumps(conf, indent=2, sort_keys=True))


def _param_name(key: str) -> str:
    # DDP prefixes parameter names with "module."; state-dict keys do not carry it.
    return key if not key.startswith("module.") else key[len("module."):]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
