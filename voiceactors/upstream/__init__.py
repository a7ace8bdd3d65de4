"""The upstream side: connections to a Realtime endpoint, the warm pool, the actor."""

from .actor import UpstreamActor as UpstreamActor
from .actor import UpstreamConfig as UpstreamConfig
from .connection import ConnectError as ConnectError
from .connection import Endpoint as Endpoint
from .connection import UpstreamConnection as UpstreamConnection
from .connection import open_upstream as open_upstream
from .pool import BreakerRegistry as BreakerRegistry
from .pool import PoolConfig as PoolConfig
from .pool import WarmPool as WarmPool

__all__ = [
    "BreakerRegistry",
    "ConnectError",
    "Endpoint",
    "PoolConfig",
    "UpstreamActor",
    "UpstreamConfig",
    "UpstreamConnection",
    "WarmPool",
    "open_upstream",
]
