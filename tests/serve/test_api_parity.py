"""API parity with vLLM's own server, through a tenant's own adapter and the official ``openai`` client.

Every request field vLLM's OpenAI layer handles reaches it (the server runs vLLM's serving
classes): structured outputs (``response_format`` json_schema and json_object), a forced named
tool call, vLLM's sampling extras (``top_k``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``), prompt logprobs, ``/tokenize`` and ``/detokenize``.
Runs on the session's app (conftest ``served``: ``tool_call_parser: hermes``, JSON without
free whitespace, as a small model needs).
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve_helpers import ADMIN_KEY, BASE, EXTREMES, MAX_NEW_TOKENS, numeric_fields

pytestmark = pytest.mark.slow

TENANT = "parity"


@pytest.fixture(scope="module")
def tenant(served, serve_assets):
    """A tenant with its own adapter (a copy of gamma registered through /v1/adapters): (key, adapter name)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(f"{served.url}/admin/tenants", headers=admin, json={"name": TENANT}, timeout=60)
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]["key"]
    registered = httpx.post(f"{served.url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                            json={"name": "own-gamma", "source": str(serve_assets.adapters["gamma"])})
    assert registered.status_code == 201, registered.text
    return key, "own-gamma"


@pytest.fixture(scope="module")
def client(served, tenant):
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=tenant[0], max_retries=2, timeout=120)


def test_json_schema_response_format_gives_json_that_validates(client, tenant, serve_assets):
    import jsonschema

    schema = {"type": "object", "properties": {"intent": {"type": "string", "enum": ["card_arrival", "refund", "exchange_rate"]}},
              "required": ["intent"], "additionalProperties": False}
    chat = client.chat.completions.create(model=tenant[1], messages=serve_assets.chat_messages, max_tokens=40, temperature=0,
                                          response_format={"type": "json_schema", "json_schema": {"name": "intent", "schema": schema}})
    assert chat.model == tenant[1] and chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)


def test_json_object_response_format_gives_a_json_object(client, tenant, serve_assets):
    chat = client.chat.completions.create(model=tenant[1], messages=serve_assets.chat_messages, max_tokens=60, temperature=0,
                                          response_format={"type": "json_object"})
    text = chat.choices[0].message.content
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # out of tokens inside the object: what was produced is still a JSON object's beginning
        assert text.lstrip().startswith("{"), text


def test_a_forced_named_tool_call_has_arguments_that_validate(client, tenant, serve_assets):
    import jsonschema

    # bounded values only: a tiny model asked for a free integer may write digits until max_tokens
    parameters = {"type": "object", "properties": {"reason": {"type": "string", "enum": ["lost", "stolen"]}, "notify": {"type": "boolean"}},
                  "required": ["reason", "notify"], "additionalProperties": False}
    # strict: the arguments must follow the schema (OpenAI's strict function calling; vLLM enforces it with a grammar)
    tools = [{"type": "function", "function": {"name": "block_card", "description": "Block a payment card.", "parameters": parameters,
                                               "strict": True}}]
    # The tiny test model pads with whitespace inside the tool-call envelope, where vLLM's grammar allows it,
    # until max_tokens; a frequency penalty steers it on (a trained model needs none).
    chat = client.chat.completions.create(model=tenant[1], messages=serve_assets.chat_messages, max_tokens=128, temperature=0, tools=tools,
                                          tool_choice={"type": "function", "function": {"name": "block_card"}}, frequency_penalty=2.0)
    calls = chat.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "block_card", chat
    jsonschema.validate(json.loads(calls[0].function.arguments), parameters)


def test_vllm_sampling_extras_are_accepted_and_honoured(client, tenant, serve_assets):
    prompt = serve_assets.prompts[0]

    def text(**extra) -> str:
        c = client.completions.create(model=BASE, prompt=prompt, max_tokens=24, temperature=0, extra_body=extra)
        return c.choices[0].text

    greedy = text()
    # top_k=1 makes sampling at temperature 1 greedy
    sampled = client.completions.create(model=BASE, prompt=prompt, max_tokens=24, temperature=1.0, seed=3, extra_body={"top_k": 1})
    assert sampled.choices[0].text == greedy
    # a strong repetition penalty changes a greedy continuation of this length
    assert text(repetition_penalty=3.0) != greedy
    # min_tokens with ignore_eos: exactly the requested length, past the adapter's usual stop
    own = client.completions.create(model=tenant[1], prompt=prompt, max_tokens=20, temperature=0,
                                    extra_body={"min_tokens": 20, "ignore_eos": True})
    assert own.usage.completion_tokens == 20 and own.choices[0].finish_reason == "length"
    # prompt logprobs: one entry per prompt token (the first has none)
    raw = httpx.post(f"{client.base_url}completions", headers={"Authorization": f"Bearer {tenant[0]}"}, timeout=120,
                     json={"model": tenant[1], "prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1}).json()
    tokens = httpx.post(f"{str(client.base_url)[:-len('v1/')]}tokenize", json={"model": tenant[1], "prompt": prompt},
                        headers={"Authorization": f"Bearer {tenant[0]}"}, timeout=60).json()["tokens"]
    assert len(raw["choices"][0]["prompt_logprobs"]) == len(tokens) and raw["choices"][0]["prompt_logprobs"][0] is None


def test_tokenize_and_detokenize_round_trip(served, tenant, serve_assets):
    headers = {"Authorization": f"Bearer {tenant[0]}"}
    prompt = serve_assets.prompts[1]
    tok = httpx.post(f"{served.url}/tokenize", headers=headers, json={"model": tenant[1], "prompt": prompt}, timeout=60)
    assert tok.status_code == 200, tok.text
    from transformers import AutoTokenizer

    assert tok.json()["tokens"] == AutoTokenizer.from_pretrained(serve_assets.base)(prompt).input_ids
    back = httpx.post(f"{served.url}/detokenize", headers=headers, json={"model": tenant[1], "tokens": tok.json()["tokens"]}, timeout=60)
    assert back.status_code == 200 and back.json()["prompt"].strip() == prompt.strip(), back.text
    # chat messages through the base's chat template
    chat = httpx.post(f"{served.url}/tokenize", headers=headers, json={"model": tenant[1], "messages": serve_assets.chat_messages}, timeout=60)
    assert chat.status_code == 200 and chat.json()["count"] > len(tok.json()["tokens"]) // 4
    # another tenant's adapter name is as unknown here as on the generation routes
    assert httpx.post(f"{served.url}/tokenize", json={"model": "parity/own-gamma", "prompt": "x"}, timeout=60).status_code == 404


def test_another_tenant_cannot_reach_the_adapter_with_any_of_these_features(served, tenant):
    import openai

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    other = httpx.post(f"{served.url}/admin/tenants", headers=admin, json={"name": "parity-other"}, timeout=60).json()["api_key"]["key"]
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=other, max_retries=0, timeout=60)
    for name in (tenant[1], f"{TENANT}/{tenant[1]}"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_NEW_TOKENS,
                                           response_format={"type": "json_object"})


# --------------------------------------------------------------------------- bad input never gets a 5xx

def test_every_numeric_field_at_and_past_its_limits_gets_an_answer_not_a_5xx(served, tenant):
    """Each numeric parameter of both generation routes at 0, negative, 2^31, 2^63, 2^64+1, 10^40, +-1e308:
    a 200 or a 4xx in OpenAI's shape, never a 5xx, and the engine still answers afterwards
    (the full cross product and random bodies run in `make reliability`)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    headers = {"Authorization": f"Bearer {tenant[0]}"}
    routes = [("/v1/completions", CompletionRequest, {"model": tenant[1], "prompt": "my card", "max_tokens": 1}),
              ("/v1/chat/completions", ChatCompletionRequest, {"model": tenant[1], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})]
    failures, tried = [], 0
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        for path, model, base in routes:
            for field in numeric_fields(model):
                for value in EXTREMES:
                    r = http.post(path, json={**base, field: value})
                    tried += 1
                    if r.status_code >= 500 or set(r.json()) - {"error"} and r.status_code != 200:
                        failures.append((path, field, value, r.status_code, r.text[:200]))
        assert tried > 150 and not failures, failures[:10]
        ok = http.post("/v1/completions", json={**routes[0][2], "max_tokens": 4})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body", [
    {"prompt": [[[[["deep"]]]]]},                                              # nesting where a string or ids belong
    {"prompt": [1] * 20000},                                                   # far past the context, as token ids
    {"prompt": "word " * 12000},                                               # far past the context, as text (within the body limit)
    {"prompt": "x", "stop": ["s"] * 2000},                                     # a huge stop list
    {"prompt": "x", "logit_bias": {str(i): 1 for i in range(3000)}},          # a huge logit_bias
    {"prompt": "x", "logit_bias": {"99999999999999999999": 1}},               # a token id too large for any integer type
    {"prompt": "x", "stop_token_ids": [2**63, -5]},
    {"prompt": "x", "allowed_token_ids": [10**30]},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        f"p{i}": {"type": "object"} for i in range(500)}}}}},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
    {"prompt": "x", "top_k": 2**64 + 1},                                       # once a 500 from inside vLLM
    {"prompt": "x", "seed": -(2**70)},
    "lone-surrogate",                                                          # valid JSON, but no text: a lone \ud800 escape
])
def test_structurally_extreme_bodies_get_an_answer_not_a_5xx(served, tenant, body):
    headers = {"Authorization": f"Bearer {tenant[0]}", "content-type": "application/json"}
    if body == "lone-surrogate":
        content = json.dumps({"model": tenant[1], "max_tokens": 2, "prompt": "a"}).replace('"a"', '"\\ud800"').encode()
    else:
        content = json.dumps({"model": tenant[1], "max_tokens": 2, **body}).encode()
    r = httpx.post(f"{served.url}/v1/completions", headers=headers, timeout=120, content=content)
    assert r.status_code < 500, r.text[:300]
    if r.status_code != 200:
        assert set(r.json()) == {"error"} and r.json()["error"]["message"], r.text[:300]
