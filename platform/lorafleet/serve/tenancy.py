"""What the ingress knows about callers: API keys, what each may call, quotas, and adapter management.

:class:`Tenancy` lives in every ingress replica. It answers four questions per request:

* who is calling (``Authorization: Bearer <key>``): a tenant, the admin, or nobody
  (allowed only with ``tenancy.allow_anonymous``) - 401 otherwise;
* what the request's ``model`` names for that caller: the base (if the tenant may call it),
  a shared adapter of the config file, or one of the tenant's own adapters. Names are
  scoped per tenant; ``<tenant>/<name>`` spells the scope out. Anything else - including
  another tenant's adapter - is the same 404 as a name that does not exist;
* whether the tenant is within its quotas (429 with ``Retry-After``);
* for ``/v1/adapters``: register, replace, pin and delete the tenant's adapters. Addressing
  another tenant's adapter there is 403, whether or not it exists. Changes to one name are
  serialised (a lock per name here, compare-and-set in the registry across replicas);
  different names proceed in parallel. Every source is fetched and validated
  (``lorafleet.serve.validation``) before the registry records it, so the engine only
  ever sees checked adapters.

Routing reads a :class:`~lorafleet.serve.registry_view.RegistryView` refreshed every
``tenancy.poll_interval_s``; a write through this replica applies here at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from lorafleet.serve.adapters import AdapterError, AdapterStore, check_source
from lorafleet.serve.config import ServeConfig, adapter_name_problem
from lorafleet.serve.errors import OpenAIError, bad_request
from lorafleet.serve.quotas import RateLimited, SharedQuotas, SharedTicket
from lorafleet.serve.registry import QUOTA_FIELDS, AdapterRecord, AdapterVersion, Registry, RegistryError, Tenant, merge_quotas
from lorafleet.serve.registry_view import RegistryView

log = logging.getLogger(__name__)

_QUOTAS_SCHEMA = {"type": "object", "additionalProperties": False,
                  "properties": {f: {"type": ["integer", "null"], "minimum": 0} for f in QUOTA_FIELDS},
                  "description": "Per-tenant quotas; a missing or null field uses the server's `tenancy.quotas` default."}
# The JSON bodies of the management routes: body name -> field -> (JSON schema, description).
# Tenancy accepts exactly these fields (anything else is a 400), and the server's OpenAPI
# document (lorafleet.serve.openapi) describes them from here.
BODIES: dict[str, dict[str, tuple[dict, str]]] = {
    "AdapterRegister": {
        "name": ({"type": "string"}, "The name clients put in `model`; unique within the tenant."),
        "source": ({"type": "string"}, "`models:/name/version`, `models:/name@alias` (MLflow registry) or an absolute folder inside the server's `allowed_local_roots`."),
        "pin": ({"type": "boolean", "default": False}, "Keep the adapter in a GPU slot (never evicted)."),
    },
    "AdapterReplace": {
        "source": ({"type": "string"}, "The new version's source (as for registration)."),
        "pin": ({"type": ["boolean", "null"]}, "Change the pin with the replace; null keeps it."),
        "expected_version": ({"type": ["integer", "null"]}, "Compare-and-set: refuse (409 version_conflict) unless this is the live version."),
    },
    "AdapterPin": {"pin": ({"type": "boolean"}, "Pin (true) or unpin (false).")},
    "TenantCreate": {
        "name": ({"type": "string"}, "Tenant name: letters, digits, `-`, `_`."),
        "allow_base": ({"type": "boolean"}, "May call the base model (default: `tenancy.allow_base`)."),
        "quotas": (_QUOTAS_SCHEMA, "Quotas of this tenant."),
        "key_label": ({"type": ["string", "null"]}, "A label for the first API key."),
    },
    "TenantUpdate": {
        "allow_base": ({"type": ["boolean", "null"]}, "May call the base model; null keeps it."),
        "quotas": (_QUOTAS_SCHEMA, "Quota fields to change (null resets one to the server default)."),
    },
    "KeyCreate": {"label": ({"type": ["string", "null"]}, "A label for the key.")},
}
REQUIRED_FIELDS = {"AdapterRegister": ["name", "source"], "AdapterReplace": ["source"], "AdapterPin": ["pin"], "TenantCreate": ["name"]}


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant, or nobody (anonymous)."""

    tenant: Optional[Tenant]

    @property
    def label(self) -> str:
        return self.tenant.name if self.tenant else "anonymous"


@dataclass(frozen=True)
class Route:
    """What a request's ``model`` resolved to for its caller."""

    kind: str  # "base" | "shared" | "tenant"
    model: str  # the name as the caller wrote it
    record: Optional[AdapterRecord] = None
    tenant_name: Optional[str] = None

    @property
    def metrics_label(self) -> str:
        return f"{self.tenant_name}/{self.record.name}" if self.kind == "tenant" else self.model


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def forbidden(message: str, code: str = "forbidden") -> OpenAIError:
    return OpenAIError(403, message, "invalid_request_error", None, code)


def not_found(model: str, visible: list[str]) -> OpenAIError:
    """The same answer for a name that does not exist and for one the caller may not see (only the caller's models are listed)."""
    shown = ", ".join(visible[:20]) + (" ..." if len(visible) > 20 else "")
    return OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it. Yours: {shown or 'none'}. "
                       "GET /v1/models lists them.", "invalid_request_error", "model", "model_not_found")


def registry_error(exc: RegistryError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, "invalid_request_error", None, exc.code)


def adapter_error(exc: AdapterError) -> OpenAIError:
    return OpenAIError(exc.status, str(exc), "invalid_request_error", "source", exc.code)


RATE_QUOTAS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


class Tenancy:
    """Authentication, routing, quotas and adapter management of one ingress replica."""

    def __init__(self, cfg: ServeConfig, store: Optional[AdapterStore] = None, app_name: str = "lorafleet"):
        self.cfg = cfg
        self.admin_digest = cfg.tenancy.admin_digest()
        self.registry = Registry(cfg.registry_url())
        self.view = RegistryView(self.registry)
        self.store = store or AdapterStore(cfg)
        self.limiter = SharedQuotas(f"quotas:{app_name}")
        self.shared = [a.name for a in cfg.adapters]
        self._default_quotas = cfg.tenancy.quotas.model_dump()
        self._locks: dict[tuple[int, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._used: dict[tuple[int, str], float] = {}

    # ------------------------------------------------------------------ background

    async def poll_once(self) -> None:
        """Reload the registry view if it changed; record when adapters were last used (the server's sync loop calls it)."""
        await asyncio.to_thread(self.view.refresh)
        used, self._used = self._used, {}
        if used:
            await asyncio.to_thread(self.registry.touch, used)

    async def changed(self) -> None:
        """Apply a write made through this replica to its view at once."""
        await asyncio.to_thread(self.view.refresh, True)

    # ------------------------------------------------------------------ callers

    def is_admin(self, authorization: Optional[str]) -> bool:
        key = _bearer(authorization)
        return bool(key and self.admin_digest and hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), self.admin_digest))

    async def caller(self, authorization: Optional[str]) -> Caller:
        """The tenant behind the request's key; anonymous when allowed; else 401 (403 for the admin key)."""
        if authorization is None:
            if self.cfg.tenancy.allow_anonymous:
                return Caller(None)
            raise unauthorized("Missing API key: send `Authorization: Bearer <key>` (keys come from `lorafleet tenants create`).")
        key = _bearer(authorization)
        if key is None:
            raise unauthorized("Malformed Authorization header: expected `Bearer <key>`.")
        tenant = self.view.snapshot.authenticate(key)
        if tenant is None and self.view.unknown_key(key):  # created a moment ago elsewhere: ask the store
            tenant = await asyncio.to_thread(self.registry.authenticate, key)
        if tenant is None:
            if self.is_admin(authorization):
                raise forbidden("The admin key manages tenants (/admin/...); call models and adapters with a tenant's key.", "admin_key_not_allowed")
            raise unauthorized("Incorrect API key provided (unknown or revoked).")
        return Caller(tenant)

    async def metrics_scope(self, authorization: Optional[str]) -> Optional[str]:
        """Whose series ``/metrics`` shows this caller: None (all) for the admin key, the tenant's
        name for a tenant's key, "" (shared models only) without a key; 401 for a bad key."""
        if authorization is None:
            return ""
        if self.is_admin(authorization):
            return None
        caller = await self.caller(authorization)
        return caller.tenant.name if caller.tenant else ""

    def require_admin(self, authorization: Optional[str]) -> None:
        if not self.admin_digest:
            raise forbidden("The admin API is disabled: no admin key is configured (tenancy.admin_key_env / admin_key_sha256). "
                            "Manage tenants with `lorafleet tenants` on a machine that reaches the registry.", "admin_api_disabled")
        if _bearer(authorization) is None:
            raise unauthorized("Missing admin key: send `Authorization: Bearer <admin key>`.")
        if not self.is_admin(authorization):
            raise forbidden("This key is not the admin key.", "not_admin")

    # ------------------------------------------------------------------ routing

    def visible_models(self, caller: Caller) -> list[str]:
        names = []
        if caller.tenant is None or caller.tenant.allow_base:
            names.append(self.cfg.base_model_name)
        if caller.tenant is None or self.cfg.tenancy.share_config_adapters:
            names += self.shared
        if caller.tenant is not None:
            names += [a.name for a in self.view.adapters(caller.tenant.id)]
        return names

    def _own_name(self, caller: Caller, name: str) -> Optional[str]:
        """``name`` in the caller's own scope (``<tenant>/`` prefix removed), or None if it names another scope."""
        if "/" not in name:
            return name
        scope, _, rest = name.partition("/")
        return rest if caller.tenant is not None and scope == caller.tenant.name and "/" not in rest else None

    async def route(self, caller: Caller, model: str) -> Route:
        """What ``model`` is for this caller (404 if it does not exist *for them*; 403 for a base they may not call)."""
        if model == self.cfg.base_model_name:
            if caller.tenant is not None and not caller.tenant.allow_base:
                raise forbidden(f"This key's tenant may not call the base model `{model}`; call one of its adapters.", "base_not_allowed")
            return Route("base", model)
        if caller.tenant is not None:
            own = self._own_name(caller, model)
            if own is not None:
                record = self.view.snapshot.adapters.get((caller.tenant.id, own))
                if record is None:  # registered a moment ago through another replica?
                    record = await asyncio.to_thread(self.registry.adapter, caller.tenant.id, own)
                if record is not None:
                    self._used[(caller.tenant.id, own)] = time.time()
                    return Route("tenant", model, record, caller.tenant.name)
        if model in self.shared and (caller.tenant is None or self.cfg.tenancy.share_config_adapters):
            return Route("shared", model)
        raise not_found(model, self.visible_models(caller))

    def quotas(self, tenant: Tenant) -> dict:
        """The tenant's effective quotas (its own over the config's defaults)."""
        return merge_quotas(tenant, self._default_quotas)

    async def admit(self, caller: Caller) -> Optional[SharedTicket]:
        """A quota ticket for the tenant (None for anonymous callers and tenants without rate quotas), or 429 with Retry-After."""
        if caller.tenant is None:
            return None
        quotas = self.quotas(caller.tenant)
        if all(quotas.get(k) is None for k in RATE_QUOTAS):
            return None
        try:
            return await self.limiter.admit(caller.tenant.id, quotas)
        except RateLimited as exc:
            raise OpenAIError(429, exc.message, "rate_limit_error", None, exc.code, {"Retry-After": str(exc.retry_after_s)}) from None

    # ------------------------------------------------------------------ adapter management (tenants)

    def _manager(self, caller: Caller) -> Tenant:
        if caller.tenant is None:
            raise unauthorized("Managing adapters needs a tenant's API key.")
        return caller.tenant

    def _managed_name(self, caller: Caller, name: str) -> str:
        own = self._own_name(caller, name)
        if own is None:
            raise forbidden(f"`{name}` is not in your namespace: a key manages only its own tenant's adapters.", "not_your_adapter")
        return own

    def _check_new_name(self, name: str) -> None:
        problem = adapter_name_problem(name)
        if problem:
            raise bad_request(f"Invalid adapter name {name!r}: {problem}.", "name", "invalid_name")
        if name == self.cfg.base_model_name or name in self.shared:
            raise OpenAIError(409, f"`{name}` is the name of the base model or of a shared adapter of this server; choose another name.",
                              "invalid_request_error", "name", "name_reserved")

    async def _fetch(self, tenant: Tenant, name: str, source: Any) -> AdapterVersion:
        if not isinstance(source, str) or not source:
            raise bad_request("`source` must be a string: models:/<name>/<version>, models:/<name>@<alias> or an absolute local folder.", "source")
        try:
            check_source(source)
            folder, digest, info = await asyncio.to_thread(self.store.fetch, f"{tenant.name}/{name}", source, tenant.name)
        except AdapterError as exc:
            raise adapter_error(exc) from None
        return AdapterVersion(source, str(folder), digest, info.rank, info.size_bytes)

    async def write(self, op, *args, **kwargs) -> Any:
        """Run one registry write (a bound ``Registry`` method) off the event loop; its errors become
        OpenAI-shaped 4xx, and this replica's view applies the change at once."""
        try:
            result = await asyncio.to_thread(op, *args, **kwargs)
        except RegistryError as exc:
            raise registry_error(exc) from None
        await self.changed()
        return result

    async def register(self, caller: Caller, body: Any) -> dict:
        tenant = self._manager(caller)
        body = _object(body, BODIES["AdapterRegister"])
        name = body.get("name")
        if not isinstance(name, str):
            raise bad_request("`name` is required: the name clients will put in `model`.", "name")
        self._check_new_name(name)
        async with self._locks[(tenant.id, name)]:
            if await asyncio.to_thread(self.registry.adapter, tenant.id, name) is not None:  # before the (slow) fetch
                raise OpenAIError(409, f"An adapter named `{name}` already exists; replace it with PUT /v1/adapters/{name}.",
                                  "invalid_request_error", "name", "adapter_exists")
            version = await self._fetch(tenant, name, body.get("source"))
            record = await self.write(self.registry.add_adapter, tenant.id, name, version, pinned=bool(body.get("pin")),
                                      max_adapters=self.quotas(tenant)["max_adapters"], max_pinned=self.cfg.max_pinned)
        log.info("tenant %s registered adapter %s v%d from %s", tenant.name, name, record.version, record.source)
        return await self.describe(record, tenant)

    async def replace(self, caller: Caller, name: str, body: Any) -> dict:
        tenant = self._manager(caller)
        name = self._managed_name(caller, name)
        body = _object(body, BODIES["AdapterReplace"])
        async with self._locks[(tenant.id, name)]:
            if await asyncio.to_thread(self.registry.adapter, tenant.id, name) is None:  # before the (slow) fetch
                raise OpenAIError(404, f"No adapter named `{name}`; register it with POST /v1/adapters.", "invalid_request_error", None, "adapter_not_found")
            version = await self._fetch(tenant, name, body.get("source"))
            _, record = await self.write(self.registry.replace_adapter, tenant.id, name, version, expected_version=body.get("expected_version"),
                                         pinned=body.get("pin"), max_pinned=self.cfg.max_pinned)
        log.info("tenant %s replaced adapter %s -> v%d from %s", tenant.name, name, record.version, record.source)
        return await self.describe(record, tenant)

    async def set_pin(self, caller: Caller, name: str, body: Any) -> dict:
        tenant = self._manager(caller)
        name = self._managed_name(caller, name)
        body = _object(body, BODIES["AdapterPin"])
        if not isinstance(body.get("pin"), bool):
            raise bad_request("`pin` (true or false) is required.", "pin")
        async with self._locks[(tenant.id, name)]:
            record = await self.write(self.registry.set_pinned, tenant.id, name, body["pin"], self.cfg.max_pinned)
        return await self.describe(record, tenant)

    async def delete(self, caller: Caller, name: str) -> dict:
        tenant = self._manager(caller)
        name = self._managed_name(caller, name)
        async with self._locks[(tenant.id, name)]:
            record = await self.write(self.registry.delete_adapter, tenant.id, name)
        log.info("tenant %s deleted adapter %s (v%d)", tenant.name, name, record.version)
        return {"id": name, "object": "adapter", "deleted": True, "version": record.version}

    async def get(self, caller: Caller, name: str) -> dict:
        tenant = self._manager(caller)
        own = self._own_name(caller, name)
        record = await asyncio.to_thread(self.registry.adapter, tenant.id, own) if own is not None else None
        if record is None:
            raise OpenAIError(404, f"No adapter named `{name}` among yours.", "invalid_request_error", None, "adapter_not_found")
        return await self.describe(record, tenant)

    async def list(self, caller: Caller) -> dict:
        tenant = self._manager(caller)
        records = await asyncio.to_thread(self.registry.adapters, tenant.id)
        states = await self.replica_states()
        return {"object": "list", "data": [self._describe(r, tenant.name, states) for r in records]}

    async def replica_states(self) -> dict:
        max_age = max(15.0, 5 * self.cfg.tenancy.poll_interval_s)
        return await asyncio.to_thread(self.registry.replica_states, max_age)

    async def describe(self, record: AdapterRecord, tenant: Tenant) -> dict:
        return self._describe(record, tenant.name, await self.replica_states())

    @staticmethod
    def _describe(record: AdapterRecord, owner: str, states: dict) -> dict:
        """The adapter as /v1/adapters shows it. Per replica (as its engine last published):
        ``active`` (pinned in a GPU slot, or running requests now) or ``loaded`` (in vLLM's
        host-memory cache); overall the most advanced of those, else ``registered``."""
        replicas = {}
        for replica, state in states.items():
            if record.lora_id in state.get("pinned", []) or record.lora_id in state.get("in_flight", []):
                replicas[replica] = "active"
            elif record.lora_id in state.get("cpu", []):
                replicas[replica] = "loaded"
        overall = "active" if "active" in replicas.values() else "loaded" if replicas else "registered"
        return {"id": record.name, "object": "adapter", "owner": owner, "version": record.version, "lora_id": record.lora_id, "source": record.source,
                "rank": record.rank, "size_bytes": record.size_bytes, "sha256": record.content_hash, "pinned": record.pinned,
                "state": overall, "replicas": replicas, "created_at": record.created_at, "updated_at": record.updated_at,
                "last_used_at": record.last_used_at}

    # ------------------------------------------------------------------ admin

    async def create_tenant(self, body: Any) -> dict:
        body = _object(body, BODIES["TenantCreate"])
        quotas = body.get("quotas") or {}
        if not isinstance(quotas, dict):
            raise bad_request(f"`quotas` must be an object with any of {list(QUOTA_FIELDS)}.", "quotas")
        allow_base = body.get("allow_base", self.cfg.tenancy.allow_base)
        tenant, key = await self.write(self.registry.create_tenant, body.get("name"), bool(allow_base), quotas, body.get("key_label"))
        return {"tenant": tenant.public(), "api_key": {"id": key.id, "key": key.secret}}

    async def list_tenants(self) -> dict:
        rows = await asyncio.to_thread(self.registry.list_tenants)
        return {"object": "list", "data": [{**t.public(), "adapters": n, "keys": [k.public() for k in keys]} for t, keys, n in rows]}

    async def update_tenant(self, name: str, body: Any) -> dict:
        body = _object(body, BODIES["TenantUpdate"])
        return (await self.write(self.registry.update_tenant, name, body.get("allow_base"), body.get("quotas"))).public()

    async def delete_tenant(self, name: str) -> dict:
        adapters = await self.write(self.registry.delete_tenant, name)
        return {"id": name, "object": "tenant", "deleted": True, "adapters_deleted": [a.name for a in adapters]}

    async def create_key(self, tenant: str, body: Any) -> dict:
        label = _object(body, BODIES["KeyCreate"]).get("label") if body is not None else None
        key = await self.write(self.registry.create_key, tenant, label)
        return {"id": key.id, "key": key.secret}

    async def revoke_key(self, tenant: str, key_id: str) -> dict:
        return (await self.write(self.registry.revoke_key, key_id, tenant)).public()


def _bearer(authorization: Optional[str]) -> Optional[str]:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def _object(body: Any, allowed: dict[str, tuple[dict, str]]) -> dict:
    """``body`` if it is an object of ``allowed`` fields, each of its documented JSON type; else 400."""
    import jsonschema

    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"Unknown field(s) {unknown}; allowed: {sorted(allowed)}.", unknown[0])
    for name, value in body.items():
        try:
            # the schemas are this module's own constants: no need to re-check them (jsonschema.validate would) per request
            jsonschema.Draft202012Validator(allowed[name][0]).validate(value)
        except jsonschema.ValidationError as exc:
            where = ".".join([name, *(str(p) for p in exc.absolute_path)])
            raise bad_request(f"Invalid `{where}`: {exc.message[:200]}.", name, "invalid_type") from None
    return body
