"""Turn-taking and barge-in: who holds the floor, and what to do when the user talks over the agent.

Theory of operation
-------------------
The playback actor drives this machine. It feeds three independent inputs: voice detectors
(the local VAD and the upstream's ``speech_started``/``speech_stopped``), the upstream's
response lifecycle and audio, and its own playback clock (``played`` positions and
``playback_idle``). The machine answers with what to do to playback, to the upstream and
to running tools. Everything that affects those decisions is in this file; the machine never
reads a clock (``now`` is monotonic seconds, passed in) and does no I/O.

Speech. The detectors overlap: the local VAD is early, the server is a round trip later and
ends its speech ``silence_duration_ms`` late. One *utterance* starts at the first
``speech_started`` from any source; a start from the other source while it is open joins it
(deduplicated, no action). The first ``speech_stopped`` from a source that is part of it ends
it; a stop from any other source is ignored. A start whose onset (``now - at_ms``) is not
after the end of the previous utterance is a late report of that utterance and is ignored:
without this, the server's ``speech_started`` for a cough that the local VAD already
dismissed would interrupt the agent a second time.

Barge-in. Speech while the agent holds the floor (``agent_responding`` or ``agent_speaking``)
pauses playback at once and starts counting: ``interrupted`` until ``onset + min_speech_ms``.
If the utterance is still open then, it is a real barge-in: flush playback, cancel the
response if it is still active upstream (never otherwise: that answers
``response_cancel_not_active``), truncate every item the user did not hear in full at its
*played* position (from the playback clock, floored to an int, never past the audio
received), and cancel interruptible tools. If the utterance ends first, it was a cough:
``false_interruption``, still paused, until ``stop + false_interruption_timeout_ms``; new
speech in that window counts again from its own onset, and the timeout resumes playback.

Min speech applies before the first audio too: a cough while the agent is thinking must not
cost the user their answer, since the server makes no new response unless its own VAD heard
a new turn. Audio that arrives during the count is held (paused) and is flushed or played
with the rest.

Where a resume lands is decided by the facts, not by where the machine came from: playback
holds audio -> ``agent_speaking``; a response is active but nothing is queued ->
``agent_responding``; otherwise the turn is over -> ``listening``. The same rule makes
``playback_idle`` during an active response (an underrun, or the gap before a follow-up
response's audio) go to ``agent_responding``.

Responses. At most one response is active: a single slot. ``response_created`` always
starts a new one; if one was still active, its ``response.done`` was lost (the server never
runs two: ``conversation_already_has_active_response``), so the newer one supersedes it.
A ``response_done`` for any other id is stale and ignored. Audio plays only while its
response is active and not being cancelled; anything else (the deltas still in flight after
a ``response.cancel``) is answered with ``discard_audio``.

Every event is legal in every state: the three inputs race each other (a position report or
a cancelled response's audio can land after the flush, a stale timer after its deadline
moved), so each state says what each of them means rather than raising.

What the driver owes the machine: ``played`` positions from the playback clock (samples
actually played, never wall-clock time) and ``playback_idle`` only when its buffer is empty;
when the upstream connection is lost, ``response_done`` (status ``"failed"``) for the active
response and ``speech_stopped(source="server")``, since that connection will never send them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Final, Literal

import msgspec

from ._core import Machine, Timer

__all__ = [
    "MACHINE",
    "TABLE",
    "AudioReceived",
    "CancelResponse",
    "CancelTools",
    "DiscardAudio",
    "FlushPlayback",
    "PausePlayback",
    "PlaybackIdle",
    "Played",
    "ResponseCreated",
    "ResponseDone",
    "ResumePlayback",
    "SpeechStarted",
    "SpeechStopped",
    "State",
    "Timer",
    "Truncate",
    "TurnConfig",
    "TurnMachine",
]


class State(StrEnum):
    """Who holds the floor (see the module docstring)."""

    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    AGENT_RESPONDING = "agent_responding"
    AGENT_SPEAKING = "agent_speaking"
    INTERRUPTED = "interrupted"
    FALSE_INTERRUPTION = "false_interruption"


def _to(*states: State) -> frozenset[State]:
    return frozenset(states)


# Short names for the table below.
LISTENING = State.LISTENING
USER_SPEAKING = State.USER_SPEAKING
AGENT_RESPONDING = State.AGENT_RESPONDING
AGENT_SPEAKING = State.AGENT_SPEAKING
INTERRUPTED = State.INTERRUPTED
FALSE_INTERRUPTION = State.FALSE_INTERRUPTION

#: ``state -> event type -> allowed next states``. Where a row has several targets the
#: comment gives the guard, in the order of the targets; an event whose only target is its
#: own state changes no state.
TABLE: Final[Mapping[State, Mapping[str, frozenset[State]]]] = {
    LISTENING: {
        # a new utterance | a late report of one that already ended
        "speech_started": _to(USER_SPEAKING, LISTENING),
        "speech_stopped": _to(LISTENING),  # a detector catching up
        "response_created": _to(AGENT_RESPONDING),
        "audio_received": _to(LISTENING),  # a cancelled response's audio in flight: discarded
        "played": _to(LISTENING),  # a position report from before the flush
        "response_done": _to(LISTENING),  # the cancelled response finishing
        "playback_idle": _to(LISTENING),
        "timer": _to(LISTENING),  # stale
    },
    USER_SPEAKING: {
        "speech_started": _to(USER_SPEAKING),  # the other detector joining
        # a source of the open utterance | any other source
        "speech_stopped": _to(LISTENING, USER_SPEAKING),
        "response_created": _to(AGENT_RESPONDING),  # the upstream ended the user's turn
        "audio_received": _to(USER_SPEAKING),  # discarded
        "played": _to(USER_SPEAKING),
        "response_done": _to(USER_SPEAKING),
        "playback_idle": _to(USER_SPEAKING),
        "timer": _to(USER_SPEAKING),
    },
    AGENT_RESPONDING: {
        "speech_started": _to(INTERRUPTED, AGENT_RESPONDING),  # new | late report
        "speech_stopped": _to(AGENT_RESPONDING),
        "response_created": _to(AGENT_RESPONDING),  # supersedes one whose done was lost
        "audio_received": _to(AGENT_SPEAKING),
        "played": _to(AGENT_RESPONDING),
        "response_done": _to(LISTENING, AGENT_RESPONDING),  # the active response | stale id
        "playback_idle": _to(AGENT_RESPONDING),
        "timer": _to(AGENT_RESPONDING),
    },
    AGENT_SPEAKING: {
        "speech_started": _to(INTERRUPTED, AGENT_SPEAKING),  # new | late report
        "speech_stopped": _to(AGENT_SPEAKING),
        "response_created": _to(AGENT_SPEAKING),  # a follow-up response; the audio plays on
        "audio_received": _to(AGENT_SPEAKING),  # queued | discarded when none is active
        "played": _to(AGENT_SPEAKING),
        "response_done": _to(AGENT_SPEAKING),  # the rest of the audio still plays
        # a response is still active | the turn is over
        "playback_idle": _to(AGENT_RESPONDING, LISTENING),
        "timer": _to(AGENT_SPEAKING),
    },
    INTERRUPTED: {
        "speech_started": _to(INTERRUPTED),  # the other detector joining: nothing extra
        # before min speech | after it, ahead of the timer | not a source of the utterance
        "speech_stopped": _to(FALSE_INTERRUPTION, LISTENING, INTERRUPTED),
        "response_created": _to(INTERRUPTED),
        "audio_received": _to(INTERRUPTED),  # held while paused
        "played": _to(INTERRUPTED),  # the position playback paused at
        "response_done": _to(INTERRUPTED),
        "playback_idle": _to(INTERRUPTED),
        "timer": _to(USER_SPEAKING, INTERRUPTED),  # speech lasted min speech: barge-in | early
    },
    FALSE_INTERRUPTION: {
        "speech_started": _to(INTERRUPTED, FALSE_INTERRUPTION),  # new speech | late report
        "speech_stopped": _to(FALSE_INTERRUPTION),
        "response_created": _to(FALSE_INTERRUPTION),
        "audio_received": _to(FALSE_INTERRUPTION),
        "played": _to(FALSE_INTERRUPTION),
        "response_done": _to(FALSE_INTERRUPTION),
        "playback_idle": _to(FALSE_INTERRUPTION),
        # resume: audio queued | a response active, nothing queued | turn over; or early
        "timer": _to(AGENT_SPEAKING, AGENT_RESPONDING, LISTENING, FALSE_INTERRUPTION),
    },
}

Source = Literal["local", "server"]
_SOURCES: Final = ("local", "server")


def _check_ms(owner: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}.{name} must be a finite number of ms >= 0, got {value!r}")


# -- events ----------------------------------------------------------------------------
# Cycle-free and numerous (audio and positions arrive every few ms), hence gc=False.


class SpeechStarted(msgspec.Struct, frozen=True, gc=False, tag="speech_started"):
    """A voice detector heard the user start speaking.

    ``source`` is ``"local"`` (the capture actor's VAD) or ``"server"`` (the upstream's
    ``input_audio_buffer.speech_started``). ``at_ms`` is how long before ``now`` the speech
    began: the detector's own lag, so min speech counts from the real onset. For the server,
    the driver maps ``audio_start_ms`` to capture time (net of prefix padding); 0 means "it
    began now". A bad source or a negative or non-finite ``at_ms`` raises ``ValueError``.
    """

    source: Source = "local"
    at_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"SpeechStarted.source must be one of {_SOURCES}, got {self.source!r}")
        _check_ms("SpeechStarted", "at_ms", self.at_ms)


class SpeechStopped(msgspec.Struct, frozen=True, gc=False, tag="speech_stopped"):
    """A voice detector heard the user stop. A bad source raises ``ValueError``."""

    source: Source = "local"

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"SpeechStopped.source must be one of {_SOURCES}, got {self.source!r}")


class ResponseCreated(msgspec.Struct, frozen=True, gc=False, tag="response_created"):
    """The upstream started a response (``response.created``); no audio yet."""

    response_id: str = "resp_1"


class AudioReceived(msgspec.Struct, frozen=True, gc=False, tag="audio_received"):
    """An agent audio delta arrived: ``ms`` of audio for ``item_id``.

    Negative or non-finite ``ms`` raises ``ValueError``.
    """

    item_id: str = "item_1"
    ms: float = 20.0

    def __post_init__(self) -> None:
        _check_ms("AudioReceived", "ms", self.ms)


class Played(msgspec.Struct, frozen=True, gc=False, tag="played"):
    """The playback clock: ``played_ms`` of ``item_id`` have been played out.

    Positions only move forward (a lower one is ignored) and never count past the audio
    received. Negative or non-finite ``played_ms`` raises ``ValueError``.
    """

    item_id: str = "item_1"
    played_ms: float = 0.0

    def __post_init__(self) -> None:
        _check_ms("Played", "played_ms", self.played_ms)


class ResponseDone(msgspec.Struct, frozen=True, gc=False, tag="response_done"):
    """The upstream finished a response (``response.done``).

    ``status`` is carried for the driver's logs and metrics; the machine acts the same for
    every status, because the audio already received is what the assistant said (up to a
    truncation) whether the response completed, failed or was cancelled.
    """

    response_id: str = "resp_1"
    status: str = "completed"


class PlaybackIdle(msgspec.Struct, frozen=True, gc=False, tag="playback_idle"):
    """Playback holds no audio: everything received so far has been played out."""


# -- actions ---------------------------------------------------------------------------


class PausePlayback(msgspec.Struct, frozen=True, gc=False, tag="pause_playback"):
    """Stop playing at once; keep the buffer and the position (it may resume)."""


class ResumePlayback(msgspec.Struct, frozen=True, gc=False, tag="resume_playback"):
    """Play on from where the pause stopped."""


class FlushPlayback(msgspec.Struct, frozen=True, gc=False, tag="flush_playback"):
    """Drop everything buffered and leave the paused state; the played positions stand."""


class CancelResponse(msgspec.Struct, frozen=True, gc=False, tag="cancel_response"):
    """Send ``response.cancel`` for ``response_id`` (active upstream when emitted)."""

    response_id: str


class Truncate(msgspec.Struct, frozen=True, gc=False, tag="truncate"):
    """Send ``conversation.item.truncate``; ``audio_end_ms`` is what the user heard."""

    item_id: str
    content_index: int
    audio_end_ms: int


class CancelTools(msgspec.Struct, frozen=True, gc=False, tag="cancel_tools"):
    """Cancel running tool calls (only those marked interruptible, when asked)."""

    interruptible_only: bool


class DiscardAudio(msgspec.Struct, frozen=True, gc=False, tag="discard_audio"):
    """Do not play this delta: its response is cancelled or no longer active."""

    item_id: str


class TurnConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Timings of the turn machine, in milliseconds (``now`` is in seconds).

    ``min_speech_ms``: how long the user must speak over the agent for a real barge-in
    (LiveKit's min interruption duration). ``false_interruption_timeout_ms``: how long after
    a too-short utterance playback stays paused before it resumes. A negative or non-finite
    value raises ``ValueError``.
    """

    min_speech_ms: float = 500.0
    false_interruption_timeout_ms: float = 1500.0

    def __post_init__(self) -> None:
        _check_ms("TurnConfig", "min_speech_ms", self.min_speech_ms)
        _check_ms("TurnConfig", "false_interruption_timeout_ms", self.false_interruption_timeout_ms)


@dataclass(slots=True)
class _Item:
    """One agent audio item of the current agent turn, as far as playback knows it."""

    received_ms: float = 0.0
    played_ms: float = 0.0
    #: Its response is still active, so more of its audio may be on the way.
    streaming: bool = True

    def heard(self) -> bool:
        """Heard in full, and nothing more can come: no truncation will ever concern it."""
        return not self.streaming and self.played_ms >= self.received_ms


class TurnMachine(Machine[State]):
    """Barge-in and turn-taking for one session (see the module docstring).

    ``handle`` never raises for a well-formed event: every event is legal in every state.
    """

    NAME: ClassVar[str] = "turn"
    State: ClassVar[type[State]] = State
    INITIAL: ClassVar[State] = State.LISTENING
    EVENTS: ClassVar[tuple[type[msgspec.Struct], ...]] = (
        SpeechStarted,
        SpeechStopped,
        ResponseCreated,
        AudioReceived,
        Played,
        ResponseDone,
        PlaybackIdle,
        Timer,
    )
    ACTIONS: ClassVar[tuple[type[msgspec.Struct], ...]] = (
        PausePlayback,
        ResumePlayback,
        FlushPlayback,
        CancelResponse,
        Truncate,
        CancelTools,
        DiscardAudio,
    )
    TABLE: ClassVar[Mapping[State, Mapping[str, frozenset[State]]]] = TABLE
    Config: ClassVar[type[TurnConfig]] = TurnConfig

    def __init__(self, config: TurnConfig | None = None, *, rng: random.Random | None = None):
        """A machine in ``listening``. It draws no random numbers; ``rng`` is accepted for
        the uniform constructor ``Machine.from_spec`` uses, and ignored."""
        self.config = config if config is not None else TurnConfig()
        self.state = State.LISTENING
        #: Sources reporting the open utterance; empty when nobody is speaking.
        self._speaking: set[str] = set()
        self._onset = -math.inf
        #: When the last utterance ended: reports of speech that began before are late.
        self._speech_end = -math.inf
        self._deadline = math.inf
        #: The response active upstream (created, not yet done): at most one.
        self._response: str | None = None
        #: We sent ``response.cancel`` for it: its remaining audio is discarded.
        self._cancelled = False
        #: Items of the current agent turn not yet known to be heard, in arrival order.
        self._items: dict[str, _Item] = {}
        #: Playback holds audio it has not played.
        self._pending = False

    def next_deadline(self) -> float:
        """The end of the min-speech count (``interrupted``) or of the false-interruption
        window (``false_interruption``); ``math.inf`` in every other state."""
        return self._deadline

    def _handle(self, event: msgspec.Struct, now: float) -> list[msgspec.Struct]:
        match event:
            case SpeechStarted():
                return self._speech_started(event, now)
            case SpeechStopped():
                return self._speech_stopped(event, now)
            case ResponseCreated():
                return self._response_created(event)
            case AudioReceived():
                return self._audio_received(event)
            case Played():
                return self._played(event)
            case ResponseDone():
                return self._response_done(event)
            case PlaybackIdle():
                return self._playback_idle()
            case Timer():
                return self._timer(now)
        raise TypeError(f"turn: not an event of this machine: {event!r}")  # pragma: no cover

    # -- speech ------------------------------------------------------------------------

    def _speech_started(self, event: SpeechStarted, now: float) -> list[msgspec.Struct]:
        if self._speaking:  # the other detector confirming the open utterance
            self._speaking.add(event.source)
            return []
        onset = now - event.at_ms / 1000
        if onset <= self._speech_end:  # began before the last utterance ended: the same one
            return []
        self._speaking = {event.source}
        self._onset = onset
        if self.state is State.LISTENING:
            self.state = State.USER_SPEAKING
            return []
        # The agent holds the floor (user_speaking and interrupted always have an open
        # utterance, so they never get here). Playback is already paused in the window.
        actions: list[msgspec.Struct] = (
            [] if self.state is State.FALSE_INTERRUPTION else [PausePlayback()]
        )
        self.state = State.INTERRUPTED
        self._deadline = onset + self.config.min_speech_ms / 1000
        return actions

    def _speech_stopped(self, event: SpeechStopped, now: float) -> list[msgspec.Struct]:
        if event.source not in self._speaking:
            return []
        self._speaking.clear()
        self._speech_end = now
        if self.state is State.USER_SPEAKING:
            self.state = State.LISTENING
            return []
        # interrupted, the only other state with an open utterance.
        if now >= self._deadline:
            # It lasted min speech; the driver just had not delivered the timer yet.
            actions = self._barge_in()
            self.state = State.LISTENING
            return actions
        self.state = State.FALSE_INTERRUPTION
        self._deadline = now + self.config.false_interruption_timeout_ms / 1000
        return []

    # -- the upstream ------------------------------------------------------------------

    def _response_created(self, event: ResponseCreated) -> list[msgspec.Struct]:
        self._settle_items()  # a superseded response sends no more audio
        self._response = event.response_id
        self._cancelled = False
        if self.state in (State.LISTENING, State.USER_SPEAKING):
            # The upstream decided the user's turn is over; a detector that still reports
            # that utterance is ignored from now on.
            self._speaking.clear()
            self.state = State.AGENT_RESPONDING
        return []

    def _audio_received(self, event: AudioReceived) -> list[msgspec.Struct]:
        if self._response is None or self._cancelled:
            return [DiscardAudio(event.item_id)]
        item = self._items.setdefault(event.item_id, _Item())
        item.received_ms += event.ms
        item.streaming = True
        self._pending = True
        if self.state is State.AGENT_RESPONDING:
            self.state = State.AGENT_SPEAKING
        return []

    def _response_done(self, event: ResponseDone) -> list[msgspec.Struct]:
        if event.response_id != self._response:
            return []
        self._response = None
        self._cancelled = False
        self._settle_items()
        if self.state is State.AGENT_RESPONDING:  # nothing queued: the turn is over
            self._end_agent_turn()
            self.state = State.LISTENING
        return []

    # -- the playback clock ------------------------------------------------------------

    def _played(self, event: Played) -> list[msgspec.Struct]:
        item = self._items.get(event.item_id)
        if item is None:  # flushed, heard in full, or never ours
            return []
        item.played_ms = max(item.played_ms, min(event.played_ms, item.received_ms))
        if item.heard():
            del self._items[event.item_id]
        return []

    def _playback_idle(self) -> list[msgspec.Struct]:
        self._pending = False
        for item in self._items.values():
            item.played_ms = item.received_ms
        self._forget_heard()
        if self.state is State.AGENT_SPEAKING:
            self.state = self._agent_state()
        return []

    # -- deadlines ---------------------------------------------------------------------

    def _timer(self, now: float) -> list[msgspec.Struct]:
        if now < self._deadline:
            return []
        if self.state is State.INTERRUPTED:
            actions = self._barge_in()
            self.state = State.USER_SPEAKING
            return actions
        # false_interruption: the only other state with a deadline.
        self._deadline = math.inf
        self.state = self._agent_state()
        return [ResumePlayback()]

    # -- helpers -----------------------------------------------------------------------

    def _barge_in(self) -> list[msgspec.Struct]:
        """The user really took the floor: stop the agent and record what was heard."""
        actions: list[msgspec.Struct] = [FlushPlayback()]
        if self._response is not None and not self._cancelled:
            actions.append(CancelResponse(self._response))
            self._cancelled = True
        for item_id, item in self._items.items():
            # A streaming item may have more audio upstream than we received, so it is
            # truncated even when everything received was played.
            if item.played_ms < item.received_ms or item.streaming:
                end = math.floor(min(item.played_ms, item.received_ms))
                actions.append(Truncate(item_id, content_index=0, audio_end_ms=end))
        actions.append(CancelTools(interruptible_only=True))
        self._end_agent_turn()
        self._deadline = math.inf
        return actions

    def _agent_state(self) -> State:
        """Where the agent's side stands now: the target of a resume or of an idle playback."""
        if self._pending:
            return State.AGENT_SPEAKING
        if self._response is not None:
            return State.AGENT_RESPONDING
        self._end_agent_turn()
        return State.LISTENING

    def _settle_items(self) -> None:
        """No response is streaming into the items any more; forget those heard in full."""
        for item in self._items.values():
            item.streaming = False
        self._forget_heard()

    def _forget_heard(self) -> None:
        # Keeps the dict bounded by what playback still holds, however long the session.
        self._items = {k: v for k, v in self._items.items() if not v.heard()}

    def _end_agent_turn(self) -> None:
        self._items.clear()
        self._pending = False


MACHINE = TurnMachine
