"""The two Ray Serve deployments of the app.

``OpenAIIngress`` (FastAPI via ``@serve.ingress``) owns HTTP: API keys, body limits, request
validation, routing by the request's ``model``, quotas, SSE framing, OpenAI-shaped errors,
``/v1/adapters`` (a tenant's runtime adapters), ``/admin/*`` (tenants and keys) and
``/metrics``; the tenancy logic lives in :mod:`lorafleet.serve.tenancy`. It calls
``EngineDeployment`` through a handle; for an adapter it sets ``multiplexed_model_id`` (the
adapter's name for config adapters, ``lora-<id>`` for a runtime adapter version), so
Serve's router prefers a replica that already has the adapter and otherwise the replica
holding the fewest (Ray Serve model multiplexing). Any replica can serve any adapter; the
preference only saves loads.

A runtime adapter request carries the exact version the ingress admitted (its ``ref``), so
a replace never changes what an admitted request runs on. ``EngineDeployment`` holds one
:class:`AdapterEngine` (one vLLM ``AsyncLLM``); its ``@serve.multiplexed`` loader makes sure
the adapter's checked folder exists on this node, and vLLM loads the weights on first use.
Every ``tenancy.poll_interval_s`` the replica re-reads the registry, pins/unpins and unloads
retired versions (:mod:`lorafleet.serve.slots`) and publishes what its engine holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Optional, Union

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
ADAPTER_VERSION_HEADER = "x-lorafleet-adapter-version"
MAX_REMEMBERED_REFS = 4096
ENGINE_STATE_MAX_AGE_S = 30.0  # what vLLM holds is re-read at least this often for /admin/engines and adapter status


# --------------------------------------------------------------------------- engine


async def coalesce(items: AsyncIterator[Any]) -> AsyncIterator[list]:
    """Yield ``items`` in lists: each list holds everything produced since the last was taken.

    A streamed token crosses two Ray hops (engine replica -> ingress -> Serve's proxy); paying
    them per token made the hop, not the model, the limit at high concurrency on a small base.
    A reader that keeps up gets one-item lists (no added latency); one that falls behind gets
    larger lists. An error raised by ``items`` is raised here after the items before it, and
    closing this generator (a client that went away) cancels ``items``, so vLLM aborts.
    """
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for item in items:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there
            queue.put_nowait(_Raised(exc))
        finally:
            queue.put_nowait(end)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch, done = [await queue.get()], False
            while not queue.empty():
                batch.append(queue.get_nowait())
            if batch[-1] is end:
                batch.pop()
                done = True
            if batch and isinstance(batch[-1], _Raised):
                if batch[:-1]:
                    yield batch[:-1]
                raise batch[-1].exc
            if batch:
                yield batch
            if done:
                return
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class EngineDeployment:
    """One vLLM engine with every configured adapter. Options come from ``app.build_app``."""

    async def __init__(self, config: dict):
        from lorafleet.serve.generation import AdapterEngine
        from lorafleet.serve.registry import Registry, RegistryView

        self.cfg = ServeConfig.model_validate(config)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (direct use in tests)
            replica = "local"
        self.core = await AdapterEngine.start(self.cfg, replica)
        self.registry = await asyncio.to_thread(Registry, self.cfg.registry_url())
        self.view = await asyncio.to_thread(RegistryView, self.registry)
        # multiplexed id of a runtime adapter version -> its ref, set just before loading; the most
        # recent ones only (a long-running replica sees every version ever registered)
        self._refs: OrderedDict[str, dict] = OrderedDict()
        slots = self.cfg.engine.max_cpu_loras or self.cfg.engine.max_loras

        async def load_adapter(model_id: str) -> Adapter:
            try:
                if model_id in self.core.catalog:
                    return await self.core.catalog.resolve_async(model_id)
                ref = self._refs[model_id]
                adapter = Adapter(ref["display"], ref["source"], ref["lora_id"], ref["path"], ref["content_hash"])
                return await asyncio.to_thread(self.core.catalog.store.ensure_local, adapter)
            except AdapterError as exc:  # e.g. another node's copy changed since registration (409)
                raise OpenAIError(exc.status, f"The adapter `{model_id}` could not be prepared: {exc}", "invalid_request_error",
                                  "model", "adapter_load_failed") from None

        # Serve's multiplexed cache mirrors vLLM's host-memory LRU (same capacity, same order
        # of use), so what this replica reports to the router is what vLLM most likely holds.
        self._adapter = serve.multiplexed(max_num_models_per_replica=slots)(load_adapter)
        self._published: Optional[tuple] = None
        self._published_at = 0.0
        self._engine_state: dict = {}
        self._engine_changes = -1
        self._engine_read_at = 0.0
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    # -- the registry

    async def _sync_forever(self) -> None:
        """Every poll interval: reload the registry if it changed, match the engine to it, publish what the engine holds."""
        while True:
            try:
                await asyncio.to_thread(self.view.refresh)
                await self._sync()
            except Exception as exc:  # noqa: BLE001 - a registry outage must not kill the replica; retried next tick
                log.warning("registry sync failed (retrying): %r", exc)
            await asyncio.sleep(self.cfg.tenancy.poll_interval_s)

    async def _sync(self) -> None:
        from lorafleet.serve.slots import engine_lora_state

        snapshot = self.view.snapshot
        live = set(snapshot.live_lora_ids) | {self.core.catalog.lora_id(n) for n in self.core.catalog.names}
        if self.core.base_stand_in is not None:
            live.add(self.core.base_stand_in.lora_id)
        pinned = {}
        for record in snapshot.pinned():
            tenant = snapshot.tenants.get(record.tenant_id)
            display = f"{tenant.name if tenant else record.tenant_id}/{record.name}"
            self.core.adapter_names[record.lora_id] = display
            pinned[record.lora_id] = Adapter(display, record.source, record.lora_id, record.path, record.content_hash, True)
        await self.core.slots.sync(live, pinned)
        # vLLM's own list is read only when it may have changed (LoRASlots.changes) and at least
        # every ENGINE_STATE_MAX_AGE_S: each read is an RPC after which the engine's worker
        # busy-polls for a second, so reading it every tick kept an idle replica at 100% of a core.
        changes = self.core.slots.changes
        if changes != self._engine_changes or time.monotonic() - self._engine_read_at > ENGINE_STATE_MAX_AGE_S:
            self._engine_state = await engine_lora_state(self.core.engine) or {}
            self._engine_changes, self._engine_read_at = changes, time.monotonic()
        state = dict(self._engine_state)
        state["in_flight"] = sorted(self.core.slots.in_flight)
        state["pinned"] = sorted(self.core.slots.pinned)
        key = tuple((k, str(v)) for k, v in sorted(state.items()))
        if key != self._published or time.monotonic() - self._published_at > 5:
            await asyncio.to_thread(self.registry.publish_replica_state, self.core.replica, state)
            self._published, self._published_at = key, time.monotonic()

    # -- requests

    async def _adapter_for(self, model: str, ref: Optional[dict]) -> Optional[Adapter]:
        if ref is not None:  # a runtime adapter: exactly the version the ingress admitted
            if ref["lora_id"] not in self.view.snapshot.live_lora_ids:
                # Registered a moment ago through the ingress: catch up now, so that the sync
                # never takes a live version for a retired one.
                await asyncio.to_thread(self.view.refresh)
            key = f"lora-{ref['lora_id']}"
            self._refs[key] = ref
            self._refs.move_to_end(key)
            if len(self._refs) > MAX_REMEMBERED_REFS:
                self._refs.popitem(last=False)
            self.core.adapter_names[ref["lora_id"]] = ref["display"]
            return await self._adapter(key)
        if model == self.cfg.base_model_name:
            return None
        if model not in self.core.catalog:
            raise unknown_model(model, [self.cfg.base_model_name, *self.core.catalog.names])
        return await self._adapter(model)

    async def complete(self, request, ref: Optional[dict] = None) -> dict:
        """Non-streaming: ``{"response": ..., "meta": ...}``."""
        result: dict = {}
        async for item in self.core.generate(request, await self._adapter_for(request.model, ref)):
            result.update(item)
        return result

    async def stream(self, request, ref: Optional[dict] = None) -> AsyncIterator[list[dict]]:
        """Streaming: lists of ``{"chunk": ...}`` items, the last list ending with ``{"meta": ...}``.

        Each list is what the engine produced while the ingress was reading the previous one
        (see :func:`coalesce`), so a busy replica pays one handle hop per batch, not per token.
        """
        adapter = await self._adapter_for(request.model, ref)
        async for batch in coalesce(self.core.generate(request, adapter)):
            yield batch

    async def check_health(self) -> None:
        await self.core.check_health()

    async def ready(self) -> dict:
        await self.core.check_health()
        return {"replica": self.core.replica, "adapters": self.core.adapter_activity()}

    def __del__(self):
        task = getattr(self, "_sync_task", None)
        if task is not None:
            task.cancel()
        core = getattr(self, "core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


# --------------------------------------------------------------------------- ingress

api = FastAPI(title="lorafleet", description="OpenAI-compatible multi-LoRA server (lorafleet): completions and chat over one base "
              "model and many LoRA adapters, per-tenant adapter management with hot-swap, tenant administration.")


def _openapi() -> dict:
    """FastAPI's document completed with the request bodies and auth (lorafleet.serve.openapi), built once."""
    if api.openapi_schema is None:
        from lorafleet.serve.openapi import build_openapi

        api.openapi_schema = build_openapi(api)
    return api.openapi_schema


api.openapi = _openapi


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


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
    """HTTP front of the app: OpenAI routes, adapter management, tenant admin, health, readiness, metrics."""

    def __init__(self, config: dict, engine):
        from lorafleet.serve.tenancy import Tenancy

        self.cfg = ServeConfig.model_validate(config)
        self.engine = engine
        self.metrics = ServeMetrics()
        self.tenancy = Tenancy(self.cfg)
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
            data = json.loads(body)
        except ValueError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None
        if b"\\ud" in body.lower():  # a \ud800-\udfff escape: valid JSON, but a lone one is no text (tokenizers reject it)
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("The request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                                  "strings must be valid Unicode.", None, "invalid_unicode") from None
        return data

    def _handle_for(self, route):
        if route.multiplexed_id is None:
            return self.engine
        return self.engine.options(multiplexed_model_id=route.multiplexed_id)

    def _record_meta(self, meta: dict) -> None:
        if meta.get("replica") and "adapters" in meta:
            self.metrics.adapters.update(meta["replica"], meta["adapters"])

    async def _caller(self, request: Request):
        self.tenancy.start()
        return await self.tenancy.caller(request.headers.get("authorization"))

    async def _openai(self, kind: str, request: Request) -> Response:
        started = time.monotonic()
        endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        label, ticket, handed_over = "unknown", None, False
        self.metrics.in_flight.inc()
        try:
            caller = await self._caller(request)
            body = await self._read_json(request)
            parsed = parse_request(kind, body)
            route = await self.tenancy.route(caller, parsed.model)
            label = route.metrics_label
            ticket = self.tenancy.admit(caller)
            handle, ref = self._handle_for(route), route.ref()
            headers = {ADAPTER_VERSION_HEADER: str(route.record.version)} if route.record else {}
            if parsed.stream:
                stream = handle.options(stream=True).stream.remote(parsed, ref)
                first = await stream.__anext__()  # every rejection happens before the first item
                handed_over = True  # the stream now owns the ticket
                return StreamingResponse(self._sse(first, stream, label, endpoint, started, ticket), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache", **headers})
            result = await handle.complete.remote(parsed, ref)
            meta = result.get("meta", {})
            self._record_meta(meta)
            if ticket is not None:
                ticket.tokens = (meta.get("usage") or {}).get("total_tokens", 0)
            self.metrics.observe(label, endpoint, 200, time.monotonic() - started, meta.get("ttft_s"), meta.get("usage"))
            return JSONResponse(result["response"], headers={REPLICA_HEADER: str(meta.get("replica", "")), **headers})
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            err = as_openai_error(exc)
            if err.status >= 500 and err.code == "internal_error":
                log.error("request to %s for model %r failed: %r", endpoint, label, exc)
            self.metrics.observe(label, endpoint, err.status, time.monotonic() - started)
            return _error_response(err)
        finally:
            if ticket is not None and not handed_over:
                ticket.release()
            self.metrics.in_flight.dec()

    async def _sse(self, first: list, stream, model: str, endpoint: str, started: float, ticket) -> AsyncIterator[str]:
        """Server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``; one write per batch of chunks."""
        status, ttft, meta = 200, None, {}
        self.metrics.in_flight.inc()  # the request is in flight until its stream ends
        try:
            batch = first
            while True:
                events = []
                for item in batch:
                    if "chunk" in item:
                        if ttft is None and any(c.get("text") or (c.get("delta") or {}).get("content") for c in item["chunk"]["choices"]):
                            ttft = time.monotonic() - started
                        events.append(f"data: {json.dumps(item['chunk'])}\n\n")
                    elif "meta" in item:
                        meta = item["meta"]
                if events:
                    yield "".join(events)
                try:
                    batch = await stream.__anext__()
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
            if ticket is not None:
                ticket.tokens = (meta.get("usage") or {}).get("total_tokens", 0)
                ticket.release()
            self.metrics.observe(model, endpoint, status, time.monotonic() - started, ttft, meta.get("usage"))
            self.metrics.in_flight.dec()

    async def _json(self, work, status: int = 200) -> Response:
        """Run a management coroutine factory; OpenAI-shaped errors on failure."""
        try:
            return JSONResponse(await work(), status_code=status)
        except Exception as exc:  # noqa: BLE001
            err = as_openai_error(exc)
            if err.code == "internal_error":
                log.error("management request failed: %r", exc)
            return _error_response(err)

    # -- OpenAI routes

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai("completions", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai("chat", request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def work():
            caller = await self._caller(request)
            base = self.cfg.base_model_name
            cards = []
            for name in self.tenancy.visible_models(caller):
                root, parent = (self.cfg.model, None) if name == base else (name, base)
                cards.append({"id": name, "object": "model", "created": self.created, "owned_by": caller.label if name not in
                              (base, *self.tenancy.shared) else "lorafleet", "root": root, "parent": parent})
            return {"object": "list", "data": cards}
        return await self._json(work)

    # -- adapter management (a tenant's own adapters) and admin (tenants and keys; the admin key only)

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
        """What each live engine replica last published about its adapters (vLLM's own list_loras, pins, in flight)."""
        async def states():
            return {"replicas": await self.tenancy.replica_states()}
        return await self._admin_call(request, states)

    # -- operations

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
        return JSONResponse({"status": "ready", "application": app_status, "models": [self.cfg.base_model_name, *self.tenancy.shared],
                             "replica": info["replica"]})

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        """Prometheus text; the admin key sees every series, a tenant only its own adapters' (metrics.py)."""
        try:
            self.tenancy.start()
            scope = await self.tenancy.metrics_scope(request.headers.get("authorization"))
        except OpenAIError as err:
            return _error_response(err)
        return Response(self.metrics.render(scope), media_type=CONTENT_TYPE)
