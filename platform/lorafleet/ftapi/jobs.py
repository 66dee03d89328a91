"""Where tenants' fine-tuning jobs live: rows in the registry database, with their events.

The tables (``lorafleet_ft_jobs``, ``lorafleet_ft_events``, created by migration ``0003``) hold
OpenAI's ``FineTuningJob`` and ``FineTuningJobEvent`` fields plus what lorafleet runs the job
with: the pinned ``FinetuneConfig`` (JSON), the Ray submission id and the MLflow run id. As for
files, every query is scoped to one tenant (``scope``) or to all of them for the admin
(``scope=None``), so another tenant's job is the same 404 as a missing id.

Status changes are compare-and-set (``UPDATE ... WHERE status IN (...)``): a cancel and the
scheduler starting the job cannot both win.

Example::

    store = JobStore(registry.engine)
    job = store.create(JobRecord.new(tenant_id, "tiny", "file-...", None, {...}, "intent", 42, config, None))
    store.events(tenant_id, job.id)          # ([Created fine-tuning job ...], False)
    store.cancel(tenant_id, job.id).status   # "cancelled" (it had not started)
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Optional

import sqlalchemy as sa

from lorafleet.serve.errors import OpenAIError, bad_request

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
NOT_STARTED = ("validating_files", "queued")
FINISHED = ("succeeded", "failed", "cancelled")

_meta = sa.MetaData()
jobs_table = sa.Table(
    "lorafleet_ft_jobs", _meta,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("training_file", sa.String(40), nullable=False),
    sa.Column("validation_file", sa.String(40), nullable=True),
    sa.Column("hyperparameters", sa.Text, nullable=False),
    sa.Column("suffix", sa.String(64), nullable=True),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("ray_submission_id", sa.String(128), nullable=True),
    sa.Column("mlflow_run_id", sa.String(64), nullable=True),
    sa.Column("fine_tuned_model", sa.String(255), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("cancel_requested_at", sa.Float, nullable=True),
)
events_table = sa.Table(
    "lorafleet_ft_events", _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=True),
    sa.Column("checkpoint", sa.Text, nullable=True),
)
_JSON_FIELDS = ("hyperparameters", "config", "metadata", "error")
JOB_ID, EVENT_ID = re.compile(r"ftjob-[0-9a-f]{24}"), re.compile(r"ft(?:event|ckpt)-[0-9a-f]{24}")  # anything else names nothing


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: int
    model: str
    training_file: str
    validation_file: Optional[str]
    hyperparameters: dict
    suffix: Optional[str]
    seed: int
    config: dict
    metadata: Optional[dict]
    status: str
    created_at: float
    ray_submission_id: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    fine_tuned_model: Optional[str] = None
    error: Optional[dict] = None
    trained_tokens: Optional[int] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    cancel_requested_at: Optional[float] = None

    @staticmethod
    def new_id() -> str:
        return f"ftjob-{secrets.token_hex(12)}"

    def openai(self, organization: str) -> dict:
        """The job as OpenAI's ``FineTuningJob`` (``organization``: the owning tenant's name)."""
        hyper = dict(self.hyperparameters)
        return {"id": self.id, "object": "fine_tuning.job", "created_at": int(self.created_at), "model": self.model,
                "organization_id": organization, "status": self.status, "training_file": self.training_file,
                "validation_file": self.validation_file, "hyperparameters": hyper, "seed": self.seed,
                "fine_tuned_model": self.fine_tuned_model, "finished_at": None if self.finished_at is None else int(self.finished_at),
                "error": self.error, "trained_tokens": self.trained_tokens, "result_files": [], "estimated_finish": None,
                "integrations": None, "metadata": self.metadata,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}

    def row(self) -> dict:
        out = asdict(self)
        for key in _JSON_FIELDS:
            out[key] = None if out[key] is None else json.dumps(out[key])
        return out

    @classmethod
    def from_row(cls, row) -> "JobRecord":
        data = dict(row._mapping)
        for key in _JSON_FIELDS:
            data[key] = None if data[key] is None else json.loads(data[key])
        return cls(**data)


@dataclass(frozen=True)
class EventRecord:
    seq: int
    id: str
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: Optional[dict]
    checkpoint: Optional[str]

    def openai(self) -> dict:
        """The event as OpenAI's ``FineTuningJobEvent``."""
        return {"id": self.id, "object": "fine_tuning.job.event", "created_at": int(self.created_at), "level": self.level,
                "message": self.message, "type": self.type, "data": self.data}

    def checkpoint_object(self) -> dict:
        """An event that announced a checkpoint, as OpenAI's ``FineTuningJobCheckpoint``."""
        data = self.data or {}
        step = int(data.get("step", 0))
        metrics = {k: data[k] for k in ("train_loss", "valid_loss", "full_valid_loss") if isinstance(data.get(k), (int, float))}
        return {"id": f"ftckpt-{self.id.removeprefix('ftevent-')}", "object": "fine_tuning.job.checkpoint", "created_at": int(self.created_at),
                "fine_tuning_job_id": self.job_id, "fine_tuned_model_checkpoint": self.checkpoint, "step_number": step,
                "metrics": {"step": step, **metrics}}

    @classmethod
    def from_row(cls, row) -> "EventRecord":
        data = dict(row._mapping)
        data["data"] = None if data["data"] is None else json.loads(data["data"])
        return cls(**data)


def job_not_found(job_id: str) -> OpenAIError:
    return OpenAIError(404, f"No fine-tuning job with id `{job_id[:80]}` among yours (GET /v1/fine_tuning/jobs lists them).",
                       "invalid_request_error", "fine_tuning_job_id", "fine_tuning_job_not_found")


def event_values(job_id: str, message: str, level: str = "info", type: str = "message", data: Optional[dict] = None,
                 checkpoint: Optional[str] = None, at: Optional[float] = None) -> dict:
    return {"id": f"ftevent-{secrets.token_hex(12)}", "job_id": job_id, "created_at": time.time() if at is None else at, "level": level,
            "type": type, "message": message, "data": None if data is None else json.dumps(data), "checkpoint": checkpoint}


class JobStore:
    """Every tenant's fine-tuning jobs and their events, in the registry database at ``engine``."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    @staticmethod
    def _scoped(query, scope: Optional[int]):
        return query if scope is None else query.where(jobs_table.c.tenant_id == scope)

    def create(self, record: JobRecord, messages: tuple[str, ...] = ()) -> JobRecord:
        """Insert the job and its first events in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(jobs_table.insert().values(**record.row()))
            for i, message in enumerate(messages):
                conn.execute(events_table.insert().values(**event_values(record.id, message, at=record.created_at + i * 1e-6)))
        return record

    def get(self, scope: Optional[int], job_id: str) -> JobRecord:
        """The job ``job_id`` of tenant ``scope`` (None: any tenant); 404 otherwise."""
        if not JOB_ID.fullmatch(job_id):
            raise job_not_found(job_id)
        with self.engine.connect() as conn:
            row = conn.execute(self._scoped(sa.select(jobs_table).where(jobs_table.c.id == job_id), scope)).first()
        if row is None:
            raise job_not_found(job_id)
        return JobRecord.from_row(row)

    def list(self, scope: Optional[int], *, after: Optional[str] = None, limit: int = 20, statuses: tuple[str, ...] = (),
             order: str = "desc") -> tuple[list[JobRecord], bool]:
        """One page of jobs, newest first as OpenAI lists them (``order="asc"``: oldest first), and whether more follow."""
        c = jobs_table.c
        query = self._scoped(sa.select(jobs_table), scope)
        if statuses:
            query = query.where(c.status.in_(statuses))
        with self.engine.connect() as conn:
            if after is not None:
                mark = conn.execute(self._scoped(sa.select(c.created_at, c.id).where(c.id == after), scope)).first() if JOB_ID.fullmatch(after) else None
                if mark is None:
                    raise bad_request(f"`after` ({after[:80]!r}) is not the id of one of your fine-tuning jobs.", "after", "invalid_cursor")
                key = sa.tuple_(c.created_at, c.id)
                query = query.where(key < sa.tuple_(*mark) if order == "desc" else key > sa.tuple_(*mark))
            direction = sa.desc if order == "desc" else sa.asc
            rows = conn.execute(query.order_by(direction(c.created_at), direction(c.id)).limit(limit + 1)).all()
        return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def events(self, scope: Optional[int], job_id: str, *, after: Optional[str] = None, limit: int = 20,
               checkpoints: bool = False) -> tuple[list[EventRecord], bool]:
        """One page of the job's events, newest first (``checkpoints``: only those announcing a checkpoint); 404 for another's job."""
        self.get(scope, job_id)
        c = events_table.c
        query = sa.select(events_table).where(c.job_id == job_id)
        if checkpoints:
            query = query.where(c.checkpoint.is_not(None))
        with self.engine.connect() as conn:
            if after is not None:
                seq = conn.execute(sa.select(c.seq).where(c.job_id == job_id, c.id == after.replace("ftckpt-", "ftevent-", 1))).scalar() \
                    if EVENT_ID.fullmatch(after) else None
                if seq is None:
                    raise bad_request(f"`after` ({after[:80]!r}) is not the id of one of this job's {'checkpoints' if checkpoints else 'events'}.",
                                      "after", "invalid_cursor")
                query = query.where(c.seq < seq)
            rows = conn.execute(query.order_by(c.seq.desc()).limit(limit + 1)).all()
        return [EventRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def add_event(self, job_id: str, message: str, **kwargs) -> None:
        with self.engine.begin() as conn:
            conn.execute(events_table.insert().values(**event_values(job_id, message, **kwargs)))

    def transition(self, job_id: str, from_statuses: tuple[str, ...], message: Optional[str] = None, level: str = "info",
                   **changes) -> Optional[JobRecord]:
        """Set ``changes`` (``status=...`` among them) if the job is in one of ``from_statuses``, with an event;
        the updated job, or None when it was not (another replica or the scheduler changed it first)."""
        with self.engine.begin() as conn:
            values = {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in changes.items()}
            done = conn.execute(jobs_table.update().where(jobs_table.c.id == job_id, jobs_table.c.status.in_(from_statuses))
                                .values(**values)).rowcount
            if not done:
                return None
            if message:
                conn.execute(events_table.insert().values(**event_values(job_id, message, level)))
            return JobRecord.from_row(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).one())

    def cancel(self, scope: Optional[int], job_id: str) -> JobRecord:
        """Cancel the job: one that has not started is ``cancelled`` at once; a running one is marked for the
        scheduler to stop (its status moves when its Ray job has stopped). 409 for a job already finished."""
        job = self.get(scope, job_id)
        now = time.time()
        done = self.transition(job.id, NOT_STARTED, "Fine-tuning job cancelled.", status="cancelled", finished_at=now, cancel_requested_at=now)
        if done is not None:
            return done
        job = self.get(scope, job_id)
        if job.status == "running":
            if job.cancel_requested_at is not None:
                return job
            marked = self.transition(job.id, ("running",), "Cancellation requested: stopping the training run.", cancel_requested_at=now)
            return marked or self.get(scope, job_id)
        if job.status == "cancelled":
            return job  # cancelling twice is harmless, as in OpenAI's API
        raise OpenAIError(409, f"The fine-tuning job `{job_id}` has already {job.status}; only a job that has not finished can be cancelled.",
                          "invalid_request_error", "fine_tuning_job_id", "job_already_finished")
