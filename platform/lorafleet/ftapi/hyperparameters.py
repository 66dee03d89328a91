"""``POST /v1/fine_tuning/jobs``'s body and how it becomes the ``FinetuneConfig`` a job runs.

The body is OpenAI's (``model``, ``training_file``, ``validation_file``, ``hyperparameters``
or ``method={"type": "supervised", "supervised": {"hyperparameters": ...}}``, ``suffix``,
``seed``, ``metadata``). ``hyperparameters`` takes OpenAI's ``n_epochs``, ``batch_size`` and
``learning_rate_multiplier`` (each ``"auto"`` or a value) and PEFT's LoRA settings ``r``,
``lora_alpha`` and ``target_modules``.

:func:`job_config` maps them onto the server's base config through the same override path as
``jobs/finetune.py --set`` (:func:`lorafleet.config.base.apply_overrides`) and validates the
result once: every problem is one 400 that names the request's field
(``hyperparameters.learning_rate_multiplier``), with the config field and value behind it.

* ``n_epochs`` -> ``training.num_epochs`` (and no ``training.max_steps``);
* ``batch_size`` (examples per optimizer step, as OpenAI counts it) -> ``training.per_device_batch_size``
  = batch_size / ``distributed.num_workers``, no gradient accumulation;
* ``learning_rate_multiplier`` -> ``training.learning_rate`` = the base config's rate x multiplier;
* ``seed`` -> ``training.seed``; ``r``, ``lora_alpha``, ``target_modules`` -> ``lora.*``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from lorafleet.config import FinetuneConfig, LoraSettings
from lorafleet.config.base import apply_overrides, format_validation_error, read_yaml
from lorafleet.serve.errors import OpenAIError

SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# What hyperparameter (request field) sets which config fields: a config error on one of them names the request field.
TARGETS = {"n_epochs": ("training.num_epochs", "training.max_steps"), "batch_size": ("training.per_device_batch_size",
           "training.gradient_accumulation_steps"), "learning_rate_multiplier": ("training.learning_rate",),
           "seed": ("training.seed",), "r": ("lora.r",), "lora_alpha": ("lora.lora_alpha",), "target_modules": ("lora.target_modules",)}
_LIMITS = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 1024), "learning_rate_multiplier": (float, 0, None)}


def _auto(kind: str, text: str):
    return Annotated[Any, WithJsonSchema({"anyOf": [{"const": "auto"}, {"type": kind}], "default": "auto", "description": text})]


class JobHyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters plus PEFT's LoRA settings."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: _auto("integer", "Passes over the training file (1-50); `auto`: the server's config.") = "auto"
    batch_size: _auto("integer", "Examples per optimizer step, over all training workers; `auto`: the server's config.") = "auto"
    learning_rate_multiplier: _auto("number", "Times the server's configured learning rate; `auto`: 1.") = "auto"
    r: Optional[int] = Field(None, description="LoRA rank (PEFT `r`), at most the server's engine.max_lora_rank so that it can be served.")
    lora_alpha: Optional[float] = Field(None, description="LoRA scaling numerator (PEFT `lora_alpha`).")
    target_modules: Optional[Any] = Field(None, description="Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear`.",
                                          json_schema_extra={"anyOf": [{"const": "all-linear"}, {"type": "array", "items": {"type": "string"}}]})

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier")
    @classmethod
    def _auto_or_value(cls, v, info):
        kind, low, high = _LIMITS[info.field_name]
        ok = v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
                             and (v >= low if kind is int else v > low) and (high is None or v <= high))
        if not ok:
            rule = f"an integer from {low} to {high}" if kind is int else f"a number above {low}"
            raise ValueError(f"must be `auto` or {rule}, got {v!r}")
        return v if v == "auto" else kind(v)

    def given(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None and v != "auto"}


class JobSupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: JobHyperparameters = Field(default_factory=JobHyperparameters)


class JobMethod(BaseModel):
    """OpenAI's ``method``: lorafleet trains ``supervised`` (LoRA) only."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="`supervised` (the only method lorafleet trains).", json_schema_extra={"enum": ["supervised"]})
    supervised: Optional[JobSupervisedMethod] = None

    @field_validator("type")
    @classmethod
    def _supervised(cls, v):
        if v != "supervised":
            raise ValueError(f"lorafleet trains LoRA adapters by supervised fine-tuning only; `{v}` is not supported (use `supervised`)")
        return v


class JobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs`` (the openai client's ``fine_tuning.jobs.create``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base to fine-tune: the server's base model (GET /v1/models).")
    training_file: str = Field(description="The id of one of your files (POST /v1/files, purpose fine-tune).")
    validation_file: Optional[str] = Field(None, description="The id of one of your files to validate on; default: 20% of the training file.")
    hyperparameters: Optional[JobHyperparameters] = Field(None, description="Training settings (OpenAI's, deprecated there in favour of `method`).")
    method: Optional[JobMethod] = Field(None, description="`{\"type\": \"supervised\", \"supervised\": {\"hyperparameters\": {...}}}`.")
    suffix: Optional[str] = Field(None, description="Up to 64 letters, digits, `.`, `_`, `-` added to the fine-tuned model's name.")
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="Training seed; default: the server's config.")
    metadata: Optional[dict[str, str]] = Field(None, description="Up to 16 key-value pairs (keys up to 64, values up to 512 characters).")
    integrations: Optional[list[Any]] = Field(None, description="Not supported (metrics go to the server's MLflow); must be empty.")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not SUFFIX.fullmatch(v):
            raise ValueError(f"must be 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit (got {v[:80]!r})")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > MAX_METADATA_KEYS or any(len(k) > MAX_METADATA_KEY or len(x) > MAX_METADATA_VALUE for k, x in v.items())):
            raise ValueError(f"at most {MAX_METADATA_KEYS} pairs, keys up to {MAX_METADATA_KEY} and values up to {MAX_METADATA_VALUE} characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v):
        if v:
            raise ValueError("integrations (Weights & Biases) are not supported: a job's metrics go to the server's MLflow and its events")
        return v

    def hyperparameter_fields(self) -> tuple[JobHyperparameters, str]:
        """The hyperparameters and the request field that gave them (top level or ``method.supervised``); 400 when both do."""
        top = self.hyperparameters or JobHyperparameters()
        nested = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        if nested is None:
            return top, "hyperparameters"
        if top.given():
            raise invalid("Give hyperparameters either in `hyperparameters` or in `method.supervised.hyperparameters`, not both.",
                          "hyperparameters")
        return nested, "method.supervised.hyperparameters"


def invalid(message: str, param: Optional[str], code: str = "invalid_hyperparameters") -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def base_data(settings, base_model: str, max_lora_rank: int) -> dict:
    """The server's base config (``fine_tuning.config`` with ``fine_tuning.overrides``) with its model set to the served
    base, and a rank the engine serves where the config leaves ``lora.r`` at its default."""
    data = read_yaml(settings.config) if settings.config else {}
    data, errors = apply_overrides(data, settings.overrides)
    if errors:
        raise ValueError(f"fine_tuning.overrides: {'; '.join(errors)}")
    data.setdefault("model", {})
    data["model"]["name_or_path"] = base_model
    lora = data.setdefault("lora", {})
    lora.setdefault("r", min(LoraSettings.model_fields["r"].default, max_lora_rank))
    return data


def check_base(settings, base_model: str, max_lora_rank: int) -> None:
    """The server's base config makes a valid LoRA job it can serve (checked when a replica starts: a bad one fails the deploy)."""
    try:
        cfg = FinetuneConfig.model_validate(pinned(base_data(settings, base_model, max_lora_rank), Path("/train.jsonl"), None, {}))
    except ValidationError as exc:
        raise ValueError("fine_tuning: the base config of jobs is invalid: " + "; ".join(format_validation_error(exc))) from None
    if cfg.method not in ("lora", "qlora"):
        raise ValueError(f"fine_tuning: the base config's method must be lora or qlora (jobs make adapters), got {cfg.method}")
    if cfg.lora.r > max_lora_rank:
        raise ValueError(f"fine_tuning: the base config's lora.r ({cfg.lora.r}) must be <= engine.max_lora_rank ({max_lora_rank}), "
                         "or no job's adapter could be served; set lora.r in fine_tuning.overrides")


def pinned(data: dict, training: Path, validation: Optional[Path], pins: dict) -> dict:
    """``data`` with the job's own data section and the per-job ``pins`` (dotted keys: run_name, output_dir, ...)."""
    keep = {k: v for k, v in (data.get("data") or {}).items() if k in ("max_eval_samples", "seed", "validation_fraction", "loss_on",
                                                                       "max_train_samples", "on_bad_row")}
    data = {**data, "data": {**keep, "task": "chat", "format": "auto", "path": str(training),
                             **({"validation_path": str(validation)} if validation else {})}}
    data, errors = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in pins.items()])
    if errors:  # server-made keys and values: a bug, not the client's mistake
        raise RuntimeError(f"pinning the job's config failed: {errors}")
    return data


def job_config(base: dict, hyper: JobHyperparameters, field: str, seed: Optional[int], max_lora_rank: int, training: Path,
               validation: Optional[Path], pins: dict) -> tuple[FinetuneConfig, dict]:
    """(the job's config, the resolved hyperparameters to show) or a 400 listing every problem, each naming its request field."""
    base_cfg = base.get("training") or {}
    workers = int((base.get("distributed") or {}).get("num_workers", 2))
    rate = float(base_cfg.get("learning_rate", 2e-4))
    given, problems, sets = hyper.given(), [], {}
    if seed is not None:
        given["seed"] = seed
    for name, value in given.items():
        if name == "n_epochs":
            sets[name] = {"training.num_epochs": value, "training.max_steps": None}
        elif name == "batch_size":
            if value % workers:
                problems.append((f"{field}.batch_size", f"{field}.batch_size ({value}) must be a multiple of the server's {workers} training "
                                                        f"workers (distributed.num_workers): each takes batch_size / {workers} examples per step"))
            sets[name] = {"training.per_device_batch_size": max(value // workers, 1), "training.gradient_accumulation_steps": 1}
        elif name == "learning_rate_multiplier":
            sets[name] = {"training.learning_rate": rate * value}
        elif name == "seed":
            sets[name] = {"training.seed": value}
        else:
            sets[name] = {f"lora.{name}": value}
    data, errors = apply_overrides(base, [f"{path}={json.dumps(v)}" for s in sets.values() for path, v in s.items()])
    data = pinned(data, training, validation, pins)
    try:
        cfg = FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        cfg = None
        for err, line in zip(exc.errors(), format_validation_error(exc)):
            where = ".".join(str(p) for p in err["loc"])
            owner = next((n for n, paths in TARGETS.items() if n in sets and any(where.startswith(p) for p in paths)), None)
            request = ("seed" if owner == "seed" and seed is not None else f"{field}.{owner}") if owner else None
            problems.append((request, f"{request}: {line}" if request else f"the job's configuration: {line}"))
    rank = cfg.lora.r if cfg is not None else given.get("r")
    if isinstance(rank, int) and rank > max_lora_rank:
        problems.append((f"{field}.r", f"{field}.r ({rank}) must be <= this server's engine.max_lora_rank ({max_lora_rank}), "
                                       "or the adapter could not be served"))
    if problems or errors:
        lines = [p for _, p in problems] + errors
        raise invalid("Invalid fine-tuning settings: " + "; ".join(lines), next((f for f, _ in problems if f), field))
    t, lora = cfg.training, cfg.lora
    shown = {"n_epochs": int(t.num_epochs) if float(t.num_epochs).is_integer() else t.num_epochs,
             "batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * cfg.distributed.num_workers,
             "learning_rate_multiplier": given.get("learning_rate_multiplier", 1.0), "r": lora.r, "lora_alpha": lora.lora_alpha,
             "target_modules": lora.target_modules}
    if t.max_steps is not None:
        shown["max_steps"] = t.max_steps
    return cfg, shown
