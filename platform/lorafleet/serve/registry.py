"""Tenants, API keys and runtime adapters: the store every replica of a server reads.

One SQLAlchemy database (``tenancy.registry_url``: SQLite in the server's state dir by
default, PostgreSQL on a cluster) holds

* tenants, with their quotas (a null quota means "the config's default");
* API keys, stored as ``sha256(salt + secret)`` only: the key itself is returned once, at
  creation, and never again; a key can be revoked;
* adapters, scoped per tenant (two tenants can both own ``intent-v1``), each pointing at its
  current *version*. Every version has its own row and its own integer id (vLLM's
  ``lora_int_id``), so a replaced adapter is a new id and the engine can never mix the old
  weights with the new name;
* the engine replicas' last published state (what each vLLM engine holds), for listings;
* one ``generation`` counter, bumped in every writing transaction. Readers poll it
  (:class:`~lorafleet.serve.registry_view.RegistryView`) and reload only when it moved, which bounds how long a change
  made through one replica takes to reach the others.

Writes to one adapter are compare-and-set on its version number, so two replicas
replacing the same name at once cannot both win; the loser gets a 409.

Example::

    reg = Registry("sqlite:////srv/lorafleet/state/registry.db")
    tenant, key = reg.create_tenant("acme")          # key.secret is shown once
    assert reg.authenticate(key.secret).name == "acme"
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lorafleet.serve.config import TENANT_NAME

# vLLM lora_int_ids of runtime adapter versions start here; the config file's adapters are 1..N.
RUNTIME_LORA_ID_BASE = 1_000_000
KEY_PREFIX = "lfk"
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([0-9a-f]{{64}})$")
QUOTA_FIELDS = ("max_adapters", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


class RegistryError(Exception):
    """A registry operation that cannot be done; ``status`` is the HTTP status it maps to."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class NotFound(RegistryError):
    status, code = 404, "not_found"


class Conflict(RegistryError):
    status, code = 409, "conflict"


# --------------------------------------------------------------------------- schema

metadata = sa.MetaData()

meta_table = sa.Table(
    "lorafleet_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
tenants_table = sa.Table(
    "lorafleet_tenants", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("allow_base", sa.Boolean, nullable=False),
    *(sa.Column(f, sa.Integer, nullable=True) for f in QUOTA_FIELDS),
    sa.Column("created_at", sa.Float, nullable=False),
    sqlite_autoincrement=True,  # ids are never reused, even after a delete
)
keys_table = sa.Table(
    "lorafleet_api_keys", metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("lorafleet_tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("salt", sa.String(32), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)
adapters_table = sa.Table(
    "lorafleet_adapters", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("lorafleet_tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("pinned", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=True),
    sa.UniqueConstraint("tenant_id", "name", name="uq_lorafleet_adapter_name"),
)
versions_table = sa.Table(
    "lorafleet_adapter_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retired_at", sa.Float, nullable=True),
    sqlite_autoincrement=True,  # a version id is a vLLM lora_int_id: never reused
)
replicas_table = sa.Table(
    "lorafleet_replica_state", metadata,
    sa.Column("replica", sa.String(200), primary_key=True),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    allow_base: bool
    created_at: float
    quotas: dict = field(default_factory=dict)  # only the quotas set in the store; None = config default

    def public(self) -> dict:
        return {"name": self.name, "allow_base": self.allow_base, "created_at": self.created_at, "quotas": dict(self.quotas)}


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: int
    salt: str
    digest: str
    label: Optional[str]
    created_at: float
    revoked_at: Optional[float]

    def public(self) -> dict:
        return {"id": self.id, "label": self.label, "created_at": self.created_at, "revoked_at": self.revoked_at}


@dataclass(frozen=True)
class NewKey:
    """A freshly created key: ``secret`` is the only copy that will ever exist."""

    id: str
    secret: str


@dataclass(frozen=True)
class AdapterVersion:
    """What a new version is made of (filled by validation before the registry sees it)."""

    source: str
    path: str
    content_hash: str
    rank: int
    size_bytes: int


@dataclass(frozen=True)
class AdapterRecord:
    """One tenant adapter and its current version."""

    tenant_id: int
    name: str
    version: int
    lora_id: int
    pinned: bool
    source: str
    path: str
    content_hash: str
    rank: int
    size_bytes: int
    created_at: float
    updated_at: float
    last_used_at: Optional[float]

    def ref(self) -> dict:
        """What the ingress hands the engine with a request: exactly the admitted version."""
        return {"tenant_id": self.tenant_id, "name": self.name, "version": self.version, "lora_id": self.lora_id,
                "source": self.source, "path": self.path, "content_hash": self.content_hash}


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def parse_key(secret: str) -> Optional[str]:
    """The key id of a well-formed key, else None."""
    m = _KEY.match(secret or "")
    return m.group(1) if m else None


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.match(name or ""):
        raise RegistryError(f"tenant name {name!r} is invalid: use 1-63 lowercase letters, digits and `._-`, starting with a letter or digit")
    return name


# --------------------------------------------------------------------------- the store


def default_registry_url(state_dir: Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'registry.db'}"


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):  # WAL: readers never block the one writer across processes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1 maps this to psycopg 3; either driver is shipped
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return sa.create_engine(url, pool_pre_ping=True)


class Registry:
    """Synchronous access to the store (call it from a thread in async code)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        from lorafleet.serve import migrations

        migrations.upgrade(self.engine)  # the schema comes from the migrations (serve/migrations), never from create_all
        try:
            with self.engine.begin() as conn:
                conn.execute(meta_table.insert().values(key="generation", value=0))
        except IntegrityError:
            pass  # already initialised (possibly by another process a moment ago)

    def close(self) -> None:
        self.engine.dispose()

    # -- helpers

    @staticmethod
    def _bump(conn) -> None:
        conn.execute(meta_table.update().where(meta_table.c.key == "generation").values(value=meta_table.c.value + 1))

    def generation(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "generation")).scalar_one())

    @staticmethod
    def _tenant(row) -> Tenant:
        quotas = {f: getattr(row, f) for f in QUOTA_FIELDS if getattr(row, f) is not None}
        return Tenant(row.id, row.name, bool(row.allow_base), row.created_at, quotas)

    def _tenant_row(self, conn, name: str):
        row = conn.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
        if row is None:
            raise NotFound(f"no tenant named {name!r}", "tenant_not_found")
        return row

    # -- tenants

    def create_tenant(self, name: str, allow_base: bool = True, quotas: Optional[dict] = None, key_label: Optional[str] = None) -> tuple[Tenant, NewKey]:
        """A new tenant and its first API key."""
        check_tenant_name(name)
        values = {f: v for f, v in (quotas or {}).items() if v is not None}
        unknown = set(values) - set(QUOTA_FIELDS)
        if unknown:
            raise RegistryError(f"unknown quota(s) {sorted(unknown)}; known: {list(QUOTA_FIELDS)}")
        bad = {f: v for f, v in values.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise RegistryError(f"quotas must be non-negative integers: {bad}")
        try:
            with self.engine.begin() as conn:
                tid = conn.execute(tenants_table.insert().values(name=name, allow_base=allow_base, created_at=time.time(), **values)).inserted_primary_key[0]
                key = self._new_key(conn, tid, key_label or "initial")
                self._bump(conn)
                row = conn.execute(sa.select(tenants_table).where(tenants_table.c.id == tid)).one()
        except IntegrityError:
            raise Conflict(f"a tenant named {name!r} already exists", "tenant_exists") from None
        return self._tenant(row), key

    def update_tenant(self, name: str, allow_base: Optional[bool] = None, quotas: Optional[dict] = None) -> Tenant:
        """Change a tenant's base access or quotas (a quota given as None goes back to the config default)."""
        values = dict(quotas or {})
        unknown = set(values) - set(QUOTA_FIELDS)
        if unknown:
            raise RegistryError(f"unknown quota(s) {sorted(unknown)}; known: {list(QUOTA_FIELDS)}")
        if allow_base is not None:
            values["allow_base"] = allow_base
        with self.engine.begin() as conn:
            row = self._tenant_row(conn, name)
            if values:
                conn.execute(tenants_table.update().where(tenants_table.c.id == row.id).values(**values))
                self._bump(conn)
            return self._tenant(conn.execute(sa.select(tenants_table).where(tenants_table.c.id == row.id)).one())

    def list_tenants(self) -> list[tuple[Tenant, list[ApiKey], int]]:
        """Every tenant with its keys and its number of adapters."""
        with self.engine.connect() as conn:
            tenants = [self._tenant(r) for r in conn.execute(sa.select(tenants_table).order_by(tenants_table.c.name))]
            keys = [ApiKey(**r._mapping) for r in conn.execute(sa.select(keys_table).order_by(keys_table.c.created_at))]
            counts = dict(conn.execute(sa.select(adapters_table.c.tenant_id, sa.func.count()).group_by(adapters_table.c.tenant_id)).all())
        return [(t, [k for k in keys if k.tenant_id == t.id], counts.get(t.id, 0)) for t in tenants]

    def get_tenant(self, name: str) -> Tenant:
        with self.engine.connect() as conn:
            return self._tenant(self._tenant_row(conn, name))

    def delete_tenant(self, name: str) -> list[AdapterRecord]:
        """Delete a tenant, its keys and its adapters (their versions are retired). Returns the adapters."""
        with self.engine.begin() as conn:
            row = self._tenant_row(conn, name)
            adapters = self._adapters(conn, row.id)
            now = time.time()
            conn.execute(versions_table.update().where(versions_table.c.tenant_id == row.id, versions_table.c.retired_at.is_(None)).values(retired_at=now))
            conn.execute(adapters_table.delete().where(adapters_table.c.tenant_id == row.id))
            conn.execute(keys_table.delete().where(keys_table.c.tenant_id == row.id))
            conn.execute(tenants_table.delete().where(tenants_table.c.id == row.id))
            self._bump(conn)
        return adapters

    # -- keys

    @staticmethod
    def _new_key(conn, tenant_id: int, label: Optional[str]) -> NewKey:
        key_id, secret, salt = secrets.token_hex(6), secrets.token_hex(32), secrets.token_hex(16)
        full = f"{KEY_PREFIX}_{key_id}_{secret}"
        conn.execute(keys_table.insert().values(id=key_id, tenant_id=tenant_id, salt=salt, digest=hash_secret(salt, full),
                                                label=label, created_at=time.time(), revoked_at=None))
        return NewKey(key_id, full)

    def create_key(self, tenant: str, label: Optional[str] = None) -> NewKey:
        with self.engine.begin() as conn:
            row = self._tenant_row(conn, tenant)
            key = self._new_key(conn, row.id, label)
            self._bump(conn)
        return key

    def revoke_key(self, key_id: str, tenant: Optional[str] = None) -> ApiKey:
        """Revoke a key by its id (the 12 hex digits after ``lfk_``); with ``tenant``, only that tenant's."""
        key_id = parse_key(key_id) or key_id  # a whole key works too
        with self.engine.begin() as conn:
            query = sa.select(keys_table).where(keys_table.c.id == key_id)
            if tenant is not None:
                query = query.where(keys_table.c.tenant_id == self._tenant_row(conn, tenant).id)
            row = conn.execute(query).first()
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}" + (f" for tenant {tenant!r}" if tenant else ""), "key_not_found")
            if row.revoked_at is None:
                conn.execute(keys_table.update().where(keys_table.c.id == key_id).values(revoked_at=time.time()))
                self._bump(conn)
            return ApiKey(**conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).one()._mapping)

    def authenticate(self, secret: str) -> Optional[Tenant]:
        """The tenant of a valid, unrevoked key; None otherwise (constant-time digest comparison)."""
        key_id = parse_key(secret)
        if key_id is None:
            return None
        with self.engine.connect() as conn:
            key = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).first()
            if key is None or key.revoked_at is not None or not hmac.compare_digest(key.digest, hash_secret(key.salt, secret)):
                return None
            row = conn.execute(sa.select(tenants_table).where(tenants_table.c.id == key.tenant_id)).first()
        return self._tenant(row) if row is not None else None

    # -- adapters

    @staticmethod
    def _adapter_query():
        a, v = adapters_table, versions_table
        return sa.select(a.c.tenant_id, a.c.name, a.c.version, a.c.pinned, a.c.created_at, a.c.updated_at, a.c.last_used_at,
                         v.c.id.label("version_id"), v.c.source, v.c.path, v.c.content_hash, v.c.rank, v.c.size_bytes
                         ).join(v, a.c.version_id == v.c.id)

    @staticmethod
    def _record(row) -> AdapterRecord:
        return AdapterRecord(row.tenant_id, row.name, row.version, RUNTIME_LORA_ID_BASE + row.version_id, bool(row.pinned), row.source,
                             row.path, row.content_hash, row.rank, row.size_bytes, row.created_at, row.updated_at, row.last_used_at)

    def _adapters(self, conn, tenant_id: Optional[int] = None) -> list[AdapterRecord]:
        query = self._adapter_query().order_by(adapters_table.c.tenant_id, adapters_table.c.name)
        if tenant_id is not None:
            query = query.where(adapters_table.c.tenant_id == tenant_id)
        return [self._record(r) for r in conn.execute(query)]

    def adapters(self, tenant_id: Optional[int] = None) -> list[AdapterRecord]:
        with self.engine.connect() as conn:
            return self._adapters(conn, tenant_id)

    def adapter(self, tenant_id: int, name: str) -> Optional[AdapterRecord]:
        with self.engine.connect() as conn:
            row = conn.execute(self._adapter_query().where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)).first()
        return self._record(row) if row else None

    def _insert_version(self, conn, tenant_id: int, name: str, version: int, v: AdapterVersion) -> int:
        return conn.execute(versions_table.insert().values(
            tenant_id=tenant_id, name=name, version=version, source=v.source, path=v.path, content_hash=v.content_hash,
            rank=v.rank, size_bytes=v.size_bytes, created_at=time.time(), retired_at=None)).inserted_primary_key[0]

    def _check_pin_room(self, conn, max_pinned: int, exclude: Optional[tuple[int, str]] = None) -> None:
        query = sa.select(adapters_table.c.tenant_id, adapters_table.c.name).where(adapters_table.c.pinned.is_(True))
        pinned = [tuple(r) for r in conn.execute(query) if tuple(r) != exclude]
        if len(pinned) >= max_pinned:
            raise Conflict(f"cannot pin: {len(pinned)} adapter(s) are already pinned and this server allows at most {max_pinned} "
                           f"(engine.max_loras - 1: one GPU slot always stays free for the others); unpin one first", "pin_limit_reached")

    def add_adapter(self, tenant_id: int, name: str, version: AdapterVersion, *, pinned: bool = False,
                    max_adapters: Optional[int] = None, max_pinned: int = 0) -> AdapterRecord:
        """Register ``name`` for the tenant (version 1). 409 when it exists, the tenant is at its adapter quota or no pin room is left."""
        with self.engine.begin() as conn:
            if max_adapters is not None:
                count = conn.execute(sa.select(sa.func.count()).where(adapters_table.c.tenant_id == tenant_id)).scalar_one()
                if count >= max_adapters:
                    raise Conflict(f"this tenant already has {count} adapter(s), its quota is {max_adapters}; delete one first",
                                   "adapter_quota_exceeded")
            if pinned:
                self._check_pin_room(conn, max_pinned)
            exists = conn.execute(sa.select(adapters_table.c.id).where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)).first()
            if exists:
                raise Conflict(f"an adapter named {name!r} already exists; replace it with PUT /v1/adapters/{name}", "adapter_exists")
            vid = self._insert_version(conn, tenant_id, name, 1, version)
            now = time.time()
            try:
                conn.execute(adapters_table.insert().values(tenant_id=tenant_id, name=name, version=1, version_id=vid, pinned=pinned,
                                                            created_at=now, updated_at=now, last_used_at=None))
            except IntegrityError:  # registered by another replica between the check and the insert
                raise Conflict(f"an adapter named {name!r} already exists; replace it with PUT /v1/adapters/{name}", "adapter_exists") from None
            self._bump(conn)
        return self.adapter(tenant_id, name)

    def replace_adapter(self, tenant_id: int, name: str, version: AdapterVersion, *, expected_version: Optional[int] = None,
                        pinned: Optional[bool] = None, max_pinned: int = 0) -> tuple[AdapterRecord, AdapterRecord]:
        """Make ``version`` the live one (old version retired). Returns (old, new). Compare-and-set on the version number."""
        with self.engine.begin() as conn:
            old = conn.execute(self._adapter_query().where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)).first()
            if old is None:
                raise NotFound(f"no adapter named {name!r}", "adapter_not_found")
            old = self._record(old)
            if expected_version is not None and expected_version != old.version:
                raise Conflict(f"adapter {name!r} is at version {old.version}, not {expected_version}", "version_conflict")
            if pinned and not old.pinned:
                self._check_pin_room(conn, max_pinned)
            vid = self._insert_version(conn, tenant_id, name, old.version + 1, version)
            done = conn.execute(adapters_table.update().where(
                adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name, adapters_table.c.version == old.version,
            ).values(version=old.version + 1, version_id=vid, updated_at=time.time(), pinned=old.pinned if pinned is None else pinned)).rowcount
            if done != 1:
                raise Conflict(f"adapter {name!r} was changed concurrently; retry", "version_conflict")
            conn.execute(versions_table.update().where(versions_table.c.id == old.lora_id - RUNTIME_LORA_ID_BASE).values(retired_at=time.time()))
            self._bump(conn)
        return old, self.adapter(tenant_id, name)

    def set_pinned(self, tenant_id: int, name: str, pinned: bool, max_pinned: int = 0) -> AdapterRecord:
        with self.engine.begin() as conn:
            current = self._adapter_row(conn, tenant_id, name)
            if pinned and not current.pinned:
                self._check_pin_room(conn, max_pinned)
            if bool(current.pinned) != pinned:
                conn.execute(adapters_table.update().where(adapters_table.c.id == current.id).values(pinned=pinned, updated_at=time.time()))
                self._bump(conn)
        return self.adapter(tenant_id, name)

    @staticmethod
    def _adapter_row(conn, tenant_id: int, name: str):
        row = conn.execute(sa.select(adapters_table).where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)).first()
        if row is None:
            raise NotFound(f"no adapter named {name!r}", "adapter_not_found")
        return row

    def delete_adapter(self, tenant_id: int, name: str) -> AdapterRecord:
        """Deregister ``name``; its version is retired (engines unload it once its requests finish)."""
        with self.engine.begin() as conn:
            row = conn.execute(self._adapter_query().where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)).first()
            if row is None:
                raise NotFound(f"no adapter named {name!r}", "adapter_not_found")
            record = self._record(row)
            conn.execute(adapters_table.delete().where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name))
            conn.execute(versions_table.update().where(versions_table.c.id == row.version_id).values(retired_at=time.time()))
            self._bump(conn)
        return record

    def touch(self, used: dict[tuple[int, str], float]) -> None:
        """Record last-use times (batched by the ingress; not a change readers need to reload for)."""
        if not used:
            return
        with self.engine.begin() as conn:
            for (tenant_id, name), at in used.items():
                conn.execute(adapters_table.update().where(adapters_table.c.tenant_id == tenant_id, adapters_table.c.name == name)
                             .values(last_used_at=at))

    # -- engine replicas

    def publish_replica_state(self, replica: str, state: dict) -> None:
        payload = json.dumps(state, sort_keys=True)
        with self.engine.begin() as conn:
            done = conn.execute(replicas_table.update().where(replicas_table.c.replica == replica).values(heartbeat=time.time(), state=payload)).rowcount
            if not done:
                try:
                    with conn.begin_nested():
                        conn.execute(replicas_table.insert().values(replica=replica, heartbeat=time.time(), state=payload))
                except IntegrityError:
                    conn.execute(replicas_table.update().where(replicas_table.c.replica == replica).values(heartbeat=time.time(), state=payload))

    def replica_states(self, max_age_s: float) -> dict[str, dict]:
        """Replicas that published within ``max_age_s`` -> their state (older rows are dead replicas and are dropped)."""
        cutoff = time.time() - max_age_s
        with self.engine.begin() as conn:
            conn.execute(replicas_table.delete().where(replicas_table.c.heartbeat < cutoff - 600))
            rows = conn.execute(sa.select(replicas_table).where(replicas_table.c.heartbeat >= cutoff)).all()
        return {r.replica: json.loads(r.state) for r in rows}

    # -- snapshot

    def snapshot(self) -> "Snapshot":
        with self.engine.connect() as conn:
            generation = int(conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "generation")).scalar_one())
            tenants = {r.id: self._tenant(r) for r in conn.execute(sa.select(tenants_table))}
            keys = {r.id: ApiKey(**r._mapping) for r in conn.execute(sa.select(keys_table))}
            adapters = {(a.tenant_id, a.name): a for a in self._adapters(conn)}
        return Snapshot(generation, tenants, keys, adapters)


@dataclass(frozen=True)
class Snapshot:
    """Everything a replica routes by, as of one ``generation``."""

    generation: int
    tenants: dict[int, Tenant]
    keys: dict[str, ApiKey]
    adapters: dict[tuple[int, str], AdapterRecord]

    def authenticate(self, secret: str) -> Optional[Tenant]:
        key_id = parse_key(secret)
        key = self.keys.get(key_id) if key_id else None
        if key is None or key.revoked_at is not None or not hmac.compare_digest(key.digest, hash_secret(key.salt, secret)):
            return None
        return self.tenants.get(key.tenant_id)

    @cached_property
    def live_lora_ids(self) -> frozenset[int]:
        return frozenset(a.lora_id for a in self.adapters.values())

    def pinned(self) -> list[AdapterRecord]:
        return [a for a in self.adapters.values() if a.pinned]


def merge_quotas(tenant: Tenant, defaults: dict) -> dict:
    """The tenant's effective quotas: its own values over the config defaults (None = unlimited)."""
    return {f: tenant.quotas.get(f, defaults.get(f)) for f in QUOTA_FIELDS}
