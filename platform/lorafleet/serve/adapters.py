"""Adapter identity and sources: what a name in a request's ``model`` field resolves to.

One type, :class:`Adapter`, names an adapter all the way to the ``LoRARequest`` the engine
sees: its name, its source (``models:/name/version``, ``models:/name@alias`` or a local
folder), the local folder the engine reads, the content hash of that folder, and the
integer id vLLM needs. The adapters of the config file get ids 1..N in config order
(:class:`AdapterCatalog`, the same on every replica); runtime adapters registered through
the API get theirs from the registry (one per version, see ``lorafleet.serve.registry``).

:class:`AdapterStore` turns a source into a validated, frozen copy in a content-addressed
cache (``<cache>/<sha256 of the files>/``): a registry version is downloaded with
``lorafleet.tracking.download_adapter``; a local folder must lie inside one of the
configured roots after symlinks are resolved, and is copied. Both are checked by
``lorafleet.serve.validation.inspect_adapter`` before and after copying, so what the engine
loads is exactly what was checked, and the files behind a version cannot change under a
running engine (vLLM reloads an evicted adapter from its path later).

Example::

    catalog = AdapterCatalog(cfg)
    adapter = catalog.resolve("banking77")          # downloads once, then cached
    engine.generate(prompt, params, request_id, lora_request=adapter.lora_request())
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorafleet.config.train import TrackingConfig, default_work_dir
from lorafleet.serve.config import AdapterSource, ServeConfig, source_problem

log = logging.getLogger(__name__)

_NUMERIC_VERSION = re.compile(r"^models:/[^/@]+/\d+/?$")


class AdapterError(ValueError):
    """An adapter source cannot be served (missing, outside the roots, incompatible); ``status``/``code``: its HTTP answer."""

    status = 422
    code = "invalid_adapter"


@dataclass(frozen=True)
class Adapter:
    """One servable adapter. ``path`` and ``content_hash`` are set once it is resolved."""

    name: str
    source: str
    lora_id: int
    path: Optional[str] = None
    content_hash: Optional[str] = None
    pinned: bool = False

    def lora_request(self):
        """The ``vllm.lora.request.LoRARequest`` for this adapter (vLLM loads it on first use, LRU after)."""
        from vllm.lora.request import LoRARequest

        if self.path is None:
            raise AdapterError(f"adapter {self.name!r} is not resolved yet")
        # NOTE(lorafleet): vLLM compares and hashes LoRARequests by lora_name alone
        # (vllm/lora/request.py), and the worker builds the batch's adapter set with set():
        # two versions of one adapter under the same name in one batch collapse into one, the
        # other is never activated, and the engine dies with a KeyError in convert_mapping.
        # The name vLLM sees is therefore unique per version (its lora_int_id).
        return LoRARequest(lora_name=f"{self.name}#{self.lora_id}", lora_int_id=self.lora_id, lora_path=self.path)


# --------------------------------------------------------------------------- folders


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def inside_roots(path: Path, roots: list[str], strict: bool = True) -> bool:
    """Whether the real path (symlinks resolved) lies inside one of the real roots (that exist).
    ``strict=False``: ``path`` need not exist (the part of it that does is resolved)."""
    real = path.expanduser().resolve(strict=strict)
    for root in roots:
        try:
            root_real = Path(root).expanduser().resolve(strict=True)
        except OSError:
            continue
        if real == root_real or real.is_relative_to(root_real):
            return True
    return False


def check_source(source: str) -> str:
    """Refuse runtime sources that are neither a registry URI nor an absolute local path (400)."""
    from lorafleet.serve.validation import AdapterRefused

    problem = source_problem(source)
    if problem is None and not source.startswith("models:") and not Path(source).is_absolute():
        problem = "a local source must be an absolute path inside one of the server's allowed roots"
    if problem:
        raise AdapterRefused(f"source {source!r}: {problem}", 400, "invalid_source")
    return source


# --------------------------------------------------------------------------- the store


class AdapterStore:
    """Validated copies of adapter sources in the content-addressed cache of one server."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.cache_dir = Path(cfg.adapter_cache_dir) if cfg.adapter_cache_dir else default_work_dir() / "serve" / "adapters"
        self._base = None
        self._base_lock = threading.Lock()

    def base_spec(self):
        """The served base as validation sees it (built once, from its config on the meta device)."""
        from lorafleet.serve.validation import BaseModelSpec

        with self._base_lock:
            if self._base is None:
                self._base = BaseModelSpec.from_model(self.cfg.model, self.cfg.base_model_name, self.cfg.tenancy.base_aliases)
            return self._base

    def tracking_uri(self) -> str:
        from lorafleet.tracking import resolve_tracking_uri

        return resolve_tracking_uri(TrackingConfig(mlflow_tracking_uri=self.cfg.mlflow_tracking_uri))

    def inspect(self, folder: Path, roots: list[str]):
        from lorafleet.serve.validation import inspect_adapter

        return inspect_adapter(folder, self.base_spec(), max_lora_rank=self.cfg.engine.max_lora_rank,
                               max_bytes=self.cfg.tenancy.max_adapter_bytes, allowed_roots=roots)

    def fetch(self, name: str, source: str, tenant: Optional[str] = None):
        """Validate ``source`` and store a copy: ``(folder, sha256, AdapterInfo)``. Blocking; raises AdapterError (4xx).

        ``tenant``: the tenant registering it, whose ``tenancy.tenant_models`` /
        ``tenant_local_roots`` rules the source must also pass (None: the config's own adapters)."""
        from lorafleet.serve.validation import AdapterRefused

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            if source.startswith("models:"):
                self._check_tenant_model(name, source, tenant)
                return self._from_registry(name, source)
            return self._from_local(name, source, tenant)
        except AdapterRefused as exc:
            if str(exc).startswith(f"adapter {name!r}"):
                raise
            raise AdapterRefused(f"adapter {name!r} ({source}): {exc}", exc.status, exc.code) from None

    def _check_tenant_model(self, name: str, source: str, tenant: Optional[str]) -> None:
        """403 unless ``tenant`` may serve the registered model ``source`` names (``tenancy.tenant_models``).
        Checked before anything is looked up, so a refusal says nothing about what the registry holds."""
        from lorafleet.serve.validation import AdapterRefused

        patterns = self.cfg.tenancy.scoped_models(tenant) if tenant is not None else []
        model = re.split(r"[/@]", source[len("models:/"):], maxsplit=1)[0]
        if patterns and not any(fnmatch.fnmatchcase(model, p) for p in patterns):
            raise AdapterRefused(f"adapter {name!r}: registered model {model!r} is not one tenant {tenant!r} may serve "
                                 f"(this server's rule: {', '.join(patterns)}); register your adapters under such a name",
                                 403, "source_not_allowed")

    def _from_local(self, name: str, source: str, tenant: Optional[str] = None):
        from lorafleet.serve.validation import AdapterRefused

        path = Path(source).expanduser()
        scoped = self.cfg.tenancy.scoped_roots(tenant) if tenant is not None else []
        # The tenant rule first, on the real path as far as it exists: a refusal must not tell
        # a tenant whether something exists outside its own folders.
        if scoped and not inside_roots(path, scoped, strict=False):
            raise AdapterRefused(f"adapter {name!r}: {source} is outside the folders of tenant {tenant!r} "
                                 f"({', '.join(scoped)}); put it inside one of them", 403, "path_not_allowed")
        if not path.exists():
            raise AdapterRefused(f"adapter {name!r}: local source {source} does not exist", 404, "adapter_not_found")
        if not inside_roots(path, self.cfg.allowed_local_roots):
            raise AdapterRefused(f"adapter {name!r}: {source} (real path {path.resolve()}) is outside the server's allowed local roots; "
                                 "put it inside one of them (tenancy: ask the operator) or register it in MLflow", 403, "path_not_allowed")
        real = path.resolve(strict=True)
        # Symlinks inside the folder must stay inside the same roots as the folder itself.
        roots = [r for r in scoped if inside_roots(Path(r), self.cfg.allowed_local_roots, strict=False)] if scoped else self.cfg.allowed_local_roots
        self.inspect(real, roots)  # refuse before copying anything
        return self._store(name, real)

    def _from_registry(self, name: str, source: str):
        from lorafleet.serve.validation import AdapterRefused
        from lorafleet.tracking import download_adapter

        tracking_uri = self.tracking_uri()
        # A numbered version never changes: remember which content it gave. An alias can move,
        # so it is looked up (and downloaded) again on every resolution.
        pointer = None
        if _NUMERIC_VERSION.match(source):
            key = hashlib.sha256(f"{tracking_uri}\n{source.rstrip('/')}".encode()).hexdigest()
            pointer = self.cache_dir / "by-source" / key
            if pointer.is_file():
                digest = pointer.read_text().strip()
                if (self.cache_dir / digest).is_dir():
                    return self.cache_dir / digest, digest, self.inspect(self.cache_dir / digest, [])
        with tempfile.TemporaryDirectory(prefix=".download-", dir=self.cache_dir) as tmp:
            try:
                folder = Path(download_adapter(tracking_uri, source, tmp))
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the message is what matters
                raise AdapterRefused(f"adapter {name!r}: could not download {source} from the model registry: {exc}", 404, "adapter_not_found") from None
            stored = self._store(name, folder)
        if pointer is not None:
            pointer.parent.mkdir(exist_ok=True)
            pointer.write_text(stored[1])
        return stored

    def _store(self, name: str, src: Path):
        """Copy ``src`` into ``cache/<hash>`` (atomic rename; concurrent writers agree) and check the copy."""
        tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=self.cache_dir))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)  # symlinks (already checked) are copied as files
            info = self.inspect(tmp, [])
            digest = content_hash(tmp)
            target = self.cache_dir / digest
            if not target.is_dir():
                try:
                    os.rename(tmp, target)
                except OSError:  # another replica stored the same content first
                    if not target.is_dir():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("adapter %s stored as %s", name, target)
        return target, digest, info

    def ensure_local(self, adapter: Adapter) -> Adapter:
        """The adapter with a folder that exists on this node: fetched again from its source when the
        node has no copy yet (another node registered it), and refused if the content changed since."""
        if adapter.path and Path(adapter.path).is_dir():
            return adapter
        folder, digest, _ = self.fetch(adapter.name, adapter.source)
        if adapter.content_hash and digest != adapter.content_hash:
            from lorafleet.serve.validation import AdapterRefused

            raise AdapterRefused(f"adapter {adapter.name!r}: {adapter.source} no longer has the content it was registered with "
                                 f"(sha256 {adapter.content_hash[:12]}..., now {digest[:12]}...); register it again", 409, "adapter_changed")
        return Adapter(adapter.name, adapter.source, adapter.lora_id, str(folder), digest, adapter.pinned)


# --------------------------------------------------------------------------- catalogue


class AdapterCatalog:
    """The adapters of the config file, their ids, and their resolution into checked local folders.

    Resolution of one name is serialised by a per-name lock and done once; different names
    resolve concurrently.
    """

    def __init__(self, cfg: ServeConfig, store: Optional[AdapterStore] = None):
        self.cfg = cfg
        self.store = store or AdapterStore(cfg)
        self.sources: dict[str, AdapterSource] = {a.name: a for a in cfg.adapters}
        # The one counter: ids 1..N in config order (runtime versions: registry.RUNTIME_LORA_ID_BASE and up).
        self._ids = {name: i + 1 for i, name in enumerate(self.sources)}
        self._resolved: dict[str, Adapter] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.sources}

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def lora_id(self, name: str) -> int:
        return self._ids[name]

    def resolve(self, name: str) -> Adapter:
        """The resolved adapter ``name`` (download/copy + checks on first call). Blocking."""
        if name not in self.sources:
            raise KeyError(name)
        with self._locks[name]:
            if name not in self._resolved:
                src = self.sources[name]
                folder, digest, _ = self.store.fetch(name, src.source)
                log.info("adapter %s from %s -> %s (sha256 %s)", name, src.source, folder, digest[:12])
                self._resolved[name] = Adapter(name, src.source, self._ids[name], str(folder), digest)
            return self._resolved[name]

    async def resolve_async(self, name: str) -> Adapter:
        if name in self._resolved:
            return self._resolved[name]
        return await asyncio.to_thread(self.resolve, name)
