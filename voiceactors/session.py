"""A session: one conversation, run as a Trio nursery of actors joined by bounded edges.

Theory of operation
-------------------
A ``Session`` is declared, then run once. Declaring wires it: ``edge()`` makes a bounded
channel with a stated full-policy, ``actor()`` names an async function and its arguments
(usually edge ends). ``run()`` opens one nursery, starts every actor in it, and returns a
``SessionSummary`` when the session is over. It is over when

* an actor raises ``EndSession(reason, code)`` (the normal way to finish: the client said
  goodbye, a fatal upstream error, the breaker refused us),
* an actor marked ``ends_session`` returns (e.g. capture, when the client's socket closes),
* an actor raises anything else: that is a bug; the session ends with reason
  ``internal_error`` and code 1011, the exception is logged and kept in the summary, and
  nothing propagates to the caller (a bug in one session must not crash its neighbours),
* ``max_duration`` passes (reason ``max_duration``, code 1001), or
* the caller's scope is cancelled: then ``run()`` raises ``trio.Cancelled`` as Trio
  requires, after filling ``session.summary`` (reason ``cancelled``).

In every case the nursery is cancelled, every actor has returned by the time ``run()``
does, and every edge is closed: no task, timer or buffer outlives the session.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from .channels import Edge, Full, open_edge

__all__ = ["ActorOutcome", "EndSession", "Session", "SessionSummary"]

log = logging.getLogger("voiceactors.session")
_ids = itertools.count(1)


class EndSession(Exception):
    """Raised by an actor to end its session with ``reason`` and a WebSocket ``code``."""

    def __init__(self, reason: str, code: int = 1000, detail: str = "") -> None:
        super().__init__(f"{reason} ({code})" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.code = code
        self.detail = detail


def _only_end(group: BaseExceptionGroup) -> EndSession | None:
    """The first ``EndSession`` in ``group`` if every other leaf is a cancellation."""
    ends, others = group.split(EndSession)
    if ends is None or (
        others is not None
        and others.subgroup(
            lambda e: not isinstance(e, trio.Cancelled) and not isinstance(e, BaseExceptionGroup)
        )
        is not None
    ):
        return None
    leaf: BaseException = ends
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, EndSession) else None


class ActorOutcome(msgspec.Struct, frozen=True):
    """How one actor finished: ``returned``, ``ended``, ``cancelled`` or ``error``."""

    name: str
    outcome: str
    detail: str = ""


class SessionSummary(msgspec.Struct, frozen=True):
    """What a finished session reports (JSON-encodable with msgspec)."""

    session_id: str
    reason: str
    code: int
    detail: str
    started_at: float
    ended_at: float
    actors: list[ActorOutcome]
    edges: dict[str, dict[str, int]]
    error: str | None = None

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at


class _Actor:
    __slots__ = ("args", "ends_session", "fn", "name")

    def __init__(
        self,
        name: str,
        fn: Callable[..., Awaitable[object]],
        args: tuple[Any, ...],
        ends_session: str | None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.args = args
        self.ends_session = ends_session


class Session:
    """One conversation's actors and edges. Declare with ``edge``/``actor``, then ``run``."""

    def __init__(self, session_id: str | None = None, *, max_duration: float = math.inf) -> None:
        self.id = session_id or f"sess_{next(_ids)}"
        self.max_duration = max_duration
        self.edges: list[Edge[Any]] = []
        self._actors: list[_Actor] = []
        self._scope: trio.CancelScope | None = None
        self._end: tuple[str, int, str] | None = None
        self._error: BaseException | None = None
        self._outcomes: dict[str, ActorOutcome] = {}
        self.summary: SessionSummary | None = None
        self._started = False

    # -- declaring ----------------------------------------------------------------------

    def edge(self, name: str, capacity: int, policy: Full = Full.BLOCK) -> Edge[Any]:
        """A bounded edge owned by this session (closed when the session ends)."""
        if self._started:
            raise RuntimeError("edges are declared before run()")
        edge: Edge[Any] = open_edge(name, capacity, policy)
        self.edges.append(edge)
        return edge

    def actor(
        self,
        name: str,
        fn: Callable[..., Awaitable[object]],
        *args: Any,
        ends_session: str | None = None,
    ) -> None:
        """Run ``await fn(*args)`` as an actor of this session.

        With ``ends_session="client_end"`` (say), the actor returning normally ends the
        session with that reason; otherwise a returning actor just leaves the others be.
        """
        if self._started:
            raise RuntimeError("actors are declared before run()")
        if any(a.name == name for a in self._actors):
            raise ValueError(f"duplicate actor name {name!r}")
        self._actors.append(_Actor(name, fn, args, ends_session))

    # -- running ------------------------------------------------------------------------

    def end(self, reason: str, code: int = 1000, detail: str = "") -> None:
        """End the session from any task (sync, idempotent: the first reason wins)."""
        if self._end is None:
            self._end = (reason, code, detail)
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> SessionSummary:
        """Run every actor until the session ends; return its summary (see module doc).

        Raises ``trio.Cancelled`` if the caller's scope is cancelled (``self.summary`` is
        set first). Can be called once.
        """
        if self._started:
            raise RuntimeError(f"session {self.id} already ran")
        self._started = True
        started = trio.current_time()
        try:
            with trio.CancelScope(deadline=started + self.max_duration) as scope:
                self._scope = scope
                if self._end is not None:  # ended before it started
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    for actor in self._actors:
                        nursery.start_soon(self._run_actor, actor, name=f"{self.id}/{actor.name}")
            if self._end is None:
                if scope.cancelled_caught:
                    self._end = ("max_duration", 1001, f"{self.max_duration:g} s")
                else:  # every actor returned on its own
                    self._end = ("completed", 1000, "")
        finally:
            for edge in self.edges:
                edge.close()
            self._scope = None
            self.summary = self._summarize(started)
        return self.summary

    async def _run_actor(self, actor: _Actor) -> None:
        try:
            try:
                await actor.fn(*actor.args)
            except BaseExceptionGroup as group:
                # An actor's own nursery wraps what its tasks raise; an EndSession inside
                # (with nothing but cancellations beside it) is still a clean end.
                end = _only_end(group)
                if end is None:
                    raise
                raise end from None
        except EndSession as exc:
            self._outcomes[actor.name] = ActorOutcome(actor.name, "ended", str(exc))
            self.end(exc.reason, exc.code, exc.detail)
        except trio.Cancelled:
            self._outcomes[actor.name] = ActorOutcome(actor.name, "cancelled")
            raise
        except Exception as exc:
            log.exception("session %s: actor %s failed", self.id, actor.name)
            self._outcomes[actor.name] = ActorOutcome(actor.name, "error", repr(exc))
            if self._error is None:
                self._error = exc
            self.end("internal_error", 1011, f"{actor.name}: {exc!r}")
        else:
            self._outcomes[actor.name] = ActorOutcome(actor.name, "returned")
            if actor.ends_session is not None:
                self.end(actor.ends_session, 1000)

    def _summarize(self, started: float) -> SessionSummary:
        reason, code, detail = self._end or ("cancelled", 1001, "cancelled from outside")
        return SessionSummary(
            session_id=self.id,
            reason=reason,
            code=code,
            detail=detail,
            started_at=started,
            ended_at=trio.current_time(),
            actors=[
                self._outcomes.get(a.name, ActorOutcome(a.name, "not_started"))
                for a in self._actors
            ],
            edges={e.name: e.stats.as_dict() for e in self.edges},
            error=repr(self._error) if self._error is not None else None,
        )
