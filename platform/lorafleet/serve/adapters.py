"""Adapter identity and sources: what a name in a request's ``model`` field resolves to.

One type, :class:`Adapter`, names an adapter from the config to the ``LoRARequest`` the
engine sees: its name, its source (``models:/name/version``, ``models:/name@alias`` or a
local folder), the local folder the engine reads, the content hash of that folder, and
the integer id vLLM needs. Ids are derived in one place, :class:`AdapterCatalog`, from one
counter over the configured adapters (in config order), so every replica built from the
same config gives an adapter the same id.

Resolving a source produces a frozen copy of the adapter in a content-addressed cache
(``<cache>/<sha256 of the files>/``): a registry version is downloaded with
``lorafleet.tracking.download_adapter``; a local folder must lie inside one of the
configured roots after symlinks are resolved, and is copied. Serving a copy means the
files behind a name cannot change under a running engine (vLLM reloads an evicted adapter
from its path later).

Example::

    catalog = AdapterCatalog(cfg)
    adapter = catalog.resolve("banking77")          # downloads once, then cached
    engine.generate(prompt, params, request_id, lora_request=adapter.lora_request())
"""

from __future__ import annotations

import asyncio
import hashlib
import json
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
from lorafleet.serve.config import AdapterSource, ServeConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The adapter that stands for "no adapter" where the engine needs one (see engine.py).
BASE_STAND_IN_NAME = "__lorafleet_base__"
_NUMERIC_VERSION = re.compile(r"^models:/[^/@]+/\d+/?$")


class AdapterError(ValueError):
    """An adapter source cannot be served (missing, outside the allowed roots, incompatible)."""


@dataclass(frozen=True)
class Adapter:
    """One servable adapter. ``path`` and ``content_hash`` are set once it is resolved."""

    name: str
    source: str
    lora_id: int
    path: Optional[str] = None
    content_hash: Optional[str] = None

    def lora_request(self):
        """The ``vllm.lora.request.LoRARequest`` for this adapter (vLLM loads it on first use, LRU after)."""
        from vllm.lora.request import LoRARequest

        if self.path is None:
            raise AdapterError(f"adapter {self.name!r} is not resolved yet")
        return LoRARequest(lora_name=self.name, lora_int_id=self.lora_id, lora_path=self.path)


# --------------------------------------------------------------------------- folder checks


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


def check_adapter_folder(folder: Path, name: str, max_lora_rank: int) -> dict:
    """Refuse folders vLLM would load wrongly or not at all; return the adapter config."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no adapter_config.json (expected a PEFT LoRA folder)")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise AdapterError(f"adapter {name!r}: {folder} has no {' or '.join(WEIGHT_FILES)}")
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: {config_file} is not valid JSON: {exc}") from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be served")
    ranks = [int(cfg.get("r", 0))] + [int(r) for r in (cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank r={max(ranks)} is above the server's engine.max_lora_rank ({max_lora_rank}); raise max_lora_rank")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} is set; vLLM serves LoRA weights only, so the served model would differ from the trained one")
    if cfg.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA adapters")
    if problems:
        raise AdapterError(f"adapter {name!r} ({folder}): " + "; ".join(problems))
    return cfg


def inside_roots(path: Path, roots: list[str]) -> bool:
    """Whether the real path (symlinks resolved) lies inside one of the real roots."""
    real = path.resolve(strict=True)
    for root in roots:
        try:
            root_real = Path(root).expanduser().resolve(strict=True)
        except OSError:
            continue
        if real == root_real or real.is_relative_to(root_real):
            return True
    return False


def _store(src: Path, cache_dir: Path) -> tuple[Path, str]:
    """Copy ``src`` into ``cache_dir/<hash>`` (atomic rename; concurrent writers agree)."""
    digest = content_hash(src)
    target = cache_dir / digest
    if target.is_dir():
        return target, digest
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=cache_dir))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another replica stored the same content first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


# --------------------------------------------------------------------------- catalogue


class AdapterCatalog:
    """The adapters one server offers, their ids, and their resolution into local folders.

    Resolution of one name is serialised by a per-name lock and done once; different names
    resolve concurrently.
    """

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.sources: dict[str, AdapterSource] = {a.name: a for a in cfg.adapters}
        # The one counter: ids 1..N in config order; the base stand-in takes N+1.
        self._ids = {name: i + 1 for i, name in enumerate(self.sources)}
        self._resolved: dict[str, Adapter] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.sources}
        self._base_stand_in: Optional[Adapter] = None
        self.cache_dir = Path(cfg.adapter_cache_dir) if cfg.adapter_cache_dir else default_work_dir() / "serve" / "adapters"

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def lora_id(self, name: str) -> int:
        return self._ids[name]

    def tracking_uri(self) -> str:
        from lorafleet.tracking import resolve_tracking_uri

        return resolve_tracking_uri(TrackingConfig(mlflow_tracking_uri=self.cfg.mlflow_tracking_uri))

    def resolve(self, name: str) -> Adapter:
        """The resolved adapter ``name`` (download/copy + checks on first call). Blocking."""
        if name not in self.sources:
            raise KeyError(name)
        with self._locks[name]:
            if name not in self._resolved:
                self._resolved[name] = self._resolve(self.sources[name])
            return self._resolved[name]

    async def resolve_async(self, name: str) -> Adapter:
        if name in self._resolved:
            return self._resolved[name]
        return await asyncio.to_thread(self.resolve, name)

    def _resolve(self, src: AdapterSource) -> Adapter:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if src.is_registry:
            folder, digest = self._from_registry(src)
        else:
            folder, digest = self._from_local(src)
        check_adapter_folder(folder, src.name, self.cfg.engine.max_lora_rank)
        log.info("adapter %s from %s -> %s (sha256 %s)", src.name, src.source, folder, digest[:12])
        return Adapter(src.name, src.source, self._ids[src.name], str(folder), digest)

    def _from_local(self, src: AdapterSource) -> tuple[Path, str]:
        path = Path(src.source).expanduser()
        if not path.exists():
            raise AdapterError(f"adapter {src.name!r}: local source {src.source} does not exist")
        if not inside_roots(path, self.cfg.allowed_local_roots):
            raise AdapterError(f"adapter {src.name!r}: {src.source} (real path {path.resolve()}) is outside allowed_local_roots "
                               f"{self.cfg.allowed_local_roots}; move it there or add its folder to allowed_local_roots")
        real = path.resolve(strict=True)
        if not real.is_dir():
            raise AdapterError(f"adapter {src.name!r}: {src.source} is not a folder")
        check_adapter_folder(real, src.name, self.cfg.engine.max_lora_rank)  # refuse before copying
        return _store(real, self.cache_dir)

    def _from_registry(self, src: AdapterSource) -> tuple[Path, str]:
        from lorafleet.tracking import download_adapter

        tracking_uri = self.tracking_uri()
        # A numbered version never changes: remember which content it gave. An alias can move,
        # so it is looked up (and downloaded) again on every resolution.
        pointer = None
        if _NUMERIC_VERSION.match(src.source):
            key = hashlib.sha256(f"{tracking_uri}\n{src.source.rstrip('/')}".encode()).hexdigest()
            pointer = self.cache_dir / "by-source" / key
            if pointer.is_file():
                digest = pointer.read_text().strip()
                if (self.cache_dir / digest).is_dir():
                    return self.cache_dir / digest, digest
        with tempfile.TemporaryDirectory(prefix=".download-", dir=self.cache_dir) as tmp:
            try:
                folder = Path(download_adapter(tracking_uri, src.source, tmp))
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the message is what matters
                raise AdapterError(f"adapter {src.name!r}: could not download {src.source} from {tracking_uri}: {exc}") from None
            check_adapter_folder(folder, src.name, self.cfg.engine.max_lora_rank)
            stored, digest = _store(folder, self.cache_dir)
        if pointer is not None:
            pointer.parent.mkdir(exist_ok=True)
            pointer.write_text(digest)
        return stored, digest

    # -- the base stand-in

    def base_stand_in(self) -> Optional[Adapter]:
        """An adapter with the layout of the first resolvable configured one and every lora_B zeroed.

        It changes nothing (B = 0 makes the update B @ A zero), but a request carrying it is
        a LoRA request: see ``engine.EngineSetup.base_through_zero_adapter`` for why the CPU
        engine needs that for base-model requests. None when no adapter is configured.
        """
        if self._base_stand_in is not None or not self.sources:
            return self._base_stand_in
        failures = []
        for name in self.names:
            try:
                template = self.resolve(name)
                break
            except AdapterError as exc:
                failures.append(str(exc))
        else:
            raise AdapterError("no configured adapter could be resolved to build the base stand-in: " + "; ".join(failures))
        target = self.cache_dir / f"zero-{template.content_hash}"
        if not target.is_dir():
            import torch
            from safetensors.torch import load_file, save_file

            tmp = Path(tempfile.mkdtemp(prefix=".zero-", dir=self.cache_dir))
            try:
                shutil.copy(Path(template.path) / "adapter_config.json", tmp / "adapter_config.json")
                weights = Path(template.path) / "adapter_model.safetensors"
                if weights.is_file():
                    tensors = load_file(str(weights))
                else:
                    tensors = torch.load(str(Path(template.path) / "adapter_model.bin"), map_location="cpu", weights_only=True)
                zeroed = {k: torch.zeros_like(v) if "lora_B" in k else v.contiguous() for k, v in tensors.items()}
                save_file(zeroed, str(tmp / "adapter_model.safetensors"))
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not target.is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._base_stand_in = Adapter(BASE_STAND_IN_NAME, f"zeroed:{template.name}", len(self._ids) + 1, str(target), content_hash(target))
        return self._base_stand_in
