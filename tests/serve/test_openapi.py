"""The HTTP API reference: the OpenAPI document the server publishes is complete (request bodies,
auth, errors), valid, and committed as docs/openapi.json (a test keeps the copy current)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def document() -> dict:
    from lorafleet.serve.server import api

    return json.loads(json.dumps(api.openapi()))


def test_committed_copy_is_current(document):
    assert DOC.is_file(), "docs/openapi.json is missing: run `make docs`"
    assert json.loads(DOC.read_text()) == document, "docs/openapi.json is stale: run `make docs` and commit it"


def test_document_is_valid_openapi(document):
    """schemathesis (the API fuzzer) loads every operation of it without a schema error."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]  # .ok() raises on a broken operation
    assert len(operations) == sum(len(ops) for ops in document["paths"].values()) >= 17


def _validator(document: dict, name: str):
    import jsonschema

    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.parametrize("name, good, bad", [
    ("CompletionRequest", {"model": "intent", "prompt": ["a", "b"], "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
     {"model": "intent", "prompt": "a", "max_tokens": "eight"}),
    ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
     {"model": "m"}),
    ("AdapterRegister", {"name": "intent-v1", "source": "models:/demo-intent/1", "pin": True}, {"name": "intent-v1"}),
    ("AdapterReplace", {"source": "models:/demo-intent/2", "expected_version": 1}, {"source": "x", "surprise": 1}),
    ("TenantCreate", {"name": "acme", "quotas": {"requests_per_minute": 600}}, {"name": "acme", "quotas": {"rpm": 600}}),
])
def test_request_bodies_are_described(document, name, good, bad):
    """Bodies the server accepts validate against the published schema; bodies it refuses do not."""
    v = _validator(document, name)
    assert not list(v.iter_errors(good))
    assert list(v.iter_errors(bad))


def test_openai_bodies_are_vllms_own_request_models(document):
    """The OpenAI routes take vLLM's request models, so every parameter vLLM's server accepts is
    published (structured outputs, tools, vLLM's sampling extras), from the code itself."""
    schemas = document["components"]["schemas"]
    completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    assert {"top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "prompt_logprobs", "response_format"} <= set(completion)
    assert {"tools", "tool_choice", "response_format", "top_k", "repetition_penalty", "max_completion_tokens"} <= set(chat)
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    assert {"/tokenize", "/detokenize"} <= set(document["paths"])


def test_operations_carry_auth_and_error_shape(document):
    paths = document["paths"]
    assert paths["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/health"]["get"]
    assert paths["/v1/adapters"]["post"]["responses"].keys() >= {"201", "4XX"}
    assert paths["/admin/tenants"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/TenantCreate")
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "type"]


def test_files_routes_publish_openais_file_objects(document):
    """/v1/files takes OpenAI's multipart upload and answers the `openai` package's own FileObject / FileDeleted."""
    paths, schemas = document["paths"], document["components"]["schemas"]
    upload = paths["/v1/files"]["post"]
    assert upload["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["file", "purpose"]
    assert upload["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FileObject")
    assert paths["/v1/files/{file_id}"]["delete"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FileDeleted")
    assert {"/v1/files/{file_id}", "/v1/files/{file_id}/content"} <= set(paths) and upload["security"] == [{"bearer": []}]
    assert {"id", "bytes", "created_at", "filename", "purpose", "status"} <= set(schemas["FileObject"]["required"])
