"""Process-wide upstream state: one breaker per endpoint and a warm pool of connections.

A session should start talking at once. The ``WarmPool`` keeps ``size`` connections per
endpoint open ahead of time, each past ``session.created`` and configured with the
runtime's default session config, so taking one costs no handshake. Connections older than
``ttl`` are closed and replaced (the upstream ends sessions at 60 minutes), and a refill
task tops the pool up in the background. Refill attempts go through the endpoint's breaker
like any other connect, so an outage does not turn the pool into a hammer.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import trio
import trio_websocket

from ..machines.breaker import BreakerMachine, CircuitOpen
from ..machines.breaker import Config as BreakerConfig
from ..realtime import ErrorEvent, ProtocolError, SessionUpdated
from .connection import ConnectError, Endpoint, UpstreamConnection, open_upstream

__all__ = ["BreakerRegistry", "PoolConfig", "WarmPool"]


class BreakerRegistry:
    """One ``BreakerMachine`` per endpoint key, shared by every session of the process."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._breakers: dict[str, BreakerMachine] = {}

    def get(self, endpoint: Endpoint) -> BreakerMachine:
        breaker = self._breakers.get(endpoint.key)
        if breaker is None:
            breaker = self._breakers[endpoint.key] = BreakerMachine(self.config)
        return breaker

    def states(self) -> dict[str, str]:
        return {key: str(b.state) for key, b in self._breakers.items()}


@dataclass(frozen=True)
class PoolConfig:
    size: int = 2
    ttl: float = 50 * 60.0
    connect_timeout: float = 10.0
    refill_backoff: float = 1.0


class WarmPool:
    """Pre-opened, configured connections to one endpoint. Run ``run()`` in a nursery.

    ``take()`` never waits: it returns a fresh connection or ``None`` (the caller then
    connects cold). Connections handed out belong to the taker, who must close them.
    Cancelling ``run()`` closes every connection still in the pool.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        breakers: BreakerRegistry,
        config: PoolConfig | None = None,
        *,
        configure: object | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.config = config or PoolConfig()
        self._breakers = breakers
        self._configure = configure  # a client event (session.update) sent on each new one
        self._idle: deque[UpstreamConnection] = deque()
        self._wanted = trio.Event()
        self._grew = trio.Event()
        self.opened = 0
        self.taken = 0
        self.expired = 0
        self.failures = 0

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> UpstreamConnection | None:
        """A ready connection, or ``None`` when the pool is empty. Wakes the refill."""
        now = trio.current_time()
        conn: UpstreamConnection | None = None
        while self._idle:
            candidate = self._idle.popleft()
            if not candidate.closed and now - candidate.opened_at < self.config.ttl:
                conn = candidate
                break
            self.expired += 1
            self._discard(candidate)
        self._wanted.set()
        if conn is not None:
            self.taken += 1
        return conn

    def _discard(self, conn: UpstreamConnection) -> None:
        # Closing is bounded; done by the refill task's nursery via a flag list.
        self._to_close.append(conn)
        self._wanted.set()

    _to_close: list[UpstreamConnection]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool full until cancelled; closes everything on the way out."""
        self._to_close = []
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._refill_forever(nursery)
        finally:
            with trio.CancelScope(shield=True):
                for conn in [*self._idle, *self._to_close]:
                    await conn.aclose(1001, "pool closing")
                self._idle.clear()
                self._to_close.clear()

    async def _refill_forever(self, nursery: trio.Nursery) -> None:
        while True:
            while self._to_close:
                await self._to_close.pop().aclose(1000, "expired in pool")
            self._expire(trio.current_time())
            if len(self._idle) < self.config.size:
                if not await self._open_one(nursery):
                    await trio.sleep(self.config.refill_backoff)
                continue
            self._wanted = trio.Event()
            oldest = min((c.opened_at for c in self._idle), default=math.inf)
            with trio.move_on_at(oldest + self.config.ttl):
                await self._wanted.wait()

    def _expire(self, now: float) -> None:
        keep: deque[UpstreamConnection] = deque()
        for conn in self._idle:
            if conn.closed or now - conn.opened_at >= self.config.ttl:
                self.expired += 1
                self._to_close.append(conn)
            else:
                keep.append(conn)
        self._idle = keep

    async def _open_one(self, nursery: trio.Nursery) -> bool:
        breaker = self._breakers.get(self.endpoint)
        started = trio.current_time()
        try:
            breaker.try_acquire(started)
        except CircuitOpen:
            return False
        try:
            conn = await nursery.start(self._keep)
        except ConnectError:
            self.failures += 1
            breaker.record(False, trio.current_time() - started, trio.current_time())
            return False
        except BaseException:
            breaker.release(trio.current_time())
            raise
        breaker.record(True, trio.current_time() - started, trio.current_time())
        self.opened += 1
        self._idle.append(conn)
        self._grew.set()
        self._grew = trio.Event()
        return True

    async def wait_filled(self, count: int | None = None) -> None:
        """Wait until at least ``count`` (default: ``size``) connections are idle here."""
        want = self.config.size if count is None else count
        while len(self._idle) < want:
            await self._grew.wait()

    async def _keep(self, *, task_status: trio.TaskStatus[UpstreamConnection]) -> None:
        """Hold one connection open until whoever has it (pool or session) releases it."""
        async with open_upstream(self.endpoint, timeout=self.config.connect_timeout) as conn:
            if self._configure is not None:
                # Configured means acknowledged: the session.updated is taken here, so the
                # session that takes the connection does not mistake it for an answer to
                # its client's own update.
                try:
                    with trio.fail_after(self.config.connect_timeout):
                        await conn.send(self._configure)
                        while not isinstance(event := await conn.receive(), SessionUpdated):
                            if isinstance(event, ErrorEvent):
                                raise ConnectError(
                                    f"configure refused: {event.error.message}",
                                    code=event.error.code or "",
                                )
                except (trio_websocket.ConnectionClosed, ProtocolError):
                    raise ConnectError("closed while configuring") from None
                except trio.TooSlowError:
                    raise ConnectError("no session.updated for the configure") from None
            task_status.started(conn)
            await conn.released.wait()
