"""The reconnect machine's rules, one behaviour per test, then a hypothesis stateful test.

Time is the pure ``now`` argument. Jitter comes from an injected ``random.Random``; where a
test needs exact delays it uses ``FixedJitter``, which lands every ``uniform(a, b)`` at the
same fraction of its range and records the ranges asked for.
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from voiceactors.machines._core import IllegalTransition, event_type
from voiceactors.machines.reconnect import (
    FATAL_CODES,
    FATAL_STATUSES,
    TABLE,
    CloseConnection,
    Closed,
    Config,
    Configure,
    Connected,
    ConnectFailed,
    Fail,
    FatalError,
    Notify,
    OpenConnection,
    ReconnectMachine,
    Recycle,
    Replay,
    ResponseDone,
    ResponseStarted,
    Start,
    State,
    Stop,
    Swap,
    Timer,
    is_fatal,
)


class FixedJitter(random.Random):
    """``uniform(a, b)`` returns ``a + (b - a) * fraction`` and records ``(a, b)``."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a + (b - a) * self.fraction


def machine(rng: random.Random | None = None, **config: Any) -> ReconnectMachine:
    return ReconnectMachine(Config(**config), rng=rng if rng is not None else random.Random(0))


def ready(at: float = 0.0, rng: random.Random | None = None, **config: Any) -> ReconnectMachine:
    m = machine(rng, **config)
    m.handle(Start(), at)
    m.handle(Connected(), at)
    return m


def kinds(actions: list[msgspec.Struct]) -> list[str]:
    return [event_type(a) for a in actions]


# -- config ------------------------------------------------------------------------------


def test_default_config_suits_a_person_waiting() -> None:
    cfg = Config()
    assert cfg.first_retry_delay <= 0.05
    assert 2.0 <= cfg.cap <= 4.0
    assert math.isfinite(cfg.retry_budget)
    assert cfg.recycle_after < 60 * 60.0


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("connect_timeout", {"connect_timeout": 0.0}),
        ("base", {"base": -1.0}),
        ("cap", {"cap": math.nan}),
        ("cap", {"cap": math.inf}),
        ("first_retry_delay", {"first_retry_delay": -0.01}),
        ("first_retry_delay", {"first_retry_delay": 5.0, "cap": 3.0}),
        ("retry_budget", {"retry_budget": 0.0}),
        ("recycle_after", {"recycle_after": math.nan}),
        ("stable_after", {"stable_after": math.inf}),
        ("quick_failure_window", {"quick_failure_window": 11.0, "stable_after": 10.0}),
        ("max_attempts", {"max_attempts": 0}),
        ("max_quick_failures", {"max_quick_failures": 0}),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=field):
        Config(**overrides)


def test_config_allows_no_budget_and_no_recycle() -> None:
    m = ready(retry_budget=math.inf, recycle_after=math.inf, max_attempts=None)
    assert m.next_deadline() == math.inf


def test_config_from_data_rejects_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError, match="cpa"):
        msgspec.convert({"cpa": 3.0}, Config)


def test_fatal_classification() -> None:
    assert FATAL_CODES == {
        "invalid_api_key",
        "insufficient_quota",
        "account_deactivated",
        "billing_hard_limit_reached",
        "beta_api_shape_disabled",
    }
    assert FATAL_STATUSES == {401, 403}
    assert is_fatal("invalid_api_key") and is_fatal(status=403)
    assert not any(is_fatal(status=s) for s in (0, 429, 500, 502, 503))
    assert not is_fatal("server_error") and not is_fatal("rate_limit_exceeded")


# -- connecting ----------------------------------------------------------------------------


def test_start_opens_current_with_a_connect_deadline() -> None:
    m = machine(connect_timeout=4.0)
    assert m.handle(Start(), 10.0) == [OpenConnection("current", 1, 4.0, 14.0)]
    assert (m.state, m.next_deadline()) == (State.CONNECTING, 14.0)


def test_first_connection_configures_even_after_failed_attempts() -> None:
    m = machine()
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 0.1)
    m.handle(Timer(), m.next_deadline())
    assert m.handle(Connected(), 1.0) == [Configure()]


def test_connect_timeout_closes_the_attempt_and_counts_as_a_failure() -> None:
    m = machine(rng=FixedJitter(0.5), base=0.5)
    m.handle(Start(), 0.0)
    actions = m.handle(Timer(), 5.0)
    assert actions == [
        CloseConnection("current", 1000, "connect timeout"),
        Notify("reconnecting", 2, 0.25),
    ]
    assert (m.state, m.failures, m.outage_started_at) == (State.BACKOFF, 1, 5.0)


@pytest.mark.parametrize("status", [0, 429, 500, 502, 503])
def test_handshake_429_5xx_and_refusals_are_retried(status: int) -> None:
    m = machine()
    m.handle(Start(), 0.0)
    assert kinds(m.handle(ConnectFailed(status=status), 0.1)) == ["notify"]
    assert m.state is State.BACKOFF


@pytest.mark.parametrize("status", sorted(FATAL_STATUSES))
def test_handshake_401_403_fail_at_once(status: int) -> None:
    m = machine()
    m.handle(Start(), 0.0)
    assert m.handle(ConnectFailed(status=status), 0.1) == [Fail("fatal error", f"http_{status}")]
    assert (m.state, m.next_deadline()) == (State.FAILED, math.inf)


# -- backoff -------------------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    rng = FixedJitter(0.5)
    m = machine(rng=rng, base=0.25, cap=3.0, retry_budget=math.inf)
    m.handle(Start(), 0.0)
    now, delays = 0.0, []
    for _ in range(7):
        now += 0.1
        (notify,) = m.handle(ConnectFailed(status=503), now)
        assert isinstance(notify, Notify) and m.next_deadline() == now + notify.retry_in
        delays.append(notify.retry_in)
        now = m.next_deadline()
        m.handle(Timer(), now)
    assert rng.ranges == [(0.0, e) for e in (0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0)]
    assert delays == [0.125, 0.25, 0.5, 1.0, 1.5, 1.5, 1.5]


def test_first_retry_after_a_stable_connection_is_near_immediate_and_not_drawn() -> None:
    rng = FixedJitter(0.5)
    m = ready(rng=rng, first_retry_delay=0.03, stable_after=10.0)
    assert m.handle(Closed(), 10.0) == [Notify("reconnecting", 1, 0.03)]
    assert rng.ranges == [] and m.next_deadline() == 10.03


def test_second_retry_after_a_drop_is_jittered() -> None:
    rng = FixedJitter(1.0)
    m = ready(rng=rng, base=0.5)
    m.handle(Closed(), 60.0)
    m.handle(Timer(), m.next_deadline())
    assert m.handle(ConnectFailed(status=500), 60.5) == [Notify("reconnecting", 2, 1.0)]
    assert rng.ranges == [(0.0, 1.0)]


def test_early_wake_up_in_backoff_does_nothing() -> None:
    m = ready()
    m.handle(Closed(), 60.0)
    before = m.snapshot()
    assert m.handle(Timer(), 60.01) == []
    assert m.snapshot() == before


def test_many_failures_keep_the_delay_within_the_cap() -> None:
    m = machine(rng=random.Random(1), retry_budget=math.inf, cap=2.0)
    m.handle(Start(), 0.0)
    now = 0.0
    for _ in range(1500):  # 2**1500 would overflow a float
        (notify,) = m.handle(ConnectFailed(status=503), now)
        assert isinstance(notify, Notify) and 0.0 <= notify.retry_in <= 2.0
        now = m.next_deadline()
        m.handle(Timer(), now)
    assert m.attempts == 1501


# -- outage accounting ---------------------------------------------------------------------


def test_outage_lasts_until_a_connection_stays_up_stable_after() -> None:
    m = machine(stable_after=10.0, quick_failure_window=1.0)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 1.0)
    m.handle(Timer(), m.next_deadline())
    m.handle(Connected(), 2.0)
    m.handle(ResponseStarted(), 11.9)  # 9.9 s up: still the same outage
    assert (m.failures, m.outage_started_at, m.attempts) == (1, 1.0, 2)
    m.handle(ResponseDone(), 12.0)  # 10 s up: over
    assert (m.failures, m.outage_started_at, m.attempts) == (0, None, 0)


def test_drop_before_stable_continues_the_outage() -> None:
    rng = FixedJitter(1.0)
    m = ready(rng=rng, base=0.5, stable_after=10.0)
    m.handle(Closed(), 60.0)  # stable: immediate
    m.handle(Timer(), m.next_deadline())
    m.handle(Connected(), 60.1)
    assert m.handle(Closed(), 65.0) == [Notify("reconnecting", 2, 1.0)]
    assert (m.failures, m.outage_started_at) == (2, 60.0)


def test_quick_failures_end_in_failed() -> None:
    m = machine(max_quick_failures=3, quick_failure_window=2.0)
    m.handle(Start(), 0.0)
    now, results = 0.0, []
    for _ in range(3):
        m.handle(Connected(), now)
        now += 1.9
        results.append(m.handle(Closed(code=1011), now))
        if m.state is State.BACKOFF:
            now = m.next_deadline()
            m.handle(Timer(), now)
    assert [kinds(r) for r in results] == [["notify"], ["notify"], ["fail"]]
    assert results[-1] == [Fail("too many quick failures", "closed_1011")]
    assert m.state is State.FAILED


def test_close_after_the_quick_window_is_not_a_quick_failure() -> None:
    m = ready(max_quick_failures=1, quick_failure_window=2.0)
    m.handle(Closed(), 2.0)
    assert m.state is State.BACKOFF


def test_quick_failure_streak_ends_with_a_stable_connection() -> None:
    m = ready(max_quick_failures=2, quick_failure_window=2.0, stable_after=10.0)
    m.handle(Closed(), 0.5)  # quick 1
    m.handle(Timer(), m.next_deadline())
    m.handle(Connected(), 1.0)
    m.handle(Closed(), 11.0)  # stable: the streak is over
    m.handle(Timer(), m.next_deadline())
    m.handle(Connected(), 12.0)
    m.handle(Closed(), 12.5)  # quick 1 again, not 2
    assert m.state is State.BACKOFF


def test_budget_counts_from_the_first_failure() -> None:
    m = machine(rng=FixedJitter(1.0), base=1.0, cap=4.0, retry_budget=5.0)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 0.0)  # retry at 1
    m.handle(Timer(), 1.0)
    m.handle(ConnectFailed(status=503), 1.0)  # retry at 3
    m.handle(Timer(), 3.0)
    assert m.handle(ConnectFailed(status=502), 3.0) == [  # retry at 7: past 5
        Fail("retry budget exhausted", "http_502")
    ]
    assert m.state is State.FAILED


def test_retry_starting_exactly_at_the_budget_is_allowed() -> None:
    m = machine(rng=FixedJitter(1.0), base=1.0, cap=4.0, retry_budget=3.0)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 0.0)
    m.handle(Timer(), 1.0)
    m.handle(ConnectFailed(status=503), 1.0)  # retry at 3.0 == budget
    assert m.handle(Timer(), 3.0) == [OpenConnection("current", 3, 5.0, 8.0)]


def test_late_wake_up_past_the_budget_fails_instead_of_retrying() -> None:
    m = machine(retry_budget=3.0)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(code="server_error"), 0.0)
    assert m.handle(Timer(), 3.5) == [Fail("retry budget exhausted", "server_error")]


def test_max_attempts_limits_attempts_per_outage() -> None:
    m = machine(max_attempts=2)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 0.1)
    assert m.handle(Timer(), m.next_deadline())[0] == OpenConnection(
        "current", 2, 5.0, m.next_deadline()
    )
    assert m.handle(ConnectFailed(status=503), 1.0) == [Fail("max attempts reached", "http_503")]


# -- planned closes --------------------------------------------------------------------------


def test_planned_close_reconnects_at_once_without_counting_a_failure() -> None:
    m = ready(quick_failure_window=2.0, max_quick_failures=1)
    actions = m.handle(Closed(code=1001, reason="session_expired", planned=True), 5.0)
    assert actions == [
        OpenConnection("current", 1, 5.0, 10.0),
        Notify("reconnecting", 1, 0.0),
    ]
    assert (m.state, m.failures, m.outage_started_at) == (State.CONNECTING, 0, None)
    assert m.handle(Connected(), 5.2) == [Replay(), Notify("reconnected", 1, 0.0)]


def test_planned_close_right_after_the_accept_is_a_quick_failure() -> None:
    m = ready(rng=FixedJitter(1.0), base=0.5, quick_failure_window=2.0, max_quick_failures=2)
    assert m.handle(Closed(code=1001, planned=True), 1.0) == [Notify("reconnecting", 1, 0.5)]
    m.handle(Timer(), 1.5)
    m.handle(Connected(), 1.6)
    assert m.handle(Closed(code=1001, planned=True), 1.7) == [
        Fail("too many quick failures", "closed_1001")
    ]


def test_recycling_a_young_connection_is_not_a_retry() -> None:
    m = ready(max_attempts=1)
    for t in (1.0, 2.0, 3.0):
        assert m.handle(Recycle(), t) == [OpenConnection("next", 1, 5.0, t + 5.0)]
        m.handle(Connected(), t + 0.1)
    assert m.attempts == 0


def test_planned_close_during_an_outage_is_held_to_its_budget() -> None:
    m = machine(retry_budget=5.0, stable_after=30.0)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 1.0)
    m.handle(Timer(), m.next_deadline())
    m.handle(Connected(), 2.0)
    assert m.handle(Closed(code=1001, planned=True), 6.5) == [
        Fail("retry budget exhausted", "http_503")
    ]


# -- fatal errors ----------------------------------------------------------------------------


def _in_state(state: State) -> ReconnectMachine:
    m = machine()
    m.handle(Start(), 0.0)
    if state is State.READY:
        m.handle(Connected(), 0.1)
    elif state is State.RECYCLING:
        m.handle(Connected(), 0.1)
        m.handle(Recycle(), 20.0)
    assert m.state is state
    return m


@pytest.mark.parametrize("state", [State.CONNECTING, State.READY, State.RECYCLING])
@pytest.mark.parametrize("code", sorted(FATAL_CODES))
def test_fatal_error_fails_from_every_live_state_and_closes_everything(
    state: State, code: str
) -> None:
    m = _in_state(state)
    actions = m.handle(FatalError(code), 21.0)
    closed = ["next", "current"] if state is State.RECYCLING else ["current"]
    assert [a.which for a in actions if isinstance(a, CloseConnection)] == closed
    assert actions[-1] == Fail("fatal error", code)
    assert (m.state, m.next_deadline()) == (State.FAILED, math.inf)


@pytest.mark.parametrize("code", sorted(FATAL_CODES))
def test_fatal_code_on_the_handshake_fails_at_once(code: str) -> None:
    m = _in_state(State.CONNECTING)
    assert m.handle(ConnectFailed(code=code), 0.2) == [Fail("fatal error", code)]


def test_failed_accepts_only_stop() -> None:
    m = _in_state(State.CONNECTING)
    m.handle(FatalError(), 0.2)
    for event in (Start(), Connected(), ConnectFailed(), Closed(), Recycle(), Timer()):
        before = m.snapshot()
        with pytest.raises(IllegalTransition):
            m.handle(event, 100.0)
        assert m.snapshot() == before
    assert m.handle(Stop(), 100.0) == [] and m.state is State.IDLE


def test_stop_then_start_is_a_fresh_session() -> None:
    m = machine(max_attempts=1)
    m.handle(Start(), 0.0)
    m.handle(ConnectFailed(status=503), 0.1)
    assert m.state is State.FAILED
    m.handle(Stop(), 1.0)
    assert m.handle(Start(), 2.0) == [OpenConnection("current", 1, 5.0, 7.0)]
    assert m.handle(Connected(), 2.1) == [Configure()]


# -- recycling -------------------------------------------------------------------------------


def test_recycle_opens_next_and_keeps_current_until_it_is_accepted() -> None:
    m = ready(recycle_after=100.0)
    assert m.next_deadline() == 100.0
    assert m.handle(Timer(), 100.0) == [OpenConnection("next", 1, 5.0, 105.0)]
    assert m.state is State.RECYCLING
    assert m.handle(Connected(), 100.3) == [Swap(1000, "recycled"), Replay()]
    assert (m.state, m.next_deadline()) == (State.READY, 200.3)


def test_recycle_waits_for_the_response_in_flight() -> None:
    m = ready(recycle_after=100.0)
    m.handle(ResponseStarted(), 99.0)
    assert m.handle(Timer(), 100.0) == []
    assert (m.state, m.next_deadline()) == (State.READY, math.inf)
    assert kinds(m.handle(ResponseDone(), 101.0)) == ["open_connection"]


def test_recycle_waits_for_every_response_in_flight() -> None:
    m = ready()
    m.handle(ResponseStarted(), 10.0)
    m.handle(ResponseStarted(), 10.1)  # an out-of-band response alongside
    assert m.handle(Recycle(), 11.0) == []
    assert m.handle(ResponseDone(), 12.0) == []
    assert kinds(m.handle(ResponseDone(), 13.0)) == ["open_connection"]


def test_response_started_on_the_old_connection_holds_the_swap() -> None:
    m = ready()
    m.handle(Recycle(), 20.0)
    m.handle(ResponseStarted(), 20.1)
    assert m.handle(Connected(), 20.2) == []
    assert (m.state, m.next_deadline()) == (State.RECYCLING, math.inf)
    assert m.handle(ResponseDone(), 25.0) == [Swap(1000, "recycled"), Replay()]
    # The new connection was accepted at 20.2: its recycle time counts from then.
    assert m.next_deadline() == 20.2 + Config().recycle_after


def test_unmatched_response_done_is_ignored() -> None:
    m = ready()
    before = m.snapshot()
    assert m.handle(ResponseDone(), 1.0) == []
    assert m.snapshot() == before


def test_failed_recycle_keeps_the_old_connection_and_retries_after_backoff() -> None:
    m = ready(rng=FixedJitter(0.5), base=0.5)
    m.handle(Recycle(), 20.0)
    assert m.handle(ConnectFailed(status=503), 20.5) == []  # no close of current
    assert (m.state, m.failures, m.outage_started_at) == (State.READY, 1, 20.5)
    assert m.next_deadline() == 20.75
    assert m.handle(Timer(), 20.75) == [OpenConnection("next", 2, 5.0, 25.75)]


def test_recycle_connect_timeout_closes_only_next() -> None:
    m = ready()
    m.handle(Recycle(), 20.0)
    assert m.handle(Timer(), 25.0) == [CloseConnection("next", 1000, "connect timeout")]
    assert m.state is State.READY


def test_recycle_stops_trying_when_the_budget_is_spent_and_the_old_close_then_fails() -> None:
    m = ready(rng=FixedJitter(1.0), base=2.0, cap=3.0, retry_budget=1.0)
    m.handle(Recycle(), 20.0)
    assert m.handle(ConnectFailed(status=503), 20.5) == []  # a retry at 22.5 is past budget
    assert (m.state, m.next_deadline()) == (State.READY, math.inf)
    assert m.handle(Closed(code=1001, planned=True), 30.0) == [
        Fail("retry budget exhausted", "http_503")
    ]


def test_old_connection_closing_during_recycle_hands_over_to_next() -> None:
    m = ready()
    m.handle(Recycle(), 20.0)
    assert m.handle(Closed(), 21.0) == [
        Swap(1000, "recycled"),
        Notify("reconnecting", 1, 0.0),
    ]
    assert (m.state, m.next_deadline(), m.failures) == (State.CONNECTING, 25.0, 0)
    assert m.handle(Connected(), 21.5) == [Replay(), Notify("reconnected", 1, 0.0)]


def test_stop_during_recycle_closes_both() -> None:
    m = ready()
    m.handle(Recycle(), 20.0)
    assert m.handle(Stop(), 21.0) == [
        CloseConnection("next", 1000, "stop"),
        CloseConnection("current", 1000, "stop"),
    ]
    assert (m.state, m.next_deadline()) == (State.IDLE, math.inf)


# -- stateful --------------------------------------------------------------------------------

NON_FATAL_FAILURES = [("", 0), ("", 429), ("", 500), ("", 503), ("server_error", 0)]
FATAL_FAILURES = [("invalid_api_key", 0), ("", 401), ("", 403), ("insufficient_quota", 0)]


FAILURES = st.one_of(  # mostly retryable, so that runs get deep
    st.sampled_from(NON_FATAL_FAILURES), st.sampled_from(NON_FATAL_FAILURES + FATAL_FAILURES)
)
EVENT_STRATEGIES: dict[str, st.SearchStrategy[msgspec.Struct]] = {
    "start": st.just(Start()),
    "connected": st.just(Connected()),
    "connect_failed": FAILURES.map(lambda cs: ConnectFailed(code=cs[0], status=cs[1])),
    "closed": st.builds(
        Closed, code=st.sampled_from([1000, 1001, 1006, 1011]), planned=st.booleans()
    ),
    "fatal_error": st.sampled_from(sorted(FATAL_CODES)).map(FatalError),
    "response_started": st.just(ResponseStarted()),
    "response_done": st.just(ResponseDone()),
    "recycle": st.just(Recycle()),
    "stop": st.just(Stop()),
    "timer": st.just(Timer()),
}
PROGRESS_STRATEGIES = {
    "connect_failed": st.sampled_from(NON_FATAL_FAILURES).map(
        lambda cs: ConnectFailed(code=cs[0], status=cs[1])
    )
}
#: Legal events that move a session on, weighted towards the deeper states.
FORWARD: dict[State, list[str]] = {
    State.IDLE: ["start"],
    State.CONNECTING: ["connected"] * 3 + ["connect_failed", "timer"],
    State.READY: ["recycle"] * 2 + ["response_started"] * 2 + ["response_done", "closed", "timer"],
    State.BACKOFF: ["timer"],
    State.RECYCLING: ["connected"] * 3
    + ["response_started"] * 3
    + ["response_done"] * 2
    + ["closed", "connect_failed", "recycle", "timer"],
    State.FAILED: ["stop"],
}
assert all(set(kinds) <= set(TABLE[state]) for state, kinds in FORWARD.items())
assert set(EVENT_STRATEGIES) == {event_type(e()) for e in ReconnectMachine.EVENTS}
EVENTS = st.one_of(*EVENT_STRATEGIES.values())
DELAYS = st.one_of(
    st.sampled_from([0.0, 0.0, 0.01, 0.5, 1.0, 2.0, 5.0, 10.0]), st.floats(0.0, 40.0)
)
Slots = dict[str, str | None]  # slot -> None | "opening" | "open"

#: What the driver holds in each state (the machine's actions must keep this true).
EXPECTED_SLOTS: dict[State, set[tuple[str | None, str | None]]] = {
    State.IDLE: {(None, None)},
    State.FAILED: {(None, None)},
    State.BACKOFF: {(None, None)},
    State.CONNECTING: {("opening", None)},
    State.READY: {("open", None)},
    State.RECYCLING: {("open", "opening"), ("open", "open")},
}


class ReconnectRules(RuleBasedStateMachine):
    """Feeds any event at a non-decreasing time, keeping a model of the driver's two slots.

    The model is the driver: events change its slots (a connect report, a close), actions
    open, close and swap them. Checked on every step: the slots match the state, at most
    one connection is being opened, no retry starts past the budget measured from the
    outage's first failure (tracked here, independently), backoff delays lie in
    [0, cap], nothing opens after a fatal error until a new start, configure comes once and
    replay only after it, attempts never exceed max_attempts.
    """

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        base=st.sampled_from([0.1, 0.5, 1.0]),
        cap=st.sampled_from([1.0, 3.0]),
        budget=st.sampled_from([3.0, 20.0, math.inf]),
        max_attempts=st.sampled_from([None, 2, 6]),
        max_quick=st.sampled_from([1, 3]),
        recycle_after=st.sampled_from([15.0, 60.0, math.inf]),
    )
    def setup(
        self,
        seed: int,
        base: float,
        cap: float,
        budget: float,
        max_attempts: int | None,
        max_quick: int,
        recycle_after: float,
    ) -> None:
        self.config = Config(
            connect_timeout=5.0,
            first_retry_delay=0.02,
            base=base,
            cap=cap,
            retry_budget=budget,
            max_attempts=max_attempts,
            stable_after=10.0,
            quick_failure_window=2.0,
            max_quick_failures=max_quick,
            recycle_after=recycle_after,
        )
        self.m = ReconnectMachine(self.config, rng=random.Random(seed))
        self.now = 0.0
        self.slots: Slots = {"current": None, "next": None}
        self.accepted_at = {"current": 0.0, "next": 0.0}
        self.stable = False
        self.outage_start: float | None = None
        self.attempts = 0
        self.configured = False
        self.dead = False  # a fatal error happened; no connection may open until start

    # -- driving --------------------------------------------------------------------------

    def feed(self, event: msgspec.Struct, now: float) -> list[msgspec.Struct] | None:
        assert now >= self.now
        self.now = now
        m, kind = self.m, event_type(event)
        if kind not in TABLE[m.state]:
            before = m.snapshot()
            with pytest.raises(IllegalTransition):
                m.handle(event, now)
            assert m.snapshot() == before
            return None
        state = m.state
        if self.slots["current"] == "open" and not self.stable:
            if now - self.accepted_at["current"] >= self.config.stable_after:
                self.stable, self.outage_start = True, None
                self.attempts = 1 if self.slots["next"] == "opening" else 0
        actions = m.handle(event, now)
        self.observe(state, event, actions)
        return actions

    def observe(self, state: State, event: msgspec.Struct, actions: list[msgspec.Struct]) -> None:
        m, slots = self.m, self.slots
        # connected/connect_failed are about the connection being opened: next while
        # recycling (even once accepted, until the swap), current otherwise.
        opening = "next" if state is State.RECYCLING else "current"
        failure = False
        match event:
            case Start():
                self.outage_start, self.attempts = None, 0
                self.configured = self.dead = False
            case Stop():
                self.outage_start = None
            case Connected() if slots[opening] == "opening":
                slots[opening] = "open"
                self.accepted_at[opening] = self.now
                if opening == "current":
                    self.accepted()
            case ConnectFailed(code=code, status=status):
                slots[opening] = None
                failure = not is_fatal(code, status)
                self.dead = not failure
            case Closed(planned=planned):
                slots["current"] = None
                quick = self.now - self.accepted_at["current"] < self.config.quick_failure_window
                failure = state is State.READY and (quick or not planned)
            case FatalError():
                self.dead = True
            case Timer():
                failure = any(isinstance(a, CloseConnection) for a in actions)
        if failure and self.outage_start is None:
            self.outage_start = self.now
        for action in actions:
            match action:
                case OpenConnection(which=which, attempt=attempt, deadline=deadline):
                    assert not self.dead, "opened a connection after a fatal error"
                    assert slots[which] is None, f"opened into a busy slot {which}"
                    slots[which] = "opening"
                    self.attempts += 1
                    assert attempt == self.attempts
                    limit = self.config.max_attempts
                    assert limit is None or attempt <= limit
                    if self.outage_start is not None:
                        assert self.now - self.outage_start <= self.config.retry_budget
                    assert deadline == self.now + self.config.connect_timeout
                case CloseConnection(which=which):
                    assert slots[which] is not None, f"closed an empty slot {which}"
                    slots[which] = None
                case Swap():
                    assert slots["next"] is not None
                    slots["current"], slots["next"] = slots["next"], None
                    self.accepted_at["current"] = self.accepted_at["next"]
                    if slots["current"] == "open":
                        self.accepted()
                case Configure():
                    assert not self.configured, "configure twice"
                    self.configured = True
                case Replay():
                    assert self.configured, "replay before any connection was configured"
                case Notify(status="reconnecting", retry_in=retry_in) if m.state is State.BACKOFF:
                    assert 0.0 <= retry_in <= self.config.cap
                    assert m.next_deadline() == self.now + retry_in
                case Fail():
                    assert m.state is State.FAILED
        if self.dead and not isinstance(event, Stop):
            assert m.state is State.FAILED, "a fatal error must end in failed"
        if state is State.CONNECTING and m.state is State.READY:
            assert kinds(actions)[0] in ("configure", "replay")
        assert m.outage_started_at == self.outage_start

    def accepted(self) -> None:
        """A new current connection: its stability starts now; outside an outage the
        attempt that made it was not a retry, so the count starts again."""
        self.stable = False
        if self.outage_start is None:
            self.attempts = 0

    # -- rules ----------------------------------------------------------------------------

    @rule(event=EVENTS, dt=DELAYS)
    def any_event(self, event: msgspec.Struct, dt: float) -> None:
        self.feed(event, self.now + dt)

    @rule(data=st.data(), dt=DELAYS)
    def legal_event(self, data: st.DataObject, dt: float) -> None:
        kind = data.draw(st.sampled_from(sorted(TABLE[self.m.state])))
        self.feed(data.draw(EVENT_STRATEGIES[kind]), self.now + dt)

    @rule(data=st.data(), dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0, 12.0]))
    def progress(self, data: st.DataObject, dt: float) -> None:
        """A legal event that keeps the session going, so runs reach recycling often."""
        kind = data.draw(st.sampled_from(FORWARD[self.m.state]))
        strategy = PROGRESS_STRATEGIES.get(kind, EVENT_STRATEGIES[kind])
        self.feed(data.draw(strategy), self.now + dt)

    @precondition(lambda self: math.isfinite(self.m.next_deadline()))
    @rule(late=st.sampled_from([0.0, 0.0, 0.0, 1e-3, 1.0, 10.0]))
    def timer_at_deadline(self, late: float) -> None:
        self.feed(Timer(), max(self.now, self.m.next_deadline()) + late)

    @precondition(lambda self: self.now < self.m.next_deadline() < math.inf)
    @rule(fraction=st.floats(0.0, 0.999))
    def early_timer(self, fraction: float) -> None:
        m = self.m
        state, deadline = m.state, m.next_deadline()
        at = self.now + (deadline - self.now) * fraction
        if at >= deadline:
            return
        assert self.feed(Timer(), at) == []
        assert (m.state, m.next_deadline()) == (state, deadline)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def slots_match_the_state(self) -> None:
        assert (self.slots["current"], self.slots["next"]) in EXPECTED_SLOTS[self.m.state]

    @invariant()
    def idle_and_failed_have_no_deadline(self) -> None:
        if self.m.state in (State.IDLE, State.FAILED):
            assert self.m.next_deadline() == math.inf


ReconnectRules.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestReconnectRules = ReconnectRules.TestCase
