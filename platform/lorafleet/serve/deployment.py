"""The two Ray Serve deployments of the app.

``OpenAIIngress`` (FastAPI via ``@serve.ingress``) owns HTTP: body limits, request
validation, routing by the request's ``model``, SSE framing, OpenAI-shaped errors and
``/metrics``. It calls ``EngineDeployment`` through a handle; for an adapter it sets
``multiplexed_model_id`` to the adapter's name, so Serve's router prefers a replica that
already has the adapter and otherwise the replica holding the fewest (Ray Serve model
multiplexing). Every engine replica has the whole catalogue, so any replica can serve any
adapter; the preference only saves loads.

``EngineDeployment`` holds one :class:`AdapterEngine` (one vLLM ``AsyncLLM``). Its
``@serve.multiplexed`` loader resolves an adapter to a local folder (downloading it from
the registry when not done at start) and returns the :class:`Adapter`; vLLM itself loads the
weights on first use and evicts them by LRU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.serve.adapters import Adapter, AdapterError
from lorafleet.serve.config import ServeConfig
from lorafleet.serve.metrics import CONTENT_TYPE, ServeMetrics
from lorafleet.serve.protocol import OpenAIError, bad_request, overloaded, parse_request, unknown_model

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-lorafleet-replica"


# --------------------------------------------------------------------------- engine


class EngineDeployment:
    """One vLLM engine with every configured adapter. Options come from ``app.build_app``."""

    async def __init__(self, config: dict):
        from lorafleet.serve.generation import AdapterEngine

        self.cfg = ServeConfig.model_validate(config)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (direct use in tests)
            replica = "local"
        self.core = await AdapterEngine.start(self.cfg, replica)
        slots = self.cfg.engine.max_cpu_loras or self.cfg.engine.max_loras

        async def load_adapter(name: str) -> Adapter:
            try:
                return await self.core.catalog.resolve_async(name)
            except AdapterError as exc:
                raise OpenAIError(500, f"The adapter `{name}` could not be prepared: {exc}", "server_error", "model", "adapter_load_failed") from None

        # Serve's multiplexed cache mirrors vLLM's host-memory LRU (same capacity, same order
        # of use), so what this replica reports to the router is what vLLM most likely holds.
        self._adapter = serve.multiplexed(max_num_models_per_replica=slots)(load_adapter)

    async def _adapter_for(self, model: str) -> Optional[Adapter]:
        if model == self.cfg.base_model_name:
            return None
        if model not in self.core.catalog:
            raise unknown_model(model, [self.cfg.base_model_name, *self.core.catalog.names])
        return await self._adapter(model)

    async def complete(self, request) -> dict:
        """Non-streaming: ``{"response": ..., "meta": ...}``."""
        result: dict = {}
        async for item in self.core.generate(request, await self._adapter_for(request.model)):
            result.update(item)
        return result

    async def stream(self, request) -> AsyncIterator[dict]:
        """Streaming: ``{"chunk": ...}`` items, then ``{"meta": ...}``."""
        adapter = await self._adapter_for(request.model)
        async for item in self.core.generate(request, adapter):
            yield item

    async def check_health(self) -> None:
        await self.core.check_health()

    async def ready(self) -> dict:
        await self.core.check_health()
        return {"replica": self.core.replica, "adapters": self.core.adapter_activity()}

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


# --------------------------------------------------------------------------- ingress

api = FastAPI(title="lorafleet", description="OpenAI-compatible multi-LoRA server (lorafleet).")


def _error_response(exc: OpenAIError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError):
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error_response(bad_request(f"Invalid request: {exc.errors()[:3]}"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {exc.detail}" if exc.status_code in (404, 405) else str(exc.detail)
    return _error_response(OpenAIError(exc.status_code, message, kind))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(as_openai_error(exc))


def as_openai_error(exc: BaseException) -> OpenAIError:
    """Map anything a handle call can raise to an OpenAI error (never a traceback)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, OpenAIError):
        return exc
    cause = getattr(exc, "cause", None)  # RayTaskError wraps what the replica raised
    if isinstance(cause, OpenAIError):
        return cause
    if isinstance(exc, BackPressureError) or isinstance(cause, BackPressureError):
        err = exc if isinstance(exc, BackPressureError) else cause
        queued, limit = err.args[0], err.args[1]  # BackPressureError keeps its numbers in args only
        return overloaded(f"The server is at capacity ({queued} requests already queued, limit {limit}); retry later.")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return overloaded("No engine replica is available right now (starting or restarting); retry later.")
    return OpenAIError(500, f"Internal server error ({type(cause or exc).__name__}); the server log has the details.", "server_error", None, "internal_error")


@serve.ingress(api)
class OpenAIIngress:
    """HTTP front of the app: OpenAI routes, health, readiness, metrics."""

    def __init__(self, config: dict, engine):
        self.cfg = ServeConfig.model_validate(config)
        self.engine = engine
        self.metrics = ServeMetrics()
        self.adapter_names = [a.name for a in self.cfg.adapters]
        self.created = int(time.time())

    # -- helpers

    async def _read_json(self, request: Request) -> Any:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = OpenAIError(413, f"The request body is larger than this server's limit of {limit} bytes.", "invalid_request_error", None, "request_too_large")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except ValueError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None

    def _handle_for(self, model: str):
        if model == self.cfg.base_model_name:
            return self.engine
        if model in self.adapter_names:
            return self.engine.options(multiplexed_model_id=model)
        raise unknown_model(model, [self.cfg.base_model_name, *self.adapter_names])

    def _metrics_model(self, model: Optional[str]) -> str:
        return model if model == self.cfg.base_model_name or model in self.adapter_names else "unknown"

    def _record_meta(self, meta: dict) -> None:
        if meta.get("replica") and "adapters" in meta:
            self.metrics.adapters.update(meta["replica"], meta["adapters"])

    async def _openai(self, kind: str, request: Request) -> Response:
        started = time.monotonic()
        endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        model: Optional[str] = None
        self.metrics.in_flight.inc()
        try:
            body = await self._read_json(request)
            parsed = parse_request(kind, body)
            model = parsed.model
            handle = self._handle_for(model)
            if parsed.stream:
                stream = handle.options(stream=True).stream.remote(parsed)
                first = await stream.__anext__()  # every rejection happens before the first item
                return StreamingResponse(self._sse(first, stream, model, endpoint, started), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache"})
            result = await handle.complete.remote(parsed)
            meta = result.get("meta", {})
            self._record_meta(meta)
            self.metrics.observe(model, endpoint, 200, time.monotonic() - started, meta.get("ttft_s"), meta.get("usage"))
            return JSONResponse(result["response"], headers={REPLICA_HEADER: str(meta.get("replica", ""))})
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            err = as_openai_error(exc)
            if err.status >= 500 and err.code == "internal_error":
                log.error("request to %s for model %r failed: %r", endpoint, model, exc)
            self.metrics.observe(self._metrics_model(model), endpoint, err.status, time.monotonic() - started)
            return _error_response(err)
        finally:
            self.metrics.in_flight.dec()

    async def _sse(self, first: dict, stream, model: str, endpoint: str, started: float) -> AsyncIterator[str]:
        """Server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``."""
        status, ttft, meta = 200, None, {}
        self.metrics.in_flight.inc()  # the request is in flight until its stream ends
        try:
            item = first
            while True:
                if "chunk" in item:
                    if ttft is None and any(c.get("text") or (c.get("delta") or {}).get("content") for c in item["chunk"]["choices"]):
                        ttft = time.monotonic() - started
                    yield f"data: {json.dumps(item['chunk'])}\n\n"
                elif "meta" in item:
                    meta = item["meta"]
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # client went away: stop generating
            status = 499
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - mid-stream failure: an error event, then the end
            err = as_openai_error(exc)
            status = err.status
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            self._record_meta(meta)
            self.metrics.observe(model, endpoint, status, time.monotonic() - started, ttft, meta.get("usage"))
            self.metrics.in_flight.dec()

    # -- routes

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai("completions", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai("chat", request)

    @api.get("/v1/models")
    async def models(self) -> dict:
        base = self.cfg.base_model_name
        cards = [{"id": base, "object": "model", "created": self.created, "owned_by": "lorafleet", "root": self.cfg.model, "parent": None}]
        cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "lorafleet", "root": name, "parent": base}
                  for name in self.adapter_names]
        return {"object": "list", "data": cards}

    @api.get("/health")
    async def health(self) -> Response:
        """Liveness of the app: this ingress answers and an engine replica's engine is alive."""
        try:
            await self.engine.check_health.remote()
        except Exception as exc:  # noqa: BLE001
            return _error_response(overloaded(f"engine unhealthy: {as_openai_error(exc).message}"))
        return JSONResponse({"status": "ok"})

    @api.get("/ready")
    async def ready(self) -> Response:
        """Readiness: the app is fully deployed (no replica starting) and an engine answers."""
        try:
            status = (await asyncio.to_thread(serve.status)).applications.get(serve.get_replica_context().app_name)
            app_status = str(getattr(getattr(status, "status", None), "value", "UNKNOWN"))
            info = await self.engine.ready.remote()
        except Exception as exc:  # noqa: BLE001
            return _error_response(overloaded(f"not ready: {as_openai_error(exc).message}"))
        if not app_status.endswith("RUNNING"):
            return _error_response(overloaded(f"not ready: application status is {app_status}"))
        return JSONResponse({"status": "ready", "application": app_status, "models": [self.cfg.base_model_name, *self.adapter_names],
                             "replica": info["replica"]})

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)
