"""One WebSocket to a Realtime endpoint (the API or the simulator), up to ``session.created``.

``connect`` does the handshake and waits for ``session.created``; everything that can go
wrong before that is a ``ConnectError`` with what the reconnect machine needs to decide
(``code`` for an upstream error code, ``status`` for a refused handshake, ``fatal``). After
it, ``UpstreamConnection`` sends client events (one encoder) and receives server events
(one decoder; unknown event types come back as ``UnknownServerEvent`` and are counted).
The same code path serves ``wss://api.openai.com`` and ``ws://127.0.0.1:PORT``: only the
URL and the key differ.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

import trio
import trio_websocket

from ..machines.reconnect import is_fatal
from ..realtime import (
    ClientEventEncoder,
    ErrorEvent,
    ProtocolError,
    ServerEventDecoder,
    SessionCreated,
    UnknownServerEvent,
)
from ..realtime.events import ServerEvent

__all__ = ["OPENAI_URL", "ConnectError", "Endpoint", "UpstreamConnection", "open_upstream"]

OPENAI_URL = "wss://api.openai.com/v1/realtime"

#: Upstream events can be large (a long audio delta); client audio appends can be 15 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect. ``api_key`` never leaves the process toward a client."""

    url: str
    model: str = "gpt-realtime"
    api_key: str | None = field(default=None, repr=False)
    extra_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def openai(cls, model: str = "gpt-realtime", api_key: str | None = None) -> Endpoint:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("OPENAI_API_KEY is not set")
        return cls(OPENAI_URL, model=model, api_key=key)

    @property
    def key(self) -> str:
        """The identity for breakers and pools: URL and model (never the key)."""
        return f"{self.url}?model={self.model}"

    def full_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"upstream URL must be ws:// or wss://, got {self.url!r}")
        query = "&".join(q for q in (parts.query, urlencode({"model": self.model})) if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    def headers(self) -> list[tuple[str, str]]:
        out = list(self.extra_headers)
        if self.api_key:
            out.append(("Authorization", f"Bearer {self.api_key}"))
        return out


class ConnectError(Exception):
    """The connection ended before ``session.created``.

    ``status`` is the refused handshake's HTTP status (0 if none), ``code`` the upstream
    error code if one was sent, ``fatal`` whether retrying is pointless.
    """

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.fatal = is_fatal(code, status)


class UpstreamConnection:
    """An accepted upstream connection (``session.created`` received).

    ``receive`` raises ``trio_websocket.ConnectionClosed`` when the peer closes or the
    socket drops, ``ProtocolError`` for a frame that is not a valid event (the caller
    decides; one bad frame is not a reason to drop the session). ``aclose`` is idempotent
    and bounded in time.
    """

    __slots__ = (
        "created",
        "endpoint",
        "released",
        "opened_at",
        "unknown_events",
        "_decoder",
        "_encoder",
        "_ws",
    )

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        endpoint: Endpoint,
        created: SessionCreated,
        opened_at: float,
    ) -> None:
        self._ws = ws
        self.endpoint = endpoint
        self.created = created
        self.opened_at = opened_at
        self._encoder = ClientEventEncoder()
        self._decoder = ServerEventDecoder()
        self.unknown_events = 0
        #: Set when the owner lets go; the task holding the connection then closes it.
        self.released = trio.Event()

    @property
    def closed(self) -> bool:
        return self._ws.closed is not None

    async def send(self, event: object) -> None:
        await self._ws.send_message(self._encoder.encode_text(event))

    async def send_text(self, text: str) -> None:
        """Send an already-encoded event (encode once)."""
        await self._ws.send_message(text)

    async def receive(self) -> ServerEvent | UnknownServerEvent:
        frame = await self._ws.get_message()
        event = self._decoder.decode(frame)
        if isinstance(event, UnknownServerEvent):
            self.unknown_events += 1
        return event

    async def ping(self) -> None:
        await self._ws.ping()

    async def aclose(self, code: int = 1000, reason: str = "", *, hurry: bool = False) -> None:
        """Close (bounded, shielded) and release the connection to its holder.

        The close handshake may take 2 s. With ``hurry`` (the caller is being cancelled:
        its session is over, and the reader that would take the peer's reply is going
        away too) the close frame is sent and the socket dropped after a brief wait.
        """
        bound = 0.05 if hurry else 2.0
        try:
            with trio.move_on_after(bound) as scope:
                scope.shield = True
                await self._ws.aclose(code, reason)
        finally:
            self.released.set()


def _ssl_context(url: str) -> ssl.SSLContext | None:
    return ssl.create_default_context() if url.startswith("wss://") else None


@asynccontextmanager
async def open_upstream(  # noqa: ASYNC109
    endpoint: Endpoint, *, timeout: float = 10.0
) -> AsyncIterator[UpstreamConnection]:
    """Open a connection and wait for ``session.created``, within ``timeout`` seconds.

    The connection lives for the body of the ``async with`` (its reader task is in there
    too), and is closed when the body ends. Raises ``ConnectError`` (with
    ``status``/``code``/``fatal``) on refusal, timeout, a close or an ``error`` event before
    ``session.created``, or a first event that is not ``session.created``.
    """
    started = trio.current_time()
    url = endpoint.full_url()
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context=_ssl_context(url),
            extra_headers=endpoint.headers(),
            max_message_size=MAX_MESSAGE_BYTES,
            message_queue_size=64,
            connect_timeout=timeout,
            disconnect_timeout=2.0,
        ) as ws:
            with trio.move_on_at(started + timeout) as scope:
                first = ServerEventDecoder().decode(await ws.get_message())
            if scope.cancelled_caught:
                raise ConnectError(f"no session.created within {timeout:g} s", code="timeout")
            if isinstance(first, ErrorEvent):
                raise ConnectError(
                    f"upstream error before session.created: {first.error.message}",
                    code=first.error.code or "",
                )
            if not isinstance(first, SessionCreated):
                raise ConnectError(f"expected session.created, got {type(first).__name__}")
            conn = UpstreamConnection(ws, endpoint, first, started)
            try:
                yield conn
            finally:
                conn.released.set()
    except trio_websocket.ConnectionTimeout:
        raise ConnectError(f"no handshake within {timeout:g} s", code="timeout") from None
    except trio_websocket.ConnectionRejected as exc:
        raise ConnectError(
            f"handshake refused with HTTP {exc.status_code}", status=exc.status_code or 0
        ) from None
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        code = reason.code if reason is not None else 1006
        text = (reason.reason or "") if reason is not None else ""
        raise ConnectError(f"closed before session.created ({code} {text})".strip()) from None
    except trio_websocket.HandshakeError as exc:
        raise ConnectError(f"handshake failed: {exc!r}") from None
    except ProtocolError as exc:
        raise ConnectError(f"bad first event: {exc}", code="protocol_error") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect: {exc.strerror or exc!r}") from None
