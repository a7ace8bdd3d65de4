"""The circuit breaker: resilience4j's CircuitBreaker as a sans-IO machine.

Theory of operation
-------------------
One breaker guards one upstream endpoint for the whole process. Before a call (for us: a
connect attempt) the caller asks ``acquire`` and gets ``permit`` or ``reject`` at once; after
it, the caller reports ``success`` or ``failure`` with the call's duration, or ``release``
when the call ended without a verdict (cancelled). The breaker decides from a sliding window
of recent results:

- ``closed``: every call is permitted and recorded. Once the window holds at least
  ``minimum_number_of_calls`` results (count-based windows cap that at the window size), a
  recorded result whose window has ``failure_rate >= failure_rate_threshold`` or
  ``slow_call_rate >= slow_call_rate_threshold`` opens the breaker. A call is slow when its
  duration is *over* ``slow_call_duration_threshold``; a slow failure counts in both rates.
- ``open``: every call is rejected with ``retry_after``. The wait grows with each re-open
  (``wait_duration_in_open * wait_multiplier ** (attempt - 1)``, capped at
  ``max_wait_duration_in_open``). The first ``acquire`` once the wait has passed moves to
  ``half_open`` and is permitted; with ``automatic_transition_from_open`` the timer does it.
  Results of calls permitted before the breaker opened still arrive here: they go into the
  window the breaker carries for its metrics and never change the state.
- ``half_open``: exactly ``permitted_calls_in_half_open`` permits, their results recorded in
  a fresh count window of that size; as soon as ``min(minimum_number_of_calls, permits)``
  results are in, over a threshold re-opens (the wait grows), under both closes (the wait
  resets). ``max_wait_in_half_open`` (0 = off) re-opens by timer so a probe that never
  reports cannot pin the breaker half-open.
- ``disabled`` permits everything and records nothing; ``forced_open`` rejects everything
  and records nothing. Only the admin events (``disable``, ``force_open``, ``close``,
  ``reset``) leave them. Admin events are accepted in every state; ``close`` and ``reset``
  both start a fresh closed window and forget the re-open count (as in resilience4j).

Every event is legal in every state: the breaker is shared by many callers, so a result, a
release or a stale timer can always arrive after another caller changed the state, and none
of that may crash a driver. The table below still says exactly where each may lead.

Two rules, as in h11: everything that affects a decision lives in this file, and the
machine never reads a clock or does I/O (``now`` comes in with every event).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

import msgspec

from ._core import Machine, Timer

__all__ = [
    "MACHINE",
    "Acquire",
    "BreakerMachine",
    "BreakerMetrics",
    "CircuitOpen",
    "Close",
    "Config",
    "Disable",
    "Failure",
    "ForceOpen",
    "Permit",
    "Reject",
    "Release",
    "Reset",
    "State",
    "Success",
    "TABLE",
    "Transition",
]


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"
    FORCED_OPEN = "forced_open"


_C, _O, _H, _D, _F = State.CLOSED, State.OPEN, State.HALF_OPEN, State.DISABLED, State.FORCED_OPEN

# Admin events lead to the same place from every state.
_ADMIN: dict[str, frozenset[State]] = {
    "disable": frozenset({_D}),
    "force_open": frozenset({_F}),
    "close": frozenset({_C}),
    "reset": frozenset({_C}),
}

#: ``state -> event type -> states it may lead to``. Several targets: a guard decides.
TABLE: dict[State, dict[str, frozenset[State]]] = {
    _C: {
        "acquire": frozenset({_C}),
        # Any recorded result may open it, a success included: it can be the call that
        # reaches the minimum, or a slow one.
        "success": frozenset({_C, _O}),
        "failure": frozenset({_C, _O}),
        "release": frozenset({_C}),
        "timer": frozenset({_C}),
        **_ADMIN,
    },
    _O: {
        "acquire": frozenset({_O, _H}),  # half_open once the wait has passed
        "success": frozenset({_O}),  # a late result: metrics only
        "failure": frozenset({_O}),
        "release": frozenset({_O}),
        "timer": frozenset({_O, _H}),  # half_open only with automatic transition
        **_ADMIN,
    },
    _H: {
        "acquire": frozenset({_H}),
        "success": frozenset({_H, _O, _C}),  # undecided until enough probes report
        "failure": frozenset({_H, _O, _C}),
        "release": frozenset({_H}),
        "timer": frozenset({_H, _O}),  # open once max_wait_in_half_open has passed
        **_ADMIN,
    },
    _D: {
        "acquire": frozenset({_D}),
        "success": frozenset({_D}),
        "failure": frozenset({_D}),
        "release": frozenset({_D}),
        "timer": frozenset({_D}),
        **_ADMIN,
    },
    _F: {
        "acquire": frozenset({_F}),
        "success": frozenset({_F}),
        "failure": frozenset({_F}),
        "release": frozenset({_F}),
        "timer": frozenset({_F}),
        **_ADMIN,
    },
}


# -- events -------------------------------------------------------------------------------


def _check_duration(duration: float) -> None:
    if not (isinstance(duration, int | float) and duration >= 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration!r}")


class Acquire(msgspec.Struct, frozen=True, tag="acquire"):
    """Ask permission for one call. Answered at once with ``Permit`` or ``Reject``."""


class Success(msgspec.Struct, frozen=True, tag="success"):
    """A permitted call succeeded after ``duration`` seconds (ValueError if < 0 or not finite)."""

    duration: float = 0.0

    def __post_init__(self) -> None:
        _check_duration(self.duration)


class Failure(msgspec.Struct, frozen=True, tag="failure"):
    """A permitted call failed after ``duration`` seconds (ValueError if < 0 or not finite)."""

    duration: float = 0.0

    def __post_init__(self) -> None:
        _check_duration(self.duration)


class Release(msgspec.Struct, frozen=True, tag="release"):
    """A permitted call ended without a verdict (cancelled): its half-open permit returns."""


class Disable(msgspec.Struct, frozen=True, tag="disable"):
    """Admin: permit everything, record nothing, until another admin event."""


class ForceOpen(msgspec.Struct, frozen=True, tag="force_open"):
    """Admin: reject everything, record nothing, until another admin event."""


class Close(msgspec.Struct, frozen=True, tag="close"):
    """Admin: go to ``closed`` with a fresh window and the re-open count at zero."""


class Reset(msgspec.Struct, frozen=True, tag="reset"):
    """Admin: same effect as ``close`` (resilience4j keeps both names)."""


# -- actions ------------------------------------------------------------------------------


class Permit(msgspec.Struct, frozen=True, tag="permit"):
    """Make the call, then report ``success``/``failure`` (or ``release`` if cancelled)."""


class Reject(msgspec.Struct, frozen=True, tag="reject"):
    """Do not make the call. ``retry_after`` is a hint in seconds: the rest of the wait in
    ``open``, the base open wait in ``half_open`` (the probes in flight decide sooner), and
    ``inf`` in ``forced_open`` (only an admin event ends it)."""

    retry_after: float
    state: str


class Transition(msgspec.Struct, frozen=True, tag="transition"):
    """The breaker changed state (log it, export it). ``wait`` is the open wait, else 0."""

    from_state: str
    to_state: str
    reason: str
    wait: float = 0.0


Action = Permit | Reject | Transition


class CircuitOpen(Exception):
    """``try_acquire`` was rejected: the breaker is ``state``; retry after ``retry_after`` s."""

    def __init__(self, retry_after: float, state: str) -> None:
        super().__init__(f"circuit breaker is {state}; retry after {retry_after:.3g} s")
        self.retry_after = retry_after
        self.state = state


# -- configuration ------------------------------------------------------------------------


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Breaker settings. Times in seconds, rates in percent. Bad values raise ValueError.

    Defaults are resilience4j's rules with voice-sized numbers: a person is waiting, so the
    breaker reacts after a handful of connect attempts and probes again within seconds.
    """

    sliding_window_type: Literal["count", "time"] = "count"
    #: Calls (count) or seconds in one-second buckets (time).
    sliding_window_size: int = 20
    minimum_number_of_calls: int = 5
    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration_threshold: float = 5.0
    wait_duration_in_open: float = 5.0
    wait_multiplier: float = 2.0
    max_wait_duration_in_open: float = 60.0
    permitted_calls_in_half_open: int = 3
    #: 0 disables it. A probe is a connect attempt with its own deadline, so this only fires
    #: when a probe's result was lost; it keeps one lost probe from pinning every session.
    max_wait_in_half_open: float = 30.0
    automatic_transition_from_open: bool = False

    def __post_init__(self) -> None:
        if self.sliding_window_type not in ("count", "time"):
            raise ValueError(
                f"sliding_window_type must be 'count' or 'time', got {self.sliding_window_type!r}"
            )
        for name in ("sliding_window_size", "minimum_number_of_calls"):
            _positive_int(name, getattr(self, name))
        _positive_int("permitted_calls_in_half_open", self.permitted_calls_in_half_open)
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not (_number(value) and 0 < value <= 100):
                raise ValueError(f"{name} must be a percentage in (0, 100], got {value!r}")
        for name in ("slow_call_duration_threshold", "max_wait_in_half_open"):
            value = getattr(self, name)
            if not (_number(value) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        base, cap = self.wait_duration_in_open, self.max_wait_duration_in_open
        if not (_number(base) and 0 < base < math.inf):
            raise ValueError(f"wait_duration_in_open must be finite and > 0, got {base!r}")
        if not (_number(cap) and base <= cap < math.inf):
            raise ValueError(
                f"max_wait_duration_in_open must be finite and >= wait_duration_in_open "
                f"({base!r}), got {cap!r}"
            )
        mult = self.wait_multiplier
        if not (_number(mult) and 1 <= mult < math.inf):
            raise ValueError(f"wait_multiplier must be finite and >= 1, got {mult!r}")
        if not isinstance(self.automatic_transition_from_open, bool):
            raise ValueError(
                "automatic_transition_from_open must be a bool, "
                f"got {self.automatic_transition_from_open!r}"
            )

    def open_wait(self, attempt: int) -> float:
        """The wait in ``open`` for the ``attempt``-th consecutive opening (1 = first)."""
        wait = self.wait_duration_in_open
        # Step by step with the cap applied each time, so a long outage never overflows.
        for _ in range(attempt - 1):
            if wait >= self.max_wait_duration_in_open or self.wait_multiplier == 1:
                break
            wait = wait * self.wait_multiplier
        return min(wait, self.max_wait_duration_in_open)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# -- sliding windows ----------------------------------------------------------------------

_FAILED = 1
_SLOW = 2


@dataclass(slots=True)
class _CountWindow:
    """The last ``size`` outcomes in a fixed ring, with running totals (subtract on evict)."""

    size: int
    ring: bytearray = field(default_factory=bytearray)
    start: int = 0
    calls: int = 0
    failed: int = 0
    slow: int = 0

    def record(self, outcome: int, now: float) -> None:
        if self.calls == self.size:
            old = self.ring[self.start]
            self.failed -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
            self.ring[self.start] = outcome
            self.start = (self.start + 1) % self.size
        else:
            self.ring.append(outcome)
            self.calls += 1
        self.failed += outcome & _FAILED
        self.slow += (outcome & _SLOW) >> 1

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failed, self.slow


@dataclass(slots=True)
class _TimeWindow:
    """Outcomes of the last ``seconds`` whole seconds, one bucket per second.

    Bucket ``i`` holds second ``s`` with ``s % seconds == i``; a bucket whose second has
    left the window is skipped when reading and reused when writing, so memory is fixed.
    Like resilience4j, a clock that goes backwards records into the newest bucket.
    """

    seconds: int
    stamp: list[int | None] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    slow: list[int] = field(default_factory=list)
    head: int | None = None

    def __post_init__(self) -> None:
        n = self.seconds
        self.stamp, self.calls, self.failed, self.slow = [None] * n, [0] * n, [0] * n, [0] * n

    def _current(self, now: float) -> int:
        second = math.floor(now)
        return second if self.head is None else max(second, self.head)

    def record(self, outcome: int, now: float) -> None:
        second = self._current(now)
        i = second % self.seconds
        if self.stamp[i] != second:
            self.stamp[i], self.calls[i], self.failed[i], self.slow[i] = second, 0, 0, 0
        self.calls[i] += 1
        self.failed[i] += outcome & _FAILED
        self.slow[i] += (outcome & _SLOW) >> 1
        self.head = second

    def totals(self, now: float) -> tuple[int, int, int]:
        if self.head is None:  # nothing recorded yet (and ``now`` may still be -inf)
            return 0, 0, 0
        current = self._current(now)
        calls = failed = slow = 0
        for i, second in enumerate(self.stamp):
            if second is not None and current - self.seconds < second <= current:
                calls += self.calls[i]
                failed += self.failed[i]
                slow += self.slow[i]
        return calls, failed, slow


class BreakerMetrics(msgspec.Struct, frozen=True):
    """What the breaker's current window says. Rates are ``None`` below the minimum calls."""

    state: str
    failure_rate: float | None
    slow_call_rate: float | None
    buffered_calls: int
    failed_calls: int
    slow_calls: int
    not_permitted_calls: int


# -- the machine --------------------------------------------------------------------------


class BreakerMachine(Machine[State]):
    """resilience4j's CircuitBreaker. Feed events with ``handle``; see the module docstring.

    ``now`` is a finite monotonic time; a value smaller than one already seen is treated as
    the latest time seen (time never runs backwards inside the breaker). The machine holds
    only fixed-size state: one window (``sliding_window_size`` slots or buckets) and a few
    numbers.
    """

    NAME: ClassVar[str] = "breaker"
    State: ClassVar[type[State]] = State
    INITIAL: ClassVar[State] = State.CLOSED
    EVENTS: ClassVar[tuple[type[msgspec.Struct], ...]] = (
        Acquire,
        Success,
        Failure,
        Release,
        Timer,
        Disable,
        ForceOpen,
        Close,
        Reset,
    )
    ACTIONS: ClassVar[tuple[type[msgspec.Struct], ...]] = (Permit, Reject, Transition)
    TABLE: ClassVar[dict[State, dict[str, frozenset[State]]]] = TABLE
    Config: ClassVar[type[Config]] = Config

    def __init__(self, config: Config | None = None, *, rng: random.Random | None = None) -> None:
        # ``rng`` is accepted for the common machine constructor; the breaker is deterministic.
        del rng
        self.config = config if config is not None else Config()
        self.state = State.CLOSED
        self._now = -math.inf
        #: Consecutive openings without a close in between; picks the open wait.
        self._attempts = 0
        self._open_wait = 0.0
        self._open_until = math.inf
        self._half_open_until = math.inf
        self._permits_left = 0
        self._closed_metrics()

    # -- windows (replaced exactly where resilience4j builds new metrics) -----------------

    def _closed_metrics(self) -> None:
        cfg = self.config
        self._window: _CountWindow | _TimeWindow
        if cfg.sliding_window_type == "count":
            self._window = _CountWindow(cfg.sliding_window_size)
            self._min_calls = min(cfg.minimum_number_of_calls, cfg.sliding_window_size)
        else:
            self._window = _TimeWindow(cfg.sliding_window_size)
            self._min_calls = cfg.minimum_number_of_calls
        self._not_permitted = 0

    def _half_open_metrics(self) -> None:
        permits = self.config.permitted_calls_in_half_open
        self._window = _CountWindow(permits)
        self._min_calls = min(self.config.minimum_number_of_calls, permits)
        self._not_permitted = 0

    def _empty_metrics(self) -> None:
        # disabled and forced_open record nothing; only the not-permitted count moves.
        self._window = _CountWindow(0)
        self._min_calls = 1
        self._not_permitted = 0

    def _rates(self, now: float) -> tuple[int, float | None, float | None]:
        calls, failed, slow = self._window.totals(now)
        if calls == 0 or calls < self._min_calls:
            return calls, None, None
        return calls, failed * 100 / calls, slow * 100 / calls

    def _over(self, now: float) -> str | None:
        """Which threshold the window is over, or None (also when rates are undefined)."""
        calls, failed, slow = self._window.totals(now)
        if calls == 0 or calls < self._min_calls:
            return None
        # Cross-multiplied so the percentage compare is exact (50 % of 10 calls is 5).
        fail = failed * 100 >= self.config.failure_rate_threshold * calls
        slowed = slow * 100 >= self.config.slow_call_rate_threshold * calls
        if fail and slowed:
            return "failure_and_slow_call_rate"
        if fail:
            return "failure_rate"
        if slowed:
            return "slow_call_rate"
        return "below_thresholds"

    # -- transitions ----------------------------------------------------------------------

    def _to(self, target: State, reason: str, now: float) -> list[Action]:
        source = self.state
        self.state = target
        self._open_until = self._half_open_until = math.inf
        wait = 0.0
        if target is State.OPEN:
            # Open keeps the window it came from, for metrics (resilience4j does the same).
            self._attempts += 1
            wait = self._open_wait = self.config.open_wait(self._attempts)
            self._open_until = now + wait
        elif target is State.HALF_OPEN:
            self._half_open_metrics()
            self._permits_left = self.config.permitted_calls_in_half_open
            if self.config.max_wait_in_half_open > 0:
                self._half_open_until = now + self.config.max_wait_in_half_open
        elif target is State.CLOSED:
            self._attempts = 0
            self._closed_metrics()
        elif target is State.FORCED_OPEN:
            self._empty_metrics()
        else:
            self._attempts = 0
            self._empty_metrics()
        if target is source:  # an admin event repeated: fresh metrics, nothing to announce
            return []
        return [Transition(str(source), str(target), reason, wait)]

    def _handle(self, event: msgspec.Struct, now: float) -> list[Any]:
        now = self._now = max(self._now, now)
        match event:
            case Acquire():
                return self._acquire(now)
            case Success(duration=duration):
                return self._record(0, duration, now)
            case Failure(duration=duration):
                return self._record(_FAILED, duration, now)
            case Release():
                if self.state is State.HALF_OPEN:
                    limit = self.config.permitted_calls_in_half_open
                    self._permits_left = min(self._permits_left + 1, limit)
                return []
            case Timer():
                if self.state is State.OPEN and now >= self._open_until:
                    if self.config.automatic_transition_from_open:
                        return self._to(State.HALF_OPEN, "wait_elapsed", now)
                if self.state is State.HALF_OPEN and now >= self._half_open_until:
                    return self._to(State.OPEN, "max_wait_in_half_open", now)
                return []
            case Disable():
                return self._to(State.DISABLED, "disable", now)
            case ForceOpen():
                return self._to(State.FORCED_OPEN, "force_open", now)
            case Close():
                return self._to(State.CLOSED, "close", now)
            case Reset():
                return self._to(State.CLOSED, "reset", now)
        raise AssertionError(f"unhandled event {event!r}")  # pragma: no cover

    def _acquire(self, now: float) -> list[Any]:
        state = self.state
        if state is State.CLOSED or state is State.DISABLED:
            return [Permit()]
        actions: list[Any] = []
        if state is State.OPEN:
            if now < self._open_until:
                self._not_permitted += 1
                return [Reject(self._open_until - now, str(state))]
            actions = self._to(State.HALF_OPEN, "wait_elapsed", now)
        if self.state is State.HALF_OPEN:
            if self._permits_left > 0:
                self._permits_left -= 1
                return [*actions, Permit()]
            self._not_permitted += 1
            # The probes in flight decide soon; the base open wait is an honest hint.
            return [Reject(self.config.wait_duration_in_open, str(self.state))]
        self._not_permitted += 1
        return [Reject(math.inf, str(self.state))]

    def _record(self, outcome: int, duration: float, now: float) -> list[Any]:
        state = self.state
        if state is State.DISABLED or state is State.FORCED_OPEN:
            return []
        if duration > self.config.slow_call_duration_threshold:
            outcome |= _SLOW
        self._window.record(outcome, now)
        if state is State.OPEN:  # a call permitted before the opening: metrics only
            return []
        verdict = self._over(now)
        if verdict is None:
            return []
        if verdict != "below_thresholds":
            return self._to(State.OPEN, verdict, now)
        if state is State.HALF_OPEN:
            return self._to(State.CLOSED, verdict, now)
        return []

    def next_deadline(self) -> float:
        """When to deliver ``Timer()``: the end of the open wait (automatic transition only) or
        of ``max_wait_in_half_open``; ``math.inf`` otherwise. Early timers are no-ops."""
        if self.state is State.OPEN and self.config.automatic_transition_from_open:
            return self._open_until
        if self.state is State.HALF_OPEN:
            return self._half_open_until
        return math.inf

    # -- convenience for drivers ----------------------------------------------------------

    def try_acquire(self, now: float) -> None:
        """Take a permit or raise ``CircuitOpen`` at once (never blocks, never waits).

        After a permit the caller must report ``record(...)``, or ``release(now)`` if the
        call was cancelled before it had a verdict, or a half-open permit stays taken until
        ``max_wait_in_half_open``.
        """
        for action in self.handle(Acquire(), now):
            if isinstance(action, Reject):
                raise CircuitOpen(action.retry_after, action.state)

    def record(self, success: bool, duration: float, now: float) -> list[Any]:
        """Report a permitted call's result; returns the actions (a ``Transition`` or none).

        Raises ValueError (nothing recorded) when ``duration`` is negative or not finite.
        """
        event = Success(duration) if success else Failure(duration)
        return self.handle(event, now)

    def release(self, now: float) -> None:
        """A permitted call ended without a verdict (cancelled): give its permit back."""
        self.handle(Release(), now)

    def metrics(self, now: float | None = None) -> BreakerMetrics:
        """The current window as seen at ``now`` (default: the latest time fed). Pure."""
        at = self._now if now is None else max(now, self._now)
        calls, failed, slow = self._window.totals(at)
        _, failure_rate, slow_rate = self._rates(at)
        return BreakerMetrics(
            state=str(self.state),
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
            buffered_calls=calls,
            failed_calls=failed,
            slow_calls=slow,
            not_permitted_calls=self._not_permitted,
        )

    @property
    def failure_rate(self) -> float | None:
        """Failed calls in percent of the window; None below the minimum number of calls."""
        return self.metrics().failure_rate

    @property
    def slow_call_rate(self) -> float | None:
        """Slow calls in percent of the window; None below the minimum number of calls."""
        return self.metrics().slow_call_rate

    @property
    def buffered_calls(self) -> int:
        """Results in the current window."""
        return self.metrics().buffered_calls

    @property
    def not_permitted_calls(self) -> int:
        """Rejections since the current window began (as resilience4j counts them)."""
        return self._not_permitted

    @property
    def open_wait(self) -> float:
        """The wait chosen for the latest opening (0 before the first)."""
        return self._open_wait


MACHINE = BreakerMachine
