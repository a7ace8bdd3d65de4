"""State one session's actors share: counters for the report, and a few facts in flight.

Only plain attributes: each is written by exactly one actor (named in its comment) and
read by others, which is safe in Trio's single thread without locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ..audio.codecs import Format

__all__ = ["PCM24K", "SessionContext", "SetOutputFormat", "Truncation", "TurnTiming"]

#: The format of every byte the runtime exchanges with the upstream.
PCM24K = Format("pcm16", 24000)


class SetOutputFormat(msgspec.Struct, frozen=True, tag="set_output_format"):
    """capture -> playback: the client changed ``session.audio.output.format``."""

    format: Format


class Truncation(msgspec.Struct, frozen=True):
    """One ``conversation.item.truncate`` the runtime sent on a barge-in."""

    item_id: str
    audio_end_ms: int
    received_ms: float
    at: float


class TurnTiming(msgspec.Struct, frozen=True):
    """How fast the agent answered one user turn (seconds on the session clock)."""

    response_id: str
    user_stopped_at: float | None
    first_audio_at: float

    @property
    def first_audio_ms(self) -> float | None:
        if self.user_stopped_at is None:
            return None
        return (self.first_audio_at - self.user_stopped_at) * 1000.0


@dataclass(slots=True)
class SessionContext:
    """Counters and shared facts of one client session."""

    opened_at: float
    # capture
    last_client_at: float = 0.0
    input_ms: float = 0.0  # session input timeline (ms of user audio received)
    frames_in: int = 0
    client_errors: int = 0
    jitter_ms: float = 0.0  # RFC 3550 interarrival jitter of the client's audio
    input_format: Format = PCM24K
    output_format: Format = PCM24K
    user_stopped_at: float | None = None  # the latest end of user speech (any detector)
    local_onset_at: float | None = None  # the latest local VAD onset
    # playback
    ready_at: float | None = None  # the first session event reached the client
    audio_ms_out: float = 0.0
    audio_ms_dropped: float = 0.0
    underruns: int = 0
    barge_ins: list[float] = field(default_factory=list)  # onset -> flush, ms (bounded)
    false_interruptions: int = 0
    truncations: list[Truncation] = field(default_factory=list)  # bounded
    turns: list[TurnTiming] = field(default_factory=list)  # bounded
    tool_calls: int = 0
    upstream_errors_hidden: int = 0

    MAX_RECORDS = 256

    def record(self, records: list, value: object) -> None:
        """Append to one of the bounded lists (the oldest goes first when full)."""
        if len(records) >= self.MAX_RECORDS:
            del records[0]
        records.append(value)
