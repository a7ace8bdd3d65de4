"""The gateway: one port serving client sessions (``/v1/realtime``), the browser page,
``/healthz``, ``/readyz`` and ``/metrics``. See :mod:`.server` for how a connection flows."""

from .security import InsecureBindError as InsecureBindError
from .security import RateLimiter as RateLimiter
from .server import ClientHandler as ClientHandler
from .server import ClientInfo as ClientInfo
from .server import Gateway as Gateway
from .server import GatewayConfig as GatewayConfig
from .server import serve_until_signal as serve_until_signal

__all__ = [
    "ClientHandler",
    "ClientInfo",
    "Gateway",
    "GatewayConfig",
    "InsecureBindError",
    "RateLimiter",
    "serve_until_signal",
]
