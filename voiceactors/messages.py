"""The messages actors pass to each other inside a session.

These are Python objects, never JSON: encoding happens once, at the socket edges
(principle 7). All are frozen msgspec Structs in one tagged union (``Message``, tag field
``kind``) so an actor can ``match`` on what it receives and a test can round-trip any of
them. The high-volume ones (audio) are ``gc=False``: they hold no references to other
containers, so the cyclic garbage collector need not track them.

Audio carries PCM16 little-endian mono bytes plus what the consumer needs to reason about
time without a clock: the sample rate, a per-stream sequence number and the monotonic time
it was captured (``trio.current_time()`` of the session, so ``MockClock`` drives tests).
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "AgentAudio",
    "AudioFrame",
    "ClientClosed",
    "ErrorReport",
    "FlushPlayback",
    "Message",
    "ResponseDone",
    "ResponseStarted",
    "SessionEnded",
    "SpeechStarted",
    "SpeechStopped",
    "ToolCall",
    "ToolResult",
    "Transcript",
    "UpstreamStatus",
    "duration_ms",
]

_BASE = {"frozen": True, "tag_field": "kind", "kw_only": True}


class AudioFrame(msgspec.Struct, gc=False, tag="audio", **_BASE):  # type: ignore[call-arg]
    """A chunk of user audio on its way upstream.

    ``pcm`` is PCM16 LE mono at ``rate``; ``seq`` counts frames from 0 per session;
    ``captured_at`` is the monotonic time the capture actor received it. ``b64`` may carry
    the base64 text the client sent when nothing needs the samples (encode once).
    """

    pcm: bytes
    rate: int = 24000
    seq: int = 0
    captured_at: float = 0.0
    b64: str | None = None


class AgentAudio(msgspec.Struct, gc=False, tag="agent_audio", **_BASE):  # type: ignore[call-arg]
    """A chunk of agent audio for playback, with its position inside the assistant item."""

    pcm: bytes
    response_id: str
    item_id: str
    rate: int = 24000
    offset_ms: float = 0.0
    received_at: float = 0.0
    b64: str | None = None


class SpeechStarted(msgspec.Struct, tag="speech_started", **_BASE):  # type: ignore[call-arg]
    """User speech began at ``audio_ms`` on the session's input timeline."""

    source: Literal["local", "server"]
    audio_ms: float
    at: float


class SpeechStopped(msgspec.Struct, tag="speech_stopped", **_BASE):  # type: ignore[call-arg]
    """User speech ended at ``audio_ms`` on the session's input timeline."""

    source: Literal["local", "server"]
    audio_ms: float
    at: float


class ResponseStarted(msgspec.Struct, tag="response_started", **_BASE):  # type: ignore[call-arg]
    response_id: str
    at: float


class ResponseDone(msgspec.Struct, tag="response_done", **_BASE):  # type: ignore[call-arg]
    """A response ended; ``status`` is the Realtime status (completed, cancelled, ...)."""

    response_id: str
    status: str
    reason: str | None = None
    at: float = 0.0


class Transcript(msgspec.Struct, tag="transcript", **_BASE):  # type: ignore[call-arg]
    """Transcript text of the user (input) or of the agent (output)."""

    role: Literal["user", "assistant"]
    item_id: str
    text: str
    final: bool = False


class ToolCall(msgspec.Struct, tag="tool_call", **_BASE):  # type: ignore[call-arg]
    """The model asked for a function call; ``arguments`` is the raw JSON string."""

    call_id: str
    name: str
    arguments: str
    item_id: str = ""
    response_id: str = ""


class ToolResult(msgspec.Struct, tag="tool_result", **_BASE):  # type: ignore[call-arg]
    """The one answer to ``call_id``: ``output`` is what goes back to the model."""

    call_id: str
    output: str
    error: str | None = None


class FlushPlayback(msgspec.Struct, tag="flush_playback", **_BASE):  # type: ignore[call-arg]
    """Drop queued agent audio at once (barge-in); the client is told to drop its buffer."""

    reason: str = "barge_in"


class UpstreamStatus(msgspec.Struct, tag="upstream_status", **_BASE):  # type: ignore[call-arg]
    """The upstream connection changed state (for the client and the watchdog)."""

    state: str
    attempt: int = 0
    retry_in: float | None = None
    reason: str | None = None


class ErrorReport(msgspec.Struct, tag="error", **_BASE):  # type: ignore[call-arg]
    """A recoverable error to surface to the client as a protocol ``error`` event."""

    code: str
    message: str
    param: str | None = None
    event_id: str | None = None


class ClientClosed(msgspec.Struct, tag="client_closed", **_BASE):  # type: ignore[call-arg]
    """The client went away (close code as seen on the socket)."""

    code: int = 1000
    reason: str = ""


class SessionEnded(msgspec.Struct, tag="session_ended", **_BASE):  # type: ignore[call-arg]
    """Sent by an actor that decides the session is over, with the reason."""

    reason: str
    code: int = 1000


Message = (
    AudioFrame
    | AgentAudio
    | SpeechStarted
    | SpeechStopped
    | ResponseStarted
    | ResponseDone
    | Transcript
    | ToolCall
    | ToolResult
    | FlushPlayback
    | UpstreamStatus
    | ErrorReport
    | ClientClosed
    | SessionEnded
)


def duration_ms(pcm: bytes, rate: int) -> float:
    """Milliseconds of PCM16 mono audio in ``pcm`` at ``rate`` Hz."""
    return len(pcm) * 500.0 / rate
