"""Configuration of a hyperparameter sweep (``jobs/sweep.py``): a normal fine-tune config plus
a search space over dotted paths into it, a search algorithm and an ASHA scheduler."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import typing
from pathlib import Path

from pydantic import AfterValidator, BaseModel, Field, model_validator

from lorafleet.config.base import StrictModel
from lorafleet.config.train import FinetuneConfig, default_work_dir

# Named target-module sets a space can choose between with `lora.target_modules: {choice: [attention, all-linear]}`.
DEFAULT_MODULE_SETS: dict[str, Union[str, list[str]]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention-qv": ["q_proj", "v_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}

# A space key that is not a config path: lora_alpha = alpha_multiple * r.
ALPHA_MULTIPLE = "lora.alpha_multiple"


class Distribution(StrictModel):
    """Exactly one of the fields: how one hyperparameter is sampled."""

    choice: Optional[list[Any]] = Field(None, description="Sample uniformly from these values.")
    grid: Optional[list[Any]] = Field(None, description="Try every value (grid search; multiplies num_samples).")
    uniform: Optional[tuple[float, float]] = Field(None, description="Uniform float in [low, high].")
    loguniform: Optional[tuple[float, float]] = Field(None, description="Log-uniform float in [low, high] (learning rates).")
    randint: Optional[tuple[int, int]] = Field(None, description="Integer in [low, high).")

    @model_validator(mode="after")
    def _exactly_one(self):
        set_fields = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {set_fields or 'none'})")
        for k in ("uniform", "loguniform", "randint"):
            v = getattr(self, k)
            if v is not None and not v[0] < v[1]:
                raise ValueError(f"{k} needs low < high (got {list(v)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.loguniform[0]})")
        if self.choice is not None and not self.choice or self.grid is not None and not self.grid:
            raise ValueError("choice/grid need at least one value")
        return self

    def example(self) -> Any:
        """A value from the distribution, used to check the path and type before anything runs."""
        for k in ("choice", "grid"):
            if getattr(self, k) is not None:
                return getattr(self, k)
        if self.uniform is not None:
            return list(self.uniform)
        if self.loguniform is not None:
            return list(self.loguniform)
        return [self.randint[0], self.randint[1] - 1]


def _is_config_path(model: type, parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    nested = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
    return any(_is_config_path(t, parts[1:]) for t in nested)


def _space_path(key: str) -> str:
    """A space key names a fine-tune config field. Checked per key, so that an unknown path is
    listed with every other problem of the file (values are checked once the file is valid)."""
    if key != ALPHA_MULTIPLE and not _is_config_path(FinetuneConfig, key.split(".")):
        raise ValueError(f"{key!r}: unknown key, not a fine-tune config path (e.g. lora.r, training.learning_rate; see docs/configuration.md)")
    return key


SpacePath = Annotated[str, AfterValidator(_space_path)]


class AshaConfig(StrictModel):
    type: Literal["asha", "none"] = Field("asha", description="`asha`: stop poor trials early (AsyncHyperBand); `none`: run all to the end.")
    grace_period: int = Field(1, ge=1, description="Evaluations every trial gets before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="Only the top 1/reduction_factor of trials pass each rung.")
    max_t: int = Field(1000, ge=1, description="Upper bound on evaluations per trial (rungs are grace_period * reduction_factor^k below it).")


class SweepSettings(StrictModel):
    name: str = Field(description="Sweep name: Tune experiment name, MLflow parent run name. Re-running the same name resumes it.")
    metric: str = Field("eval_loss", description="Validation metric to optimise (eval_loss, eval_accuracy, eval_macro_f1, eval_exact_match, eval_rouge_l).")
    mode: Optional[Literal["min", "max"]] = Field(None, description="min or max; default: min for *loss/*perplexity, else max.")
    search: Literal["random", "grid", "optuna"] = Field("random", description="`random` / `grid`: Tune's variant generator; `optuna`: TPE.")
    num_samples: int = Field(4, ge=1, description="Trials to sample (with grid values: repetitions of the whole grid).")
    seed: int = Field(0, description="Seed of the search algorithm.")
    space: dict[SpacePath, Distribution] = Field(description="Dotted config path -> distribution, e.g. `training.learning_rate: {loguniform: [1e-4, 3e-3]}`. `lora.alpha_multiple` sets lora_alpha = multiple * r.")
    module_sets: dict[str, Union[str, list[str]]] = Field(default_factory=lambda: dict(DEFAULT_MODULE_SETS), description="Names usable as values of lora.target_modules in the space.")
    scheduler: AshaConfig = Field(default_factory=AshaConfig)
    eval_every_n_steps: int = Field(10, ge=1, description="Evaluate (and report to Tune) every N optimizer steps; ASHA decides at these points.")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="Trials running at once. Default: derived from cluster resources / resources per trial.")
    trial_cpus: float = Field(0.01, gt=0, description="CPU reserved by each trial's driver function (it only launches the Train run).")
    storage_path: Optional[str] = Field(None, description="Tune storage (shared by all nodes on a cluster). Default: <work dir>/tune_results.")

    def resolved_storage_path(self) -> str:
        """``storage_path`` (a URI as given, a local path made absolute), else ``<work dir>/tune_results``
        (``default_work_dir``: persistent under ``ray job submit`` too)."""
        sp = self.storage_path
        if sp and "://" in sp:
            return sp
        return str(Path(sp).expanduser().resolve() if sp else default_work_dir() / "tune_results")

    @property
    def resolved_mode(self) -> str:
        if self.mode:
            return self.mode
        return "min" if self.metric.endswith(("loss", "perplexity")) else "max"


class SweepConfig(StrictModel):
    """A sweep: ``sweep`` settings plus the fine-tune every trial starts from."""

    sweep: SweepSettings
    finetune: FinetuneConfig

    @model_validator(mode="after")
    def _space_paths_are_config_paths(self):
        from lorafleet.config.base import ConfigError
        from lorafleet.tune.space import apply_trial_params

        errors = []
        metric = self.sweep.metric
        if metric not in ("eval_loss", "eval_perplexity"):
            from lorafleet.data.mixture import datasets_of

            datasets = datasets_of(self.finetune.data)
            allowed = datasets.metric_names()
            if metric not in allowed:
                errors.append(f"sweep.metric {metric!r} is never reported for task {datasets.name!r}; "
                              f"use one of {allowed}")
            elif not metric.endswith("/loss") and not self.finetune.training.generation_metrics:
                errors.append(f"sweep.metric {metric!r} needs finetune.training.generation_metrics: true (got false)")
        base = self.finetune.model_dump(mode="json")
        for key, dist in self.sweep.space.items():
            for value in dist.example():
                try:
                    apply_trial_params(base, {key: value}, self.sweep.module_sets)
                except ConfigError as exc:
                    errors.append(f"sweep.space[{key!r}] value {value!r}: " + "; ".join(exc.errors))
                    break
        if errors:
            raise ValueError("; ".join(errors))
        return self
