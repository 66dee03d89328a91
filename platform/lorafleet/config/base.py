"""Strict pydantic base model, the YAML + ``--set`` loader shared by every config, and the job
entry (:func:`job_config`) with the rule for where a job's outputs may go.

Every user-facing config is loaded through :func:`load_config`: the YAML file is read,
``--set key.path=value`` overrides are applied (values parsed as YAML scalars), and the
result is validated once. All problems are collected and raised together as a
:class:`ConfigError` whose message lists each one with the offending value.

Example::

    cfg = load_config(FinetuneConfig, "jobs/configs/banking77-lora.yaml",
                      ["training.learning_rate=3e-4", "lora.r=8"])
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base for all config models: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or override is invalid. ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid configuration ({source}), {len(errors)} problem(s):\n{lines}")


M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], parsed value). Values are YAML scalars/lists."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> tuple[dict, list[str]]:
    """Apply dotted overrides to a nested dict (a number indexes a list: ``data.mixture.0.path=x.csv``).
    Returns the new dict and the override errors."""
    data = copy.deepcopy(data)
    errors: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        node = data
        for i, part in enumerate(path):
            if isinstance(node, list):  # a list of sections (data.mixture.0.path): the part is an index
                if not (part.isdigit() and int(part) < len(node)):
                    errors.append(f"override {text!r}: {'.'.join(path[:i])} is a list of {len(node)}; "
                                  f"{part!r} is not one of its indices (0 to {len(node) - 1})")
                    break
                part = int(part)
            if i == len(path) - 1:
                node[part] = value
                break
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], (dict, list)):
                errors.append(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
                break
            node = node[part]
    return data, errors


def format_validation_error(exc: ValidationError) -> list[str]:
    """One readable line per pydantic error: ``where: what (got value)``."""
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        value = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        out.append(f"{where}: {msg}{shown}")
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def validate_config(model: type[M], data: dict, source: str = "<dict>", extra_errors: list[str] | None = None) -> M:
    errors = list(extra_errors or [])
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, errors + format_validation_error(exc)) from None
    if errors:
        raise ConfigError(source, errors)
    return cfg


def load_config(model: type[M], path: str | Path | None, overrides: Iterable[str] = (), base: dict | None = None) -> M:
    """Load ``path`` (YAML), apply ``overrides`` and validate against ``model``."""
    data = read_yaml(path) if path is not None else dict(base or {})
    data, errors = apply_overrides(data, overrides)
    return validate_config(model, data, str(path) if path else "<overrides>", errors)


def job_config(model: type[M], description: str, argv: list[str] | None = None, config_help: str = "YAML file") -> M:
    """The validated config of a job script (``--config FILE [--set KEY.PATH=VALUE ...]``).

    Every problem is printed to stderr and the script exits with status 2 before anything
    starts (no Ray, no downloads). Under ``ray job submit --working-dir``, a relative output
    path (see :func:`relative_output_paths`) is one of those problems.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(model, args.config, args.set)
        refuse_relative_outputs(cfg, args.config)
        return cfg
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- where a job's outputs go
#
# `ray job submit --working-dir .` uploads the folder, and Ray unpacks it on every node into
# <session dir>/runtime_resources/working_dir_files/<package>/, the directory the job's driver and
# all its workers (Train workers, Tune trials) run in (WorkingDirPlugin in
# ray/_private/runtime_env/working_dir.py). That copy is Ray's cache, not the user's folder: it is
# garbage-collected with the package, the next Ray session does not see it, and the user never
# looks there. A relative output path would resolve into it, and so would the default work dir
# `./lorafleet-work`: the MLflow store, the registered version, the checkpoints a re-submission
# resumes from and the adapter would all be lost with it. Inputs (data.path, model folders) are
# different: a relative one inside the uploaded folder is exactly what the user meant.

RAY_WORKING_DIR_FILES = ("runtime_resources", "working_dir_files")
WORK_DIR_ENV = "LORAFLEET_HOME"
DEFAULT_WORK_DIR = "lorafleet-work"
# Config fields (in any section) that name where a job writes; everything else is an input.
OUTPUT_FIELDS = ("output_dir", "storage_path", "mlflow_tracking_uri", "mlflow_artifact_location")

_log = logging.getLogger("lorafleet.config")
_announced: set[str] = set()


def ray_working_dir_copy(cwd: str | Path | None = None) -> Optional[Path]:
    """The folder of Ray's temporary copy of an uploaded ``--working-dir`` that ``cwd`` (default:
    the current directory) lies in, or None (a local run, or a job submitted without one)."""
    parts = Path(cwd if cwd is not None else os.getcwd()).parts
    for i in range(len(parts) - 2):
        if parts[i:i + 2] == RAY_WORKING_DIR_FILES:
            return Path(*parts[:i + 3])
    return None


def work_dir_for(environ_value: Optional[str], working_dir_copy: Optional[Path]) -> Path:
    """The work dir given ``$LORAFLEET_HOME`` and :func:`ray_working_dir_copy` (see
    ``lorafleet.config.train.default_work_dir``, which passes the live values)."""
    if working_dir_copy is None:
        return Path(environ_value or DEFAULT_WORK_DIR).expanduser().resolve()
    if environ_value:
        chosen = Path(environ_value).expanduser()
        if not chosen.is_absolute():
            raise ValueError(
                f"{WORK_DIR_ENV}={environ_value!r} is a relative path, and this process runs in Ray's temporary copy of "
                f"the uploaded working dir ({working_dir_copy}), which Ray deletes: the MLflow store, checkpoints and "
                f"adapters would be lost with it. Set {WORK_DIR_ENV} to an absolute path (in the environment of "
                f"`ray start`, or with --runtime-env-json '{{\"env_vars\": {{\"{WORK_DIR_ENV}\": \"/abs/path\"}}}}')")
        why = f"${WORK_DIR_ENV}"
    else:
        chosen = Path.home() / DEFAULT_WORK_DIR
        why = (f"${WORK_DIR_ENV} is not set, so ~/{DEFAULT_WORK_DIR} on this node, not ./{DEFAULT_WORK_DIR}, which "
               f"would be inside Ray's temporary copy of the working dir ({working_dir_copy}); set {WORK_DIR_ENV} in the "
               f"environment of `ray start` or in --runtime-env-json env_vars to choose another folder")
    chosen = chosen.resolve()
    if str(chosen) not in _announced:  # once per process: every default path goes through here
        _announced.add(str(chosen))
        _log.warning("lorafleet work dir (MLflow store, checkpoints, outputs): %s (%s). On a multi-node cluster "
                     "point checkpoint.storage_path / sweep.storage_path at shared storage and "
                     "tracking.mlflow_tracking_uri at an MLflow server.", chosen, why)
    return chosen


def is_relative_local_path(value: str) -> bool:
    """True for a local path (or ``sqlite:///``/``file:`` URI) that is relative; False for absolute
    paths and remote URIs (``s3://``, ``gs://``, ``http://``, ``postgresql://``, ``databricks``)."""
    v = value.strip()
    if v.startswith("sqlite:///"):
        rest = v[len("sqlite:///"):]
        return rest not in ("", ":memory:") and not rest.startswith("/")
    if v.startswith("file:"):
        return not v[len("file:"):].startswith("/")
    if "://" in v or v.startswith("databricks"):
        return False
    return not Path(v).expanduser().is_absolute()


def relative_output_paths(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every relative output location in a config dict (fields named in
    :data:`OUTPUT_FIELDS`, in any section)."""
    found: list[tuple[str, str]] = []
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            found += relative_output_paths(value, f"{prefix}{key}.")
        elif key in OUTPUT_FIELDS and isinstance(value, str) and value and is_relative_local_path(value):
            found.append((f"{prefix}{key}", value))
    return found


def refuse_relative_outputs(cfg: Any, source: str, cwd: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` listing every relative output location of ``cfg`` (and a
    relative ``$LORAFLEET_HOME`` or ``$MLFLOW_TRACKING_URI``) when running in Ray's temporary
    copy of an uploaded working dir; do nothing elsewhere. Unset fields are fine: their
    defaults go to the work dir."""
    copy_dir = ray_working_dir_copy(cwd)
    if copy_dir is None:
        return
    found = relative_output_paths(cfg)
    for var in (WORK_DIR_ENV, "MLFLOW_TRACKING_URI"):
        value = os.environ.get(var)
        if value and is_relative_local_path(value):
            found.append((f"${var}", value))
    if not found:
        return
    errors = [f"{key}: {value!r} is a relative path; this job runs in Ray's temporary copy of the uploaded working dir "
              f"({copy_dir}), which Ray deletes, so what it wrote there would be lost. Give an absolute path (on a "
              f"multi-node cluster one every node sees, or an s3://, gs:// or MLflow server URI), or leave it unset to "
              f"use the work dir (${WORK_DIR_ENV}, else ~/{DEFAULT_WORK_DIR} on the node)" for key, value in found]
    raise ConfigError(f"{source}, under `ray job submit`", errors)


def dump_config(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys (used for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
