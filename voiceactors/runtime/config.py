"""What an operator can tune about client sessions. Invalid values raise ``ValueError``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..audio.vad import PROFILES
from ..machines.turn import TurnConfig
from ..sim.config import SimConfig
from ..upstream.actor import UpstreamConfig
from ..upstream.pool import PoolConfig

__all__ = ["SERVER_OWNED_FIELDS", "PlaybackConfig", "RuntimeConfig"]

#: Session fields only the operator sets, unless ``allow_client_session`` (the prompt, the
#: tools the server runs, the model it pays for).
SERVER_OWNED_FIELDS: tuple[str, ...] = (
    "model",
    "instructions",
    "tools",
    "tool_choice",
    "prompt",
    "tracing",
)


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class PlaybackConfig:
    """Pacing of agent audio toward the client, in milliseconds.

    The lead (audio sent but not yet played) aims at ``min_lead_ms`` plus
    ``jitter_factor`` times the client's measured arrival jitter, never more than
    ``max_lead_ms``: enough to ride out the network, small enough that a barge-in stops
    the agent within that much audio even for a client that cannot be told to flush.
    ``max_buffer_ms`` bounds the audio held per session (the upstream bursts faster than
    real time); beyond it agent audio is dropped and counted. ``report_every_ms`` is how
    often the played position is recomputed while the agent speaks.
    """

    min_lead_ms: float = 80.0
    max_lead_ms: float = 300.0
    jitter_factor: float = 3.0
    max_buffer_ms: float = 120_000.0
    report_every_ms: float = 50.0

    def __post_init__(self) -> None:
        _positive(
            "PlaybackConfig",
            min_lead_ms=self.min_lead_ms,
            max_lead_ms=self.max_lead_ms,
            jitter_factor=self.jitter_factor,
            max_buffer_ms=self.max_buffer_ms,
            report_every_ms=self.report_every_ms,
        )
        if self.max_lead_ms < self.min_lead_ms:
            raise ValueError("PlaybackConfig.max_lead_ms must be >= min_lead_ms")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime reaches its upstream and runs each client's session.

    ``upstream``: ``"sim"`` (the embedded simulator, configured by ``sim``), ``"openai"``
    (needs ``OPENAI_API_KEY``) or a ``ws://``/``wss://`` URL of any Realtime GA server.
    ``instructions``/``voice``: the operator's session defaults. ``allow_client_session``
    lets clients set :data:`SERVER_OWNED_FIELDS` (off: they get an ``error`` event).
    Times are seconds unless named ``_ms``.
    """

    upstream: str = "sim"
    model: str = "gpt-realtime"
    instructions: str | None = None
    voice: str | None = None
    allow_client_session: bool = False
    demo_tools: bool | None = None  # None: on for the simulator, off otherwise
    vad_profile: str = "normal"
    turn: TurnConfig = field(default_factory=TurnConfig)
    playback: PlaybackConfig = field(default_factory=PlaybackConfig)
    upstream_config: UpstreamConfig = field(default_factory=UpstreamConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    max_session_s: float = 2 * 3600.0
    idle_timeout_s: float = 600.0  # no client message for this long ends the session
    client_send_timeout_s: float = 5.0  # a client that stops reading is cut off after this
    watchdog_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.upstream not in ("sim", "openai"):
            url = urlsplit(self.upstream)
            if url.scheme not in ("ws", "wss") or not url.hostname:
                raise ValueError(
                    f"upstream must be 'sim', 'openai' or a ws(s):// URL, got {self.upstream!r}"
                )
        if self.vad_profile not in PROFILES:
            raise ValueError(
                f"vad_profile must be one of {list(PROFILES)}, got {self.vad_profile!r}"
            )
        if not self.model:
            raise ValueError("model must not be empty")
        _positive(
            "RuntimeConfig",
            max_session_s=self.max_session_s,
            idle_timeout_s=self.idle_timeout_s,
            client_send_timeout_s=self.client_send_timeout_s,
            watchdog_interval_s=self.watchdog_interval_s,
        )

    @property
    def uses_demo_tools(self) -> bool:
        return self.upstream == "sim" if self.demo_tools is None else self.demo_tools
