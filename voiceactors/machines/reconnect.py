"""Reconnect: one session's upstream connection, from the first connect to giving up.

Theory of operation
-------------------
The upstream actor holds at most two WebSockets to the Realtime API, in two slots:
``current`` (the connection the session talks through, or the attempt that will become it)
and ``next`` (a make-before-break replacement while recycling). This machine decides when to
open, close and swap them, when to configure or replay the session, and what to tell the
client. The driver reports what happened to the connections as events:

* ``connected`` means ``session.created`` arrived on the connection being opened;
  ``connect_failed`` means that connection ended before it (handshake refused, 429/5xx,
  a close, a fatal error code or a 401/403 handshake); ``closed`` means the established
  ``current`` connection ended. ``planned=True`` marks a close that is not a fault
  (``session_expired`` then 1001, a server restart): the machine reconnects at once without
  counting a failure, unless the close came within ``quick_failure_window`` of the accept
  (then it is a quick failure: a zero-delay reconnect loop is never safe).
* The first accepted connection of a session gets ``configure``; every later one gets
  ``replay`` (config, tools, items, un-committed audio: a new upstream connection is an
  empty session). ``notify`` tells the client when it is reconnecting and when it is back.
* Every other failure is retried after a full-jitter exponential delay
  ``uniform(0, min(cap, base * 2**n))`` where ``n`` counts the failures of this outage before
  the current one; the first retry after a *stable* connection drops waits only
  ``first_retry_delay``. An outage starts at its first failure and ends once a connection
  has stayed up ``stable_after`` seconds; a retry that could not start within
  ``retry_budget`` of the outage start (or past ``max_attempts``) ends in ``failed``, and
  so do ``max_quick_failures`` connections closed within ``quick_failure_window`` of
  being accepted.
* Fatal errors (``FATAL_CODES``, handshake ``FATAL_STATUSES``) go to ``failed`` at once.
* ``recycle_after`` seconds after a connect (or on an explicit ``recycle``) the connection
  is replaced before the upstream's 60-minute cap: once no response is in flight a ``next``
  connection is opened, and once it is accepted *and* no response is in flight on
  ``current`` the two are swapped and the session replayed onto the new one.
* A failed recycle attempt is a failure of the outage like any other (it counts towards the
  budget and the attempts), but the old connection still works, so the machine goes back to
  ``ready`` on it and tries the recycle again after the backoff delay. Once the budget or
  the attempts are spent it stops trying and keeps the old connection until it closes; that
  close then takes the normal path (and finds the outage budget spent). If instead the old
  connection closes while ``next`` is being opened, ``next`` simply takes over (``swap``):
  no retry is needed for a connection already under way, so that close is not counted.

Stability is judged when an event arrives (no wake-up is needed to decide it: nothing
depends on it until the next event). Every decision is in this module; the machine reads no
clock and does no I/O (see ``_core``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from enum import StrEnum
from typing import Final, Literal

import msgspec

from ._core import Machine, Timer

__all__ = [
    "FATAL_CODES",
    "FATAL_STATUSES",
    "MACHINE",
    "CloseConnection",
    "Closed",
    "Config",
    "Configure",
    "ConnectFailed",
    "Connected",
    "Fail",
    "FatalError",
    "Notify",
    "OpenConnection",
    "ReconnectMachine",
    "Recycle",
    "Replay",
    "ResponseDone",
    "ResponseStarted",
    "Start",
    "State",
    "Stop",
    "Swap",
    "Timer",
    "is_fatal",
]


class State(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    BACKOFF = "backoff"
    RECYCLING = "recycling"
    FAILED = "failed"


def _to(*states: State) -> frozenset[State]:
    return frozenset(states)


IDLE, CONNECTING, READY, BACKOFF, RECYCLING, FAILED = State

#: ``state -> event -> allowed next states``. Several targets: a guard decides (see spec).
TABLE: Final = {
    IDLE: {
        "start": _to(CONNECTING),
        "stop": _to(IDLE),
    },
    CONNECTING: {
        "connected": _to(READY),
        "connect_failed": _to(BACKOFF, FAILED),  # fatal or limits spent -> failed
        "fatal_error": _to(FAILED),
        "timer": _to(CONNECTING, BACKOFF, FAILED),  # early: no-op; else a failure
        "stop": _to(IDLE),
    },
    READY: {
        "closed": _to(CONNECTING, BACKOFF, FAILED),  # planned: at once; else a failure
        "fatal_error": _to(FAILED),
        "response_started": _to(READY),
        "response_done": _to(READY, RECYCLING),  # a recycle was waiting for it
        "recycle": _to(READY, RECYCLING),  # waits while a response is in flight
        "timer": _to(READY, RECYCLING),  # recycle time
        "stop": _to(IDLE),
    },
    BACKOFF: {
        "timer": _to(BACKOFF, CONNECTING, FAILED),  # early: no-op; late past budget: failed
        "stop": _to(IDLE),
    },
    RECYCLING: {
        "connected": _to(RECYCLING, READY),  # swap only with no response in flight
        "connect_failed": _to(READY, FAILED),  # keep the old connection unless fatal
        "closed": _to(READY, CONNECTING),  # old one gone: next takes over
        "fatal_error": _to(FAILED),
        "response_started": _to(RECYCLING),
        "response_done": _to(RECYCLING, READY),
        "recycle": _to(RECYCLING),
        "timer": _to(RECYCLING, READY),  # next's connect deadline
        "stop": _to(IDLE),
    },
    FAILED: {
        "stop": _to(IDLE),
    },
}

#: Error codes (``error.code`` from the upstream) that are never retried.
FATAL_CODES: Final = frozenset(
    {
        "invalid_api_key",
        "insufficient_quota",
        "account_deactivated",
        "billing_hard_limit_reached",
        "beta_api_shape_disabled",
    }
)
#: Handshake HTTP statuses that are never retried (bad or forbidden credentials).
FATAL_STATUSES: Final = frozenset({401, 403})


def is_fatal(code: str = "", status: int = 0) -> bool:
    """Whether an upstream error code or handshake status must not be retried."""
    return code in FATAL_CODES or status in FATAL_STATUSES


# -- events ------------------------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="start"):
    """Open the upstream connection for this session (only in ``idle``)."""


class Connected(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="connected"):
    """``session.created`` arrived on the connection being opened."""


class ConnectFailed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="connect_failed"):
    """The connection being opened ended before ``session.created``.

    ``code`` is the upstream error code if one was sent, ``status`` the handshake HTTP status
    if the handshake was refused (0 otherwise). A close before ``session.created`` is
    reported here, not as ``closed``.
    """

    code: str = ""
    status: int = 0


class Closed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="closed"):
    """The established ``current`` connection closed; ``planned`` if it was not a fault
    (honoured only outside ``quick_failure_window`` of the accept)."""

    code: int = 1006
    reason: str = ""
    planned: bool = False


class FatalError(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="fatal_error"):
    """The upstream sent an error that must not be retried (see ``FATAL_CODES``)."""

    code: str = "invalid_api_key"


class ResponseStarted(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="response_started"
):
    """``response.created`` on the current connection."""


class ResponseDone(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="response_done"):
    """``response.done`` on the current connection (an unmatched one is ignored)."""


class Recycle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="recycle"):
    """Replace the connection soon (e.g. on a ``session_expired`` warning)."""


class Stop(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="stop"):
    """The session is over: close whatever is open and forget everything."""


# -- actions -----------------------------------------------------------------------------

Slot = Literal["current", "next"]


class OpenConnection(msgspec.Struct, frozen=True, tag="open_connection"):
    """Open a connection into ``which`` (empty); deliver ``Timer()`` at ``deadline``.

    ``attempt`` numbers the attempts of one outage, from 1; an open outside an outage (the
    first connect, a recycle, a reconnect after a planned close) is attempt 1.
    While recycling (``which="next"``) the ``current`` connection stays in use.
    """

    which: Slot
    attempt: int
    timeout: float
    deadline: float


class CloseConnection(msgspec.Struct, frozen=True, tag="close_connection"):
    """Close the connection in ``which`` with ``code``/``reason``; the slot becomes empty."""

    which: Slot
    code: int
    reason: str


class Swap(msgspec.Struct, frozen=True, tag="swap"):
    """``next`` becomes ``current``; the former ``current`` is closed (if still open)."""

    code: int
    reason: str


class Configure(msgspec.Struct, frozen=True, tag="configure"):
    """First connection of the session: send the session config and tools."""


class Replay(msgspec.Struct, frozen=True, tag="replay"):
    """A new connection replaced an old one: replay config, tools, conversation items and
    un-committed input audio onto ``current`` (the upstream kept nothing)."""


class Notify(msgspec.Struct, frozen=True, tag="notify"):
    """Tell the client: ``reconnecting`` (attempt ``attempt`` in ``retry_in`` s) or
    ``reconnected``."""

    status: Literal["reconnecting", "reconnected"]
    attempt: int
    retry_in: float


class Fail(msgspec.Struct, frozen=True, tag="fail"):
    """Give up: end the session with ``reason``; ``code`` is the error that caused it."""

    reason: str
    code: str


Action = OpenConnection | CloseConnection | Swap | Configure | Replay | Notify | Fail

# -- config ------------------------------------------------------------------------------


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Timings in seconds. ``retry_budget`` and ``recycle_after`` may be ``inf`` (off);
    ``max_attempts`` is ``None`` for no limit. A bad value raises ``ValueError``."""

    connect_timeout: float = 5.0
    first_retry_delay: float = 0.02
    base: float = 0.25
    cap: float = 3.0
    retry_budget: float = 20.0
    max_attempts: int | None = None
    stable_after: float = 10.0
    quick_failure_window: float = 2.0
    max_quick_failures: int = 3
    # The upstream ends sessions at 60 minutes; leave time for a response to finish.
    recycle_after: float = 55 * 60.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "base", "cap"):
            _check(name, getattr(self, name), lambda v: math.isfinite(v) and v > 0, "finite, > 0")
        for name in ("first_retry_delay", "stable_after", "quick_failure_window"):
            _check(name, getattr(self, name), lambda v: math.isfinite(v) and v >= 0, "finite, >= 0")
        for name in ("retry_budget", "recycle_after"):
            _check(name, getattr(self, name), lambda v: v > 0, "> 0 (inf for none)")
        if self.first_retry_delay > self.cap:
            raise ValueError(
                f"first_retry_delay ({self.first_retry_delay}) must not exceed cap ({self.cap})"
            )
        if self.quick_failure_window > self.stable_after:
            raise ValueError(
                f"quick_failure_window ({self.quick_failure_window}) must not exceed "
                f"stable_after ({self.stable_after})"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts!r}")
        if self.max_quick_failures < 1:
            raise ValueError(f"max_quick_failures must be >= 1, got {self.max_quick_failures!r}")


def _check(name: str, value: float, ok: Callable[[float], bool], rule: str) -> None:
    if not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


# -- the machine -------------------------------------------------------------------------

_TIMEOUT = (1000, "connect timeout")
_RECYCLED = (1000, "recycled")


class ReconnectMachine(Machine[State]):
    """Decides the life of one session's upstream connection (see the module docstring).

    ``handle`` raises ``IllegalTransition`` (nothing changed) for an event the current state
    does not accept; ``failed`` accepts only ``stop``. ``next_deadline()`` is the connect
    deadline, the end of a backoff, the recycle time, or ``math.inf``.
    """

    NAME = "reconnect"
    State = State
    INITIAL = State.IDLE
    EVENTS = (
        Start,
        Connected,
        ConnectFailed,
        Closed,
        FatalError,
        ResponseStarted,
        ResponseDone,
        Recycle,
        Stop,
        Timer,
    )
    ACTIONS = (OpenConnection, CloseConnection, Swap, Configure, Replay, Notify, Fail)
    TABLE = TABLE
    Config = Config

    def __init__(self, config: Config | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config if config is not None else Config()
        self._rng = rng if rng is not None else random.Random()
        self.state = State.IDLE
        self._reset()

    def _reset(self) -> None:
        self._deadline = math.inf
        self._attempts = 0  # connection attempts of the outage (or the one under way)
        self._failures = 0  # failures of the current outage
        self._quick_failures = 0
        self._outage_start: float | None = None
        self._last_error = ""
        self._ever_connected = False  # configure once, replay after that
        self._connected_at = 0.0  # when current was accepted (ready, recycling)
        self._stable = False
        self._responses = 0  # responses in flight on current
        self._recycle_pending = False  # ready: recycle as soon as no response is in flight
        self._next_up_at: float | None = None  # recycling: next accepted, waiting to swap

    # -- read-only views for drivers and metrics --------------------------------------

    @property
    def attempts(self) -> int:
        """Connection attempts in the current outage, or the one under way outside one."""
        return self._attempts

    @property
    def failures(self) -> int:
        """Failures in the current outage (0 when none is under way)."""
        return self._failures

    @property
    def outage_started_at(self) -> float | None:
        """Time of the current outage's first failure, ``None`` when there is none."""
        return self._outage_start

    def next_deadline(self) -> float:
        return self._deadline

    # -- dispatch ---------------------------------------------------------------------

    def _handle(self, event: msgspec.Struct, now: float) -> list[msgspec.Struct]:
        if self.state is READY or self.state is RECYCLING:
            self._settle(now)
        actions: list[Action]
        match event:
            case Start():
                self._reset()
                actions = [self._open("current", now)]
            case Stop():
                actions = self._stop()
            case Connected():
                actions = self._on_connected(now)
            case ConnectFailed(code=code, status=status):
                actions = self._on_connect_failed(now, code, status)
            case Closed(code=code, planned=planned):
                actions = self._on_closed(now, code, planned)
            case FatalError(code=code):
                self._last_error = code
                actions = [*self._close_all(code), *self._give_up("fatal error")]
            case ResponseStarted():
                self._responses += 1
                actions = []
            case ResponseDone():
                actions = self._on_response_done(now)
            case Recycle():
                actions = self._want_recycle(now) if self.state is READY else []
            case Timer():
                actions = self._on_timer(now) if now >= self._deadline else []
            case _:  # pragma: no cover - the table admits only the events above
                raise AssertionError(event)
        out: list[msgspec.Struct] = []
        out.extend(actions)
        return out

    def _on_connected(self, now: float) -> list[Action]:
        if self.state is CONNECTING:
            attempt = self._attempts  # before _became_current may start the count again
            self._became_current(now)
            if self._ever_connected:
                return [Replay(), Notify("reconnected", attempt, 0.0)]
            self._ever_connected = True
            return [Configure()]
        if self._next_up_at is not None:  # a repeated report for next: nothing new
            return []
        if self._responses:
            # Swapping now would cut the response short; hold next until it is done.
            self._next_up_at = now
            self._deadline = math.inf
            return []
        return self._swap(now)

    def _on_connect_failed(self, now: float, code: str, status: int) -> list[Action]:
        error = code or (f"http_{status}" if status else "connect_failed")
        self._last_error = error
        if self.state is CONNECTING:
            if is_fatal(code, status):
                return self._give_up("fatal error")
            return self._failure(now, error)
        self._next_up_at = None
        if is_fatal(code, status):
            return [CloseConnection("current", 1000, error), *self._give_up("fatal error")]
        return self._recycle_failed(now, error)

    def _on_closed(self, now: float, code: int, planned: bool) -> list[Action]:
        self._responses = 0
        if self.state is RECYCLING:
            # The old connection is gone; what was its replacement becomes the connection.
            if self._next_up_at is not None:
                return self._swap(self._next_up_at)
            self.state = CONNECTING  # the connect deadline of next still holds
            return [Swap(*_RECYCLED), Notify("reconnecting", self._attempts, 0.0)]
        quick = now - self._connected_at < self.config.quick_failure_window
        # Expiry or a server restart is not a fault: reconnect at once. But a server that
        # "plans" to close what it just accepted would get a reconnect loop with no delay.
        if planned and not quick:
            why = self._exhausted(now)
            if why is not None:
                return self._give_up(why)
            opening = self._open("current", now)
            return [opening, Notify("reconnecting", opening.attempt, 0.0)]
        return self._failure(now, f"closed_{code}", quick=quick, healthy=self._stable)

    def _on_response_done(self, now: float) -> list[Action]:
        if self._responses == 0:
            return []
        self._responses -= 1
        if self._responses:
            return []
        if self.state is READY:
            return self._start_recycle(now) if self._recycle_pending else []
        return self._swap(self._next_up_at) if self._next_up_at is not None else []

    def _on_timer(self, now: float) -> list[Action]:
        """The deadline has passed (``now >= next_deadline()``)."""
        if self.state is CONNECTING:
            self._last_error = "connect_timeout"
            return [CloseConnection("current", *_TIMEOUT), *self._failure(now, "connect_timeout")]
        if self.state is BACKOFF:
            # A late wake-up may find the budget spent since the retry was scheduled.
            why = self._exhausted(now)
            return self._give_up(why) if why is not None else [self._open("current", now)]
        if self.state is READY:
            return self._want_recycle(now)
        # RECYCLING, next not yet accepted (the deadline is inf once it is).
        return [CloseConnection("next", *_TIMEOUT), *self._recycle_failed(now, "connect_timeout")]

    # -- connections --------------------------------------------------------------------

    def _open(self, which: Slot, now: float) -> OpenConnection:
        self._attempts += 1
        self._deadline = now + self.config.connect_timeout
        self.state = CONNECTING if which == "current" else RECYCLING
        return OpenConnection(which, self._attempts, self.config.connect_timeout, self._deadline)

    def _close_all(self, reason: str) -> list[Action]:
        if self.state is RECYCLING:
            return [CloseConnection("next", 1000, reason), CloseConnection("current", 1000, reason)]
        if self.state is CONNECTING or self.state is READY:
            return [CloseConnection("current", 1000, reason)]
        return []

    def _stop(self) -> list[Action]:
        actions = self._close_all("stop")
        self.state = IDLE
        self._reset()
        return actions

    def _became_current(self, accepted_at: float) -> None:
        self.state = READY
        self._connected_at = accepted_at
        self._stable = False
        self._responses = 0
        self._recycle_pending = False
        self._next_up_at = None
        self._deadline = accepted_at + self.config.recycle_after
        if self._outage_start is None:
            self._attempts = 0  # no outage: that attempt was not a retry

    def _swap(self, accepted_at: float) -> list[Action]:
        self._became_current(accepted_at)
        return [Swap(*_RECYCLED), Replay()]

    def _settle(self, now: float) -> None:
        """Once current has stayed up ``stable_after``, the outage (if any) is over."""
        if self._stable or now - self._connected_at < self.config.stable_after:
            return
        self._stable = True
        self._failures = self._quick_failures = 0
        self._outage_start = None
        self._last_error = ""
        # A recycle attempt under way is the first attempt of the new period.
        opening = self.state is RECYCLING and self._next_up_at is None
        self._attempts = 1 if opening else 0

    # -- failures -----------------------------------------------------------------------

    def _count_failure(self, now: float, error: str) -> None:
        self._failures += 1
        self._last_error = error
        if self._outage_start is None:
            self._outage_start = now

    def _delay(self, healthy: bool) -> float:
        if healthy:
            return self.config.first_retry_delay
        n = min(self._failures - 1, 64)  # 2**n past the cap changes nothing; avoid overflow
        return self._rng.uniform(0.0, min(self.config.cap, self.config.base * 2.0**n))

    def _failure(
        self, now: float, error: str, *, quick: bool = False, healthy: bool = False
    ) -> list[Action]:
        """``current`` is gone: schedule a retry in ``backoff``, or give up."""
        self._count_failure(now, error)
        self._responses = 0
        if quick:
            self._quick_failures += 1
            if self._quick_failures >= self.config.max_quick_failures:
                return self._give_up("too many quick failures")
        if self.config.max_attempts is not None and self._attempts >= self.config.max_attempts:
            return self._give_up("max attempts reached")
        delay = self._delay(healthy)
        assert self._outage_start is not None
        if now + delay - self._outage_start > self.config.retry_budget:
            return self._give_up("retry budget exhausted")
        self.state = BACKOFF
        self._deadline = now + delay
        return [Notify("reconnecting", self._attempts + 1, delay)]

    def _exhausted(self, now: float) -> str | None:
        """Why a retry starting ``now`` is not allowed, or None (no outage: always allowed)."""
        if self._outage_start is None:
            return None
        if self.config.max_attempts is not None and self._attempts >= self.config.max_attempts:
            return "max attempts reached"
        if now - self._outage_start > self.config.retry_budget:
            return "retry budget exhausted"
        return None

    def _give_up(self, reason: str) -> list[Action]:
        self.state = FAILED
        self._deadline = math.inf
        return [Fail(reason, self._last_error)]

    # -- recycling ----------------------------------------------------------------------

    def _want_recycle(self, now: float) -> list[Action]:
        if self._recycle_pending:
            return []
        if self._responses:
            self._recycle_pending = True
            self._deadline = math.inf  # woken by response_done, not by the clock
            return []
        return self._start_recycle(now)

    def _start_recycle(self, now: float) -> list[Action]:
        self._recycle_pending = False
        if self._exhausted(now) is not None:
            # Keep serving on the old connection; its close will take the normal path.
            self._deadline = math.inf
            return []
        return [self._open("next", now)]

    def _recycle_failed(self, now: float, error: str) -> list[Action]:
        """``next`` is gone; ``current`` still works: back to ``ready``, retry the recycle."""
        self._count_failure(now, error)
        self.state = READY
        self._next_up_at = None
        self._deadline = math.inf
        if self.config.max_attempts is None or self._attempts < self.config.max_attempts:
            delay = self._delay(healthy=False)
            assert self._outage_start is not None
            if now + delay - self._outage_start <= self.config.retry_budget:
                self._deadline = now + delay
        return []


MACHINE = ReconnectMachine
