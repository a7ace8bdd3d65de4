"""The breaker's rules, one behaviour per test, then a hypothesis model run.

Time is the pure ``now`` argument: nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from voiceactors.machines._core import IllegalTransition, Timer, event_type
from voiceactors.machines.breaker import (
    TABLE,
    Acquire,
    BreakerMachine,
    CircuitOpen,
    Close,
    Config,
    Disable,
    Failure,
    ForceOpen,
    Permit,
    Reject,
    Release,
    Reset,
    State,
    Success,
    Transition,
    _CountWindow,
    _TimeWindow,
)

#: The spec's scenario config: a count window of 10 that decides only when full.
TEN = Config(sliding_window_size=10, minimum_number_of_calls=10)


def fail_n(m: BreakerMachine, n: int, now: float = 0.0, duration: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        out += m.handle(Failure(duration), now)
    return out


def succeed_n(m: BreakerMachine, n: int, now: float = 0.0, duration: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        out += m.handle(Success(duration), now)
    return out


def opened(config: Config = TEN) -> BreakerMachine:
    """A breaker opened at t=0 by failures only (its first opening: the base wait)."""
    m = BreakerMachine(config)
    needed = config.minimum_number_of_calls
    if config.sliding_window_type == "count":
        needed = min(needed, config.sliding_window_size)
    fail_n(m, needed)
    assert m.state is State.OPEN
    return m


def half_opened(config: Config = TEN) -> BreakerMachine:
    m = opened(config)
    m.handle(Acquire(), config.wait_duration_in_open)
    assert m.state is State.HALF_OPEN
    return m


# -- configuration ------------------------------------------------------------------------


def test_defaults_are_voice_sized() -> None:
    c = Config()
    assert (c.sliding_window_type, c.sliding_window_size, c.minimum_number_of_calls) == (
        "count",
        20,
        5,
    )
    assert (c.failure_rate_threshold, c.slow_call_rate_threshold) == (50.0, 100.0)
    assert c.slow_call_duration_threshold == 5.0
    assert [c.open_wait(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert c.permitted_calls_in_half_open == 3
    assert c.automatic_transition_from_open is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sliding_window_type", "sliding"),
        ("sliding_window_size", 0),
        ("sliding_window_size", 2.5),
        ("sliding_window_size", True),
        ("minimum_number_of_calls", 0),
        ("failure_rate_threshold", 0.0),
        ("failure_rate_threshold", 100.5),
        ("failure_rate_threshold", math.nan),
        ("slow_call_rate_threshold", -1.0),
        ("slow_call_duration_threshold", -0.1),
        ("slow_call_duration_threshold", math.inf),
        ("wait_duration_in_open", 0.0),
        ("wait_duration_in_open", math.nan),
        ("wait_multiplier", 0.5),
        ("max_wait_duration_in_open", 1.0),  # below the 5 s base
        ("permitted_calls_in_half_open", 0),
        ("max_wait_in_half_open", -1.0),
        ("automatic_transition_from_open", 1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_config_from_data_rejects_unknown_fields_and_types() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"sliding_window": 10}, Config)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"sliding_window_type": "sliding"}, Config)


def test_open_wait_never_overflows_in_a_long_outage() -> None:
    assert Config().open_wait(100_000) == 60.0
    flat = Config(wait_multiplier=1.0)
    assert flat.open_wait(1) == flat.open_wait(50) == 5.0


# -- closed -------------------------------------------------------------------------------


def test_closed_permits_every_call() -> None:
    m = BreakerMachine(TEN)
    assert [m.handle(Acquire(), t) for t in (0.0, 1.0, 2.0)] == [[Permit()]] * 3


def test_rates_are_undefined_below_the_minimum_number_of_calls() -> None:
    m = BreakerMachine(TEN)
    assert fail_n(m, 9) == []
    assert m.state is State.CLOSED
    assert (m.failure_rate, m.slow_call_rate, m.buffered_calls) == (None, None, 9)


def test_failure_rate_at_the_threshold_opens() -> None:
    m = BreakerMachine(TEN)
    succeed_n(m, 5)
    assert fail_n(m, 5) == [Transition("closed", "open", "failure_rate", 5.0)]
    assert m.failure_rate == 50.0


def test_failure_rate_under_the_threshold_stays_closed() -> None:
    m = BreakerMachine(TEN)
    succeed_n(m, 6)
    fail_n(m, 4)
    assert m.state is State.CLOSED
    assert m.failure_rate == 40.0


def test_count_window_minimum_is_capped_at_the_window_size() -> None:
    m = BreakerMachine(Config(sliding_window_size=4, minimum_number_of_calls=10))
    assert fail_n(m, 3) == []
    assert fail_n(m, 1) == [Transition("closed", "open", "failure_rate", 5.0)]


def test_time_window_minimum_is_not_capped() -> None:
    m = BreakerMachine(
        Config(sliding_window_type="time", sliding_window_size=2, minimum_number_of_calls=10)
    )
    fail_n(m, 9)
    assert m.state is State.CLOSED
    assert fail_n(m, 1) == [Transition("closed", "open", "failure_rate", 5.0)]


def test_count_window_evicts_the_oldest_call() -> None:
    m = BreakerMachine(TEN)
    fail_n(m, 4)
    succeed_n(m, 6)  # 4 of 10 failed
    succeed_n(m, 4)  # the four failures have left the ring
    assert (m.failure_rate, m.buffered_calls) == (0.0, 10)


def test_a_call_is_slow_only_over_the_threshold() -> None:
    m = BreakerMachine(TEN)
    succeed_n(m, 10, duration=5.0)
    assert m.slow_call_rate == 0.0
    assert m.state is State.CLOSED
    assert m.handle(Success(5.001), 0.0) == []  # 1 slow of 10, still far from 100 %
    assert m.metrics().slow_calls == 1


def test_a_slow_failure_counts_in_both_rates() -> None:
    m = BreakerMachine(
        Config(
            sliding_window_size=2,
            minimum_number_of_calls=2,
            failure_rate_threshold=100.0,
            slow_call_rate_threshold=50.0,
        )
    )
    m.handle(Success(), 0.0)
    assert m.handle(Failure(9.0), 0.0) == [Transition("closed", "open", "slow_call_rate", 5.0)]
    metrics = m.metrics()
    assert (metrics.failed_calls, metrics.slow_calls) == (1, 1)


def test_both_rates_over_is_named_in_the_reason() -> None:
    m = BreakerMachine(Config(sliding_window_size=1, minimum_number_of_calls=1))
    assert m.handle(Failure(6.0), 0.0) == [
        Transition("closed", "open", "failure_and_slow_call_rate", 5.0)
    ]


def test_time_window_forgets_whole_seconds_that_left_it() -> None:
    m = BreakerMachine(
        Config(
            sliding_window_type="time",
            sliding_window_size=3,
            minimum_number_of_calls=1,
            failure_rate_threshold=100.0,
        )
    )
    m.handle(Success(), 0.2)  # second 0
    m.handle(Success(), 1.5)  # second 1
    assert m.metrics(2.99).buffered_calls == 2  # seconds 0..2
    assert m.metrics(3.0).buffered_calls == 1  # seconds 1..3
    assert m.metrics(4.0).buffered_calls == 0
    assert m.metrics(100.0).failure_rate is None


def test_reading_metrics_later_changes_nothing() -> None:
    m = BreakerMachine(Config(sliding_window_type="time", sliding_window_size=3))
    fail_n(m, 2, now=0.5)
    before = m.snapshot()
    assert m.metrics(50.0).buffered_calls == 0
    assert m.snapshot() == before
    assert m.buffered_calls == 2  # as of the latest time fed


def test_time_going_backwards_counts_as_the_latest_time() -> None:
    m = BreakerMachine(
        Config(sliding_window_type="time", sliding_window_size=2, minimum_number_of_calls=2)
    )
    m.handle(Success(), 10.0)
    assert m.handle(Failure(), 3.0) == [Transition("closed", "open", "failure_rate", 5.0)]
    assert m.handle(Acquire(), 14.0) == [Reject(1.0, "open")]  # opened at 10.0, not 3.0


def test_memory_is_fixed_however_long_the_session() -> None:
    count = BreakerMachine(
        Config(sliding_window_size=7, minimum_number_of_calls=7, failure_rate_threshold=100.0)
    )
    timed = BreakerMachine(
        Config(sliding_window_type="time", sliding_window_size=7, failure_rate_threshold=100.0)
    )
    for i in range(5000):
        for m in (count, timed):
            m.handle(Success() if i % 3 else Failure(), i * 0.37)
    assert isinstance(count._window, _CountWindow) and len(count._window.ring) == 7
    assert isinstance(timed._window, _TimeWindow) and len(timed._window.stamp) == 7
    assert count.buffered_calls == 7


# -- open ---------------------------------------------------------------------------------


def test_open_rejects_at_once_with_the_time_left() -> None:
    m = opened()
    assert m.handle(Acquire(), 1.5) == [Reject(3.5, "open")]
    assert m.not_permitted_calls == 1


def test_open_half_opens_on_the_first_call_after_the_wait() -> None:
    m = opened()
    [reject] = m.handle(Acquire(), 4.999)
    assert isinstance(reject, Reject) and reject.retry_after == pytest.approx(0.001)
    assert m.handle(Acquire(), 5.0) == [
        Transition("open", "half_open", "wait_elapsed", 0.0),
        Permit(),
    ]


def test_open_has_no_deadline_without_automatic_transition() -> None:
    m = opened()
    assert m.next_deadline() == math.inf
    assert m.handle(Timer(), 100.0) == []
    assert m.state is State.OPEN


def test_automatic_transition_half_opens_by_timer_at_the_deadline() -> None:
    m = opened(
        Config(
            sliding_window_size=2, minimum_number_of_calls=2, automatic_transition_from_open=True
        )
    )
    assert m.next_deadline() == 5.0
    assert m.handle(Timer(), 4.9) == []  # early: a no-op
    assert m.handle(Timer(), 5.0) == [Transition("open", "half_open", "wait_elapsed", 0.0)]
    assert m.handle(Acquire(), 5.0) == [Permit()]


def test_results_arriving_in_open_never_change_the_state() -> None:
    m = opened()
    before_deadline = m.next_deadline()
    assert succeed_n(m, 50, now=1.0) == []
    assert m.state is State.OPEN
    assert m.next_deadline() == before_deadline
    # As in resilience4j they land in the window open carries for metrics only.
    assert m.failure_rate == 0.0
    assert m.handle(Acquire(), 2.0) == [Reject(3.0, "open")]


# -- half-open ----------------------------------------------------------------------------


def test_half_open_hands_out_exactly_the_permitted_calls() -> None:
    m = half_opened()  # the first permit went to the call that half-opened it
    assert m.handle(Acquire(), 5.0) == [Permit()]
    assert m.handle(Acquire(), 5.0) == [Permit()]
    assert m.handle(Acquire(), 5.0) == [Reject(5.0, "half_open")]
    assert m.not_permitted_calls == 1


def test_half_open_decides_once_enough_probes_report() -> None:
    m = half_opened()
    assert m.handle(Success(), 6.0) == []
    assert m.handle(Success(), 6.0) == []
    assert m.handle(Success(), 6.0) == [Transition("half_open", "closed", "below_thresholds")]


def test_half_open_decides_at_the_minimum_when_it_is_below_the_permits() -> None:
    cfg = Config(sliding_window_size=2, minimum_number_of_calls=2, permitted_calls_in_half_open=5)
    m = half_opened(cfg)
    assert m.handle(Failure(), 6.0) == []
    assert m.handle(Failure(), 6.0) == [Transition("half_open", "open", "failure_rate", 10.0)]


def test_a_failed_probe_batch_reopens_with_a_longer_wait() -> None:
    m = half_opened()
    fail_n(m, 2, now=6.0)
    assert m.handle(Success(), 6.0) == [Transition("half_open", "open", "failure_rate", 10.0)]
    assert m.handle(Acquire(), 6.0) == [Reject(10.0, "open")]
    assert m.open_wait == 10.0


def test_closing_resets_the_wait() -> None:
    m = half_opened()
    succeed_n(m, 3, now=6.0)
    assert m.state is State.CLOSED
    assert fail_n(m, 10, now=7.0) == [Transition("closed", "open", "failure_rate", 5.0)]


def test_only_one_transition_per_result() -> None:
    m = half_opened()
    succeed_n(m, 2, now=6.0)
    actions = m.handle(Failure(), 6.0)  # 1 of 3 failed: closes; closed must not re-judge it
    assert actions == [Transition("half_open", "closed", "below_thresholds")]
    assert m.buffered_calls == 0


def test_max_wait_in_half_open_reopens_by_timer() -> None:
    m = half_opened()
    assert m.next_deadline() == 35.0
    assert m.handle(Timer(), 34.0) == []
    assert m.handle(Timer(), 35.0) == [
        Transition("half_open", "open", "max_wait_in_half_open", 10.0)
    ]


def test_max_wait_in_half_open_zero_means_no_deadline() -> None:
    m = half_opened(
        Config(sliding_window_size=10, minimum_number_of_calls=10, max_wait_in_half_open=0.0)
    )
    assert m.next_deadline() == math.inf
    assert m.handle(Timer(), 1e9) == []
    assert m.state is State.HALF_OPEN


def test_release_returns_a_permit_but_never_more_than_the_limit() -> None:
    m = half_opened()
    for _ in range(5):
        m.release(5.0)
    permits = [m.handle(Acquire(), 5.0) for _ in range(4)]
    assert permits == [[Permit()], [Permit()], [Permit()], [Reject(5.0, "half_open")]]


def test_half_open_starts_a_fresh_window_and_count() -> None:
    m = opened()
    m.handle(Acquire(), 1.0)  # rejected in open
    m.handle(Acquire(), 5.0)
    assert (m.buffered_calls, m.not_permitted_calls, m.failure_rate) == (0, 0, None)


# -- admin states -------------------------------------------------------------------------


def test_disabled_permits_and_records_nothing() -> None:
    m = BreakerMachine(TEN)
    assert m.handle(Disable(), 0.0) == [Transition("closed", "disabled", "disable")]
    assert fail_n(m, 100) == []
    assert m.handle(Acquire(), 0.0) == [Permit()]
    assert (m.state, m.buffered_calls) == (State.DISABLED, 0)


def test_forced_open_rejects_without_end() -> None:
    m = BreakerMachine(TEN)
    m.handle(ForceOpen(), 0.0)
    assert m.handle(Acquire(), 1e6) == [Reject(math.inf, "forced_open")]
    assert m.next_deadline() == math.inf
    assert m.handle(Success(), 1e6) == []


@pytest.mark.parametrize("admin", [Close(), Reset()])
def test_close_and_reset_start_a_fresh_closed_window(admin: Any) -> None:
    m = BreakerMachine(TEN)
    fail_n(m, 9)
    assert m.handle(admin, 0.0) == []  # already closed: nothing to announce
    assert fail_n(m, 9) == []
    assert m.state is State.CLOSED


@pytest.mark.parametrize("admin", [Close(), Reset()])
def test_close_and_reset_forget_the_reopen_count(admin: Any) -> None:
    m = half_opened()
    fail_n(m, 3, now=6.0)  # second opening: 10 s
    assert m.handle(admin, 7.0) == [Transition("open", "closed", event_type(admin))]
    assert fail_n(m, 10, now=8.0) == [Transition("closed", "open", "failure_rate", 5.0)]


def test_every_event_is_accepted_in_every_state() -> None:
    """A shared breaker gets late results and stale timers: none may crash a driver."""
    for state in State:
        assert set(TABLE[state]) == {event_type(e()) for e in BreakerMachine.EVENTS}


# -- the convenience API ------------------------------------------------------------------


def test_try_acquire_raises_a_typed_error_when_rejected() -> None:
    m = opened()
    with pytest.raises(CircuitOpen) as info:
        m.try_acquire(1.0)
    assert (info.value.retry_after, info.value.state) == (4.0, "open")
    assert "open" in str(info.value)
    m.try_acquire(5.0)  # half-opens and permits: no error
    assert m.state is State.HALF_OPEN


def test_try_acquire_in_forced_open_says_so() -> None:
    m = BreakerMachine()
    m.handle(ForceOpen(), 0.0)
    with pytest.raises(CircuitOpen) as info:
        m.try_acquire(0.0)
    assert (info.value.retry_after, info.value.state) == (math.inf, "forced_open")


def test_record_reports_the_transition() -> None:
    m = BreakerMachine(Config(sliding_window_size=1, minimum_number_of_calls=1))
    assert m.record(True, 0.1, 0.0) == []
    assert m.record(False, 0.1, 0.0) == [Transition("closed", "open", "failure_rate", 5.0)]


@pytest.mark.parametrize("duration", [-0.1, math.nan, math.inf])
def test_record_rejects_a_bad_duration_and_changes_nothing(duration: float) -> None:
    m = BreakerMachine()
    before = m.snapshot()
    with pytest.raises(ValueError, match="duration"):
        m.record(False, duration, 0.0)
    assert m.snapshot() == before


def test_decoded_events_are_validated() -> None:
    with pytest.raises(msgspec.ValidationError, match="duration"):
        msgspec.convert({"type": "failure", "duration": -1}, BreakerMachine.event_union())


# -- hypothesis: any events at non-decreasing times ---------------------------------------

configs = st.builds(
    Config,
    sliding_window_type=st.sampled_from(["count", "time"]),
    sliding_window_size=st.integers(1, 6),
    minimum_number_of_calls=st.integers(1, 6),
    failure_rate_threshold=st.sampled_from([1.0, 25.0, 50.0, 66.7, 100.0]),
    slow_call_rate_threshold=st.sampled_from([25.0, 50.0, 100.0]),
    slow_call_duration_threshold=st.sampled_from([0.0, 1.0, 2.0]),
    wait_duration_in_open=st.sampled_from([0.5, 1.0, 3.0]),
    wait_multiplier=st.sampled_from([1.0, 1.5, 2.0]),
    max_wait_duration_in_open=st.sampled_from([3.0, 10.0]),
    permitted_calls_in_half_open=st.integers(1, 4),
    max_wait_in_half_open=st.sampled_from([0.0, 2.0, 10.0]),
    automatic_transition_from_open=st.booleans(),
)
gaps = st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 2.5, 7.0])
durations = st.sampled_from([0.0, 1.0, 2.0, 3.0])


class BreakerRules(RuleBasedStateMachine):
    """Drives one breaker with any event at non-decreasing times against a small model."""

    m: BreakerMachine

    @initialize(config=configs)
    def start(self, config: Config) -> None:
        self.m = BreakerMachine(config)
        self.cfg = config
        self.now = 0.0
        self.reopens = 0  # openings since the last close: picks the expected wait
        self.open_until = math.inf  # when the current opening's wait ends
        self.held = 0  # half-open permits handed out and not released

    def feed(self, event: msgspec.Struct, gap: float = 0.0, at: float | None = None) -> list[Any]:
        m, tag, before = self.m, event_type(event), self.m.state
        at = self.now + gap if at is None else at
        assert at >= self.now
        self.now = at
        if tag not in TABLE[before]:
            snap = m.snapshot()
            with pytest.raises(IllegalTransition):
                m.handle(event, at)
            assert m.snapshot() == snap
            return []
        actions = m.handle(event, at)
        after = m.state
        assert after in TABLE[before][tag]
        moves = [a for a in actions if isinstance(a, Transition)]
        assert len(moves) == (after is not before), "exactly one transition per state change"
        if moves:
            assert (moves[0].from_state, moves[0].to_state) == (before, after)
        if after is not State.HALF_OPEN or before is not State.HALF_OPEN:
            self.held = 0
        for action in actions:
            if isinstance(action, Permit):
                # open and forced_open never permit; open only after half-opening.
                assert after in (State.CLOSED, State.DISABLED, State.HALF_OPEN)
                self.held += after is State.HALF_OPEN
            elif isinstance(action, Reject):
                assert action.state == after and action.retry_after > 0
                assert after in (State.OPEN, State.HALF_OPEN, State.FORCED_OPEN)
                assert (action.retry_after == math.inf) == (after is State.FORCED_OPEN)
        if after is State.OPEN and before is not State.OPEN:
            self.check_opening(event, before, moves[0], at)
        if after in (State.CLOSED, State.DISABLED):
            self.reopens = 0
        return actions

    def check_opening(self, event: Any, before: State, move: Transition, at: float) -> None:
        """Open only over a threshold with enough calls, or when the half-open wait ran out."""
        if isinstance(event, Success | Failure):
            assert before in (State.CLOSED, State.HALF_OPEN)
            metrics = self.m.metrics()
            assert metrics.failure_rate is not None and metrics.slow_call_rate is not None
            assert (
                metrics.failure_rate >= self.cfg.failure_rate_threshold - 1e-9
                or metrics.slow_call_rate >= self.cfg.slow_call_rate_threshold - 1e-9
            )
        else:
            assert isinstance(event, Timer) and before is State.HALF_OPEN
            assert move.reason == "max_wait_in_half_open" and self.cfg.max_wait_in_half_open > 0
        self.reopens += 1
        assert move.wait == self.cfg.open_wait(self.reopens)
        self.open_until = at + move.wait

    @rule(gap=gaps)
    def acquire(self, gap: float) -> None:
        before, at = self.m.state, self.now + gap
        held = self.held
        actions = self.feed(Acquire(), gap)
        if before is State.OPEN:
            if at < self.open_until:
                assert actions == [Reject(pytest.approx(self.open_until - at), "open")]
            else:
                assert [type(a) for a in actions] == [Transition, Permit]
        elif before is State.HALF_OPEN:
            limit = self.cfg.permitted_calls_in_half_open
            assert isinstance(actions[0], Permit if held < limit else Reject)

    @rule(n=st.integers(2, 5))
    def burst_of_callers(self, n: int) -> None:
        for _ in range(n):
            self.acquire(0.0)

    @rule(gap=gaps, ok=st.booleans(), duration=durations)
    def result(self, gap: float, ok: bool, duration: float) -> None:
        before = self.m.state
        actions = self.feed(Success(duration) if ok else Failure(duration), gap)
        if before in (State.OPEN, State.DISABLED, State.FORCED_OPEN):
            assert actions == [] and self.m.state is before

    @rule(gap=gaps)
    def release(self, gap: float) -> None:
        was_half_open = self.m.state is State.HALF_OPEN
        assert self.feed(Release(), gap) == []
        if was_half_open:
            self.held = max(0, self.held - 1)

    @rule(gap=gaps, due=st.booleans(), late=st.sampled_from([0.0, 0.0, 0.3]))
    def timer(self, gap: float, due: bool, late: float) -> None:
        """A timer at (or just after) the deadline, or at any time: early ones are no-ops."""
        deadline = self.m.next_deadline()
        at = max(self.now, deadline + late) if due and deadline < math.inf else self.now + gap
        actions = self.feed(Timer(), at=at)
        assert len(actions) == (at >= deadline)

    @rule(gap=gaps, admin=st.sampled_from([Disable(), ForceOpen(), Close(), Reset()]))
    def admin(self, gap: float, admin: Any) -> None:
        self.feed(admin, gap)
        target = {"disable": State.DISABLED, "force_open": State.FORCED_OPEN}
        assert self.m.state is target.get(event_type(admin), State.CLOSED)

    @invariant()
    def rates_are_percentages_or_undefined(self) -> None:
        metrics = self.m.metrics()
        for rate in (metrics.failure_rate, metrics.slow_call_rate):
            assert rate is None or 0.0 <= rate <= 100.0
        assert 0 <= metrics.failed_calls <= metrics.buffered_calls
        assert 0 <= metrics.slow_calls <= metrics.buffered_calls

    @invariant()
    def windows_are_bounded(self) -> None:
        window = self.m._window
        if isinstance(window, _CountWindow):
            sizes = (self.cfg.sliding_window_size, self.cfg.permitted_calls_in_half_open, 0)
            assert window.size in sizes
            assert self.m.buffered_calls <= window.size and len(window.ring) <= window.size
        else:
            assert len(window.stamp) == self.cfg.sliding_window_size

    @invariant()
    def half_open_never_hands_out_more_than_the_permits(self) -> None:
        limit = self.cfg.permitted_calls_in_half_open
        assert self.held <= limit
        if self.m.state is State.HALF_OPEN:
            assert self.m._permits_left == limit - self.held

    @invariant()
    def open_wait_is_within_base_and_max(self) -> None:
        if self.m.state is State.OPEN:
            cfg = self.cfg
            assert cfg.wait_duration_in_open <= self.m.open_wait <= cfg.max_wait_duration_in_open

    @invariant()
    def only_open_and_half_open_have_deadlines(self) -> None:
        deadline, state = self.m.next_deadline(), self.m.state
        if state is State.OPEN and self.cfg.automatic_transition_from_open:
            assert deadline == self.open_until
        elif state is State.HALF_OPEN and self.cfg.max_wait_in_half_open > 0:
            assert deadline < math.inf
        else:
            assert deadline == math.inf


TestBreakerRules = BreakerRules.TestCase
TestBreakerRules.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
