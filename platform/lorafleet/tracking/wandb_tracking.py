"""Optional Weights & Biases logging next to MLflow.

``wandb`` is imported only when a run starts. Offline mode needs no network and
writes ``<dir>/wandb/offline-run-*/run-<id>.wandb`` (upload later with
``wandb sync``); online mode needs ``WANDB_API_KEY`` and says so at once instead of
prompting for a login inside a training worker.

Example::

    settings = WandbSettings.from_config(cfg.tracking, name="banking77", config=flat_params, dir="/out")
    if settings is not None:
        run = WandbRun(settings)
        run.log({"train_loss": 1.2}, step=10)
        run.finish()
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lorafleet.config.train import TrackingConfig

_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def wandb_run_id(name: str, project: str, group: Optional[str] = None) -> str:
    """Stable W&B run id for a lorafleet run name, so a restarted worker resumes the same W&B run."""
    digest = hashlib.sha1(f"{project}/{group or ''}/{name}".encode()).hexdigest()[:8]
    return f"{_BAD_ID_CHARS.sub('-', name)[:48]}-{digest}"


def _require_api_key(mode: str) -> None:
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError(
            "tracking.wandb is 'online' but WANDB_API_KEY is not set: export WANDB_API_KEY "
            "(every Ray worker needs it, e.g. via runtime_env env_vars), or use wandb: offline "
            "and `wandb sync` later, or wandb: off"
        )


@dataclass
class WandbSettings:
    """Everything a worker needs to open (or reopen) the W&B run; plain data, picklable for Ray."""

    mode: str  # "online" | "offline"
    project: str
    entity: Optional[str]
    group: Optional[str]
    name: str
    run_id: Optional[str]  # None: derived from name (see wandb_run_id)
    config: dict[str, Any] = field(default_factory=dict)
    dir: str = "."

    def __post_init__(self):
        if self.mode not in ("online", "offline"):
            raise ValueError(f"W&B mode must be 'online' or 'offline' (got {self.mode!r}); use None settings for off")

    @classmethod
    def from_config(cls, cfg: TrackingConfig, name: str, config: dict, dir: str) -> "WandbSettings | None":
        """Settings for ``cfg.wandb``; None when it is ``off``. Raises at once for online without ``WANDB_API_KEY``."""
        if cfg.wandb == "off":
            return None
        _require_api_key(cfg.wandb)
        return cls(
            mode=cfg.wandb,
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            group=cfg.wandb_group,
            name=name,
            run_id=wandb_run_id(name, cfg.wandb_project, cfg.wandb_group),
            config=dict(config),
            dir=str(dir),
        )


class WandbRun:
    """One W&B run opened with ``resume="allow"`` under a stable id (restarted workers continue it)."""

    def __init__(self, settings: WandbSettings):
        _require_api_key(settings.mode)
        if importlib.util.find_spec("wandb") is None:  # an optional extra since W&B is opt-in
            raise ImportError("tracking.wandb is set but wandb is not installed: pip install -e '.[wandb]' "
                              "(make install and the cluster's setup include it), or set tracking.wandb: off")
        import wandb

        self.settings = settings
        self.run_id = settings.run_id or wandb_run_id(settings.name, settings.project, settings.group)
        Path(settings.dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            mode=settings.mode,
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=settings.name,
            id=self.run_id,
            resume="allow",
            config=settings.config,
            dir=settings.dir,
            # create_new: never finish or reuse another run of this process (no global-run coupling).
            reinit="create_new",
            settings=wandb.Settings(silent=True, init_timeout=120),
        )

    @property
    def dir(self) -> str:
        """The run's local files folder (``.../wandb/<offline-run|run>-<time>-<id>/files``)."""
        return self._run.dir

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=int(step))

    def finish(self) -> None:
        self._run.finish()
