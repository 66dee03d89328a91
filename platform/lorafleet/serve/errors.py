"""The server's error type, rendered in OpenAI's shape, and the few constructors every module shares.

::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

vLLM's serving classes answer their own errors (``ErrorResponse``, with the HTTP status as
``code``); lorafleet's own refusals (keys, tenants, quotas, limits) are :class:`OpenAIError`
with a string ``code`` naming the case.
"""

from __future__ import annotations

from typing import Optional


class OpenAIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error object.

    All constructor arguments go to ``Exception.__init__`` so the error survives pickling
    across Ray (a replica raises it, the ingress catches it).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(status, message, type, param, code, headers)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429, WWW-Authenticate on a 401

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


RETRY_AFTER_S = 1  # what a 503 tells clients to wait: queues drain in about a request's time


def overloaded(message: str) -> OpenAIError:
    """503 with ``Retry-After``: the OpenAI client (and most HTTP clients) back off and retry."""
    return OpenAIError(503, message, "server_error", None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)})
