"""The client edge of a session: decoding what a client sends, encoding what it receives.

A client speaks the Realtime GA protocol (the subset in :mod:`voiceactors.realtime`) plus
one extension event, ``voiceactors.playback``: how much of an agent item the client has
actually played. Nothing else is added to the wire: every event the runtime sends is a GA
server event, so the official SDK validates all of them.

``ClientLink`` owns the socket's sending side for the session: one encoder, one write
deadline (a client that stops reading ends the session instead of blocking an actor), and
the one place that turns a refused input into a GA ``error`` event.
"""

from __future__ import annotations

import itertools
import math
import secrets
from typing import Any, Literal, Protocol

import msgspec
import trio
from trio_websocket import CloseReason, ConnectionClosed

from ..realtime import codec
from ..realtime import events as ev
from ..session import EndSession

__all__ = [
    "ClientDecoder",
    "ClientLink",
    "ClientPort",
    "PlaybackReport",
]


class ClientPort(Protocol):
    """What a session needs of its client's socket: trio-websocket's surface.

    ``get_message`` raises ``trio_websocket.ConnectionClosed`` once the socket is closed.
    The gateway passes a ``WebSocketConnection``; ``run`` passes an in-memory pair.
    """

    @property
    def closed(self) -> CloseReason | None: ...

    async def get_message(self) -> str | bytes: ...

    async def send_message(self, message: str | bytes) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


class PlaybackReport(
    msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, tag_field="type",
    tag="voiceactors.playback",
):  # fmt: skip
    """Extension event: the client has played ``played_ms`` of agent item ``item_id``.

    Clients that send it get truncation at exactly what their user heard; clients that do
    not (the official SDK) get it at the position the server's playout clock estimates.
    """

    item_id: str
    played_ms: float
    event_id: str | None = None

    def __post_init__(self) -> None:
        # msgspec reports these at the event's root; the message names the field.
        if not (math.isfinite(self.played_ms) and 0 <= self.played_ms <= 86_400_000):
            raise ValueError("`played_ms` must be a finite number of ms >= 0")
        if not 0 < len(self.item_id) <= 128:
            raise ValueError("`item_id` must be 1 to 128 characters")


_REPORT_TYPE = PlaybackReport.__struct_config__.tag
_REPORT_FIELDS = PlaybackReport.__struct_fields__


class ClientDecoder:
    """Decode a client frame into a GA client event or a :class:`PlaybackReport`.

    Raises :class:`~voiceactors.realtime.codec.ProtocolError` with the code, message and
    ``param`` the real API would give (see ``ClientEventDecoder``); a malformed playback
    report is ``invalid_value`` naming its field.
    """

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events = codec.ClientEventDecoder(strict=True)

    def decode(self, frame: str | bytes) -> ev.ClientEvent | PlaybackReport:
        try:
            return self._events.decode(frame)
        except codec.ProtocolError as refused:
            if refused.param != "type":
                raise
            # An unknown type: ours? (Rare, ~10 a second from a page: the generic path.)
            try:
                obj = msgspec.json.decode(frame)
            except msgspec.DecodeError:
                raise refused from None
            if not isinstance(obj, dict) or obj.get("type") != _REPORT_TYPE:
                raise
        event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
        try:
            return msgspec.convert(obj, PlaybackReport)
        except msgspec.ValidationError as bad:
            error = codec._from_validation(bad, event_id)
            if not error.param:  # a range check: it names its field in backticks
                error.param = next((f for f in _REPORT_FIELDS if f"`{f}`" in str(bad)), None)
            raise error from None


class ClientLink:
    """The sending side of one client's socket.

    ``send`` encodes a server event (a Struct, or an ``UnknownServerEvent`` passed through
    as its raw JSON) and writes it under ``send_timeout``. A closed socket raises
    ``EndSession("client_closed")``; a client that does not take the frame in time raises
    ``EndSession("client_not_reading", 1011)``. Writes from several actors interleave
    whole frames (trio-websocket serialises writers).
    """

    __slots__ = ("_enc", "_ids", "_port", "_prefix", "_timeout", "errors_sent", "sent")

    def __init__(self, port: ClientPort, *, send_timeout: float) -> None:
        self._port = port
        self._timeout = send_timeout
        self._enc = msgspec.json.Encoder()
        self._prefix = "event_va" + secrets.token_hex(4)
        self._ids = itertools.count(1)
        self.sent = 0
        self.errors_sent = 0

    def event_id(self) -> str:
        """A fresh server event id for events the runtime makes itself."""
        return f"{self._prefix}{next(self._ids):06d}"

    async def send(self, event: Any) -> None:
        if isinstance(event, codec.UnknownServerEvent):
            data = self._enc.encode(event.raw)
        else:
            data = self._enc.encode(event)
        await self.send_text(data.decode("utf-8"))

    async def send_text(self, text: str) -> None:
        with trio.move_on_after(self._timeout) as scope:
            try:
                await self._port.send_message(text)
            except ConnectionClosed:
                raise EndSession("client_closed", 1000) from None
        if scope.cancelled_caught:
            raise EndSession(
                "client_not_reading", 1011, f"a frame waited {self._timeout:g} s to be sent"
            )
        self.sent += 1

    async def error(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        type: Literal["invalid_request_error", "server_error"] = "invalid_request_error",
    ) -> None:
        """Send a GA ``error`` event (the session goes on)."""
        self.errors_sent += 1
        detail = ev.ErrorDetail(
            type=type, code=code, message=message, param=param, event_id=event_id
        )
        await self.send(ev.ErrorEvent(event_id=self.event_id(), error=detail))

    async def refuse(self, exc: codec.ProtocolError) -> None:
        """Answer a refused client event with the error it earned."""
        await self.error(exc.code, exc.message, param=exc.param, event_id=exc.event_id)

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with ``code`` (bounded by the send timeout; idempotent)."""
        if self._port.closed is not None:
            return
        with trio.move_on_after(self._timeout):
            await self._port.aclose(code, reason[:120])
