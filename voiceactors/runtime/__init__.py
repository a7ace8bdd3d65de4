"""Client sessions: the actors between a client's socket and the upstream.

``open_runtime_from_config`` (or ``open_runtime`` from CLI arguments) yields a
:class:`Runtime`; the gateway hands each accepted WebSocket to ``Runtime.handle_client``
and ``run`` hands an in-memory port to ``Runtime.run_client``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..sim.config import SimConfig
from .client import ClientDecoder, ClientLink, ClientPort, PlaybackReport
from .config import SERVER_OWNED_FIELDS, PlaybackConfig, RuntimeConfig
from .service import Runtime, RuntimeError_, SessionReport, open_runtime_from_config

__all__ = [
    "SERVER_OWNED_FIELDS",
    "ClientDecoder",
    "ClientLink",
    "ClientPort",
    "PlaybackConfig",
    "PlaybackReport",
    "Runtime",
    "RuntimeConfig",
    "RuntimeError_",
    "SessionReport",
    "config_from_args",
    "open_runtime",
    "open_runtime_from_config",
]


def config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The :class:`RuntimeConfig` that ``serve``'s arguments describe (``ValueError`` if bad)."""
    fields: dict[str, object] = {}
    for name in ("upstream", "model", "instructions", "voice", "vad_profile"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "allow_client_session", False):
        fields["allow_client_session"] = True
    lead = getattr(args, "lead_ms", None)
    if lead is not None:
        fields["playback"] = PlaybackConfig(min_lead_ms=lead[0], max_lead_ms=lead[1])
    # A served simulator keeps no records: nobody reads them, and they grow per session.
    return RuntimeConfig(sim=SimConfig().unrecorded(), **fields)


@asynccontextmanager
async def open_runtime(args: argparse.Namespace) -> AsyncIterator[Runtime]:
    """``open_runtime_from_config(config_from_args(args))``: what ``serve`` runs."""
    async with open_runtime_from_config(config_from_args(args)) as runtime:
        yield runtime
