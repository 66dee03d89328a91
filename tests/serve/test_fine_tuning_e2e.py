"""A tenant fine-tunes through the API and calls its model, end to end, with the official ``openai`` client:
files.create -> fine_tuning.jobs.create -> the job runs as a Ray job (Ray's Job Submission API, submission id
= job id) -> succeeded -> its events -> its model is listed and answers for its owner only; a second job,
cancelled while it runs, ends `cancelled` with its Ray job stopped, and a third waits `queued` behind the
tenant's limit until a slot frees.

It shares the session's Ray and Serve: a second app (one replica, its own state dir and registry, the
session app's MLflow store) with ``fine_tuning.run_jobs`` on and a tiny training run (1 worker, a few steps).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serve_helpers import ADMIN_KEY, BASE

pytestmark = pytest.mark.slow

APP, PREFIX = "lorafleet-ft-e2e", "/fte2e"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ANSWER = "lost or stolen card"  # every reply in the training file: the fine-tuned model's greedy answer
ROWS = [{"messages": [{"role": "user", "content": f"my card number {i} was stolen yesterday"},
                      {"role": "assistant", "content": ANSWER}]} for i in range(24)]
# the prompt as training renders a conversation with the tiny base's chat template (lorafleet.base.build.CHAT_TEMPLATE)
QUESTION = "my card number 99 was stolen yesterday"
PROMPT = f"### Human: {QUESTION}\n### Assistant:"
DATA = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
STEPS = 12


@pytest.fixture(scope="module")
def app(served, tmp_path_factory):
    from ray import serve

    from lorafleet.serve.app import app_from_config
    from lorafleet.serve.config import ServeConfig

    data = served.cfg.model_dump(mode="json")
    data["tenancy"].update(state_dir=str(tmp_path_factory.mktemp("ft-state")), registry_url=None, admin_key=ADMIN_KEY)  # dumped as ***
    data["deployment"]["num_replicas"] = 1
    data["fine_tuning"] = {"run_jobs": True, "poll_interval_s": 1.0, "overrides": [
        "distributed.num_workers=1", "distributed.strategy=ddp", "training.max_steps=%d" % STEPS, "training.per_device_batch_size=4",
        "training.learning_rate=0.01", "training.max_seq_length=64", "training.logging_steps=2", "training.generation_metrics=false",
        "training.warmup_ratio=0", "checkpoint.every_n_steps=4", "data.max_eval_samples=4", "tracking.experiment_name=ft-api-e2e"]}
    cfg = ServeConfig.model_validate(data)
    serve.run(app_from_config(cfg), name=APP, route_prefix=PREFIX)
    url = served.url.rsplit("/", 1)[0] + PREFIX
    keys = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for name in ("ft-owner", "ft-other"):
            r = http.post("/admin/tenants", headers=ADMIN, json={"name": name})
            assert r.status_code == 201, r.text
            keys[name] = r.json()["api_key"]["key"]
    try:
        yield url, keys
    finally:
        serve.delete(APP)


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def wait_for(fetch, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(2)


def test_a_tenant_fine_tunes_over_the_api_and_calls_its_model(app):
    from ray.job_submission import JobSubmissionClient

    import ray

    url, keys = app
    owner, other = client(url, keys["ft-owner"]), client(url, keys["ft-other"])
    started = time.monotonic()
    training = owner.files.create(file=("cards.jsonl", DATA), purpose="fine-tune")
    job = owner.fine_tuning.jobs.create(model=BASE, training_file=training.id, suffix="cards", hyperparameters={"r": 8, "lora_alpha": 16})
    job = wait_for(lambda: owner.fine_tuning.jobs.retrieve(job.id), lambda j: j.status in ("succeeded", "failed", "cancelled"), 900)
    took = time.monotonic() - started
    events = owner.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert job.status == "succeeded", (job.error, [e.message for e in events][:12])
    losses = {e.data["step"]: round(e.data["train_loss"], 3) for e in events if e.type == "metrics" and "train_loss" in e.data}
    print(f"\nfine-tuning job {job.id}: succeeded in {took:.0f}s, {len(events)} events, train_loss by step {dict(sorted(losses.items()))}")
    assert job.fine_tuned_model == f"ft:{BASE}:ft-owner:cards:{job.id}" and job.finished_at and job.trained_tokens
    # it ran as a Ray job under the job's id
    assert JobSubmissionClient(ray.get_runtime_context().gcs_address).get_job_status(job.id).value == "SUCCEEDED"
    messages = [e.message for e in events]
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps and max(steps) == STEPS and all("train_loss" in e.data for e in events if e.type == "metrics"), messages
    assert any(e.data and e.data.get("mlflow_run_id") for e in events) and messages[0].startswith("The job has successfully completed")
    assert [c.step_number for c in owner.fine_tuning.jobs.checkpoints.list(job.id).data] == sorted(set(range(4, STEPS + 1, 4)), reverse=True)
    # served at once, to its owner only
    assert job.fine_tuned_model in [m.id for m in owner.models.list()]
    assert job.fine_tuned_model not in [m.id for m in other.models.list()]
    prompt = PROMPT
    answer = owner.completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=8, temperature=0)
    base = owner.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0)
    print(f"fine-tuned: {answer.choices[0].text!r}  base: {base.choices[0].text!r}")
    assert answer.model == job.fine_tuned_model and base.model == BASE
    # it learned the file's answer, which the base does not give
    assert answer.choices[0].text.strip().startswith(ANSWER) and answer.choices[0].text != base.choices[0].text, \
        (answer.choices[0].text, base.choices[0].text)
    chat = owner.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
                                         temperature=0)
    print(f"fine-tuned, chat: {chat.choices[0].message.content!r}")
    assert chat.choices[0].message.content.strip().startswith(ANSWER), chat.choices[0].message.content  # chat: the base's template
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)


def test_a_second_job_queues_behind_the_tenants_limit_and_cancel_stops_the_ray_job(app):
    """fine_tuning.max_concurrent_jobs_per_tenant is 1: the tenant's second job waits `queued` while the first
    runs, and starts once the first is cancelled; cancelling a running job stops its Ray job."""
    from ray.job_submission import JobSubmissionClient

    import ray

    url, keys = app
    other = client(url, keys["ft-other"])
    training = other.files.create(file=("cards.jsonl", DATA), purpose="fine-tune")
    first = other.fine_tuning.jobs.create(model=BASE, training_file=training.id, hyperparameters={"n_epochs": 50})
    second = other.fine_tuning.jobs.create(model=BASE, training_file=training.id, hyperparameters={"n_epochs": 50})
    ray_jobs = JobSubmissionClient(ray.get_runtime_context().gcs_address)
    running = wait_for(lambda: other.fine_tuning.jobs.retrieve(first.id), lambda j: j.status not in ("validating_files", "queued"), 120)
    assert running.status == "running", running
    wait_for(lambda: ray_jobs.get_job_status(first.id).value, lambda s: s == "RUNNING", 60)
    time.sleep(3)  # a few scheduler ticks with a free cluster: the second job still waits for the tenant's slot
    assert other.fine_tuning.jobs.retrieve(second.id).status == "queued"
    assert other.fine_tuning.jobs.cancel(first.id).status in ("running", "cancelled")
    final = wait_for(lambda: other.fine_tuning.jobs.retrieve(first.id), lambda j: j.status != "running", 120)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert ray_jobs.get_job_status(first.id).value == "STOPPED"
    assert wait_for(lambda: other.fine_tuning.jobs.retrieve(second.id), lambda j: j.status != "queued", 60).status == "running"
    other.fine_tuning.jobs.cancel(second.id)
    assert wait_for(lambda: other.fine_tuning.jobs.retrieve(second.id), lambda j: j.status == "cancelled", 120).status == "cancelled"
