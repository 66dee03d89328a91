"""OpenAI request schemas, the error type and response shapes of the server.

Requests are pydantic models with ``extra="forbid"``: a field the OpenAI API does not
define is a 400 ("Unrecognized request argument supplied"), and a field it defines but
this server does not implement (``tools``, ``suffix``, ``response_format`` other than
text...) is a 400 naming it, never silently ignored. Errors are ``OpenAIError`` and leave
the server as OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# --------------------------------------------------------------------------- errors


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


def unknown_model(model: str, available: list[str]) -> OpenAIError:
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    return OpenAIError(404, f"The model `{model}` does not exist on this server. Available: {shown}. GET /v1/models lists them.",
                       "invalid_request_error", "model", "model_not_found")


RETRY_AFTER_S = 1  # what a 503 tells clients to wait: queues drain in about a request's time


def overloaded(message: str) -> OpenAIError:
    """503 with ``Retry-After``: the OpenAI client (and most HTTP clients) back off and retry."""
    return OpenAIError(503, message, "server_error", None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)})


def validation_error_to_openai(exc: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the parameter (all of them in the message)."""
    errors = exc.errors()
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return bad_request("Invalid request: " + "; ".join(parts), param, "invalid_value")


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


Stop = Optional[Union[str, list[str]]]


class _Sampling(BaseModel):
    """Fields common to completions and chat."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # OpenAI parameters this server does not implement: part of the schema only so that
    # using one gives a 400 naming it rather than "unrecognized argument".
    _unsupported: ClassVar[tuple[str, ...]] = ()

    model: str = Field(description="The base model's name or an adapter's name.")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Stop = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, description="End-user id (recorded nowhere; accepted for compatibility).")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # Many clients send `"temperature": null` for "not set": treat null as the default.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed (got {len(stops)})")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {bias} for token {key})")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self

    def unsupported_fields(self) -> list[str]:
        """OpenAI parameters set in this request that this server does not implement."""
        return [name for name in self._unsupported if getattr(self, name) not in (None, False, [])]

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    _unsupported: ClassVar[tuple[str, ...]] = ("suffix",)

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"`best_of` ({self.best_of}) other than `n` ({self.n}) is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("`echo` together with `logprobs` is not supported by this server (prompt logprobs)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` must not be an empty list")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _only_text(cls, v):
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported by this server (only 'text')")
        return v


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    _unsupported: ClassVar[tuple[str, ...]] = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
                    "prediction", "reasoning_effort", "web_search_options", "service_tier")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    audio: Optional[Any] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[Any] = None
    service_tier: Optional[str] = None

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs: true`")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give one of `max_tokens` and `max_completion_tokens` (they differ)")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        # Chat templates know system/user/assistant; OpenAI's newer `developer` role is a system message.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_request(kind: str, body: Any) -> Union[CompletionRequest, ChatCompletionRequest]:
    """Validate a JSON body for ``kind`` ("completions" or "chat"); raise OpenAIError(400)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = CompletionRequest if kind == "completions" else ChatCompletionRequest
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_openai(exc) from None
    for name in request.unsupported_fields():
        raise bad_request(f"`{name}` is not supported by this server.", name, "unsupported_parameter")
    return request


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """vLLM's finish reason in OpenAI's vocabulary (stop / length)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
