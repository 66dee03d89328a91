"""Fine-tuning jobs without a server: how a request becomes the FinetuneConfig a job runs (and every
config error a 400 naming the request's field), and the job store on the real registry database
(SQLite and PostgreSQL): isolation, paging, events, and cancel racing the scheduler."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from lorafleet.config import FinetuneConfig, load_config
from lorafleet.ftapi.config import FineTuningSettings
from lorafleet.ftapi.hyperparameters import JobCreate, JobHyperparameters, base_data, check_base, job_config
from lorafleet.ftapi.jobs import JobRecord, JobStore
from lorafleet.serve.errors import OpenAIError
from lorafleet.serve.registry import Registry

SETTINGS = FineTuningSettings(overrides=["training.learning_rate=0.001", "distributed.num_workers=2", "training.max_steps=5"])
PINS = {"run_name": "ftjob-abc", "output_dir": "/state/ft/ftjob-abc", "tracking.register_as": "acme~ft-intent"}


def config_of(hyper: dict, field: str = "hyperparameters", seed=None, max_lora_rank: int = 8, settings=SETTINGS):
    return job_config(base_data(settings, "/models/tiny", max_lora_rank), JobHyperparameters(**hyper), field, seed, max_lora_rank,
                      "/files/train.jsonl", None, PINS)


def test_openai_and_lora_hyperparameters_map_onto_the_finetune_config(tmp_path):
    cfg, shown = config_of({"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5, "r": 4, "lora_alpha": 8,
                            "target_modules": ["q_proj", "v_proj"]}, seed=7)
    t = cfg.training
    assert (t.num_epochs, t.max_steps, t.per_device_batch_size, t.gradient_accumulation_steps, t.seed) == (3, None, 4, 1, 7)
    assert t.learning_rate == pytest.approx(0.0005)  # the server's rate x the multiplier
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert (cfg.model.name_or_path, cfg.data.task, cfg.data.path, cfg.run_name, cfg.tracking.register_as) == (
        "/models/tiny", "chat", "/files/train.jsonl", "ftjob-abc", "acme~ft-intent")
    assert shown == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5, "r": 4, "lora_alpha": 8.0,
                     "target_modules": ["q_proj", "v_proj"]}
    # the same config as `jobs/finetune.py --set ...` makes from the dumped base: one override path
    (tmp_path / "base.yaml").write_text(__import__("yaml").safe_dump(base_data(SETTINGS, "/models/tiny", 8)))
    again = load_config(FinetuneConfig, tmp_path / "base.yaml", [
        "training.num_epochs=3", "training.max_steps=null", "training.per_device_batch_size=4", "training.gradient_accumulation_steps=1",
        "training.learning_rate=0.0005", "training.seed=7", "lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q_proj, v_proj]",
        "data.task=chat", "data.format=auto", "data.path=/files/train.jsonl", *(f"{k}={v}" for k, v in PINS.items())])
    assert again == cfg


def test_auto_keeps_the_servers_config_and_its_rank_fits_the_engine():
    cfg, shown = config_of({})
    assert (cfg.training.max_steps, cfg.training.learning_rate, cfg.distributed.num_workers, cfg.lora.r) == (5, 0.001, 2, 8)
    assert shown["learning_rate_multiplier"] == 1.0 and shown["max_steps"] == 5 and shown["batch_size"] == 16
    check_base(SETTINGS, "/models/tiny", 8)
    with pytest.raises(ValueError, match=r"lora.r \(32\) must be <= engine.max_lora_rank \(8\)"):
        check_base(FineTuningSettings(overrides=["lora.r=32"]), "/models/tiny", 8)
    with pytest.raises(ValueError, match="method must be lora or qlora"):
        check_base(FineTuningSettings(overrides=["method=full"]), "/models/tiny", 8)


def test_every_config_error_is_one_400_naming_the_request_fields():
    with pytest.raises(OpenAIError) as err:
        config_of({"batch_size": 7, "learning_rate_multiplier": 5000, "r": 16, "target_modules": []}, "method.supervised.hyperparameters")
    e = err.value
    assert e.status == 400 and e.param == "method.supervised.hyperparameters.batch_size", e.message
    for expected in ("method.supervised.hyperparameters.batch_size (7) must be a multiple of the server's 2 training workers",
                     "method.supervised.hyperparameters.learning_rate_multiplier: training.learning_rate: Input should be less than or equal to 1 (got 5.0)",
                     "method.supervised.hyperparameters.target_modules: lora.target_modules: ",
                     "method.supervised.hyperparameters.r (16) must be <= this server's engine.max_lora_rank (8)"):
        assert expected in e.message, e.message


@pytest.mark.parametrize("body, field, words", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "an integer from 1 to 50"),
    ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs", "an integer from 1 to 50"),
    ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, "hyperparameters.learning_rate_multiplier", "`auto` or a number"),
    ({"hyperparameters": {"lora_rank": 8}}, "hyperparameters.lora_rank", "Extra inputs"),
    ({"method": {"type": "dpo"}}, "method.type", "supervised fine-tuning only"),
    ({"suffix": "a" * 65}, "suffix", "1 to 64"),
    ({"suffix": "my:model"}, "suffix", "letters, digits"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "not supported"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
])
def test_request_bodies_are_refused_naming_the_field(body, field, words):
    with pytest.raises(ValidationError) as err:
        JobCreate(model="tiny", training_file="file-x", **body)
    first = err.value.errors()[0]
    assert ".".join(str(p) for p in first["loc"]) == field and words in first["msg"], first


def test_hyperparameters_come_from_one_place():
    hyper, field = JobCreate(model="m", training_file="f", method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}).hyperparameter_fields()
    assert (hyper.n_epochs, field) == (2, "method.supervised.hyperparameters")
    with pytest.raises(OpenAIError, match="either in `hyperparameters` or in `method"):
        JobCreate(model="m", training_file="f", hyperparameters={"n_epochs": 3},
                  method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}).hyperparameter_fields()


def _job(tenant_id: int, status: str = "validating_files", at: float | None = None) -> JobRecord:
    return JobRecord(JobRecord.new_id(), tenant_id, "tiny", "file-x", None, {"n_epochs": 1}, "s", 42, {"run_name": "x"}, None, status,
                     time.time() if at is None else at)


def _store_behaviour(url: str) -> None:
    reg = Registry(url)
    acme, _ = reg.create_tenant("acme")
    globex, _ = reg.create_tenant("globex")
    store = JobStore(reg.engine)
    now = time.time()
    jobs = [store.create(_job(acme.id, at=now + i), ("Created fine-tuning job", "Validating training file")) for i in range(5)]
    other = store.create(_job(globex.id))
    assert store.get(acme.id, jobs[0].id) == jobs[0] == store.get(None, jobs[0].id)
    for call in (lambda: store.get(globex.id, jobs[0].id), lambda: store.cancel(globex.id, jobs[0].id),
                 lambda: store.events(globex.id, jobs[0].id)):
        with pytest.raises(OpenAIError) as err:
            call()
        assert err.value.status == 404 and err.value.code == "fine_tuning_job_not_found"
    # newest first, paged with `after`
    seen, after = [], None
    while True:
        page, more = store.list(acme.id, after=after, limit=2)
        seen += [j.id for j in page]
        if not more:
            break
        after = page[-1].id
    assert seen == [j.id for j in reversed(jobs)]
    assert {j.id for j in store.list(None, limit=100)[0]} == {j.id for j in jobs} | {other.id}
    events, more = store.events(acme.id, jobs[0].id, limit=1)
    assert [e.message for e in events] == ["Validating training file"] and more
    assert [e.message for e in store.events(acme.id, jobs[0].id, after=events[0].id)[0]] == ["Created fine-tuning job"]
    # cancel: a job not started ends cancelled; a running one is marked for the scheduler; a finished one is 409
    cancelled = store.cancel(acme.id, jobs[0].id)
    assert cancelled.status == "cancelled" and cancelled.finished_at and store.events(acme.id, jobs[0].id)[0][0].message == "Fine-tuning job cancelled."
    assert store.cancel(acme.id, jobs[0].id).status == "cancelled"
    running = store.transition(jobs[1].id, ("validating_files",), "Job started.", status="running", started_at=time.time())
    marked = store.cancel(acme.id, running.id)
    assert marked.status == "running" and marked.cancel_requested_at is not None
    store.transition(jobs[2].id, ("validating_files",), status="succeeded", fine_tuned_model="ft:x", finished_at=time.time())
    with pytest.raises(OpenAIError) as err:
        store.cancel(None, jobs[2].id)
    assert err.value.status == 409
    # a cancel racing the scheduler's start: exactly one wins, and the job ends in a state that says which
    for job in jobs[3:]:
        barrier, results = threading.Barrier(2), {}

        def start(job=job):
            barrier.wait()
            results["start"] = store.transition(job.id, ("validating_files", "queued"), status="running") is not None

        def cancel(job=job):
            barrier.wait()
            results["cancel"] = store.cancel(acme.id, job.id).status

        threads = [threading.Thread(target=start), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = store.get(acme.id, job.id)
        assert (final.status, final.cancel_requested_at is not None) in (("cancelled", True), ("running", True)), (final, results)
        assert results["start"] == (final.status == "running")
    reg.close()


def test_the_job_store_on_sqlite(tmp_path):
    _store_behaviour(f"sqlite:///{tmp_path}/registry.db")


@pytest.mark.postgres
def test_the_job_store_on_postgresql(postgres_db):
    _store_behaviour(postgres_db)


def test_a_registry_password_never_reaches_the_ray_jobs_environment(tmp_path, monkeypatch):
    """Ray shows a job's env_vars to whoever can list jobs: a password-bearing registry URL goes in a 0600 file."""
    import stat

    from lorafleet.ftapi.run_job import REGISTRY_URL_ENV, REGISTRY_URL_FILE_ENV, job_env, registry_url_from_env

    secret = "postgresql://lorafleet:s3cret-pw@db.internal:5432/registry"
    env = job_env(secret, tmp_path / "secrets", "ftjob-abc")
    assert list(env) == [REGISTRY_URL_FILE_ENV] and "s3cret-pw" not in repr(env)
    path = tmp_path / "secrets" / "ftjob-abc.registry-url"
    assert env[REGISTRY_URL_FILE_ENV] == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.delenv(REGISTRY_URL_ENV, raising=False)
    monkeypatch.setenv(REGISTRY_URL_FILE_ENV, env[REGISTRY_URL_FILE_ENV])
    assert registry_url_from_env() == secret  # what the job connects with
    # no password (SQLite, peer or .pgpass auth): the URL itself, nothing written
    plain = f"sqlite:///{tmp_path}/registry.db"
    assert job_env(plain, tmp_path / "other", "ftjob-def") == {REGISTRY_URL_ENV: plain} and not (tmp_path / "other").exists()
    monkeypatch.delenv(REGISTRY_URL_FILE_ENV)
    monkeypatch.setenv(REGISTRY_URL_ENV, plain)
    assert registry_url_from_env() == plain
