"""Run the whole server (gateway, runtime, embedded simulator) inside a test.

```python
async with open_gateway() as gw:
    async with connect_client(gw.url) as client:   # voiceactors.testing.sim.connect_client
        ...
```
Everything listens on 127.0.0.1 on free ports and stops when the block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import h11
import trio

from ..gateway import Gateway, GatewayConfig
from ..runtime import Runtime, RuntimeConfig, open_runtime_from_config
from ..sim.server import LoopbackURLs

__all__ = ["RunningGateway", "http_get", "open_gateway"]


@dataclass(frozen=True, slots=True)
class RunningGateway(LoopbackURLs):
    """A gateway serving on 127.0.0.1:``port`` (``url``, ``base_url``, ``http_url``)."""

    gateway: Gateway
    runtime: Runtime
    port: int


@asynccontextmanager
async def open_gateway(
    config: RuntimeConfig | None = None, gateway: GatewayConfig | None = None, **kw: Any
) -> AsyncIterator[RunningGateway]:
    """Serve a gateway over a runtime (``config``, default: the embedded simulator).

    ``gateway`` defaults to 127.0.0.1 on a free port; ``kw`` go to
    ``open_runtime_from_config`` (``tools``, ``metrics``).
    """
    gw_config = gateway or GatewayConfig(host="127.0.0.1", port=0)
    async with open_runtime_from_config(config or RuntimeConfig(), **kw) as runtime:
        gw = Gateway(
            gw_config, runtime.handle_client, readiness=runtime.readiness, metrics=runtime.metrics
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve)
            try:
                yield RunningGateway(gw, runtime, port)
            finally:
                nursery.cancel_scope.cancel()


async def http_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One GET through h11 on a fresh connection to ``host:port``: status and body."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("host", host)])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
