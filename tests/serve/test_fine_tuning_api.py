"""OpenAI's fine-tuning jobs API (``/v1/fine_tuning/jobs``) on the session's real app, with the official
``openai`` client: create / list / retrieve / cancel / events / checkpoints, validation before anything
is stored, and per-tenant isolation. Tenants ``tuner-a`` and ``tuner-b`` are created through the admin
API; tests run in file order and build on each other. (Jobs stay `validating_files` here: this module
does not start the scheduler.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from serve_helpers import ADMIN_KEY, BASE

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS: dict[str, str] = {}
FILES: dict[str, str] = {}
JOBS: list[str] = []
ROWS = [{"messages": [{"role": "user", "content": f"my card {i} was stolen"}, {"role": "assistant", "content": "lost_or_stolen_card"}]}
        for i in range(16)]
DATA = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        for name in ("tuner-a", "tuner-b"):
            r = client.post("/admin/tenants", headers=ADMIN, json={"name": name})
            assert r.status_code == 201, r.text
            KEYS[name] = r.json()["api_key"]["key"]
            FILES[name] = client_for(served, KEYS[name]).files.create(file=(f"{name}.jsonl", DATA), purpose="fine-tune").id
        yield client


def client_for(served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0)


def error(exc_info, status: int, code: str, param=None) -> dict:
    exc = exc_info.value
    assert exc.status_code == status, (exc.status_code, exc.response.text)
    err = exc.response.json()["error"]
    assert err["code"] == code and err["message"] and "Traceback" not in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def stored_config(served, job_id: str) -> dict:
    engine = sa.create_engine(served.cfg.registry_url())
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT config FROM lorafleet_ft_jobs WHERE id = :i"), {"i": job_id}).scalar_one()
    engine.dispose()
    return json.loads(row)


def test_a_tenant_creates_lists_retrieves_and_cancels_its_jobs(http, served):
    a = client_for(served, KEYS["tuner-a"])
    job = a.fine_tuning.jobs.create(model=BASE, training_file=FILES["tuner-a"], suffix="intent", seed=7,
                                    hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                    metadata={"team": "cards"})
    assert isinstance(job, FineTuningJob) and job.id.startswith("ftjob-") and len(job.id) == 30
    assert (job.status, job.model, job.training_file, job.organization_id, job.seed, job.fine_tuned_model) == (
        "validating_files", BASE, FILES["tuner-a"], "tuner-a", 7, None)
    assert (job.hyperparameters.n_epochs, job.hyperparameters.learning_rate_multiplier) == (2, 0.5)
    assert (job.hyperparameters.r, job.hyperparameters.target_modules) == (4, ["q_proj", "v_proj"])  # lorafleet's, shown back
    assert job.method.type == "supervised" and job.metadata == {"team": "cards"}
    # the pinned config is the FinetuneConfig jobs/finetune.py would run: the server's base, the tenant's file, the job's names
    cfg = stored_config(served, job.id)
    assert cfg["model"]["name_or_path"] == served.cfg.model and cfg["run_name"] == job.id and cfg["data"]["task"] == "chat"
    assert cfg["data"]["path"].endswith(f"/files/{cfg['data']['path'].split('/')[-2]}/{FILES['tuner-a']}.jsonl")
    assert (cfg["training"]["num_epochs"], cfg["training"]["seed"], cfg["lora"]["r"], cfg["tracking"]["register_as"]) == (2, 7, 4, "tuner-a~ft-intent")
    assert a.fine_tuning.jobs.retrieve(job.id) == job
    JOBS.append(job.id)
    # the newer `method` form
    for i in range(3):
        JOBS.append(a.fine_tuning.jobs.create(model=BASE, training_file=FILES["tuner-a"], suffix=f"m{i}",
                                              method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}}).id)
    assert a.fine_tuning.jobs.retrieve(JOBS[-1]).hyperparameters.batch_size == 4
    page = a.fine_tuning.jobs.list(limit=3)
    assert [j.id for j in page.data] == JOBS[::-1][:3] and page.has_more
    assert [j.id for j in a.fine_tuning.jobs.list(limit=3)] == JOBS[::-1]  # the client pages on with `after`
    events = a.fine_tuning.jobs.list_events(job.id)
    assert all(isinstance(e, FineTuningJobEvent) for e in events.data)
    assert [e.message for e in events.data] == [f"Validating training file: {FILES['tuner-a']}", f"Created fine-tuning job: {job.id}"]
    assert a.fine_tuning.jobs.checkpoints.list(job.id).data == []
    cancelled = a.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert a.fine_tuning.jobs.retrieve(job.id).status == "cancelled" and a.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert a.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "Fine-tuning job cancelled."


@pytest.mark.parametrize("kwargs, status, code, param", [
    ({"model": "gpt-4o-mini"}, 400, "model_not_available", "model"),
    ({"training_file": "file-" + "0" * 24}, 400, "invalid_training_file", "training_file"),
    ({"validation_file": "file-" + "0" * 24}, 400, "invalid_validation_file", "validation_file"),
    ({"hyperparameters": {"batch_size": 3}}, 400, "invalid_hyperparameters", "hyperparameters.batch_size"),
    ({"hyperparameters": {"r": 64}}, 400, "invalid_hyperparameters", "hyperparameters.r"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "invalid_value", "hyperparameters.n_epochs"),
    ({"hyperparameters": {"lora_alpha": -1}}, 400, "invalid_hyperparameters", "hyperparameters.lora_alpha"),
    ({"method": {"type": "dpo", "dpo": {}}}, 400, "invalid_value", "method.type"),
    ({"suffix": "../../x"}, 400, "invalid_value", "suffix"),
    ({"suffix": "s" * 65}, 400, "invalid_value", "suffix"),  # OpenAI: up to 64 characters
])
def test_bad_requests_are_400s_naming_the_field_and_store_nothing(http, served, kwargs, status, code, param):
    a = client_for(served, KEYS["tuner-a"])
    before = [j.id for j in a.fine_tuning.jobs.list(limit=100)]
    with pytest.raises(openai.APIStatusError) as exc:
        a.fine_tuning.jobs.create(**{"model": BASE, "training_file": FILES["tuner-a"], **kwargs})
    error(exc, status, code, param)
    assert [j.id for j in a.fine_tuning.jobs.list(limit=100)] == before


def test_another_tenant_gets_404_and_cannot_use_the_files_and_the_admin_sees_all(http, served):
    a, b = client_for(served, KEYS["tuner-a"]), client_for(served, KEYS["tuner-b"])
    mine, missing = JOBS[1], "ftjob-" + "0" * 24
    for call in (b.fine_tuning.jobs.retrieve, b.fine_tuning.jobs.cancel, b.fine_tuning.jobs.list_events, b.fine_tuning.jobs.checkpoints.list):
        answers = []
        for job_id in (mine, missing):
            with pytest.raises(openai.NotFoundError) as exc:
                call(job_id)
            answers.append(error(exc, 404, "fine_tuning_job_not_found")["message"].replace(job_id, "<id>"))
        assert answers[0] == answers[1]
    assert a.fine_tuning.jobs.retrieve(mine).status == "validating_files"  # b's cancel changed nothing
    assert b.fine_tuning.jobs.list().data == []
    # a's file is no more usable to b than a missing one
    answers = []
    for file_id in (FILES["tuner-a"], "file-" + "0" * 24):
        with pytest.raises(openai.BadRequestError) as exc:
            b.fine_tuning.jobs.create(model=BASE, training_file=file_id)
        answers.append(error(exc, 400, "invalid_training_file", "training_file")["message"].replace(file_id, "<id>"))
    assert answers[0] == answers[1]
    own = b.fine_tuning.jobs.create(model=BASE, training_file=FILES["tuner-b"])
    assert (own.organization_id, own.status) == ("tuner-b", "validating_files")
    admin = client_for(served, ADMIN_KEY)
    seen = {j.id: j.organization_id for j in admin.fine_tuning.jobs.list(limit=100)}
    assert {mine: "tuner-a", own.id: "tuner-b"}.items() <= seen.items()
    assert admin.fine_tuning.jobs.retrieve(mine).id == mine and admin.fine_tuning.jobs.cancel(own.id).status == "cancelled"
    with pytest.raises(openai.PermissionDeniedError) as exc:
        admin.fine_tuning.jobs.create(model=BASE, training_file=FILES["tuner-b"])
    error(exc, 403, "admin_key_not_allowed")
    assert http.get("/v1/fine_tuning/jobs").status_code == 401  # anonymous model calls are allowed here, jobs never
    assert http.post("/v1/fine_tuning/jobs", json={"model": BASE, "training_file": FILES["tuner-a"]}).status_code == 401


def test_operators_list_show_and_cancel_jobs_with_the_cli(http, served, tmp_path, capsys):
    import yaml

    from lorafleet.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(served.cfg.model_dump(mode="json")))
    assert main(["jobs", "list", "--config", str(config), "--tenant", "tuner-a", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in listed] == JOBS and {c["tenant"] for c in listed} == {"tuner-a"}
    assert main(["jobs", "list", "--config", str(config), "--tenant", "tuner-a"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["job", "tenant", "status", "created", "fine-tuned", "model"]
    assert [r.split()[:3] for r in rows] == [[c["id"], "tuner-a", c["status"]] for c in listed] and all(r.endswith("-") for r in rows)
    assert main(["jobs", "show", JOBS[2], "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["run_name"] == JOBS[2] and shown["events"][-1]["message"] == f"Created fine-tuning job: {JOBS[2]}"
    assert main(["jobs", "cancel", JOBS[2], "--config", str(config)]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert client_for(served, KEYS["tuner-a"]).fine_tuning.jobs.retrieve(JOBS[2]).status == "cancelled"
    assert main(["jobs", "show", "ftjob-" + "0" * 24, "--config", str(config)]) == 1
