"""Run the Realtime simulator inside a test's Trio run.

    async with open_simulator(script="turns.toml", faults=plan, seed=1) as rt:
        async with open_websocket_url(rt.url + "?model=gpt-realtime") as ws:
            ...
        assert rt.sim.connections[0].received_audio_bytes == sent

or take the ``realtime_sim`` fixture (a running simulator with default config).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from ..sim import (
    FaultPlan,
    RunningSimulator,
    Script,
    SimConfig,
    Simulator,
    load_fault_plan,
    load_script,
)

__all__ = [
    "RealtimeTestClient",
    "RunningSimulator",
    "connect_client",
    "open_simulator",
    "realtime_sim",
]


@asynccontextmanager
async def open_simulator(
    script: Script | str | Path | None = None,
    faults: FaultPlan | str | Path | None = None,
    seed: int = 0,
    **config: Any,
) -> AsyncIterator[RunningSimulator]:
    """Serve a simulator on 127.0.0.1 (free port) for the body of the ``async with``.

    ``script``/``faults`` may be objects or file paths (bad files raise ScriptError before
    anything starts); other keywords are SimConfig fields. Leaving the block (normally,
    by exception or cancellation) cancels the server and all its connections: no task
    is left behind.
    """
    if isinstance(script, str | Path):
        script = load_script(script)
    if isinstance(faults, str | Path):
        faults = load_fault_plan(faults)
    cfg = SimConfig(script=script, faults=faults or FaultPlan(), seed=seed, **config)
    sim = Simulator(cfg)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        try:
            yield RunningSimulator(sim, port)
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def realtime_sim() -> AsyncIterator[RunningSimulator]:
    """A running simulator with the default config (echo brain, server VAD)."""
    async with open_simulator() as running:
        yield running


class RealtimeTestClient:
    """A thin JSON client over a trio-websocket connection, for tests.

    ``recv`` returns each server event as a dict; ``recv_until(type)`` collects events up
    to and including the first of ``type``. Both raise ``trio_websocket.ConnectionClosed``
    when the server closes; bound them with ``trio.fail_after`` in tests.
    """

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(event))

    async def recv(self) -> dict[str, Any]:
        event = json.loads(await self.ws.get_message())
        self.seen.append(event)
        return event

    async def recv_until(self, type_: str) -> list[dict[str, Any]]:
        out = []
        while True:
            event = await self.recv()
            out.append(event)
            if event.get("type") == type_:
                return out

    async def append_audio(self, data: bytes, chunk_bytes: int = 4800) -> None:
        """Send ``data`` as ``input_audio_buffer.append`` events (default 100 ms of PCM16)."""
        for i in range(0, len(data), chunk_bytes):
            chunk = base64.b64encode(data[i : i + chunk_bytes]).decode("ascii")
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})


@asynccontextmanager
async def connect_client(
    url: str, model: str = "gpt-realtime", headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[RealtimeTestClient]:
    """Open ``url?model=...`` with trio-websocket and wrap it in a RealtimeTestClient."""
    sep = "&" if "?" in url else "?"
    async with open_websocket_url(f"{url}{sep}model={model}", extra_headers=headers) as ws:
        yield RealtimeTestClient(ws)
