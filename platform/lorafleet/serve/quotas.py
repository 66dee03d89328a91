"""Per-tenant request quotas enforced by the ingress: requests/minute, tokens/minute, concurrency.

Requests and tokens per minute are token buckets that hold a minute's budget and refill
continuously, so a tenant may burst up to its per-minute quota and then proceeds at the
steady rate. Tokens are only known when a request ends (prompt + completion, as reported
in ``usage``), so they are debited then; a tenant whose token bucket is empty gets 429
until it refills. Every 429 carries ``Retry-After`` (whole seconds until the request would
be admitted).

Every server replica answers HTTP itself, and Serve's proxy spreads a tenant's requests over
them, so the quota state is shared: :class:`SharedQuotas` keeps one :class:`QuotaLimiter` for
the whole app in a small Ray actor. Only requests of tenants that have a request, token or
concurrency quota call it (one actor call to admit, one to release);
everyone else never leaves the replica. If the actor dies with the replica that started it,
the next request starts a new one (the buckets start full again).

Example::

    limiter = QuotaLimiter(shares=1)
    with limiter.admit(tenant_id, {"requests_per_minute": 60, ...}) as ticket:
        ...                                  # run the request
        ticket.tokens = usage["total_tokens"]
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


class RateLimited(Exception):
    """A request over a quota: 429 with ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int, code: str):
        super().__init__(message)
        self.message, self.retry_after_s, self.code = message, max(1, retry_after_s), code


class _Bucket:
    def __init__(self, per_minute: float):
        self.capacity = per_minute
        self.level = per_minute
        self.stamp = time.monotonic()

    def _refill(self, capacity: float) -> None:
        now = time.monotonic()
        if capacity != self.capacity:  # the quota changed: keep the spent part, clamp to the new size
            self.level = min(self.level, capacity)
            self.capacity = capacity
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def seconds_until(self, capacity: float, amount: float) -> float:
        """0 when ``amount`` is available now, else the wait until it is."""
        self._refill(capacity)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass
class _TenantState:
    requests: Optional[_Bucket] = None
    tokens: Optional[_Bucket] = None
    in_flight: int = 0


@dataclass
class Ticket:
    """An admitted request; set ``tokens`` before it is released."""

    limiter: "QuotaLimiter"
    tenant_id: int
    tokens: int = 0
    _released: bool = field(default=False, repr=False)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.limiter._release(self.tenant_id, self.tokens)


class QuotaLimiter:
    """The quota state of one ingress replica, for every tenant."""

    def __init__(self, shares: int = 1):
        self.shares = max(1, shares)
        self._lock = threading.Lock()
        self._tenants: dict[int, _TenantState] = {}

    def _share(self, value: Optional[int]) -> Optional[float]:
        return None if value is None else max(1.0, value / self.shares)

    def admit(self, tenant_id: int, quotas: dict) -> Ticket:
        """Admit one request of the tenant or raise :class:`RateLimited`."""
        rpm = self._share(quotas.get("requests_per_minute"))
        tpm = self._share(quotas.get("tokens_per_minute"))
        concurrent = quotas.get("max_concurrent_requests")
        concurrent = None if concurrent is None else max(1, concurrent // self.shares)
        with self._lock:
            state = self._tenants.setdefault(tenant_id, _TenantState())
            if concurrent is not None and state.in_flight >= concurrent:
                raise RateLimited(f"Too many concurrent requests: this key's tenant already has {state.in_flight} in flight "
                                  f"(limit {concurrent}); retry when one finishes.", 1, "concurrency_limit_exceeded")
            if tpm is not None:
                state.tokens = state.tokens or _Bucket(tpm)
                wait = state.tokens.seconds_until(tpm, 1)  # any positive balance admits
                if wait > 0:
                    raise RateLimited(f"Rate limit reached: tokens per minute (limit {int(tpm)}) are used up; retry in {math.ceil(wait)} s.",
                                      math.ceil(wait), "rate_limit_exceeded")
            if rpm is not None:
                state.requests = state.requests or _Bucket(rpm)
                wait = state.requests.seconds_until(rpm, 1)
                if wait > 0:
                    raise RateLimited(f"Rate limit reached: requests per minute (limit {int(rpm)}); retry in {math.ceil(wait)} s.",
                                      math.ceil(wait), "rate_limit_exceeded")
                state.requests.take(1)
            state.in_flight += 1
        return Ticket(self, tenant_id)

    def _release(self, tenant_id: int, tokens: int) -> None:
        with self._lock:
            state = self._tenants.get(tenant_id)
            if state is None:
                return
            state.in_flight -= 1
            if state.tokens is not None and tokens:
                state.tokens.take(tokens)

    def forget(self, tenant_id: int) -> None:
        """Drop a deleted tenant's state."""
        with self._lock:
            self._tenants.pop(tenant_id, None)


class _QuotaActor:
    """The app's one QuotaLimiter (a Ray actor: ``SharedQuotas`` creates it by name)."""

    def __init__(self):
        self.limiter = QuotaLimiter()

    def admit(self, tenant_id: int, quotas: dict) -> Optional[tuple]:
        """None when admitted, else ``(message, retry_after_s, code)``."""
        try:
            self.limiter.admit(tenant_id, quotas)
        except RateLimited as exc:
            return exc.message, exc.retry_after_s, exc.code
        return None

    def release(self, tenant_id: int, tokens: int) -> None:
        self.limiter._release(tenant_id, tokens)

    def forget(self, tenant_id: int) -> None:
        self.limiter.forget(tenant_id)


@dataclass
class SharedTicket:
    """An admitted request of a tenant with quotas; set ``tokens``, then await :meth:`release` (once).

    The server awaits the release before the response ends, so the tenant's next request (to any
    replica) is admitted against counts that include this one.
    """

    quotas: "SharedQuotas"
    tenant_id: int
    tokens: int = 0
    _released: bool = field(default=False, repr=False)

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self.quotas._release(self.tenant_id, self.tokens)


class SharedQuotas:
    """Quotas counted once for every replica of the app (see the module docstring).

    ``name`` names the actor (one per Serve application). Outside a Ray worker (tools, unit
    tests) the limiter is local to the process.
    """

    def __init__(self, name: str):
        self.name = name
        self._actor = None
        self._local: Optional[QuotaLimiter] = None

    def _handle(self):
        import ray

        if not ray.is_initialized():
            return None
        if self._actor is None:
            self._actor = ray.remote(_QuotaActor).options(name=self.name, namespace="lorafleet", get_if_exists=True, num_cpus=0,
                                                          max_concurrency=1).remote()
        return self._actor

    async def admit(self, tenant_id: int, quotas: dict):
        """A ticket for one request, or :class:`RateLimited`."""
        from ray.exceptions import RayActorError

        handle = self._handle()
        if handle is None:
            self._local = self._local or QuotaLimiter()
            self._local.admit(tenant_id, quotas)
            return SharedTicket(self, tenant_id)
        try:
            refused = await handle.admit.remote(tenant_id, quotas)
        except RayActorError:  # the actor died with the replica that owned it: start a new one
            self._actor = None
            refused = await self._handle().admit.remote(tenant_id, quotas)
        if refused is not None:
            raise RateLimited(*refused)
        return SharedTicket(self, tenant_id)

    async def _release(self, tenant_id: int, tokens: int) -> None:
        from ray.exceptions import RayActorError

        if self._actor is not None:
            try:
                await self._actor.release.remote(tenant_id, tokens)
            except RayActorError:  # the actor (and its counts) went away with its replica: nothing to release
                self._actor = None
        elif self._local is not None:
            self._local._release(tenant_id, tokens)

    def forget(self, tenant_id: int) -> None:
        handle = self._handle()
        if handle is not None:
            handle.forget.remote(tenant_id)
        elif self._local is not None:
            self._local.forget(tenant_id)
