"""Search spaces: sweep config distributions -> Ray Tune domains, and sampled values -> a
validated fine-tune config."""

from __future__ import annotations

import copy
from typing import Any

from lorafleet.config.base import ConfigError, validate_config
from lorafleet.config.sweep import ALPHA_MULTIPLE, Distribution
from lorafleet.config.train import FinetuneConfig


def tune_domain(dist: Distribution):
    from ray import tune

    if dist.choice is not None:
        return tune.choice(dist.choice)
    if dist.grid is not None:
        return tune.grid_search(dist.grid)
    if dist.uniform is not None:
        return tune.uniform(*dist.uniform)
    if dist.loguniform is not None:
        return tune.loguniform(*dist.loguniform)
    return tune.randint(*dist.randint)


def tune_param_space(space: dict[str, Distribution]) -> dict:
    return {key: tune_domain(dist) for key, dist in space.items()}


def apply_trial_params(base: dict, params: dict[str, Any], module_sets: dict) -> FinetuneConfig:
    """The fine-tune config of one trial: ``base`` (a config dump) with the sampled ``params``.

    ``lora.target_modules`` values may name a module set (``attention``, ``all-linear``...);
    ``lora.alpha_multiple`` sets ``lora_alpha`` to that multiple of the trial's ``r``.
    """
    data = copy.deepcopy(base)
    errors: list[str] = []
    multiple = None
    for key, value in params.items():
        if key == ALPHA_MULTIPLE:
            multiple = value
            continue
        if key == "lora.target_modules" and isinstance(value, str) and value in module_sets:
            value = module_sets[value]
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                errors.append(f"{key}: {part!r} is not a config section")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    if multiple is not None:
        data["lora"]["lora_alpha"] = float(multiple) * data["lora"]["r"]
    return validate_config(FinetuneConfig, data, "sweep trial", errors)


def trial_label(params: dict[str, Any]) -> str:
    """Short readable hyperparameters for tables and tags."""
    out = []
    for k, v in params.items():
        name = k.rsplit(".", 1)[-1]
        out.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(out)


__all__ = ["ConfigError", "apply_trial_params", "trial_label", "tune_domain", "tune_param_space"]
