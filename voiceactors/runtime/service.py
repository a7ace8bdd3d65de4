"""The runtime: what serves client sessions in a process (one upstream, many sessions).

``open_runtime_from_config`` starts the process-wide parts in one nursery: the embedded
simulator (when the upstream is ``"sim"``), the warm pool of upstream connections, the
shared breaker registry and the metrics. ``Runtime.run_client`` then runs one client's
session as a nursery of actors:

```
client ──▶ capture ──up──▶ upstream ──▶ Realtime API / simulator
   ▲          │ VAD           │
   │          ▼               ▼
   └───── playback ◀──play────┘──tools──▶ tool-runner ──up──▶
                 watchdog (loop lag, client idle)
```

Everything a session owns lives in that nursery; when it ends (client gone, fatal
upstream error, breaker open, rate limit, idle, max duration, a bug) every actor is
cancelled, every edge closed and the client is told why (an ``error`` event when the
server ended it, then the close code). A session's failure never reaches another one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio
from msgspec import UNSET

from .. import metrics as m
from ..channels import Full
from ..realtime import events as ev
from ..session import Session, SessionSummary
from ..sim import RunningSimulator, Simulator
from ..upstream import BreakerRegistry, Endpoint, UpstreamActor, WarmPool
from .capture import Capture
from .client import ClientLink, ClientPort
from .config import RuntimeConfig
from .context import SessionContext, Truncation, TurnTiming
from .playback import Playback
from .tools import ToolMetrics, ToolRegistry, ToolRunner, demo_tools
from .watchdog import Watchdog

__all__ = ["Runtime", "RuntimeError_", "SessionReport", "open_runtime_from_config"]

log = logging.getLogger("voiceactors.runtime")

# Bounded label values for the sessions-ended counter.
END_REASONS = (
    "client_closed",
    "client_lost",
    "completed",
    "rate_limited",
    "idle_timeout",
    "client_not_reading",
    "upstream_failed",
    "upstream_unavailable",
    "downstream_closed",
    "max_duration",
    "internal_error",
    "cancelled",
    "other",
)


class RuntimeError_(ValueError):
    """The runtime cannot start as configured (no API key, bad upstream, ...)."""


class SessionReport(msgspec.Struct, frozen=True):
    """What one client session did, measured (the ``run`` command prints it)."""

    session_id: str
    reason: str
    code: int
    detail: str
    setup_ms: float | None
    reconnects: int
    frames_in: int
    frames_dropped: int
    audio_ms_in: float
    audio_ms_out: float
    audio_ms_dropped: float
    underruns: int
    barge_ins: list[float]
    false_interruptions: int
    truncations: list[Truncation]
    turns: list[TurnTiming]
    tool_calls: int
    client_errors: int
    max_loop_lag_ms: float
    summary: SessionSummary


class _Metrics:
    def __init__(self, registry: m.Registry) -> None:
        p = "voiceactors_session_"
        ended = registry.counter(p + "ended_total", "Client sessions ended, by reason.", ["reason"])
        self.ended = {r: ended.labels(r) for r in END_REASONS}
        self.barge_ins = registry.counter(p + "barge_ins_total", "Barge-ins (agent cut off).")
        self.false = registry.counter(
            p + "false_interruptions_total", "Interruptions too short to cut the agent off."
        )
        self.underruns = registry.counter(
            p + "playback_underruns_total", "Times a client ran out of agent audio mid-answer."
        )
        self.reconnects = registry.counter(p + "upstream_reconnects_total", "Upstream reconnects.")
        self.client_errors = registry.counter(
            p + "client_errors_total", "Client events refused with an error event."
        )
        self.frames_in = registry.counter(p + "audio_frames_in_total", "Client audio frames.")
        self.first_audio = registry.histogram(
            p + "first_audio_seconds",
            "End of user speech to the first agent audio sent to the client.",
            buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
        )
        self.barge_in = registry.histogram(
            p + "barge_in_seconds",
            "User speech onset to agent playback flushed.",
            buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
        )
        self.loop_lag = registry.histogram(
            "voiceactors_event_loop_lag_seconds",
            "How late a session watchdog woke up.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )


class Runtime:
    """Serves client sessions against one upstream; make it with ``open_runtime_from_config``."""

    def __init__(
        self,
        config: RuntimeConfig,
        endpoint: Endpoint,
        *,
        breakers: BreakerRegistry,
        pool: WarmPool | None,
        tools: ToolRegistry,
        metrics: m.Registry,
        sim: RunningSimulator | None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.breakers = breakers
        self.pool = pool
        self.tools = tools
        self.metrics = metrics
        self.sim = sim
        self._m = _Metrics(metrics)
        self._tool_metrics = ToolMetrics(metrics)
        self._rng = rng or random.Random()
        self.session_defaults = default_session(config, tools)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: ready unless the upstream's breaker is open (no secrets in it)."""
        state = str(self.breakers.get(self.endpoint).state)
        detail = {
            "upstream": "sim" if self.sim is not None else self.endpoint.url,
            "breaker": state,
            "warm_connections": len(self.pool) if self.pool is not None else 0,
        }
        return state != "open", detail

    async def handle_client(self, ws: ClientPort, info: Any) -> None:
        """The gateway's session handler: run the session; the report goes to metrics."""
        await self.run_client(ws, info)

    async def run_client(self, port: ClientPort, info: Any) -> SessionReport:
        """Run one client's session on ``port`` until it ends; close the port; report.

        Raises ``trio.Cancelled`` when cancelled from outside (the gateway's drain), after
        every actor has stopped.
        """
        cfg = self.config
        now = trio.current_time()
        ctx = SessionContext(opened_at=now, last_client_at=now)
        session = Session(info.session_id, max_duration=cfg.max_session_s)
        up = session.edge("up", 32, Full.BLOCK)
        play = session.edge("play", 64, Full.BLOCK)
        calls = session.edge("tools", 16, Full.BLOCK)
        link = ClientLink(port, send_timeout=cfg.client_send_timeout_s)
        upstream = UpstreamActor(
            self.endpoint,
            breakers=self.breakers,
            session=self.session_defaults,
            pool=self.pool,
            config=cfg.upstream_config,
            rng=random.Random(self._rng.random()),
        )
        runner = ToolRunner(self.tools, up.sender, metrics=self._tool_metrics)
        capture = Capture(ctx, cfg, link, up.sender, play.sender, info.rate_limiter)
        playback = Playback(
            ctx,
            cfg,
            link,
            up.sender,
            calls.sender,
            upstream,
            tool_names=self.tools.names(),
            cancel_tools=runner.cancel,
        )
        watchdog = Watchdog(ctx, cfg, self._m.loop_lag.observe)
        session.actor("capture", capture.run, port, ends_session="client_closed")
        session.actor("upstream", upstream.run, up.receiver, play.sender)
        session.actor("playback", playback.run, play.receiver)
        session.actor("tools", runner.run, calls.receiver)
        session.actor("watchdog", watchdog.run)
        try:
            summary = await session.run()
        finally:
            if session.summary is not None:
                self._count(session.summary, ctx, upstream)
        await self._goodbye(link, summary)
        return SessionReport(
            session_id=summary.session_id,
            reason=summary.reason,
            code=summary.code,
            detail=summary.detail,
            setup_ms=None if ctx.ready_at is None else (ctx.ready_at - ctx.opened_at) * 1000.0,
            reconnects=upstream.reconnects,
            frames_in=ctx.frames_in,
            frames_dropped=sum(e["dropped"] for e in summary.edges.values()),
            audio_ms_in=ctx.input_ms,
            audio_ms_out=ctx.audio_ms_out,
            audio_ms_dropped=ctx.audio_ms_dropped + upstream.log.audio.dropped_ms,
            underruns=ctx.underruns,
            barge_ins=list(ctx.barge_ins),
            false_interruptions=ctx.false_interruptions,
            truncations=list(ctx.truncations),
            turns=list(ctx.turns),
            tool_calls=ctx.tool_calls,
            client_errors=ctx.client_errors,
            max_loop_lag_ms=watchdog.max_lag * 1000.0,
            summary=summary,
        )

    def _count(self, summary: SessionSummary, ctx: SessionContext, upstream: UpstreamActor) -> None:
        mm = self._m
        reason = summary.reason if summary.reason in mm.ended else "other"
        mm.ended[reason].inc()
        mm.barge_ins.inc(len(ctx.barge_ins))
        mm.false.inc(ctx.false_interruptions)
        mm.underruns.inc(ctx.underruns)
        mm.reconnects.inc(upstream.reconnects)
        mm.client_errors.inc(ctx.client_errors)
        mm.frames_in.inc(ctx.frames_in)
        for b in ctx.barge_ins:
            mm.barge_in.observe(b / 1000.0)
        for t in ctx.turns:
            if t.first_audio_ms is not None:
                mm.first_audio.observe(t.first_audio_ms / 1000.0)

    async def _goodbye(self, link: ClientLink, summary: SessionSummary) -> None:
        """Tell the client why the server ended its session, then close."""
        if summary.reason in ("client_closed", "client_lost"):
            return
        kind = "server_error" if summary.code in (1011, 1013) else "invalid_request_error"
        text = summary.detail or summary.reason
        try:
            await link.error(summary.reason, f"Session ended: {text}", type=kind)
        except Exception:  # the client is gone or not reading: the close says enough
            pass
        await link.close(summary.code, summary.reason)


def default_session(config: RuntimeConfig, tools: ToolRegistry) -> ev.Session:
    """The operator's session: PCM16 24 kHz, server VAD without auto-interrupt, tools."""
    fmt = ev.AudioFormat(type="audio/pcm", rate=24000)
    return ev.Session(
        instructions=config.instructions if config.instructions is not None else UNSET,
        audio=ev.AudioConfig(
            input=ev.AudioInput(
                format=fmt,
                turn_detection=ev.TurnDetection(type="server_vad", interrupt_response=False),
            ),
            output=ev.AudioOutput(
                format=fmt, voice=config.voice if config.voice is not None else UNSET
            ),
        ),
        tools=tools.definitions() if len(tools) else UNSET,
    )


def endpoint_for(config: RuntimeConfig, sim: RunningSimulator | None) -> Endpoint:
    """The upstream ``config`` names (``RuntimeError_`` when it cannot be used)."""
    if config.upstream == "sim":
        assert sim is not None
        return Endpoint(sim.url, model=config.model)
    if config.upstream == "openai":
        try:
            return Endpoint.openai(config.model)
        except ValueError as exc:
            raise RuntimeError_(
                "--upstream openai needs OPENAI_API_KEY in the environment"
            ) from exc
    return Endpoint(config.upstream, model=config.model)


@asynccontextmanager
async def open_runtime_from_config(
    config: RuntimeConfig,
    *,
    metrics: m.Registry | None = None,
    tools: ToolRegistry | None = None,
) -> AsyncIterator[Runtime]:
    """Start the process-wide parts for ``config``; stop them when the block ends.

    ``tools`` adds the operator's tools (the demo tools are used when
    ``config.uses_demo_tools``). Raises :class:`RuntimeError_` before anything starts if
    the upstream cannot be used. Leaving the block closes the warm pool's connections and
    the embedded simulator; sessions still running must have ended first (the gateway
    drains them).
    """
    registry = tools if tools is not None else ToolRegistry()
    if config.uses_demo_tools:
        for tool in demo_tools():
            if tool.name not in registry:
                registry.add(tool)
    if config.upstream != "sim":
        endpoint_for(config, None)  # fail before starting anything
    async with trio.open_nursery() as nursery:
        sim: RunningSimulator | None = None
        if config.upstream == "sim":
            sim = await nursery.start(_serve_sim, config)
        endpoint = endpoint_for(config, sim)
        breakers = BreakerRegistry()
        runtime_metrics = metrics if metrics is not None else m.Registry()
        pool: WarmPool | None = None
        if config.pool.size > 0:
            configure = ev.SessionUpdate(session=default_session(config, registry))
            pool = WarmPool(endpoint, breakers, config.pool, configure=configure)
            await nursery.start(pool.run)
        runtime = Runtime(
            config,
            endpoint,
            breakers=breakers,
            pool=pool,
            tools=registry,
            metrics=runtime_metrics,
            sim=sim,
        )
        try:
            yield runtime
        finally:
            nursery.cancel_scope.cancel()


async def _serve_sim(
    config: RuntimeConfig, *, task_status: trio.TaskStatus[RunningSimulator]
) -> None:
    sim = Simulator(config.sim)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        task_status.started(RunningSimulator(sim, port))
