"""The one checkpoint format: resume, fault tolerance and export all go through here.

A training checkpoint folder (one per ``ray.train.report``) holds::

    dcp/                    torch.distributed.checkpoint: model (trainable params only for
                            LoRA/QLoRA) + optimizer state, one shard file per rank
    trainer_state.json      step, epoch, micro-batch position in the epoch, scheduler
                            state, tokens seen, metric history (rank 0)
    adapter/                only in the final checkpoint: the exported PEFT adapter (or
                            full model for method full) in safetensors

Every rank writes its own shard to a local temporary folder; Ray Train merges the
folders of all ranks into one checkpoint directory in the run's storage path.
``torch.distributed.checkpoint.state_dict`` makes the same code work for FSDP2 (DTensor
shards), DDP and single-process models, so a run can even resume on another world size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DCP_DIR = "dcp"
ADAPTER_DIR = "adapter"


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


def export_model(path: str | Path, model, tokenizer, method: str) -> None:
    """Write the final adapter (PEFT folder) or, for method full, the whole model.

    Collective (the full state dict is gathered from all shards); rank 0 writes.
    Output is safetensors only: ``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable by ``PeftModel.from_pretrained`` and by vLLM.
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
    target.save_pretrained(str(path), state_dict=sd, safe_serialization=True)
    if method == "full":
        tokenizer.save_pretrained(str(path))
        # Generation-time settings: the training loop turned the KV cache off.
        cfg_file = path / "config.json"
        conf = json.loads(cfg_file.read_text())
        conf["use_cache"] = True
        cfg_file.write_text(json.dumps(conf, indent=2))


def _param_name(key: str) -> str:
    # DDP prefixes parameter names with "module."; state-dict keys do not carry it.
    return key if not key.startswith("module.") else key[len("module."):]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
