"""The one Ray Serve deployment of the app: ``LoRAServer``, FastAPI ingress and vLLM engine in one replica.

Serve's proxy hands each HTTP request to a replica; that replica authenticates it, maps the
request's ``model`` to the exact adapter version the caller may use (:mod:`.tenancy`),
applies limits and quotas, and runs it through vLLM's own OpenAI serving classes on its own
engine (:mod:`.frontend`). There is no second deployment and no handle call on the request
path; the design and the order of the checks are in ``docs/serving.md``.

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``,
``/detokenize`` (OpenAI / vLLM), ``/v1/adapters`` (a tenant's runtime adapters), ``/v1/files`` and ``/v1/fine_tuning`` (lorafleet.ftapi),
``/admin/*`` (tenants and keys), ``/health``, ``/ready``, ``/metrics``.

Every ``tenancy.poll_interval_s`` the replica re-reads the registry, pins/unpins and unloads
retired adapter versions (:mod:`.slots`), and publishes what its engine holds and its metric
counts (so that ``/metrics`` on any replica reports the whole app).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

from lorafleet.ftapi.routes import attach as attach_ftapi, mount as mount_ftapi
from lorafleet.serve.adapters import Adapter, AdapterError
from lorafleet.serve.config import ServeConfig
from lorafleet.serve.errors import OpenAIError, bad_request, overloaded
from lorafleet.serve.limits import BodyLimit, apply_limits, integers_in_range, refused_fields
from lorafleet.serve.metrics import CONTENT_TYPE, ServeMetrics

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-lorafleet-replica"
ADAPTER_VERSION_HEADER = "x-lorafleet-adapter-version"
MAX_LOCAL_ADAPTERS = 4096  # resolved runtime versions remembered per replica (a long-running replica sees every version)
_GENERATED = re.compile(r'"(?:text|content)":"[^"]')  # a streamed chunk that carries generated text
METRICS_PUBLISH_S = 1.0  # how stale another replica's counts in a /metrics scrape may be
ENGINE_STATE_MAX_AGE_S = 30.0  # what vLLM holds is re-read at least this often for /admin/engines and adapter status

api = FastAPI(title="lorafleet", description="OpenAI-compatible multi-LoRA server (lorafleet): completions and chat over one base "
              "model and many LoRA adapters through vLLM's own OpenAI layer, per-tenant adapter management with hot-swap, "
              "tenant administration.")
api.add_middleware(BodyLimit)
mount_ftapi(api)  # /v1/files, /v1/fine_tuning/jobs (lorafleet.ftapi)


def _openapi() -> dict:
    """FastAPI's document (the OpenAI bodies are the routes' pydantic models) completed by lorafleet.serve.openapi, built once."""
    if api.openapi_schema is None:
        from lorafleet.serve.openapi import build_openapi

        api.openapi_schema = build_openapi(api)
    return api.openapi_schema


api.openapi = _openapi


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


def vllm_error_response(err) -> JSONResponse:
    """vLLM's ``ErrorResponse`` as it answers it (status in ``error.code``); a 503 tells clients when to retry."""
    headers = {"Retry-After": "1"} if err.error.code == 503 else None
    return JSONResponse(err.model_dump(), status_code=err.error.code, headers=headers)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError):
    return error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(bad_request(f"The request body is not valid JSON: {first.get('msg')}", None, "invalid_json"))
    parts = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5])
    return error_response(bad_request(f"Invalid request: {parts}", ".".join(loc) or None, "invalid_value"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {exc.detail}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(OpenAIError(exc.status_code, message, kind))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return as_response(exc)


def as_response(exc: BaseException) -> JSONResponse:
    """Anything the request path can raise, as an error response (never a traceback).

    lorafleet's own refusals keep their status and code; what vLLM raises is mapped by vLLM's
    own ``create_error_response`` (validation 400, not found 404, ...), as vLLM's server does.
    """
    from vllm.entrypoints.serve import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, OpenAIError):
        return error_response(exc)
    if isinstance(exc, RecursionError):  # e.g. a JSON body nested thousands deep: Python's parser gives up
        return error_response(bad_request("The request body is nested too deeply to parse.", None, "invalid_json"))
    if isinstance(exc, EngineDeadError):
        return error_response(overloaded("The inference engine of this replica failed and is being restarted; retry the request."))
    if isinstance(exc, AdapterError):  # e.g. another node's copy changed since registration (409)
        return error_response(OpenAIError(exc.status, f"The adapter could not be prepared: {exc}", "invalid_request_error", "model",
                                          "adapter_load_failed"))
    return vllm_error_response(create_error_response(exc))


@serve.ingress(api)
class LoRAServer:
    """HTTP front and vLLM engine of one replica. Options come from ``app.build_app``."""

    async def __init__(self, config: dict):
        from lorafleet.serve.frontend import Frontend
        from lorafleet.serve.tenancy import Tenancy

        self.cfg = ServeConfig.model_validate(config)
        try:
            context = serve.get_replica_context()
            replica, app_name = context.replica_id.unique_id, context.app_name
        except Exception:  # noqa: BLE001 - outside Serve (direct use in tests)
            replica, app_name = "local", "lorafleet"
        self.frontend = await Frontend.start(self.cfg, replica)
        self.tenancy = await asyncio.to_thread(Tenancy, self.cfg, None, app_name)
        self.metrics = ServeMetrics(self.frontend.replica)
        self.created = int(time.time())
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes
        attach_ftapi(api.state, self.cfg, self.tenancy)
        # Completions and chat requests this replica holds (running in vLLM or waiting in its queue);
        # past the bound a request gets 503 + Retry-After at once, in OpenAI's shape (app.py sizes
        # Serve's own limit above it, so Serve's plain-text back-pressure never answers first).
        self.admission_bound = self.cfg.deployment.max_ongoing_requests + self.cfg.limits.max_queued_requests
        self.generating = 0
        self._local: OrderedDict[int, Adapter] = OrderedDict()  # lora id -> the version's checked folder on this node
        self._published: Optional[tuple] = None
        self._published_counts: Optional[dict] = None
        self._published_at = 0.0
        self._engine_state: dict = {}
        self._engine_changes = -1
        self._engine_read_at = 0.0
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    # ------------------------------------------------------------------ the registry

    async def _sync_forever(self) -> None:
        """Every poll interval: reload the registry if it changed, match the engine to it, publish state and metrics."""
        while True:
            try:
                await self.tenancy.poll_once()
                await self._sync()
            except Exception as exc:  # noqa: BLE001 - a registry outage must not kill the replica; retried next tick
                log.warning("registry sync failed (retrying): %r", exc)
            await asyncio.sleep(self.cfg.tenancy.poll_interval_s)

    async def _sync(self) -> None:
        from lorafleet.serve.slots import engine_lora_state

        core, snapshot = self.frontend, self.tenancy.view.snapshot
        live = set(snapshot.live_lora_ids) | {core.catalog.lora_id(n) for n in core.catalog.names}
        pinned = {}
        for record in snapshot.pinned():
            tenant = snapshot.tenants.get(record.tenant_id)
            display = f"{tenant.name if tenant else record.tenant_id}/{record.name}"
            core.adapter_names[record.lora_id] = display
            pinned[record.lora_id] = Adapter(display, record.source, record.lora_id, record.path, record.content_hash, True)
        await core.slots.sync(live, pinned)
        core.forget(live | set(core.slots.in_flight))
        # vLLM's own list is read only when it may have changed (LoRASlots.changes) and at least
        # every ENGINE_STATE_MAX_AGE_S: each read is an RPC after which the engine's worker
        # busy-polls for a second, so reading it every tick kept an idle replica at 100% of a core.
        changes = core.slots.changes
        if changes != self._engine_changes or time.monotonic() - self._engine_read_at > ENGINE_STATE_MAX_AGE_S:
            self._engine_state = await engine_lora_state(core.engine) or {}
            self._engine_changes, self._engine_read_at = changes, time.monotonic()
        state = dict(self._engine_state)
        state["in_flight"] = sorted(core.slots.in_flight)
        state["pinned"] = sorted(core.slots.pinned)
        state["cpu_lora_patch"] = core.cpu_lora_patch
        counts = self.metrics.snapshot(core.adapter_activity())
        key = tuple((k, str(v)) for k, v in sorted(state.items()))
        since = time.monotonic() - self._published_at
        # adapter state at once; changed counts at most every METRICS_PUBLISH_S (vLLM's gauges move on every step)
        if key != self._published or (since > METRICS_PUBLISH_S and counts != self._published_counts) or since > 5:
            await asyncio.to_thread(self.tenancy.registry.publish_replica_state, core.replica, {**state, "metrics": counts})
            self._published, self._published_counts, self._published_at = key, counts, time.monotonic()

    # ------------------------------------------------------------------ the request path

    async def _caller(self, request: Request):
        return await self.tenancy.caller(request.headers.get("authorization"))

    async def _adapter(self, route) -> Optional[Adapter]:
        """The admitted version as a checked folder on this node (None: the base)."""
        if route.kind == "base":
            return None
        if route.kind == "shared":
            return await self.frontend.catalog.resolve_async(route.model)
        record = route.record
        local = self._local.get(record.lora_id)
        if local is None:
            wanted = Adapter(route.metrics_label, record.source, record.lora_id, record.path, record.content_hash)
            local = await asyncio.to_thread(self.frontend.catalog.store.ensure_local, wanted)
            self._local[record.lora_id] = local
            if len(self._local) > MAX_LOCAL_ADAPTERS:
                self._local.popitem(last=False)
        self._local.move_to_end(record.lora_id)
        self.frontend.adapter_names[record.lora_id] = route.metrics_label
        return local

    async def _generate(self, kind: str, request: Union[CompletionRequest, ChatCompletionRequest], raw: Request) -> Response:
        started = time.monotonic()
        endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        label, ticket, handed_over = "unknown", None, False
        self.metrics.in_flight.inc()
        self.generating += 1
        try:
            caller = await self._caller(raw)
            refused_fields(request)
            integers_in_range(request)
            if caller.tenant is not None:  # prefix-cache blocks are never shared across tenants (no timing side channel)
                request.cache_salt = f"tenant-{caller.tenant.id}:{request.cache_salt or ''}"
            route = await self.tenancy.route(caller, request.model)
            label = route.metrics_label
            if self.generating > self.admission_bound:
                raise overloaded(f"The server is at capacity ({self.generating - 1} requests in this replica, limit {self.admission_bound}); "
                                 "retry later.")
            apply_limits(kind, request, self.cfg.limits)
            adapter = await self._adapter(route)
            ticket = await self.tenancy.admit(caller)
            result = await self.frontend.generate(kind, request, raw, adapter, route.model)
            headers = {REPLICA_HEADER: self.frontend.replica}
            if route.record is not None:
                headers[ADAPTER_VERSION_HEADER] = str(route.record.version)
            if hasattr(result, "__aiter__"):
                handed_over = True  # the stream now owns the ticket
                return StreamingResponse(self._sse(result, raw, label, endpoint, started, ticket), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache", **headers})
            if hasattr(result, "error"):  # vLLM's ErrorResponse
                self.metrics.observe(label, endpoint, result.error.code, time.monotonic() - started)
                return vllm_error_response(result)
            use = result.usage.model_dump() if result.usage else None
            if ticket is not None and use:
                ticket.tokens = use.get("total_tokens", 0)
            self.metrics.observe(label, endpoint, 200, time.monotonic() - started, None, use)
            return JSONResponse(result.model_dump(), headers=headers)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI-shaped error
            response = as_response(exc)
            if response.status_code >= 500:
                log.error("request to %s for model %r failed: %r", endpoint, label, exc)
            self.metrics.observe(label, endpoint, response.status_code, time.monotonic() - started)
            return response
        finally:
            if not handed_over:
                self.generating -= 1
                if ticket is not None:
                    await asyncio.shield(ticket.release())  # a cancelled request still gives its quota back
            self.metrics.in_flight.dec()

    async def _sse(self, chunks: AsyncIterator[str], raw: Request, model: str, endpoint: str, started: float, ticket) -> AsyncIterator[str]:
        """vLLM's SSE strings as they come; metrics and the quota ticket when the stream ends."""
        status, ttft, use = 200, None, None
        self.metrics.in_flight.inc()  # the request is in flight until its stream ends
        try:
            async for chunk in chunks:
                if ttft is None and _GENERATED.search(chunk):
                    ttft = time.monotonic() - started
                if chunk.startswith('data: {"error"'):
                    status = 500
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):  # client went away: closing vLLM's generator aborts the request
            status = 499
            raise
        finally:
            metadata = getattr(raw.state, "request_metadata", None)
            final = getattr(metadata, "final_usage_info", None)
            use = final.model_dump() if final is not None else None
            if ticket is not None:
                ticket.tokens = (use or {}).get("total_tokens", 0)
                await asyncio.shield(ticket.release())
            self.metrics.observe(model, endpoint, status, time.monotonic() - started, ttft, use)
            self.metrics.in_flight.dec()
            self.generating -= 1

    # ------------------------------------------------------------------ OpenAI routes

    @api.post("/v1/completions")
    async def completions(self, request: CompletionRequest, raw_request: Request) -> Response:
        return await self._generate("completions", request, raw_request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await self._generate("chat", request, raw_request)

    async def _tokenization(self, request, raw: Request, op: str) -> Response:
        try:
            caller = await self._caller(raw)
            if request.model:
                route = await self.tenancy.route(caller, request.model)
                self.frontend.bind(request, await self._adapter(route))
            else:
                request.model = self.cfg.base_model_name
            result = await getattr(self.frontend.tokenization, op)(request, raw)
            if hasattr(result, "error"):
                return vllm_error_response(result)
            return JSONResponse(result.model_dump())
        except Exception as exc:  # noqa: BLE001
            return as_response(exc)

    @api.post("/tokenize")
    async def tokenize(self, request: TokenizeRequest, raw_request: Request) -> Response:
        """The prompt (or chat messages, with the chat template) as the base's token ids (vLLM's /tokenize)."""
        return await self._tokenization(request, raw_request, "create_tokenize")

    @api.post("/detokenize")
    async def detokenize(self, request: DetokenizeRequest, raw_request: Request) -> Response:
        """Token ids as text (vLLM's /detokenize)."""
        return await self._tokenization(request, raw_request, "create_detokenize")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def work():
            caller = await self._caller(request)
            base = self.cfg.base_model_name
            cards = []
            for name in self.tenancy.visible_models(caller):
                root, parent = (self.cfg.model, None) if name == base else (name, base)
                cards.append({"id": name, "object": "model", "created": self.created, "owned_by": caller.label if name not in
                              (base, *self.tenancy.shared) else "lorafleet", "root": root, "parent": parent,
                              "max_model_len": self.frontend.max_model_len})
            return {"object": "list", "data": cards}
        return await self._json(work)

    # ------------------------------------------------------------------ management (manage.py holds the logic)

    async def _json(self, work, status: int = 200) -> Response:
        """Run a management coroutine factory; OpenAI-shaped errors on failure."""
        try:
            return JSONResponse(await work(), status_code=status)
        except Exception as exc:  # noqa: BLE001
            response = as_response(exc)
            if response.status_code >= 500:
                log.error("management request failed: %r", exc)
            return response

    async def _read_json(self, request: Request) -> Any:
        body = await request.body()  # BodyLimit has bounded it
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None

    async def _body(self, request: Request, body: Union[bool, str]) -> tuple:
        """The JSON body as an extra argument when the route takes one (``"optional"``: None when empty)."""
        if not body:
            return ()
        if body == "optional" and request.headers.get("content-length") in (None, "0"):
            return (None,)
        return (await self._read_json(request),)

    async def _tenant_call(self, request: Request, op, *args, body: Union[bool, str] = False, status: int = 200) -> Response:
        """``op(caller, *args[, body])`` for the tenant behind the request's key."""
        async def work():
            caller = await self._caller(request)
            return await op(caller, *args, *(await self._body(request, body)))
        return await self._json(work, status)

    async def _admin_call(self, request: Request, op, *args, body: Union[bool, str] = False, status: int = 200) -> Response:
        """``op(*args[, body])`` after checking the admin key."""
        async def work():
            self.tenancy.require_admin(request.headers.get("authorization"))
            return await op(*args, *(await self._body(request, body)))
        return await self._json(work, status)

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.list)

    @api.post("/v1/adapters", status_code=201)
    async def register_adapter(self, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.register, body=True, status=201)

    @api.get("/v1/adapters/{name:path}")
    async def get_adapter(self, name: str, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.get, name)

    @api.put("/v1/adapters/{name:path}")
    async def replace_adapter(self, name: str, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.replace, name, body=True)

    @api.patch("/v1/adapters/{name:path}")
    async def pin_adapter(self, name: str, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.set_pin, name, body=True)

    @api.delete("/v1/adapters/{name:path}")
    async def delete_adapter(self, name: str, request: Request) -> Response:
        return await self._tenant_call(request, self.tenancy.delete, name)

    @api.post("/admin/tenants", status_code=201)
    async def create_tenant(self, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.create_tenant, body=True, status=201)

    @api.get("/admin/tenants")
    async def list_tenants(self, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.list_tenants)

    @api.patch("/admin/tenants/{tenant}")
    async def update_tenant(self, tenant: str, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.update_tenant, tenant, body=True)

    @api.delete("/admin/tenants/{tenant}")
    async def delete_tenant(self, tenant: str, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.delete_tenant, tenant)

    @api.post("/admin/tenants/{tenant}/keys", status_code=201)
    async def create_key(self, tenant: str, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.create_key, tenant, body="optional", status=201)

    @api.delete("/admin/tenants/{tenant}/keys/{key_id}")
    async def revoke_key(self, tenant: str, key_id: str, request: Request) -> Response:
        return await self._admin_call(request, self.tenancy.revoke_key, tenant, key_id)

    @api.get("/admin/engines")
    async def engines(self, request: Request) -> Response:
        """What each live replica last published: adapters (vLLM's own list_loras, pins, in flight), CPU LoRA patch state."""
        async def states():
            return {"replicas": {r: {k: v for k, v in s.items() if k != "metrics"} for r, s in (await self.tenancy.replica_states()).items()}}
        return await self._admin_call(request, states)

    # ------------------------------------------------------------------ operations

    async def check_health(self) -> None:
        """Serve's health check: raises when the engine is dead, so Serve replaces the replica."""
        await self.frontend.check_health()

    @api.get("/health")
    async def health(self) -> Response:
        """Liveness: this replica answers and its engine is alive."""
        try:
            await self.frontend.check_health()
        except Exception as exc:  # noqa: BLE001
            return error_response(overloaded(f"engine unhealthy: {exc!r}"))
        return JSONResponse({"status": "ok"})

    @api.get("/ready")
    async def ready(self) -> Response:
        """Readiness: the app is fully deployed (no replica starting) and this replica's engine answers."""
        try:
            status = (await asyncio.to_thread(serve.status)).applications.get(serve.get_replica_context().app_name)
            app_status = str(getattr(getattr(status, "status", None), "value", "UNKNOWN"))
            await self.frontend.check_health()
        except Exception as exc:  # noqa: BLE001
            return error_response(overloaded(f"not ready: {exc!r}"))
        if not app_status.endswith("RUNNING"):
            return error_response(overloaded(f"not ready: application status is {app_status}"))
        return JSONResponse({"status": "ready", "application": app_status, "models": [self.cfg.base_model_name, *self.tenancy.shared],
                             "replica": self.frontend.replica})

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        """Prometheus text summed over the app's live replicas; the admin key sees every series, a tenant only its own adapters'."""
        try:
            scope = await self.tenancy.metrics_scope(request.headers.get("authorization"))
            others = {r: s.get("metrics") for r, s in (await self.tenancy.replica_states()).items() if r != self.frontend.replica}
        except OpenAIError as err:
            return error_response(err)
        mine = self.metrics.snapshot(self.frontend.adapter_activity())
        return Response(self.metrics.render(scope, [mine, *(m for m in others.values() if m)]), media_type=CONTENT_TYPE)

    def __del__(self):
        task = getattr(self, "_sync_task", None)
        if task is not None:
            task.cancel()
        frontend = getattr(self, "frontend", None)
        if frontend is not None:
            try:
                frontend.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
