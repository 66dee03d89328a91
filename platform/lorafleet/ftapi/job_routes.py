"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning jobs API, behind the server's API keys.

Routes (OpenAI's shapes: the ``openai`` package's ``FineTuningJob``, ``FineTuningJobEvent`` and
``FineTuningJobCheckpoint``; lists page with ``after`` and ``limit`` and say ``has_more``)::

    POST /v1/fine_tuning/jobs                       JobCreate (model, training_file, hyperparameters | method, suffix, ...)
    GET  /v1/fine_tuning/jobs                       ?after= &limit=   (the caller's jobs, newest first)
    GET  /v1/fine_tuning/jobs/{fine_tuning_job_id}
    POST /v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel
    GET  /v1/fine_tuning/jobs/{fine_tuning_job_id}/events       ?after= &limit=  (newest first)
    GET  /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints  ?after= &limit=

Creating a job checks everything before storing anything: ``model`` is this server's base,
the files are the caller's own fine-tuning files (another tenant's id is refused exactly as a
missing one), and the hyperparameters make a valid ``FinetuneConfig`` (:mod:`.hyperparameters`).
The job is stored as ``validating_files`` with its pinned config. Isolation is that of files:
another tenant's job is a 404, the admin key sees and cancels every tenant's jobs but creates none.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from openai.types.fine_tuning import FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel, ConfigDict

from lorafleet.ftapi.hyperparameters import JobCreate, base_data, check_base, invalid, job_config
from lorafleet.ftapi.jobs import JobRecord, JobStore
from lorafleet.serve.errors import OpenAIError
from lorafleet.serve.tenancy import forbidden, unauthorized

JOBS_PATH = "/v1/fine_tuning/jobs"
MAX_MODEL_NAME = 128  # adapter names (lorafleet.serve.config.adapter_name_problem)

router = APIRouter()


class JobError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


class JobMethodObject(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: dict


class FineTuningJob(BaseModel):
    """OpenAI's ``FineTuningJob`` as lorafleet fills it (the openai package's own model parses it). Its ``method`` is
    supervised only, declared here rather than by the openai model, whose reinforcement graders would add dozens of
    schemas to the OpenAPI document and rename the ones vLLM's request models share with them."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: Optional[str] = None
    hyperparameters: dict
    seed: int
    fine_tuned_model: Optional[str] = None
    finished_at: Optional[int] = None
    error: Optional[JobError] = None
    trained_tokens: Optional[int] = None
    result_files: list[str]
    estimated_finish: Optional[int] = None
    integrations: Optional[list[dict]] = None
    metadata: Optional[dict[str, str]] = None
    method: JobMethodObject


class _Page(BaseModel):
    object: Literal["list"] = "list"
    has_more: bool = False


class JobList(_Page):
    """``GET /v1/fine_tuning/jobs`` (the openai client's ``SyncCursorPage[FineTuningJob]``)."""

    data: list[FineTuningJob]


class EventList(_Page):
    data: list[FineTuningJobEvent]


class CheckpointList(_Page):
    data: list[FineTuningJobCheckpoint]
    first_id: Optional[str] = None
    last_id: Optional[str] = None


def fine_tuned_model_name(base: str, tenant: str, suffix: Optional[str], job_id: str) -> str:
    """The model a job makes, as OpenAI names them: ``ft:<base>:<tenant>:<suffix>:<job id>`` (a hub base's `/` as `-`)."""
    return f"ft:{re.sub(r'[^A-Za-z0-9._-]', '-', base)}:{tenant}:{suffix or ''}:{job_id}"


class JobsAPI:
    """What the routes do, per replica. ``files`` is the replica's FilesAPI (its key check and file store)."""

    def __init__(self, cfg, tenancy, files):
        self.cfg, self.tenancy, self.files = cfg, tenancy, files
        self.store = JobStore(tenancy.registry.engine)
        check_base(cfg.fine_tuning, cfg.model, cfg.engine.max_lora_rank)
        self.scheduler_task = None
        if cfg.fine_tuning.run_jobs:
            from lorafleet.ftapi.scheduler import Scheduler

            scheduler = Scheduler(cfg, tenancy, self.store, files.store, fine_tuned_model_name)
            self.scheduler_task = asyncio.get_running_loop().create_task(scheduler.run_forever())

    def _owner(self, tenant_id: int) -> str:
        tenant = self.tenancy.view.snapshot.tenants.get(tenant_id)
        return tenant.name if tenant else f"tenant-{tenant_id}"

    def _file(self, tenant_id: int, file_id: Optional[str], field: str):
        try:
            record = self.files.store.get(tenant_id, file_id)
        except OpenAIError as exc:
            if exc.status != 404:
                raise
            record = None
        if record is None or record.purpose != "fine-tune":
            raise invalid(f"invalid {field}: `{file_id}` is not one of your files with purpose fine-tune (GET /v1/files lists them).", field,
                          f"invalid_{field}")
        return self.files.store.path(record)

    async def create(self, request: Request, body: JobCreate) -> dict:
        if self.tenancy.is_admin(request.headers.get("authorization")):
            raise forbidden("A fine-tuning job belongs to one tenant: create it with that tenant's API key.", "admin_key_not_allowed")
        tenant = (await self.tenancy.caller(request.headers.get("authorization"))).tenant
        if tenant is None:
            raise unauthorized("Fine-tuning jobs belong to a tenant: send `Authorization: Bearer <key>` with a tenant's API key.")
        base = self.cfg.base_model_name
        if body.model != base:
            raise invalid(f"The model `{body.model}` cannot be fine-tuned here: this server fine-tunes its base model `{base}`.", "model",
                          "model_not_available")
        hyper, field = body.hyperparameter_fields()
        job_id = JobRecord.new_id()
        name = fine_tuned_model_name(base, tenant.name, body.suffix, job_id)
        if len(name) > MAX_MODEL_NAME:
            raise invalid(f"The fine-tuned model's name `{name}` would be {len(name)} characters; names hold at most {MAX_MODEL_NAME}: "
                          "use a shorter suffix.", "suffix", "invalid_suffix")
        return await asyncio.to_thread(self._create, tenant, body, hyper, field, job_id)

    def _create(self, tenant, body: JobCreate, hyper, field: str, job_id: str) -> dict:
        training = self._file(tenant.id, body.training_file, "training_file")
        validation = self._file(tenant.id, body.validation_file, "validation_file") if body.validation_file is not None else None
        root = self.cfg.state_path() / "fine_tuning"
        pins = {"run_name": job_id, "output_dir": str(root / str(tenant.id) / job_id), "checkpoint.storage_path": str(root / "ray_results"),
                "tracking.register_as": f"{tenant.name}~ft-{body.suffix or job_id}"}
        if self.cfg.mlflow_tracking_uri:
            pins["tracking.mlflow_tracking_uri"] = self.cfg.mlflow_tracking_uri
        cfg, shown = job_config(base_data(self.cfg.fine_tuning, self.cfg.model, self.cfg.engine.max_lora_rank), hyper, field, body.seed, self.cfg.engine.max_lora_rank,
                                training, validation, pins)
        record = JobRecord(job_id, tenant.id, body.model, body.training_file, body.validation_file, shown, body.suffix, cfg.training.seed,
                           cfg.model_dump(mode="json"), body.metadata, "validating_files", time.time())
        self.store.create(record, (f"Created fine-tuning job: {job_id}", f"Validating training file: {body.training_file}"))
        return record.openai(tenant.name)

    async def list(self, request: Request, after: Optional[str], limit: int) -> dict:
        records, more = await asyncio.to_thread(self.store.list, await self.files.scope(request), after=after, limit=limit)
        return {"object": "list", "data": [r.openai(self._owner(r.tenant_id)) for r in records], "has_more": more}

    async def get(self, request: Request, job_id: str) -> dict:
        record = await asyncio.to_thread(self.store.get, await self.files.scope(request), job_id)
        return record.openai(self._owner(record.tenant_id))

    async def cancel(self, request: Request, job_id: str) -> dict:
        record = await asyncio.to_thread(self.store.cancel, await self.files.scope(request), job_id)
        return record.openai(self._owner(record.tenant_id))

    async def events(self, request: Request, job_id: str, after: Optional[str], limit: int, checkpoints: bool = False) -> dict:
        events, more = await asyncio.to_thread(self.store.events, await self.files.scope(request), job_id, after=after, limit=limit,
                                               checkpoints=checkpoints)
        if not checkpoints:
            return {"object": "list", "data": [e.openai() for e in events], "has_more": more}
        data = [e.checkpoint_object() for e in events]
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}


@router.post(JOBS_PATH, response_model=FineTuningJob)
async def create_job(body: JobCreate, request: Request):
    """Start fine-tuning the base on one of your files; the job is stored as `validating_files`."""
    return await request.app.state.jobs.create(request, body)


@router.get(JOBS_PATH, response_model=JobList)
async def list_jobs(request: Request, after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)):
    """Your fine-tuning jobs (the admin's: every tenant's), newest first; `after` (a job id) pages on."""
    return await request.app.state.jobs.list(request, after, limit)


@router.get(JOBS_PATH + "/{fine_tuning_job_id}", response_model=FineTuningJob)
async def retrieve_job(fine_tuning_job_id: str, request: Request):
    return await request.app.state.jobs.get(request, fine_tuning_job_id)


@router.post(JOBS_PATH + "/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
async def cancel_job(fine_tuning_job_id: str, request: Request):
    """Cancel a job: one that has not started ends `cancelled` at once; a running one once its training run has stopped."""
    return await request.app.state.jobs.cancel(request, fine_tuning_job_id)


@router.get(JOBS_PATH + "/{fine_tuning_job_id}/events", response_model=EventList)
async def job_events(fine_tuning_job_id: str, request: Request, after: Optional[str] = None, limit: int = Query(20, ge=1, le=1000)):
    """The job's events (status changes, step metrics), newest first."""
    return await request.app.state.jobs.events(request, fine_tuning_job_id, after, limit)


@router.get(JOBS_PATH + "/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
async def job_checkpoints(fine_tuning_job_id: str, request: Request, after: Optional[str] = None, limit: int = Query(10, ge=1, le=100)):
    """The job's saved checkpoints, newest first."""
    return await request.app.state.jobs.events(request, fine_tuning_job_id, after, limit, checkpoints=True)
