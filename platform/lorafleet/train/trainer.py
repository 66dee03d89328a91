"""Driver side of a fine-tune: validate, start tracking, run ``TorchTrainer``, export, register.

Example::

    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.train import run_finetune
    result = run_finetune(load_config(FinetuneConfig, "jobs/configs/banking77-lora.yaml"))
    print(result["metrics"]["eval_accuracy"], result["adapter_path"])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from lorafleet.config.base import dump_config, flatten, ray_working_dir_copy
from lorafleet.config.train import FinetuneConfig
from lorafleet.train.checkpoint import ADAPTER_DIR, read_train_state

log = logging.getLogger(__name__)


def resolve_local_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Make local model/data paths absolute: Ray workers do not share the driver's working directory."""
    updates = {}
    p = Path(cfg.model.name_or_path).expanduser()
    if p.exists():
        updates["model"] = cfg.model.model_copy(update={"name_or_path": str(p.resolve())})
    updates["data"] = _absolute_data_paths(cfg.data, "data")
    if cfg.data.mixture:
        mixture = [_absolute_data_paths(d, f"data.mixture[{d.metric_prefix()}]") for d in cfg.data.mixture]
        updates["data"] = updates["data"].model_copy(update={"mixture": mixture})
    updates["output_dir"] = str(cfg.resolved_output_dir())
    updates["checkpoint"] = cfg.checkpoint.model_copy(update={"storage_path": cfg.resolved_storage_path()})
    return cfg.model_copy(update=updates)


def _absolute_data_paths(data, where: str):
    """``data`` (data itself or a mixture's dataset) with its local files as absolute paths; missing ones refused."""
    data_updates = {}
    for field in ("path", "validation_path"):
        value = getattr(data, field)
        if value and Path(value).expanduser().exists():
            data_updates[field] = str(Path(value).expanduser().resolve())
        elif value:
            raise FileNotFoundError(f"{where}.{field} does not exist: {value} (relative paths are resolved from {Path.cwd()})")
    return data.model_copy(update=data_updates)


def ensure_ray(num_cpus_needed: float) -> None:
    """Connect to the cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one.

    A local Ray gets at least ``num_cpus_needed + 1`` logical CPUs: Ray Train's controller and
    the trial functions of a sweep each hold a slot, and on a 2-core machine the worker group
    otherwise never starts (see README, troubleshooting).
    """
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")}
    os.environ.update(env)
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` Ray refuses a driver runtime env that repeats an env var of the
        # job's own (--runtime-env-json): pass on only what the job does not set itself.
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
        env = {k: v for k, v in env.items() if k not in job_env}
        ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    else:
        from lorafleet.ray_local import start_local_ray

        start_local_ray(max(os.cpu_count() or 1, int(num_cpus_needed) + 2), runtime_env={"env_vars": env})


# Fields that do not change what a checkpoint contains: a resumed run may differ in these.
_RESUME_NEUTRAL = ("tracking", "output_dir", "push_to_hub", "checkpoint")


def config_fingerprint(cfg: FinetuneConfig) -> str:
    import hashlib

    d = dump_config(cfg)
    for key in _RESUME_NEUTRAL:
        d.pop(key, None)
    d["distributed"].pop("worker_startup_timeout_s", None)
    # Under `ray job submit --working-dir`, an input inside the upload resolves into Ray's copy,
    # named by a hash of the whole upload (_ray_pkg_<hash>): an edit anywhere in the folder changes
    # it. Such paths count relative to the copy, so the same command submitted again still resumes.
    copy = ray_working_dir_copy()
    for section, key in (("model", "name_or_path"), ("data", "path"), ("data", "validation_path")):
        value = d[section].get(key)
        if copy is not None and isinstance(value, str) and value.startswith(f"{copy}/"):
            d[section][key] = "<ray working_dir>/" + value[len(f"{copy}/"):]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def guard_resume(cfg: FinetuneConfig) -> None:
    """Re-running a run name resumes it (Ray restores its checkpoints), so refuse when the
    config that shaped those checkpoints has changed: resuming would load mismatched state."""
    storage = cfg.resolved_storage_path()
    if "://" in storage:
        return  # remote storage: the fingerprint file is only kept for local/NFS paths
    marker = Path(storage) / cfg.run_name / "lorafleet_config.json"
    fp = config_fingerprint(cfg)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("fingerprint") != fp:
            raise ValueError(
                f"run_name {cfg.run_name!r} already exists in {marker.parent} with a different configuration "
                f"(fingerprint {saved.get('fingerprint')} != {fp}); re-running a run name resumes it. Choose a new "
                f"run_name, or delete {marker.parent} to start over")
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp, "config": dump_config(cfg)}, indent=2))


def build_trainer(cfg: FinetuneConfig, tracking: dict | None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorafleet.train.loop import train_loop_per_worker

    d = cfg.distributed
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dump_config(cfg), "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=dict(d.resources_per_worker), placement_strategy=d.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.resolved_storage_path(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=list(callbacks or []),
        ),
    )


def preflight(cfg: FinetuneConfig):
    """Fail fast on the driver, before any worker starts: tokenizer loads and the data is usable."""
    from lorafleet.data.mixture import load_training_data
    from lorafleet.train.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = load_training_data(cfg.data, tokenizer=tokenizer)
    log.info("data: %d train / %d validation examples, stats %s", len(data.train), len(data.validation), data.stats)
    return data


def run_finetune(cfg: FinetuneConfig, *, callbacks: list | None = None, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None) -> dict:
    """Run one fine-tune end to end and return the content of ``result.json``.

    ``callbacks`` go to the Ray Train run (a sweep passes Tune's ``TuneReportCallback``);
    ``parent_run_id`` nests the MLflow run under a sweep's parent run.

    Tracking never fails a run that trained: once training is done, the adapter and
    ``result.json`` are written before MLflow is touched, and what MLflow did not get (step
    metrics still buffered at the end, final metrics, artifacts, registration) is listed in
    ``result["tracking"]`` (``ok`` false) and logged as an error; the call still returns
    normally (a job exits 0). Re-running the same run name once MLflow is back finishes the
    MLflow run and registers the adapter from the final checkpoint.
    """
    started = time.time()
    cfg = resolve_local_paths(cfg)
    data = preflight(cfg)
    guard_resume(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tracking = None
    run_id = None
    tags = {**_run_tags(cfg, data), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if cfg.tracking.enabled:
        from lorafleet.tracking import WandbSettings, resolve_tracking_uri, start_or_resume_run

        uri = resolve_tracking_uri(cfg.tracking)
        run_id = start_or_resume_run(cfg.tracking, cfg.run_name, flatten(dump_config(cfg)), tags)
        wandb = WandbSettings.from_config(cfg.tracking, name=cfg.run_name, config=dump_config(cfg), dir=str(out))
        tracking = {"tracking_uri": uri, "run_id": run_id, "wandb": _asdict(wandb)}
        log.info("MLflow run %s at %s", run_id, uri)

    workers_cpu = cfg.distributed.num_workers * cfg.distributed.resources_per_worker.get("CPU", 1)
    ensure_ray(workers_cpu)
    if tracking:
        import ray

        from lorafleet.tracking import warn_if_node_local

        warn_if_node_local(tracking["tracking_uri"], sum(1 for n in ray.nodes() if n["Alive"]))
    trainer = build_trainer(cfg, tracking, callbacks)
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            from lorafleet.tracking import finish_run

            try:
                finish_run(cfg.tracking, run_id, {}, {}, status="FAILED")
            except Exception:  # never hide the training error behind a tracking error
                log.exception("could not mark MLflow run %s as FAILED", run_id)
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (run {cfg.run_name}); see the Ray logs")
    return _finalise(cfg, result, run_id, data, tags, out, started)


def _finalise(cfg, result, run_id, data, tags, out: Path, started: float) -> dict:
    adapter_dst = out / ADAPTER_DIR
    with result.checkpoint.as_directory() as ckpt:
        state = read_train_state(ckpt)
        if adapter_dst.exists():
            shutil.rmtree(adapter_dst)
        shutil.copytree(Path(ckpt) / ADAPTER_DIR, adapter_dst)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    from lorafleet.tracking import plot_loss_curve

    curve = plot_loss_curve(state.history, str(out / "loss_curve.png"), title=f"{cfg.run_name} ({cfg.method}, {data.name})")
    res = {
        "run_name": cfg.run_name,
        "method": cfg.method,
        "task": data.name,
        "base_model": cfg.model.name_or_path,
        "metrics": metrics,
        "adapter_path": str(adapter_dst),
        "checkpoint_path": result.checkpoint.path,
        "loss_curve": curve,
        "data_stats": data.stats,
        "dataset_fingerprint": data.fingerprint,
        "resumed_from_step": state.resumed_from_step,
        "mlflow_run_id": run_id,
        "registered_model": None,
        "registered_version": None,
        # ok: MLflow has every step metric, the final metrics and artifacts, and the registered version
        # asked for (null until MLflow has been tried); errors also lists outages the step metrics
        # survived. The whole entry is null when tracking is disabled.
        "tracking": {"ok": None, "unsent_metrics": state.tracking.get("unsent_metrics", 0),
                     "errors": list(state.tracking.get("errors", []))} if run_id else None,
        "elapsed_s": round(time.time() - started, 1),
        "history": state.history,  # rank 0's metrics at every logging / evaluation step
    }
    # Written before MLflow is touched: an unreachable server can take minutes to give up (HTTP retries).
    (out / "result.json").write_text(json.dumps(res, indent=2))
    if run_id:
        _finish_tracking(cfg, run_id, metrics, adapter_dst, curve, data, res)
        (out / "result.json").write_text(json.dumps(res, indent=2))
    if cfg.push_to_hub.repo_id:
        push_adapter_to_hub(adapter_dst, cfg.push_to_hub.repo_id, cfg.push_to_hub.private)
    return res


def _finish_tracking(cfg, run_id, metrics, adapter_dst: Path, curve, data, res) -> None:
    """Final metrics, artifacts and registration; failures go to ``res["tracking"]``, never up."""
    from lorafleet.tracking import finish_run, register_adapter

    tracking = res["tracking"]
    failed = []
    try:
        # The adapter must be an artifact before a model version can point at it. The final metrics go
        # at the final step (rank 0 logged the same values there, unless MLflow was down), not step 0.
        finish_run(cfg.tracking, run_id, metrics, {ADAPTER_DIR: str(adapter_dst), "plots": curve}, status="FINISHED",
                   step=int(metrics.get("step", 0)))
    except Exception as exc:  # noqa: BLE001 - reported, the adapter is on disk
        failed.append(f"finishing the MLflow run: {exc}")
    if cfg.tracking.register_as:
        try:
            name, version = register_adapter(cfg.tracking, run_id, ADAPTER_DIR, tags=_version_tags(cfg, data))
            res["registered_model"], res["registered_version"] = name, str(version)
        except Exception as exc:  # noqa: BLE001
            failed.append(f"registering {cfg.tracking.register_as}: {exc}")
    tracking["errors"] += failed
    tracking["ok"] = not failed and not tracking["unsent_metrics"]
    if not tracking["ok"]:
        lost = [f"{tracking['unsent_metrics']} step metric value(s) never reached MLflow"] if tracking["unsent_metrics"] else []
        log.error("TRACKING INCOMPLETE for run %s (MLflow run %s): %s. Training succeeded: the adapter is in %s, "
                  "result.json beside it.%s", cfg.run_name, run_id, "; ".join(lost + failed), adapter_dst,
                  " Re-run the same run name once MLflow is reachable to finish the MLflow run and register the adapter."
                  if failed else "")


def push_adapter_to_hub(folder: Path, repo_id: str, private: bool) -> None:
    """Upload the adapter folder to the Hugging Face hub (needs network and HF_TOKEN; not testable offline)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def _run_tags(cfg: FinetuneConfig, data) -> dict[str, str]:
    from lorafleet.tracking import git_commit

    tags = {"lorafleet.run_name": cfg.run_name, "lorafleet.task": data.name, "lorafleet.method": cfg.method,
            "lorafleet.base_model": cfg.model.name_or_path, "lorafleet.dataset_fingerprint": data.fingerprint,
            **({"lorafleet.mixture": data.describe()} if data.mixture else {}), **cfg.tracking.tags}
    commit = git_commit()
    if commit:
        tags["lorafleet.git_commit"] = commit
    return tags


def _version_tags(cfg: FinetuneConfig, data) -> dict[str, str]:
    tm = cfg.lora.target_modules
    return {"base_model": cfg.model.name_or_path, "method": cfg.method, "r": str(cfg.lora.r),
            "lora_alpha": str(cfg.lora.lora_alpha), "target_modules": tm if isinstance(tm, str) else ",".join(tm),
            "task": data.name, "dataset_fingerprint": data.fingerprint,
            **({"mixture": data.describe()} if data.mixture else {}),
            # the template the server applies to chat requests (the adapter's lorafleet_prompt.json, registered with it)
            **({"prompt_template": template} if (template := data.prompt_format()["template"]) else {}), **cfg.tracking.tags}


def _asdict(obj):
    from dataclasses import asdict

    return asdict(obj) if obj is not None else None
