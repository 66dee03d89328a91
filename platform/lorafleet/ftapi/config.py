"""The ``files`` and ``fine_tuning`` sections of the server's config (``ServeConfig.files``, ``ServeConfig.fine_tuning``)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from lorafleet.config.base import StrictModel


class FileSettings(StrictModel):
    """Training files tenants upload through ``POST /v1/files``. The content lives under
    ``<tenancy.state_dir>/files/<tenant id>/<file id>.jsonl``: on a multi-node cluster point
    ``tenancy.state_dir`` at a filesystem every node mounts. The quotas hold for every tenant."""

    max_file_bytes: int = Field(100 * 2**20, ge=1024, description="Largest file one upload may carry (413 above it). The upload route "
                                "streams its body to disk under this limit (plus 64 KiB of multipart headers) instead of limits.max_body_bytes.")
    max_line_bytes: int = Field(2**20, ge=1024, description="Longest line (one training example) accepted; a longer line is refused (400) "
                                "without being held in memory.")
    max_files: Optional[int] = Field(100, ge=1, description="Files one tenant may hold at once (429 beyond; null: no limit).")
    max_total_bytes: Optional[int] = Field(2**30, ge=1024, description="Bytes of all of one tenant's files together (429 beyond; null: no limit).")


class FineTuningSettings(StrictModel):
    """Fine-tuning jobs tenants create through ``POST /v1/fine_tuning/jobs``. Each job runs a ``FinetuneConfig``
    (the one ``jobs/finetune.py`` reads) made of ``config`` with ``overrides``, then the request's hyperparameters;
    the server pins per job the base (``model.name_or_path``: this server's model), the data (the job's files,
    task ``chat``), ``run_name`` (the job id), the output and checkpoint folders (under ``<tenancy.state_dir>/fine_tuning``)
    and ``tracking.register_as`` (``<tenant>~ft-<suffix>``)."""

    config: Optional[str] = Field(None, description="A FinetuneConfig YAML (e.g. jobs/configs/banking77-lora.yaml) jobs start from; its "
                                  "method must be lora or qlora. Default: lorafleet's defaults (LoRA on all linear layers, 1 epoch). Where it leaves lora.r unset, jobs use min(16, engine.max_lora_rank).")
    overrides: list[str] = Field(default_factory=list, description="`key.path=value` overrides of that config, as jobs/finetune.py's --set "
                                 "takes them (e.g. distributed.num_workers=1). The request's hyperparameters apply after them.")
    run_jobs: bool = Field(True, description="This server's replicas run the jobs (moving them from queued to running and on, each "
                           "as a Ray job on the cluster it runs on). false: jobs are accepted and wait at validating_files for a server that runs them.")
    max_concurrent_jobs_per_tenant: int = Field(1, ge=1, description="Jobs of one tenant running at once; its next jobs wait `queued` "
                                                "until one ends.")
    poll_interval_s: float = Field(2.0, gt=0, le=60, description="How often the scheduler looks at the jobs and their Ray jobs.")
    ray_address: Optional[str] = Field(None, description="Address of the Ray cluster jobs are submitted to (its dashboard, "
                                       "http://HEAD:8265). Default: the cluster the server runs on.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of every job (env_vars, pip, ...); the "
                                        "scheduler adds LORAFLEET_REGISTRY_URL to env_vars, through which the job writes its events (a URL "
                                        "with a password goes in a 0600 file under the state dir instead, named by "
                                        "LORAFLEET_REGISTRY_URL_FILE: Ray shows env_vars to whoever can list jobs).")
