"""A process's cached view of the registry: the :class:`~lorafleet.serve.registry.Snapshot` every
request routes by, reloaded only when the store's generation counter moved."""

from __future__ import annotations

import threading

from lorafleet.serve.registry import AdapterRecord, Registry, parse_key


class RegistryView:
    """A process's cached :class:`Snapshot`, reloaded when the store's generation moves.

    ``refresh()`` costs one small query when nothing changed. Callers poll it every
    ``tenancy.poll_interval_s``; a change made through this process is applied at once
    (``refresh(force=True)`` after the write). Callers read through to the store on a miss
    (a key or an adapter created a moment ago through another replica: see
    :meth:`unknown_key`), so only *changes* to things a replica already knows wait for the
    next poll.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._lock = threading.Lock()
        self.snapshot = registry.snapshot()

    def refresh(self, force: bool = False) -> bool:
        """Reload if the generation moved (or ``force``); True when the snapshot changed."""
        with self._lock:
            if not force and self.registry.generation() == self.snapshot.generation:
                return False
            self.snapshot = self.registry.snapshot()
            return True

    def unknown_key(self, secret: str) -> bool:
        """A well-formed key whose id the snapshot does not know (only such a key is worth asking the store about)."""
        key_id = parse_key(secret)
        return key_id is not None and key_id not in self.snapshot.keys

    def adapters(self, tenant_id: int) -> list[AdapterRecord]:
        return sorted((a for (t, _), a in self.snapshot.adapters.items() if t == tenant_id), key=lambda a: a.name)
