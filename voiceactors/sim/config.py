"""The simulator's configuration (immutable; one per Simulator)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..realtime.events import TurnDetection
from .faults import FaultPlan
from .script import Script

__all__ = ["DEFAULT_TURN_DETECTION", "SimConfig", "is_known_model"]

DEFAULT_TURN_DETECTION = TurnDetection(
    type="server_vad",
    threshold=0.5,
    prefix_padding_ms=300,
    silence_duration_ms=500,
    idle_timeout_ms=None,
    create_response=True,
    interrupt_response=True,
)

_MODEL_PREFIXES = (
    "gpt-realtime",
    "gpt-4o-realtime-preview",
    "gpt-4o-mini-realtime-preview",
    "gpt-audio",
)


def is_known_model(name: str) -> bool:
    """Realtime model names (``gpt-realtime``, ``gpt-realtime-mini``, dated snapshots...)."""
    return any(name == p or name.startswith(p + "-") for p in _MODEL_PREFIXES)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Behaviour of a :class:`~voiceactors.sim.Simulator`.

    Times are in milliseconds of the Trio clock unless named ``_s``. ``speed`` is how much
    faster than real time audio deltas are sent (the real API bursts; ``inf`` = no pacing).
    ``api_key`` None accepts any key; otherwise a wrong or missing key is answered like the
    real API (``auth_failure="error"``: handshake accepted, ``error`` with code
    ``invalid_api_key``, close 3000 ``invalid_request_error.invalid_api_key``) or refused at
    the handshake with HTTP 401 (``auth_failure="reject"``).

    ``mirror`` makes the session a latency reflector for benchmarks (``tools/bench_relay.py``),
    not a model of the Realtime API: turn detection starts off, the first
    ``input_audio_buffer.append`` opens one standing response, and every append is answered
    at once by a ``response.output_audio.delta`` carrying the append's base64 text unchanged
    (not decoded, validated, recorded or paced). Other client events behave as usual.
    """

    script: Script | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)
    seed: int = 0
    first_byte_ms: float = 300.0
    speed: float = 4.0
    chunk_ms: int = 100
    max_session_s: float = 3600.0
    api_key: str | None = None
    auth_failure: str = "error"
    turn_detection: TurnDetection | None = DEFAULT_TURN_DETECTION
    voice: str = "marin"
    max_items: int = 256
    max_buffer_ms: int = 15 * 60 * 1000
    max_message_bytes: int = 16 * 1024 * 1024
    max_recorded_events: int = 100_000
    max_recorded_audio_bytes: int = 256 * 1024 * 1024
    max_connections_recorded: int = 10_000

    def unrecorded(self) -> SimConfig:
        """This config with recording off: for a served simulator nobody inspects (the CLI,
        ``serve``'s embedded one), whose records would otherwise grow with every session."""
        return dataclasses.replace(
            self, max_recorded_events=0, max_recorded_audio_bytes=0, max_connections_recorded=0
        )
    max_held_events: int = 4096
    close_timeout_s: float = 2.0
    epoch: float | None = None
    mirror: bool = False

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be > 0 (inf for no pacing)")
        if self.first_byte_ms < 0:
            raise ValueError("first_byte_ms must be >= 0")
        if not 10 <= self.chunk_ms <= 1000:
            raise ValueError("chunk_ms must be in [10, 1000]")
        if self.max_session_s <= 0:
            raise ValueError("max_session_s must be > 0")
        if self.auth_failure not in ("error", "reject"):
            raise ValueError("auth_failure must be 'error' or 'reject'")
        if self.max_items < 1 or self.max_buffer_ms < 100:
            raise ValueError("max_items must be >= 1 and max_buffer_ms >= 100")
