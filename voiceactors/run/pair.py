"""An in-memory WebSocket pair: the client socket a ``run`` session is given instead of a
real connection.

:class:`MemoryPort` has the part of trio-websocket's ``WebSocketConnection`` surface the
runtime uses (``get_message``, ``send_message``, ``aclose``, ``closed``), so the runtime
serves it exactly as it serves a socket the gateway accepted. Each direction is a bounded
trio memory channel: a peer that stops reading blocks the sender.
"""

from __future__ import annotations

import trio
from trio_websocket import CloseReason, ConnectionClosed

__all__ = ["MemoryPort", "memory_client_pair"]


class _Link:
    __slots__ = ("closed_by", "reason")

    def __init__(self) -> None:
        self.reason: CloseReason | None = None
        self.closed_by: str | None = None


class MemoryPort:
    """One end of an in-memory WebSocket with trio-websocket's surface.

    Built in pairs by :func:`memory_client_pair`. Each direction is a trio memory channel
    of fixed capacity, so a peer that stops reading blocks the sender (backpressure), as a
    full TCP window would; nothing is queued without bound.
    """

    __slots__ = ("_link", "_recv", "_send", "name")

    def __init__(
        self,
        name: str,
        link: _Link,
        send: trio.MemorySendChannel[str | bytes],
        recv: trio.MemoryReceiveChannel[str | bytes],
    ) -> None:
        self.name = name
        self._link = link
        self._send = send
        self._recv = recv

    @property
    def closed(self) -> CloseReason | None:
        """Why the pair was closed (the first ``aclose``'s code and reason), else None."""
        return self._link.reason

    @property
    def closed_by(self) -> str | None:
        """``"server"`` or ``"client"``: the end that closed first, else None."""
        return self._link.closed_by

    async def get_message(self) -> str | bytes:
        """The next message from the peer.

        After the *peer* closed, messages it sent before closing are still delivered (they
        were on the wire before its close frame), then ``ConnectionClosed``. After *this*
        end closed, ``ConnectionClosed`` at once. Cancellation loses no message.
        """
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.reason) from None

    async def send_message(self, message: str | bytes) -> None:
        """Queue ``message`` for the peer, waiting while its buffer is full.

        Raises ``ConnectionClosed`` if either end has closed (also when the close happens
        while waiting), ``TypeError`` for anything but ``str``/``bytes``. A cancelled send
        queued nothing.
        """
        if not isinstance(message, str | bytes):
            raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
        if self._link.reason is not None:
            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(self._link.reason)
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.reason) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the pair with ``code``/``reason`` (idempotent; the first close wins).

        Both ends then see ``closed``; this end's pending and future ``get_message`` raise
        ``ConnectionClosed``; the peer first drains what this end sent. Senders blocked on
        either side are woken with ``ConnectionClosed``. A code outside 1000-4999 raises
        ``ValueError`` and closes nothing.
        """
        if not 1000 <= code <= 4999:
            raise ValueError(f"close code must be in 1000-4999, got {code}")
        if self._link.reason is None:
            self._link.reason = CloseReason(code, reason)
            self._link.closed_by = self.name
        self._send.close()
        self._recv.close()
        await trio.lowlevel.checkpoint()


def memory_client_pair(capacity: int = 16) -> tuple[MemoryPort, MemoryPort]:
    """``(server_port, client_port)``: two connected :class:`MemoryPort` ends.

    ``capacity`` (>= 1) is how many messages each direction buffers before ``send_message``
    waits. Closing either end closes both (see :meth:`MemoryPort.aclose`).
    """
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    link = _Link()
    to_client_send, to_client_recv = trio.open_memory_channel[str | bytes](capacity)
    to_server_send, to_server_recv = trio.open_memory_channel[str | bytes](capacity)
    server = MemoryPort("server", link, to_client_send, to_server_recv)
    client = MemoryPort("client", link, to_server_send, to_client_recv)
    return server, client
