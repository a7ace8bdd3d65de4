"""The turn (barge-in) machine's rules, one behaviour per test, then a hypothesis model.

Time is the pure ``now`` argument (seconds); nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from voiceactors.machines._core import IllegalTransition, Timer, event_type
from voiceactors.machines.turn import (
    TABLE,
    AudioReceived,
    CancelResponse,
    CancelTools,
    DiscardAudio,
    FlushPlayback,
    PausePlayback,
    PlaybackIdle,
    Played,
    ResponseCreated,
    ResponseDone,
    ResumePlayback,
    SpeechStarted,
    SpeechStopped,
    State,
    Truncate,
    TurnConfig,
    TurnMachine,
)


def agent_speaking(
    *items: tuple[str, float], response: str = "resp_1", done: bool = False
) -> TurnMachine:
    """A machine at t=0 in agent_speaking with ``items`` (id, ms) received."""
    m = TurnMachine()
    m.handle(ResponseCreated(response), 0.0)
    for item_id, ms in items or (("item_1", 3000.0),):
        m.handle(AudioReceived(item_id, ms), 0.0)
    if done:
        m.handle(ResponseDone(response), 0.0)
    assert m.state is State.AGENT_SPEAKING
    return m


def barge_in(m: TurnMachine, at: float) -> list[msgspec.Struct]:
    """Speech at ``at`` that lasts: the actions of the decision at onset + min speech."""
    assert m.handle(SpeechStarted(), at) == [PausePlayback()]
    actions = m.handle(Timer(), m.next_deadline())
    assert m.state is State.USER_SPEAKING
    return actions


# -- the table ---------------------------------------------------------------------------


def test_every_event_is_legal_in_every_state() -> None:
    """The inputs race each other, so the machine defines every pair instead of raising."""
    tags = {event_type(e()) for e in TurnMachine.EVENTS}
    assert set(TABLE) == set(State)
    for state in State:
        assert set(TABLE[state]) == tags, state


def test_initial_state_has_no_deadline() -> None:
    m = TurnMachine()
    assert m.state is State.LISTENING
    assert m.next_deadline() == math.inf


# -- config and event validation ---------------------------------------------------------


def test_config_defaults() -> None:
    cfg = TurnConfig()
    assert (cfg.min_speech_ms, cfg.false_interruption_timeout_ms) == (500.0, 1500.0)


@pytest.mark.parametrize("field", ["min_speech_ms", "false_interruption_timeout_ms"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_config_rejects_bad_durations(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TurnConfig(**{field: value})


def test_from_spec_rejects_unknown_config_keys() -> None:
    with pytest.raises(msgspec.ValidationError, match="min_speech"):
        TurnMachine.from_spec({"min_speech": 300})
    assert TurnMachine.from_spec({"min_speech_ms": 300}).config.min_speech_ms == 300


@pytest.mark.parametrize(
    "make",
    [
        lambda: SpeechStarted(source="mic"),  # type: ignore[arg-type]
        lambda: SpeechStarted(at_ms=-5.0),
        lambda: SpeechStopped(source=""),  # type: ignore[arg-type]
        lambda: AudioReceived(ms=math.nan),
        lambda: AudioReceived(ms=-20.0),
        lambda: Played(played_ms=math.inf),
    ],
)
def test_events_reject_bad_values(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_decoded_events_are_validated_too() -> None:
    with pytest.raises(msgspec.ValidationError, match="played_ms"):
        msgspec.convert({"type": "played", "played_ms": -1}, TurnMachine.event_union())


# -- speech and min speech ----------------------------------------------------------------


def test_speech_while_listening_is_the_users_turn() -> None:
    m = TurnMachine()
    assert m.handle(SpeechStarted(), 1.0) == []
    assert m.state is State.USER_SPEAKING
    assert m.handle(SpeechStopped(), 2.0) == []
    assert m.state is State.LISTENING


def test_speech_over_the_agent_pauses_and_counts_min_speech_from_the_onset() -> None:
    m = agent_speaking()
    assert m.handle(SpeechStarted(at_ms=200.0), 1.0) == [PausePlayback()]
    assert m.state is State.INTERRUPTED
    assert m.next_deadline() == pytest.approx(1.3)


def test_an_early_timer_changes_nothing() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    before = m.snapshot()
    assert m.handle(Timer(), 1.49) == []
    assert m.snapshot() == before


def test_speech_shorter_than_min_speech_is_a_false_interruption() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    assert m.handle(SpeechStopped(), 1.3) == []
    assert m.state is State.FALSE_INTERRUPTION
    assert m.next_deadline() == pytest.approx(2.8)


def test_speech_that_ends_exactly_at_min_speech_is_real() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    actions = m.handle(SpeechStopped(), m.next_deadline())
    assert actions[0] == FlushPlayback() and actions[-1] == CancelTools(True)
    assert m.state is State.LISTENING
    assert m.next_deadline() == math.inf


def test_zero_min_speech_barges_in_on_the_first_timer() -> None:
    m = TurnMachine(TurnConfig(min_speech_ms=0.0))
    m.handle(ResponseCreated(), 0.0)
    m.handle(AudioReceived(), 0.0)
    m.handle(SpeechStarted(), 1.0)
    assert m.next_deadline() == 1.0
    assert m.handle(Timer(), 1.0)[0] == FlushPlayback()


def test_the_second_detector_joins_the_utterance_without_actions() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(source="local"), 1.0)
    deadline = m.next_deadline()
    assert m.handle(SpeechStarted(source="server", at_ms=900.0), 1.2) == []
    assert m.next_deadline() == deadline  # an earlier onset from the slower detector is ignored


def test_the_first_stop_of_a_source_of_the_utterance_ends_it() -> None:
    m = TurnMachine()
    m.handle(SpeechStarted(source="server"), 0.0)
    m.handle(SpeechStarted(source="local"), 0.1)
    m.handle(SpeechStopped(source="local"), 1.0)
    assert m.state is State.LISTENING
    m.handle(SpeechStopped(source="server"), 1.5)
    assert m.state is State.LISTENING


def test_a_stop_from_a_source_outside_the_utterance_is_ignored() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(source="local"), 1.0)
    before = m.snapshot()
    assert m.handle(SpeechStopped(source="server"), 1.1) == []
    assert m.snapshot() == before


def test_a_report_of_speech_that_began_before_the_last_stop_is_ignored() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(SpeechStopped(), 1.2)
    before = m.snapshot()
    # Onset 1.4 - 0.2 = 1.2: not after the stop.
    assert m.handle(SpeechStarted(source="server", at_ms=200.0), 1.4) == []
    assert m.snapshot() == before


def test_speech_that_began_after_the_last_stop_is_new() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(SpeechStopped(), 1.2)
    assert m.handle(SpeechStarted(source="server", at_ms=199.0), 1.4) == []
    assert m.state is State.INTERRUPTED
    assert m.next_deadline() == pytest.approx(1.4 - 0.199 + 0.5)


# -- false interruption and resume -----------------------------------------------------


def test_false_interruption_resumes_into_speaking_when_audio_is_queued() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(SpeechStopped(), 1.1)
    assert m.handle(Timer(), m.next_deadline()) == [ResumePlayback()]
    assert m.state is State.AGENT_SPEAKING
    assert m.next_deadline() == math.inf


def test_false_interruption_resumes_into_responding_when_nothing_is_queued() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(PlaybackIdle(), 1.0)
    m.handle(SpeechStopped(), 1.1)
    assert m.handle(Timer(), m.next_deadline()) == [ResumePlayback()]
    assert m.state is State.AGENT_RESPONDING


def test_false_interruption_resumes_into_listening_when_the_turn_is_over() -> None:
    m = agent_speaking(done=True)
    m.handle(SpeechStarted(), 1.0)
    m.handle(PlaybackIdle(), 1.0)
    m.handle(SpeechStopped(), 1.1)
    assert m.handle(Timer(), m.next_deadline()) == [ResumePlayback()]
    assert m.state is State.LISTENING


def test_a_resume_happens_once() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(SpeechStopped(), 1.1)
    m.handle(Timer(), m.next_deadline())
    assert m.handle(Timer(), 10.0) == []


def test_new_speech_in_the_window_counts_again_without_a_second_pause() -> None:
    m = agent_speaking()
    m.handle(SpeechStarted(), 1.0)
    m.handle(SpeechStopped(), 1.1)
    assert m.handle(SpeechStarted(at_ms=50.0), 2.0) == []
    assert m.state is State.INTERRUPTED
    assert m.next_deadline() == pytest.approx(2.45)


# -- the barge-in and truncation ----------------------------------------------------------


def test_barge_in_flushes_cancels_truncates_and_cancels_tools_in_that_order() -> None:
    m = agent_speaking()
    m.handle(Played("item_1", 1200.0), 1.2)
    assert barge_in(m, 1.2) == [
        FlushPlayback(),
        CancelResponse("resp_1"),
        Truncate("item_1", content_index=0, audio_end_ms=1200),
        CancelTools(interruptible_only=True),
    ]
    assert m.next_deadline() == math.inf


def test_truncate_uses_the_position_playback_paused_at_not_the_wall_clock() -> None:
    m = agent_speaking()
    m.handle(Played("item_1", 1200.0), 1.2)
    m.handle(SpeechStarted(), 1.2)
    m.handle(Played("item_1", 1220.0), 1.25)  # the pause took effect 20 ms of audio later
    actions = m.handle(Timer(), m.next_deadline())
    assert Truncate("item_1", 0, 1220) in actions


def test_truncate_floors_to_an_int_ms() -> None:
    m = agent_speaking()
    m.handle(Played("item_1", 1200.99), 1.2)
    (truncate,) = [a for a in barge_in(m, 1.2) if isinstance(a, Truncate)]
    assert truncate.audio_end_ms == 1200 and type(truncate.audio_end_ms) is int


def test_truncate_never_goes_past_the_audio_received() -> None:
    m = agent_speaking(("item_1", 3000.0))
    m.handle(Played("item_1", 3085.0), 3.1)  # a clock that ran ahead of the audio
    assert Truncate("item_1", 0, 3000) in barge_in(m, 3.1)


def test_a_position_past_the_audio_counts_only_what_had_arrived() -> None:
    m = agent_speaking(("item_1", 1000.0))
    m.handle(Played("item_1", 1085.0), 1.1)  # you cannot have played audio not yet received
    m.handle(AudioReceived("item_1", 1000.0), 1.2)
    assert Truncate("item_1", 0, 1000) in barge_in(m, 1.2)


def test_played_positions_only_move_forward() -> None:
    m = agent_speaking()
    m.handle(Played("item_1", 1200.0), 1.2)
    m.handle(Played("item_1", 900.0), 1.3)
    assert Truncate("item_1", 0, 1200) in barge_in(m, 1.3)


def test_every_item_not_heard_in_full_is_truncated_and_heard_ones_are_not() -> None:
    m = agent_speaking(("item_1", 1000.0), ("item_2", 1000.0), ("item_3", 500.0), done=True)
    m.handle(Played("item_1", 1000.0), 1.0)
    m.handle(Played("item_2", 400.0), 1.4)
    assert barge_in(m, 1.4) == [
        FlushPlayback(),
        Truncate("item_2", 0, 400),
        Truncate("item_3", 0, 0),
        CancelTools(True),
    ]


def test_a_streaming_item_is_truncated_even_when_all_received_audio_was_played() -> None:
    m = agent_speaking(("item_1", 1000.0))
    m.handle(PlaybackIdle(), 1.0)  # an underrun: more audio is on its way upstream
    assert m.state is State.AGENT_RESPONDING
    assert barge_in(m, 1.1) == [
        FlushPlayback(),
        CancelResponse("resp_1"),
        Truncate("item_1", 0, 1000),
        CancelTools(True),
    ]


def test_no_cancel_when_the_response_is_already_done() -> None:
    m = agent_speaking(done=True)
    assert not [a for a in barge_in(m, 1.0) if isinstance(a, CancelResponse)]


def test_speech_before_the_first_audio_cancels_without_truncating() -> None:
    m = TurnMachine()
    m.handle(ResponseCreated("resp_7"), 0.0)
    assert barge_in(m, 0.2) == [FlushPlayback(), CancelResponse("resp_7"), CancelTools(True)]


def test_audio_of_a_cancelled_response_is_discarded_and_the_next_one_plays() -> None:
    m = agent_speaking()
    barge_in(m, 1.0)
    assert m.handle(AudioReceived("item_1", 20.0), 1.6) == [DiscardAudio("item_1")]
    m.handle(ResponseDone("resp_1", status="cancelled"), 1.7)
    m.handle(SpeechStopped(), 2.0)
    m.handle(ResponseCreated("resp_2"), 2.5)
    assert m.handle(AudioReceived("item_2", 20.0), 2.6) == []
    assert m.state is State.AGENT_SPEAKING


# -- responses ---------------------------------------------------------------------------


def test_a_stale_response_done_is_ignored() -> None:
    m = agent_speaking()
    before = m.snapshot()
    assert m.handle(ResponseDone("resp_0"), 1.0) == []
    assert m.snapshot() == before


def test_a_new_response_supersedes_one_whose_done_was_lost() -> None:
    m = agent_speaking(("item_1", 1000.0))
    m.handle(Played("item_1", 1000.0), 1.0)
    m.handle(ResponseCreated("resp_2"), 1.0)
    # item_1 can get no more audio and was heard: nothing to truncate; only resp_2 is active.
    assert barge_in(m, 1.0) == [FlushPlayback(), CancelResponse("resp_2"), CancelTools(True)]


def test_the_upstream_ending_the_users_turn_closes_the_utterance() -> None:
    m = TurnMachine()
    m.handle(SpeechStarted(), 0.0)
    m.handle(ResponseCreated(), 0.8)
    assert m.state is State.AGENT_RESPONDING
    assert m.handle(SpeechStopped(), 1.0) == []
    assert m.state is State.AGENT_RESPONDING


def test_playback_idle_with_a_response_active_means_responding() -> None:
    m = agent_speaking()
    m.handle(PlaybackIdle(), 3.0)
    assert m.state is State.AGENT_RESPONDING
    m.handle(AudioReceived("item_1", 20.0), 3.1)
    assert m.state is State.AGENT_SPEAKING


def test_items_are_forgotten_once_heard_so_memory_does_not_grow() -> None:
    m = TurnMachine()
    now = 0.0
    for n in range(200):  # one long agent turn: responses chained without an idle gap
        m.handle(ResponseCreated(f"resp_{n}"), now)
        m.handle(AudioReceived(f"item_{n}", 100.0), now)
        m.handle(ResponseDone(f"resp_{n}"), now)
        m.handle(Played(f"item_{n}", 100.0), now + 0.1)
        now += 0.1
    assert m.state is State.AGENT_SPEAKING
    assert len(m.snapshot()["_items"]) == 0


# -- hypothesis: any events, any timing ----------------------------------------------------

# Mostly short steps, so speech often stops inside min speech and the false-interruption
# window is explored, with long ones mixed in for deadlines that pass.
DT = st.one_of(
    st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3]),
    st.sampled_from([0.6, 1.6]),
    st.floats(min_value=0.0, max_value=2.0),
)
MS = st.one_of(st.sampled_from([0.0, 20.0, 300.0, 1000.0]), st.floats(0.0, 2000.0))
SOURCE = st.sampled_from(["local", "server"])
PAUSED = {State.INTERRUPTED, State.FALSE_INTERRUPTION}


class TurnRules(RuleBasedStateMachine):
    """Feeds any event at non-decreasing times and checks each answer against a model.

    The model tracks what the machine must honour: the response that is active (created,
    not done), which were cancelled, what was received and played per item of the current
    agent turn, and whether playback is paused.
    """

    @initialize(
        min_speech_ms=st.sampled_from([0.0, 250.0, 500.0]),
        timeout_ms=st.sampled_from([0.0, 1000.0, 1500.0]),
    )
    def start(self, min_speech_ms: float, timeout_ms: float) -> None:
        self.cfg = TurnConfig(min_speech_ms, timeout_ms)
        self.m = TurnMachine(self.cfg)
        self.now = 0.0
        self.responses = 0
        self.active: str | None = None
        self.cancelled: set[str] = set()
        self.received: dict[str, float] = {}
        self.played: dict[str, float] = {}
        self.item_response: dict[str, str] = {}
        self.turn: list[str] = []  # items of the current agent turn, in arrival order
        self.paused = False
        self.last_stop = -math.inf  # when the last utterance ended

    # -- feeding -------------------------------------------------------------------------

    def feed(self, event: msgspec.Struct, dt: float = 0.0, *, at: float | None = None) -> None:
        self.now = self.now + dt if at is None else max(self.now, at)
        m, tag = self.m, event_type(event)
        before, deadline = m.state, m.next_deadline()
        snap = m.snapshot() if isinstance(event, Timer) or tag not in TABLE[before] else None
        if tag not in TABLE[before]:
            try:
                m.handle(event, self.now)
            except IllegalTransition:
                assert m.snapshot() == snap
                return
            raise AssertionError(f"{before} x {tag} should be illegal")
        actions = m.handle(event, self.now)
        assert m.state in TABLE[before][tag]
        self.check(event, before, deadline, actions)
        if isinstance(event, Timer) and self.now < deadline:
            assert actions == [] and m.snapshot() == snap, "an early timer is a no-op"
        self.update(event, before, actions)

    def check(
        self, event: msgspec.Struct, before: State, deadline: float, actions: list[Any]
    ) -> None:
        after = self.m.state
        if actions and isinstance(actions[0], FlushPlayback):
            self.check_barge_in(event, before, deadline, actions)
        elif actions == [PausePlayback()]:
            assert before in (State.AGENT_RESPONDING, State.AGENT_SPEAKING)
            assert isinstance(event, SpeechStarted) and after is State.INTERRUPTED
            assert not self.paused
        elif actions == [ResumePlayback()]:
            assert before is State.FALSE_INTERRUPTION and isinstance(event, Timer)
            assert self.now >= deadline and after is not State.FALSE_INTERRUPTION
        elif actions:
            assert isinstance(event, AudioReceived)
            assert actions == [DiscardAudio(event.item_id)]
            assert self.active is None or self.active in self.cancelled
        else:
            if isinstance(event, AudioReceived):
                assert self.active is not None and self.active not in self.cancelled
            # A due decision is never skipped.
            if before is State.INTERRUPTED and isinstance(event, Timer):
                assert self.now < deadline
            if before is State.FALSE_INTERRUPTION and isinstance(event, Timer):
                assert self.now < deadline
        if after is State.INTERRUPTED and before is not State.INTERRUPTED:
            assert isinstance(event, SpeechStarted)
            onset = self.now - event.at_ms / 1000
            want = onset + self.cfg.min_speech_ms / 1000
            assert self.m.next_deadline() == pytest.approx(want)
        if after is State.FALSE_INTERRUPTION and before is State.INTERRUPTED:
            assert self.now < deadline, "speech that lasted min speech is never dismissed"
            want = self.now + self.cfg.false_interruption_timeout_ms / 1000
            assert self.m.next_deadline() == pytest.approx(want)

    def check_barge_in(
        self, event: msgspec.Struct, before: State, deadline: float, actions: list[Any]
    ) -> None:
        assert before is State.INTERRUPTED and self.paused
        assert isinstance(event, Timer | SpeechStopped) and self.now >= deadline
        assert self.m.state is (
            State.USER_SPEAKING if isinstance(event, Timer) else State.LISTENING
        )
        for a in actions:
            if isinstance(a, Truncate):
                assert type(a.audio_end_ms) is int and a.content_index == 0
                assert 0 <= a.audio_end_ms <= self.received[a.item_id]
                assert a.audio_end_ms <= self.played.get(a.item_id, 0.0)
        want: list[msgspec.Struct] = [FlushPlayback()]
        if self.active is not None and self.active not in self.cancelled:
            want.append(CancelResponse(self.active))
        for item in self.turn:
            got, heard = self.received[item], self.played.get(item, 0.0)
            if heard < got or self.item_response[item] == self.active:
                want.append(Truncate(item, 0, math.floor(min(heard, got))))
        want.append(CancelTools(interruptible_only=True))
        assert actions == want

    def update(self, event: msgspec.Struct, before: State, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, PausePlayback):
                self.paused = True
            elif isinstance(a, ResumePlayback | FlushPlayback):
                self.paused = False
            elif isinstance(a, CancelResponse):
                self.cancelled.add(a.response_id)
        match event:
            case ResponseCreated():
                self.active = event.response_id
            case ResponseDone() if event.response_id == self.active:
                self.active = None
            case AudioReceived() if not actions:
                item = event.item_id
                self.received[item] = self.received.get(item, 0.0) + event.ms
                self.item_response[item] = self.active or ""
                if item not in self.turn:
                    self.turn.append(item)
            case Played() if event.item_id in self.turn:
                item = event.item_id
                clamped = min(event.played_ms, self.received[item])
                self.played[item] = max(self.played.get(item, 0.0), clamped)
            case PlaybackIdle():
                for item in self.turn:
                    self.played[item] = self.received[item]
        if self.m.state in (State.LISTENING, State.USER_SPEAKING):
            self.turn.clear()
        if isinstance(event, SpeechStopped) and self.m.state is not before:
            self.last_stop = self.now

    # -- rules ---------------------------------------------------------------------------

    @rule(source=SOURCE, at_ms=st.one_of(st.sampled_from([0.0, 300.0]), MS), dt=DT)
    def speech_started(self, source: str, at_ms: float, dt: float) -> None:
        self.feed(SpeechStarted(source, at_ms), dt)  # type: ignore[arg-type]

    @rule(source=SOURCE, dt=DT)
    def speech_stopped(self, source: str, dt: float) -> None:
        self.feed(SpeechStopped(source), dt)  # type: ignore[arg-type]

    @rule(dt=DT)
    def response_created(self, dt: float) -> None:
        self.responses += 1
        self.feed(ResponseCreated(f"resp_{self.responses}"), dt)

    @rule(stale=st.booleans(), status=st.sampled_from(["completed", "cancelled"]), dt=DT)
    def response_done(self, stale: bool, status: str, dt: float) -> None:
        rid = self.active if self.active is not None and not stale else "resp_0"
        self.feed(ResponseDone(rid, status), dt)

    @rule(k=st.integers(0, 1), ms=MS, dt=DT)
    def audio_received(self, k: int, ms: float, dt: float) -> None:
        # Item ids belong to one response, as upstream.
        self.feed(AudioReceived(f"{self.active}_item{k}", ms), dt)

    @rule(data=st.data(), fraction=st.floats(0.0, 1.2), dt=DT)
    def played(self, data: st.DataObject, fraction: float, dt: float) -> None:
        item = data.draw(st.sampled_from([*self.turn, "ghost"]))
        self.feed(Played(item, fraction * self.received.get(item, 500.0)), dt)

    # Two common bursts as single rules, so that the paths through interrupted and
    # false_interruption are frequent rather than lucky.

    @rule(ms=MS, dt=DT)
    def reply(self, ms: float, dt: float) -> None:
        self.response_created(dt)
        self.audio_received(0, ms, 0.0)

    @rule(source=SOURCE, length=st.floats(0.0, 0.7), dt=DT)
    def short_speech(self, source: str, length: float, dt: float) -> None:
        self.speech_started(source, 0.0, dt)
        self.speech_stopped(source, length)

    @precondition(lambda self: self.last_stop > -math.inf)
    @rule(source=SOURCE, dt=DT)
    def late_report(self, source: str, dt: float) -> None:
        """A detector reporting speech that began before the last utterance ended: ignored."""
        self.now += dt
        before, snap = self.m.state, self.m.snapshot()
        at_ms = (self.now - self.last_stop) * 1000 + 50.0
        self.feed(SpeechStarted(source, at_ms))  # type: ignore[arg-type]
        assert self.m.state is before
        if before not in (State.USER_SPEAKING, State.INTERRUPTED):  # no open utterance to join
            assert self.m.snapshot() == snap

    @rule(dt=DT)
    def playback_idle(self, dt: float) -> None:
        self.feed(PlaybackIdle(), dt)

    @precondition(lambda self: self.m.next_deadline() < math.inf)
    @rule(late=st.sampled_from([0.0, 0.0, 0.01, 0.7]))
    def timer_at_deadline(self, late: float) -> None:
        self.feed(Timer(), at=self.m.next_deadline() + late)

    @rule(dt=DT)
    def timer_any_time(self, dt: float) -> None:
        self.feed(Timer(), dt)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def one_response_at_most_and_it_is_the_latest(self) -> None:
        assert self.m._response == self.active

    @invariant()
    def paused_exactly_while_counting_or_waiting(self) -> None:
        assert self.paused == (self.m.state in PAUSED)

    @invariant()
    def deadline_only_while_paused(self) -> None:
        deadline = self.m.next_deadline()
        assert (deadline < math.inf) == (self.m.state in PAUSED)


TurnRules.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestTurnRules = TurnRules.TestCase
