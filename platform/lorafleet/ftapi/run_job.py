"""What the Ray job of one fine-tuning job runs: the same ``run_finetune`` as ``jobs/finetune.py``, with the
config pinned when the job was created, reporting progress as the job's events.

The scheduler (:mod:`.scheduler`) submits it through Ray's Job Submission API::

    python -m lorafleet.ftapi.run_job ftjob-0123...      # LORAFLEET_REGISTRY_URL=<the registry's SQLAlchemy URL>

A URL with a password reaches the job as a file instead (``LORAFLEET_REGISTRY_URL_FILE``, see :func:`job_env`):
Ray shows a job's environment to everyone who can list the cluster's jobs.

It reads the job's row from the registry, runs the fine-tune (checkpoints under the server's
state, resumed by ``run_name`` = the job id when the job is submitted again), and writes an event
for every report of the training loop (step, loss, learning rate, tokens/s) and one at the end with
the MLflow run id and the registered version. Registering the adapter for serving is the
scheduler's part: it runs in the server, where the tenant registration path lives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from ray.train import UserCallback

REGISTRY_URL_ENV = "LORAFLEET_REGISTRY_URL"
REGISTRY_URL_FILE_ENV = "LORAFLEET_REGISTRY_URL_FILE"
STEP_FIELDS = {"train_loss": "train_loss", "eval_loss": "valid_loss", "lr": "learning_rate", "tokens_per_s": "tokens_per_s",
               "epoch": "epoch", "tokens_seen": "tokens_seen"}


def job_env(url: str, secrets_dir: Path, job_id: str) -> dict[str, str]:
    """The environment variable that tells the job where the registry is.

    Ray shows a job's ``env_vars`` to anyone who can read the cluster's job list (the dashboard,
    ``ray job list``). A URL with a password is therefore written to ``secrets_dir`` (mode 0600,
    under the server's state dir, which the job already reads its training files from), and only
    that file's path goes in the environment. A URL without a password (SQLite, peer or .pgpass
    auth) is passed as it is.
    """
    import sqlalchemy as sa

    if sa.engine.make_url(url).password is None:
        return {REGISTRY_URL_ENV: url}
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = secrets_dir / f"{job_id}.registry-url"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(url)
    return {REGISTRY_URL_FILE_ENV: str(path)}


def registry_url_from_env() -> Optional[str]:
    """The registry URL :func:`job_env` gave this process (None when it gave none)."""
    path = os.environ.get(REGISTRY_URL_FILE_ENV)
    return Path(path).read_text(encoding="utf-8").strip() if path else os.environ.get(REGISTRY_URL_ENV)


def _store(url: str):
    import sqlalchemy as sa

    from lorafleet.ftapi.jobs import JobStore

    return JobStore(sa.create_engine(url, pool_pre_ping=True))


class JobEvents(UserCallback):
    """A Ray Train callback (it runs in the Train controller) that writes each report as a ``metrics`` event."""

    def __init__(self, url: str, job_id: str):
        self.url, self.job_id, self._store = url, job_id, None

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0] if metrics else {}
        if "step" not in first:
            return
        data = {"step": int(first["step"]), **{name: float(first[key]) for key, name in STEP_FIELDS.items() if isinstance(first.get(key), (int, float))}}
        text = ", ".join(f"{k} {v:.4g}" for k, v in data.items() if k != "step")
        try:
            self._store = self._store or _store(self.url)
            self._store.add_event(self.job_id, f"Step {data['step']}: {text}", type="metrics", data=data,
                                  checkpoint=checkpoint.path if checkpoint is not None else None)
        except Exception:  # noqa: BLE001 - a registry hiccup must not fail the training run
            logging.getLogger(__name__).exception("could not record the event of step %s", data["step"])


def main(argv=None) -> int:
    from lorafleet.config import FinetuneConfig
    from lorafleet.train import run_finetune

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = registry_url_from_env()
    if not url:
        print(f"error: neither {REGISTRY_URL_ENV} nor {REGISTRY_URL_FILE_ENV} is set (the scheduler sets one)", file=sys.stderr)
        return 2
    store = _store(url)
    cfg = FinetuneConfig.model_validate(store.get(None, args.job_id).config)
    store.add_event(args.job_id, f"Training started on Ray (run {cfg.run_name}, {cfg.distributed.num_workers} workers).")
    result = run_finetune(cfg, callbacks=[JobEvents(url, args.job_id)])
    summary = {k: result.get(k) for k in ("mlflow_run_id", "registered_model", "registered_version", "adapter_path")}
    store.add_event(args.job_id, f"Training finished: MLflow run {summary['mlflow_run_id']}, registered as "
                                 f"{summary['registered_model']} version {summary['registered_version']}.", data=summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
