"""Strict pydantic base model and the YAML + ``--set`` loader shared by every config.

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
import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

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
    """Apply dotted overrides to a nested dict. Returns the new dict and the override errors."""
    data = copy.deepcopy(data)
    errors: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
                break
            node = child
        else:
            node[path[-1]] = value
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
    starts (no Ray, no downloads).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


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
