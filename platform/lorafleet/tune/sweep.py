"""Ray Tune sweeps over LoRA hyperparameters; every trial is a distributed Ray Train run.

The Train V2 pattern: the Tune trial function builds a ``TorchTrainer`` (its own worker
group) and Train's ``TuneReportCallback`` forwards rank 0's reports to Tune, where ASHA
decides at each evaluation whether the trial continues.

Example::

    from lorafleet.config import load_config
    from lorafleet.config.sweep import SweepConfig
    from lorafleet.tune import run_sweep
    result = run_sweep(load_config(SweepConfig, "jobs/configs/banking77-sweep.yaml"))
    print(result["best"]["params"], result["best"]["registered_version"])
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lorafleet.config.base import dump_config, flatten
from lorafleet.config.sweep import SweepConfig, SweepSettings
from lorafleet.config.train import FinetuneConfig
from lorafleet.tune.space import apply_trial_params, trial_label, tune_param_space

log = logging.getLogger(__name__)


def derive_max_concurrent_trials(s: SweepSettings, ft: FinetuneConfig, cluster: dict[str, float]) -> tuple[int, str]:
    """Trials that fit at once: the cluster's GPUs (or CPUs) over what one trial's workers reserve.

    12 GPUs with 4 workers x 1 GPU per trial -> 3. Returns the number and a sentence saying why.
    """
    d = ft.distributed
    unit = "GPU" if d.use_gpu else "CPU"
    per_worker = d.resources_per_worker.get(unit, 1.0 if unit == "GPU" else 0.0) or 1.0
    per_trial = d.num_workers * per_worker
    total = cluster.get(unit, 0.0)
    derived = max(1, int(math.floor(total / per_trial))) if per_trial else 1
    if s.max_concurrent_trials:
        return s.max_concurrent_trials, (f"max_concurrent_trials={s.max_concurrent_trials} (set in config; the cluster's "
                                         f"{total:g} {unit} / {per_trial:g} {unit} per trial would allow {derived})")
    return derived, (f"max_concurrent_trials={derived}: {total:g} {unit} in the cluster / ({d.num_workers} workers x "
                     f"{per_worker:g} {unit}) per trial")


def prepare_trial_base(cfg: SweepConfig) -> FinetuneConfig:
    """The fine-tune every trial starts from: absolute paths, the MLflow store resolved here on the
    driver (a trial on another node must not work out its own default on its own disk), and
    evaluation (= a Tune report) every ``eval_every_n_steps`` so every result ASHA sees carries the metric."""
    from lorafleet.tracking import pinned_tracking
    from lorafleet.train.trainer import resolve_local_paths

    s = cfg.sweep
    ft = resolve_local_paths(cfg.finetune)
    every = s.eval_every_n_steps
    ckpt_every = max(every, math.ceil(ft.checkpoint.every_n_steps / every) * every)
    return ft.model_copy(update={
        "training": ft.training.model_copy(update={"eval_steps": every, "logging_steps": every}),
        "checkpoint": ft.checkpoint.model_copy(update={"every_n_steps": ckpt_every}),
        "tracking": ft.tracking.model_copy(update={"wandb_group": ft.tracking.wandb_group or s.name, **pinned_tracking(ft.tracking)}),
        "output_dir": str(Path(ft.resolved_output_dir()).parent / s.name) if not cfg.finetune.output_dir else ft.output_dir,
    })


def _trial(params: dict, *, base: dict, module_sets: dict, sweep_name: str, parent_run_id: str | None) -> None:
    """One Tune trial: a full distributed fine-tune reporting to Tune through Train's callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lorafleet.train.trainer import run_finetune

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_trial_params(base, params, module_sets)
    cfg = cfg.model_copy(update={
        "run_name": f"{sweep_name}-{trial_id}",
        "output_dir": str(Path(base["output_dir"]) / "trials" / trial_id),
        "tracking": cfg.tracking.model_copy(update={"register_as": None}),
    })
    tags = {"lorafleet.sweep": sweep_name, "lorafleet.trial_id": trial_id, "lorafleet.trial_params": trial_label(params)}
    run_finetune(cfg, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id, extra_tags=tags)


def run_sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep; register the best trial's adapter; write result.json."""
    import ray
    from ray import tune

    from lorafleet.train.trainer import ensure_ray, preflight

    s = cfg.sweep
    mode = s.resolved_mode
    ft = prepare_trial_base(cfg)
    preflight(ft)
    ensure_ray(ft.distributed.num_workers * ft.distributed.resources_per_worker.get("CPU", 1) + 1)
    concurrency, why = derive_max_concurrent_trials(s, ft, ray.cluster_resources())
    print(f"[sweep {s.name}] {why}", flush=True)
    out = Path(ft.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    parent_run_id = None
    if ft.tracking.enabled:
        from lorafleet.tracking import start_or_resume_run

        params = {f"sweep.{k}": v for k, v in flatten(s.model_dump(mode="json")).items()}
        params.update(flatten(dump_config(ft)))
        parent_run_id = start_or_resume_run(ft.tracking, s.name, params, {"lorafleet.sweep": s.name, "lorafleet.kind": "sweep"})

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=dump_config(ft), module_sets=s.module_sets, sweep_name=s.name, parent_run_id=parent_run_id),
        {"CPU": s.trial_cpus},
    )
    storage = s.resolved_storage_path()
    exp_path = os.path.join(storage, s.name)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # finished trials are recorded promptly for resume
    if tune.Tuner.can_restore(exp_path):
        print(f"[sweep {s.name}] resuming from {exp_path}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(s.space),
            tune_config=tune.TuneConfig(metric=s.metric, mode=mode, num_samples=s.num_samples, search_alg=_search_alg(s, mode, concurrency),
                                        scheduler=_scheduler(s), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=s.name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    grid = tuner.fit()
    return _summarise(cfg, ft, grid, parent_run_id, out, mode)


def _search_alg(s: SweepSettings, mode: str, max_concurrent: int = 0):
    """The search algorithm, limited to ``max_concurrent`` running trials.

    NOTE: Tune applies ``TuneConfig.max_concurrent_trials`` to ``Searcher`` instances (wrapping
    them in a ConcurrencyLimiter) but ignores it, with only a warning, for a
    ``BasicVariantGenerator`` instance (ray/tune/tune.py), so the generator gets it directly.
    """
    from ray import tune

    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        import optuna

        if any(d.grid is not None for d in s.space.values()):
            raise ValueError("sweep.search optuna cannot take grid distributions; use choice instead")
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
    return tune.search.BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent)


def _scheduler(s: SweepSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = s.scheduler
    if a.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", grace_period=a.grace_period, reduction_factor=a.reduction_factor, max_t=a.max_t)


def _params_json(trial_path: str) -> dict:
    """A trial's sampled params from the params.json Tune writes: a restored experiment's
    errored trials come back from ``ResultGrid`` with an empty config."""
    try:
        return json.loads((Path(trial_path) / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def _trial_rows(grid, metric: str) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        finished = bool(m) and "steps_total" in m and m.get("step") == m.get("steps_total")
        status = "error" if r.error else ("completed" if finished else "early_stopped")
        trial_id = m.get("trial_id") or Path(r.path).name
        rows.append({
            "trial_id": trial_id,
            "params": dict(r.config or {}) or _params_json(r.path),
            "status": status,
            "metric": m.get(metric),
            "stopped_at_iteration": m.get("training_iteration"),
            "stopped_at_step": m.get("step"),
            "error": str(r.error).splitlines()[0][:500] if r.error else None,
            "path": r.path,
        })
    return rows


def _summarise(cfg: SweepConfig, ft: FinetuneConfig, grid, parent_run_id, out: Path, mode: str) -> dict:
    s = cfg.sweep
    rows = _trial_rows(grid, s.metric)
    for row in rows:
        rj = out / "trials" / row["trial_id"] / "result.json"
        row["mlflow_run_id"] = json.loads(rj.read_text())["mlflow_run_id"] if rj.is_file() else None
    done = [r for r in rows if r["status"] == "completed" and r["metric"] is not None]
    best = (min if mode == "min" else max)(done, key=lambda r: r["metric"]) if done else None
    result: dict[str, Any] = {"sweep": s.name, "metric": s.metric, "mode": mode, "trials": rows, "best": None,
                              "parent_run_id": parent_run_id}
    if best:
        best_cfg = apply_trial_params(dump_config(ft), best["params"], s.module_sets)
        result["best"] = {**best, "config": dump_config(best_cfg),
                          "adapter_path": str(out / "trials" / best["trial_id"] / "adapter"),
                          "registered_model": None, "registered_version": None}
    if ft.tracking.enabled:
        _track(ft, s, rows, result, parent_run_id, out)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(results_table(rows, s.metric, best), flush=True)
    print(f"[sweep {s.name}] result: {out / 'result.json'}", flush=True)
    return result


def _track(ft: FinetuneConfig, s: SweepSettings, rows, result, parent_run_id, out: Path) -> None:
    """Close child runs Tune stopped (KILLED + early_stopped tag), register the best adapter,
    finish the parent run with the metric-vs-hyperparameter plot."""
    from lorafleet.tracking import finish_run, register_adapter, start_or_resume_run

    for row in rows:
        if row["status"] == "early_stopped":
            run_id = start_or_resume_run(ft.tracking, f"{s.name}-{row['trial_id']}", {}, {})
            finish_run(ft.tracking, run_id, {}, {}, status="KILLED",
                       tags={"lorafleet.early_stopped": "true", "lorafleet.stopped_at_iteration": str(row["stopped_at_iteration"])})
            row["mlflow_run_id"] = run_id
    best = result["best"]
    if best and ft.tracking.register_as and best.get("mlflow_run_id"):
        tags = {"sweep": s.name, "sweep_parent_run": parent_run_id or "", "metric": s.metric, "metric_value": str(best["metric"]),
                **{f"hp.{k}": str(v) for k, v in best["params"].items()},
                "base_model": ft.model.name_or_path, "method": ft.method, "task": ft.data.run_task_name(),
                "r": str(best["config"]["lora"]["r"]), "target_modules": str(best["config"]["lora"]["target_modules"])}
        name, version = register_adapter(ft.tracking, best["mlflow_run_id"], "adapter", tags=tags)
        best["registered_model"], best["registered_version"] = name, str(version)
    plot = plot_metric_vs_params(rows, s.metric, str(out / "sweep_metric_vs_params.png"))
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    counts = {f"trials_{k}": sum(r["status"] == k for r in rows) for k in ("completed", "early_stopped", "error")}
    final = {**counts, **({f"best_{s.metric}": best["metric"]} if best else {})}
    finish_run(ft.tracking, parent_run_id, final, {"plots": plot, "result": str(out / "result.json")}, status="FINISHED")


def results_table(rows: list[dict], metric: str, best: dict | None) -> str:
    lines = [f"| trial | status | {metric} | stopped at iteration | hyperparameters |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["trial_id"]):
        mark = " (best)" if best and r["trial_id"] == best["trial_id"] else ""
        value = f"{r['metric']:.4f}" if isinstance(r["metric"], (int, float)) else "-"
        lines.append(f"| {r['trial_id']}{mark} | {r['status']} | {value} | {r['stopped_at_iteration'] or '-'} | {trial_label(r['params'])} |")
    return "\n".join(lines)


def plot_metric_vs_params(rows: list[dict], metric: str, path: str) -> str:
    """One panel per hyperparameter: the metric of every trial against its value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for r in rows for k in r["params"]})
    fig = Figure(figsize=(4 * max(1, len(keys)), 3.2))
    FigureCanvasAgg(fig)
    colors = {"completed": "tab:blue", "early_stopped": "tab:orange", "error": "tab:red"}
    for i, key in enumerate(keys or ["-"]):
        ax = fig.add_subplot(1, max(1, len(keys)), i + 1)
        for status, color in colors.items():
            pts = [(r["params"].get(key), r["metric"]) for r in rows if r["status"] == status and r["metric"] is not None]
            if pts:
                xs = [str(x) if not isinstance(x, (int, float)) else x for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], c=color, label=status)
        if key.endswith("learning_rate"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
