"""The watchdog actor: event-loop lag and client liveness for one session.

It wakes every ``watchdog_interval_s`` (a cancel-scope deadline, not a background timer:
it dies with the session). How late it wakes is the event loop's lag, the one figure that
says a process is overloaded before its users do. A client that has sent nothing for
``idle_timeout_s`` (browsers send audio continuously; an SDK client at least pings with
events) ends the session, so a vanished client does not hold an upstream connection for
hours. Upstream stalls are the upstream actor's own business (its stall deadline).
"""

from __future__ import annotations

import trio

from ..session import EndSession
from .config import RuntimeConfig
from .context import SessionContext

__all__ = ["Watchdog"]


class Watchdog:
    """Watch one session; ``run`` raises ``EndSession("idle_timeout")`` when the client is idle."""

    def __init__(
        self, ctx: SessionContext, config: RuntimeConfig, observe_lag: object = None
    ) -> None:
        self.ctx = ctx
        self.interval = config.watchdog_interval_s
        self.idle_timeout = config.idle_timeout_s
        self.max_lag = 0.0
        self._observe = observe_lag  # (seconds) -> None, e.g. a histogram's observe

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            planned = trio.current_time() + self.interval
            await trio.sleep_until(planned)
            now = trio.current_time()
            lag = now - planned
            if lag > self.max_lag:
                self.max_lag = lag
            if self._observe is not None:
                self._observe(lag)  # type: ignore[operator]
            quiet = now - max(ctx.last_client_at, ctx.opened_at)
            if quiet >= self.idle_timeout:
                raise EndSession(
                    "idle_timeout", 1000, f"no client message for {self.idle_timeout:g} s"
                )
