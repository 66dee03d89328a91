"""LoRA slots of one vLLM engine: admission, pinning, and unloading retired adapter versions.

vLLM keeps at most ``max_loras`` adapters in its GPU slots and evicts the least recently
used one when a batch needs another. A *pinned* adapter (``AsyncLLM.pin_lora``) is never
evicted, but vLLM's scheduler does not know about pins: it fills a batch with up to
``max_loras`` distinct adapters, and if pinned ones hold some slots the worker must evict an
adapter of the very batch it is preparing (a crash). :class:`LoRASlots` therefore admits a
request into the engine only while the distinct *unpinned* adapters in flight fit in the
slots the pins leave free (``max_loras - pinned``); the rest wait here, in arrival order
per adapter, not in the engine. With no pins this is the same bound vLLM's scheduler
applies.

:meth:`LoRASlots.sync` is called on every registry change (and periodically): it pins what
the registry says is pinned, unpins what no longer is, and removes from the engine every
adapter version that is no longer live (replaced or deleted) once its last in-flight request
has ended (plus a short grace: vLLM may have scheduled one more step for it), which frees its
GPU slot and its host-memory cache entry. Requests admitted
before a replace keep running on the old version; nothing is removed under them.

:func:`engine_lora_state` reads what the engine itself holds (``list_loras``), so listings
and tests see vLLM's own state rather than our bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Optional

from lorafleet.serve.adapters import Adapter

log = logging.getLogger(__name__)


async def engine_lora_state(engine) -> Optional[dict]:
    """``{"cpu": [...]}``: the lora ids vLLM itself holds in host memory (``AsyncLLM.list_loras``), or None if unreadable.

    vLLM's ``remove_lora`` deactivates an adapter's GPU slot before dropping it from this
    set, so an id missing here holds neither. (Which ids sit in GPU slots is not exposed
    through vLLM's engine API without enabling pickle-based IPC, which this server does not.)
    """
    try:
        return {"cpu": sorted(int(i) for i in await engine.list_loras())}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must never break serving
        log.debug("list_loras failed: %r", exc)
        return None


class LoRASlots:
    """Admission and lifecycle of adapters in one engine (one asyncio loop; not thread-safe)."""

    # An adapter is removed only after this long without requests: vLLM may still hold a
    # finished request's adapter in the batch it scheduled next (async scheduling).
    IDLE_GRACE_S = 2.0

    def __init__(self, engine, max_loras: int, ensure_local: Callable[[Adapter], Adapter]):
        self.engine = engine
        self._idle_since: dict[int, float] = {}
        self.max_loras = max_loras
        self.ensure_local = ensure_local  # blocking: run in a thread
        self.in_flight: dict[int, int] = {}
        self.pinned: dict[int, Adapter] = {}
        self._unpinning: set[int] = set()
        self._reserved = 0  # pins being set up: their slots are taken before the pin lands
        self._cond = asyncio.Condition()
        self._sync_lock = asyncio.Lock()
        # Bumped whenever what vLLM holds may change: an adapter request starts or ends, a pin is
        # set, an adapter is removed. Equal values mean there is no need to ask the engine again.
        self.changes = 0

    def _unpinned_in_flight(self) -> int:
        return sum(1 for lora_id in self.in_flight if lora_id not in self.pinned)

    def _free_for_unpinned(self) -> int:
        return self.max_loras - len(self.pinned) - self._reserved

    def _can_enter(self, lora_id: int) -> bool:
        return lora_id in self.pinned or lora_id in self.in_flight or self._unpinned_in_flight() < self._free_for_unpinned()

    @contextlib.asynccontextmanager
    async def use(self, adapter: Optional[Adapter]) -> AsyncIterator[None]:
        """Hold a slot for ``adapter`` (None: the base without any adapter needs none) while a request runs."""
        if adapter is None:
            yield
            return
        lora_id = adapter.lora_id
        async with self._cond:
            await self._cond.wait_for(lambda: self._can_enter(lora_id))
            self.in_flight[lora_id] = self.in_flight.get(lora_id, 0) + 1
            self._idle_since.pop(lora_id, None)
            self.changes += 1
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight[lora_id] -= 1
                self.changes += 1
                if not self.in_flight[lora_id]:
                    del self.in_flight[lora_id]
                    self._idle_since[lora_id] = time.monotonic()
                self._cond.notify_all()

    async def sync(self, live: set[int], want_pinned: dict[int, Adapter]) -> None:
        """Match the engine to the registry: ``live`` lora ids may stay loaded, ``want_pinned`` must be pinned."""
        async with self._sync_lock:
            for lora_id in set(self.pinned) - set(want_pinned):
                self._unpinning.add(lora_id)
            for lora_id, adapter in want_pinned.items():
                if lora_id in self._unpinning:
                    self._unpinning.discard(lora_id)
                if lora_id not in self.pinned:
                    await self._pin(adapter)
            await self._release_idle(live)

    async def _pin(self, adapter: Adapter) -> None:
        async with self._cond:
            if len(self.pinned) + self._reserved >= self.max_loras:
                log.error("not pinning %s: every GPU slot but one is pinned already", adapter.name)
                return
            self._reserved += 1
            try:
                # The new pin takes a slot: wait until the unpinned adapters in flight fit in the rest.
                await self._cond.wait_for(lambda: self._unpinned_in_flight() - (adapter.lora_id in self.in_flight) <= self._free_for_unpinned())
            except BaseException:
                self._reserved -= 1
                raise
        try:
            local = await asyncio.to_thread(self.ensure_local, adapter)
            await self.engine.add_lora(local.lora_request())
            await self.engine.pin_lora(local.lora_id)
            self.pinned[local.lora_id] = local
            self.changes += 1
            log.info("pinned adapter %s (lora id %d)", adapter.name, adapter.lora_id)
        except Exception as exc:  # noqa: BLE001 - a pin that cannot be set must not stop the sync
            log.error("pinning adapter %s failed: %r", adapter.name, exc)
        finally:
            async with self._cond:
                self._reserved -= 1
                self._cond.notify_all()

    async def _release_idle(self, live: set[int]) -> None:
        """Remove idle adapters that are retired (not live) or being unpinned; vLLM has no unpin, so an
        unpinned adapter is removed and loads again, unpinned, on its next request.

        The engine is asked what it holds (an RPC to its worker) only when an adapter this replica
        has run or pinned is retired or being unpinned: a vLLM worker busy-polls for a second after
        each RPC, so asking on every tick of the sync kept an idle replica's worker at 100% CPU."""
        known = set(self._idle_since) | set(self.pinned) | set(self.in_flight)
        if not any(i not in live or i in self._unpinning for i in known):
            return
        try:
            loaded = set(await self.engine.list_loras())
        except Exception as exc:  # noqa: BLE001
            log.warning("list_loras failed: %r", exc)
            return
        now = time.monotonic()
        for lora_id in sorted(loaded | set(self.pinned)):
            retired = lora_id not in live
            if not (retired or lora_id in self._unpinning) or self.in_flight.get(lora_id):
                continue
            if now - self._idle_since.get(lora_id, 0.0) < self.IDLE_GRACE_S:
                continue
            if lora_id in loaded:
                await self.engine.remove_lora(lora_id)
            async with self._cond:
                self.changes += 1
                self.pinned.pop(lora_id, None)
                self._unpinning.discard(lora_id)
                self._idle_since.pop(lora_id, None)
                self._cond.notify_all()
            log.info("removed lora id %d from the engine (%s)", lora_id, "retired" if retired else "unpinned")
