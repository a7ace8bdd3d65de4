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

import trio

from ..gateway import Gateway, GatewayConfig
from ..runtime import Runtime, RuntimeConfig, open_runtime_from_config
from ..sim.server import LoopbackURLs

__all__ = ["RunningGateway", "open_gateway"]


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
