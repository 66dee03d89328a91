"""What lorafleet adds to vLLM's request checks: the body bound, the server's own caps, refused fields.

vLLM's request models validate every OpenAI and vLLM parameter; this module only holds the
limits a multi-tenant server sets on top (``limits`` in the serve config) and the fields it
refuses on purpose:

* ``BodyLimit``: a body larger than ``limits.max_body_bytes`` is a 413 before anything parses it
  (the file upload, ``app.state.streamed_bodies``, streams its body under its own limit).
* :func:`apply_limits`: ``max_tokens`` / ``max_completion_tokens`` above ``limits.max_tokens``
  (400 ``max_tokens_too_large``), ``n`` or the number of prompts above ``limits.max_n``.
* :func:`refused_fields`: fields that would reach past the caller's tenant. vLLM's KV-transfer
  fields (``kv_transfer_params``, ``ec_transfer_params``) address other requests' cache blocks
  in disaggregated serving; lorafleet runs no KV connector and refuses them with a 400 naming
  the field instead of passing them on.
"""

from __future__ import annotations

import json
from typing import Optional

from lorafleet.serve.errors import OpenAIError, bad_request

REFUSED_FIELDS = ("kv_transfer_params", "ec_transfer_params")
_WITH_BODY = {"POST", "PUT", "PATCH"}


class BodyLimit:
    """ASGI middleware: reads a request body up to ``app.state.max_body_bytes`` and answers 413 beyond it.

    The body is read here once and replayed to the route, so no route ever sees more than the
    limit (FastAPI would otherwise read a body of any size before the route runs).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            return await self.app(scope, receive, send)
        state = scope["app"].state if "app" in scope else None
        limit: Optional[int] = getattr(state, "max_body_bytes", None)
        path, root = scope["path"], scope.get("root_path", "")  # the route's path within the app (Serve mounts it at a prefix)
        if limit is None or (path[len(root):] if root and path.startswith(root) else path) in getattr(state, "streamed_bodies", ()):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _answer_413(limit, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _answer_413(limit, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


async def _answer_413(limit: int, send) -> None:
    err = OpenAIError(413, f"The request body is larger than this server's limit of {limit} bytes.", "invalid_request_error", None,
                      "request_too_large")
    payload = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


INT64_MAX = 2**63 - 1


def _beyond_int64(value, path: str):
    """The first integer in ``value`` (nested lists and dicts, digit-string keys too) outside int64, as (path, value)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (path, value) if not -INT64_MAX - 1 <= value <= INT64_MAX else None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _beyond_int64(item, f"{path}.{i}")
            if found:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and key.lstrip("-").isdigit() and len(key) > 18 and _beyond_int64(int(key), path):
                return f"{path}.{key}", int(key)
            found = _beyond_int64(item, f"{path}.{key}")
            if found:
                return found
    return None


def integers_in_range(request) -> None:
    """400 for an integer no engine type holds (beyond int64): vLLM passes some straight to torch and C++,
    where they fail as a 500 (seen: top_k = 2**64 + 1)."""
    for name in request.model_fields_set:
        found = _beyond_int64(getattr(request, name, None), name)
        if found:
            where, value = found
            raise bad_request(f"`{where}` ({value}) is outside the range of a 64-bit integer.", where, "invalid_value")


def refused_fields(request) -> None:
    """400 naming a field lorafleet refuses on purpose (see the module docstring)."""
    for name in REFUSED_FIELDS:
        if name in request.model_fields_set and getattr(request, name, None) is not None:
            raise bad_request(f"`{name}` is not accepted by this server: it addresses engine state beyond your own request "
                              "(disaggregated KV transfer is not enabled here).", name, "unsupported_parameter")


def apply_limits(kind: str, request, limits) -> None:
    """The server's caps on one completions or chat request (400 naming the parameter)."""
    cap = limits.max_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if value is not None and value > cap:
            raise bad_request(f"{name} ({value}) is above this server's limit of {cap}.", name, "max_tokens_too_large")
    n = request.n or 1
    if n > limits.max_n:
        raise bad_request(f"n ({n}) is above this server's limit of {limits.max_n}.", "n")
    if kind == "completions":
        prompt = request.prompt
        count = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
        if count > limits.max_n:
            raise bad_request(f"At most {limits.max_n} prompts per request (got {count}).", "prompt")
