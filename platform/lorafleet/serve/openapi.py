"""The server's OpenAPI document: FastAPI's routes plus what FastAPI cannot see.

The OpenAI routes take vLLM's own request models as their bodies, so FastAPI publishes those
schemas itself. The management routes still read their JSON bodies themselves; this adds
their schemas from the field table Tenancy validates against (``lorafleet.serve.tenancy.BODIES``),
the error shape, and bearer authentication. The running server publishes the result at ``/openapi.json``
(``/docs`` renders it); ``make docs`` commits a copy as ``docs/openapi.json``::

    python -m lorafleet.serve.openapi > docs/openapi.json
"""

from __future__ import annotations

import json
from typing import Any

REF = "#/components/schemas/{model}"
PUBLIC = ("/health", "/ready", "/metrics")
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}},
    "description": "OpenAI's error shape. lorafleet's own refusals name the case in `code` (invalid_api_key, model_not_found, "
                   "max_tokens_too_large, adapter_exists, version_conflict, rate_limit_exceeded, overloaded, ...); errors vLLM's "
                   "OpenAI layer raises (sampling parameters, context length, structured outputs) carry the HTTP status as `code`, "
                   "as vLLM's own server does. README: Serve / errors.",
}


# (path, method) -> (request body schema, required)
ROUTE_BODIES = {
    ("/v1/adapters", "post"): ("AdapterRegister", True),
    ("/v1/adapters/{name}", "put"): ("AdapterReplace", True),
    ("/v1/adapters/{name}", "patch"): ("AdapterPin", True),
    ("/admin/tenants", "post"): ("TenantCreate", True),
    ("/admin/tenants/{tenant}", "patch"): ("TenantUpdate", True),
    ("/admin/tenants/{tenant}/keys", "post"): ("KeyCreate", False),
}


def build_openapi(app) -> dict[str, Any]:
    """The complete document for the FastAPI ``app`` of :mod:`lorafleet.serve.server`."""
    from fastapi.openapi.utils import get_openapi

    import lorafleet
    from lorafleet.serve.tenancy import BODIES, REQUIRED_FIELDS

    doc = get_openapi(title=app.title, version=lorafleet.__version__, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, fields in BODIES.items():
        schemas[name] = {"type": "object", "additionalProperties": False, "required": REQUIRED_FIELDS.get(name, []),
                         "properties": {f: {**schema, "description": text} for f, (schema, text) in fields.items()}}
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "A tenant's API key (`lfk_...`; model, /v1/adapters and /v1/files routes) or the admin key (/admin routes; every tenant's /v1/files)."}}
    error = {"description": "Error (OpenAI shape)", "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    for (path, method), (name, required) in ROUTE_BODIES.items():
        doc["paths"][path][method]["requestBody"] = {
            "required": required, "content": {"application/json": {"schema": {"$ref": REF.format(model=name)}}}}
    for path, operations in doc["paths"].items():
        for op in operations.values():
            op["responses"].pop("422", None)  # FastAPI's own validation error shape is never returned
            op["responses"]["4XX"] = error
            op["responses"]["5XX"] = error
            if path not in PUBLIC:
                op["security"] = [{"bearer": []}]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc


def main() -> int:
    from lorafleet.serve.server import api

    print(json.dumps(api.openapi(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
