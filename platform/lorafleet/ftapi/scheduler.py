"""The loop that runs fine-tuning jobs: it moves them through OpenAI's statuses and runs each as a Ray job.

Every server replica runs it (``fine_tuning.run_jobs``), every ``fine_tuning.poll_interval_s``; all
its state is in the registry database, so a restarted server loses nothing and picks up where
the last one was. Each step is a compare-and-set on the job's status, so replicas running it
side by side never both act on one job:

* ``validating_files`` -> ``queued`` once its files are still there (-> ``failed`` if not);
* ``queued`` -> ``running`` within ``fine_tuning.max_concurrent_jobs_per_tenant`` (oldest first),
  then submitted with Ray's Job Submission API (``submission_id`` = the job id, so a second
  submission of the same job is refused by Ray and a restarted server re-attaches by id);
  the Ray job runs :mod:`lorafleet.ftapi.run_job` with the pinned config;
* ``running``: Ray's status decides. ``SUCCEEDED``: the adapter MLflow registered is registered
  for the tenant as ``ft:<base>:<tenant>:<suffix>:<job id>`` through ``Tenancy.register`` (the
  path of ``POST /v1/adapters``: validation, hash, hot-swap), then ``succeeded``; ``STOPPED``:
  ``cancelled``; ``FAILED``: ``failed`` with Ray's message. A cancel request stops the Ray job.
  A Ray job that Ray does not know (the cluster was replaced) is submitted again and resumes
  from its checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import sqlalchemy as sa

from lorafleet.ftapi.jobs import NOT_STARTED, JobRecord, JobStore, jobs_table
from lorafleet.serve.errors import OpenAIError
from lorafleet.serve.registry import tenants_table

log = logging.getLogger(__name__)


class _NoSlot(Exception):
    pass


class Scheduler:
    def __init__(self, cfg, tenancy, store: JobStore, files, model_name):
        self.cfg, self.settings, self.tenancy, self.store, self.files = cfg, cfg.fine_tuning, tenancy, store, files
        self.model_name = model_name  # (base, tenant, suffix, job id) -> the fine-tuned model's name
        self._client = None

    def client(self):
        """Ray's Job Submission client for the cluster this replica runs on (its dashboard, found through the GCS)."""
        if self._client is None:
            import ray
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.settings.ray_address or ray.get_runtime_context().gcs_address)
        return self._client

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - a registry or Ray outage must not end the loop; retried next tick
                log.warning("fine-tuning scheduler tick failed (retrying): %r", exc)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def tick(self) -> None:
        jobs, _ = await asyncio.to_thread(self.store.list, None, limit=10**6, statuses=("validating_files", "queued", "running"), order="asc")
        for job in jobs:
            if job.status == "validating_files":
                await asyncio.to_thread(self._validate, job)
            elif job.status == "queued":
                await asyncio.to_thread(self._start, job)
            else:
                await self._follow(job)

    def _validate(self, job: JobRecord) -> None:
        for field, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
            if file_id is None:
                continue
            try:
                self.files.get(job.tenant_id, file_id)
            except OpenAIError:
                self._end(job, "failed", f"The {field} {file_id} was deleted before the job started.", code=f"invalid_{field}", param=field)
                return
        self.store.transition(job.id, ("validating_files",), "Files validated; the job is queued.", status="queued")

    def _start(self, job: JobRecord) -> None:
        """queued -> running if the tenant has a free slot (the count is taken after the update, in its transaction,
        so replicas starting two jobs of one tenant at once cannot both pass), then submit."""
        limit = self.settings.max_concurrent_jobs_per_tenant
        try:
            with self.store.engine.begin() as conn:
                if not conn.execute(jobs_table.update().where(jobs_table.c.id == job.id, jobs_table.c.status == "queued")
                                    .values(status="running", started_at=time.time(), ray_submission_id=job.id)).rowcount:
                    return
                conn.execute(sa.select(tenants_table.c.id).where(tenants_table.c.id == job.tenant_id).with_for_update())
                running = conn.execute(sa.select(sa.func.count()).where(jobs_table.c.tenant_id == job.tenant_id,
                                                                       jobs_table.c.status == "running")).scalar_one()
                if running > limit:
                    raise _NoSlot  # rolls the update back: the job stays queued
        except _NoSlot:
            return
        self.store.add_event(job.id, f"Fine-tuning job started (Ray job {job.id}).")
        self._submit(job)

    def _submit(self, job: JobRecord) -> None:
        from lorafleet.ftapi.run_job import job_env

        env = {**self.settings.runtime_env.get("env_vars", {}),
               **job_env(self.cfg.registry_url(), self.cfg.state_path() / "fine_tuning" / "secrets", job.id)}
        try:
            self.client().submit_job(entrypoint=f"{sys.executable} -m lorafleet.ftapi.run_job {job.id}", submission_id=job.id,
                                     runtime_env={**self.settings.runtime_env, "env_vars": env}, entrypoint_num_cpus=0)
        except Exception as exc:  # noqa: BLE001
            if "already exists" in str(exc):  # submitted by another replica a moment ago
                return
            self._end(job, "failed", f"The job could not be submitted to Ray: {exc}", code="submission_failed")

    def _ray_status(self, job: JobRecord) -> Optional[str]:
        try:
            return str(self.client().get_job_status(job.id).value)
        except Exception as exc:  # noqa: BLE001 - Ray does not know it (a new cluster): submit again, it resumes
            if "does not exist" in str(exc) or "404" in str(exc) or "not found" in str(exc).lower():
                return None
            raise

    async def _follow(self, job: JobRecord) -> None:
        status = await asyncio.to_thread(self._ray_status, job)
        if status is None:
            await asyncio.to_thread(self.store.add_event, job.id, "The Ray job is unknown to this cluster: submitting it again.", level="warn")
            return await asyncio.to_thread(self._submit, job)
        if job.cancel_requested_at is not None and status in ("PENDING", "RUNNING"):
            await asyncio.to_thread(self.client().stop_job, job.id)
        elif status == "STOPPED":
            await asyncio.to_thread(self._end, job, "cancelled", "Fine-tuning job cancelled; its Ray job was stopped.")
        elif status == "FAILED":
            info = await asyncio.to_thread(self.client().get_job_info, job.id)
            logs = await asyncio.to_thread(self.client().get_job_logs, job.id)
            tail = "\n".join(logs.strip().splitlines()[-5:])
            await asyncio.to_thread(self._end, job, "failed", f"Training failed: {info.message}\n{tail}"[:2000], code="training_failed")
        elif status == "SUCCEEDED":
            await self._succeed(job)

    async def _succeed(self, job: JobRecord) -> None:
        from lorafleet.serve.tenancy import Caller

        result = json.loads((Path(job.config["output_dir"]) / "result.json").read_text())
        tenant = next((t for t, _, _ in await asyncio.to_thread(self.tenancy.registry.list_tenants) if t.id == job.tenant_id), None)
        if tenant is None:
            return await asyncio.to_thread(self._end, job, "failed", "The job's tenant was deleted.", code="tenant_deleted")
        if not result.get("registered_version"):  # trained, but MLflow did not register it (result.json says why)
            return await asyncio.to_thread(self._end, job, "failed", "The adapter was trained but not registered in MLflow: "
                                           f"{json.dumps(result.get('tracking'))[:1500]}", code="registration_failed")
        name = self.model_name(job.model, tenant.name, job.suffix, job.id)
        source = f"models:/{result['registered_model']}/{result['registered_version']}"
        try:
            await self.tenancy.register(Caller(tenant), {"name": name, "source": source})
        except OpenAIError as exc:
            existing = await asyncio.to_thread(self.tenancy.registry.adapter, tenant.id, name)
            if exc.code != "adapter_exists" or existing is None or existing.source != source:  # else: registered by another replica
                return await asyncio.to_thread(self._end, job, "failed", f"The adapter could not be registered for serving: {exc.message}",
                                               code="registration_failed")
        tokens = (result.get("metrics") or {}).get("tokens_seen")
        await asyncio.to_thread(self.store.transition, job.id, ("running",), f"The job has successfully completed: {name} is served.",
                                status="succeeded", fine_tuned_model=name, finished_at=time.time(), mlflow_run_id=result.get("mlflow_run_id"),
                                trained_tokens=int(tokens) if tokens is not None else None)

    def _end(self, job: JobRecord, status: str, message: str, code: Optional[str] = None, param: Optional[str] = None) -> None:
        error = {"code": code, "message": message, "param": param} if code else None
        self.store.transition(job.id, (*NOT_STARTED, "running"), message, "error" if error else "info", status=status,
                              finished_at=time.time(), error=error)
