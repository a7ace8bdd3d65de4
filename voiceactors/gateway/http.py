"""HTTP/1.1 plumbing for the gateway, on h11: read one request head, send one response.

The gateway answers one request per connection (``Connection: close``): its plain routes
are probes and a page load, so keep-alive would buy little and would make the slowloris
bound harder to state. A WebSocket upgrade is handed on, with the bytes already read, to
trio-websocket through :class:`ReplayStream`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

__all__ = [
    "ReplayStream",
    "Reply",
    "error_reply",
    "header_dict",
    "read_request_head",
    "send_reply",
    "static_file",
]

# Small reads keep h11's head-size check close to exact (it checks between reads).
_READ_BYTES = 4096
# After answering, read (and drop) what the client still sends for up to this long before
# closing: closing a socket with unread input sends RST, which can destroy the response
# in flight (a 431 to a client still sending its huge head would arrive as "reset").
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".webp": "image/webp",
    ".wasm": "application/wasm",
    ".wav": "audio/wav",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
# One path segment of a static file name: no dot files, no "..", no separators, no
# percent-escapes (we never decode, so "%2e%2e" is just a name that does not exist).
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


class ReplayStream(trio.abc.HalfCloseableStream):
    """``stream``, but :meth:`receive_some` first returns ``prefix`` (the bytes h11 read).

    Sends, EOF and close go straight to ``stream``. After :meth:`aclose`, receiving raises
    ``trio.ClosedResourceError`` even if part of the prefix was never read.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._closed:
            raise trio.ClosedResourceError
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        n = len(self._prefix) if max_bytes is None else max_bytes
        chunk, self._prefix = self._prefix[:n], self._prefix[n:]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = b""
        await self.transport_stream.aclose()


async def read_request_head(
    stream: trio.abc.ReceiveStream, conn: h11.Connection, max_head_bytes: int
) -> tuple[h11.Request | None, bytes]:
    """Read until h11 has a whole request head; return it and every byte read so far.

    Returns ``(None, raw)`` when the client closed before starting a request. Raises
    ``h11.RemoteProtocolError`` for a malformed head, for EOF inside one, or (status hint
    431) for one longer than ``max_head_bytes`` (give ``conn`` the same
    ``max_incomplete_event_size``: h11 stops buffering there; this makes the limit exact).
    Has no deadline of its own: the caller wraps it in one (slowloris). Cancellation
    loses nothing the caller still needs (it closes the connection).
    """
    raw = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ_BYTES)
            raw += data
            conn.receive_data(data)  # b"" tells h11 the client closed
            continue
        if isinstance(event, h11.Request):
            # h11 only limits an *incomplete* head; a complete one can overshoot by a read.
            head_len = len(raw) - len(conn.trailing_data[0])
            if head_len > max_head_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event, bytes(raw)
        return None, bytes(raw)  # ConnectionClosed: EOF before any request


def header_dict(request: h11.Request) -> dict[str, str]:
    """Request headers by lower-case name (latin-1); repeated fields joined with ``", "``."""
    out: dict[str, str] = {}
    for name, value in request.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(
    status: int,
    code: str,
    message: str,
    *,
    type: str = "invalid_request_error",
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    """A JSON error body in the OpenAI API's shape: ``{"error": {type, code, message}}``."""
    body = {"error": {"type": type, "code": code, "message": message, "param": None}}
    return Reply(status, json.dumps(body).encode(), "application/json", headers)


def render_reply(conn: h11.Connection, reply: Reply, *, head_only: bool = False) -> bytes:
    """The bytes of ``reply`` (no body for HEAD), always with ``Connection: close``."""
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("connection", "close"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        *reply.headers,
    ]
    data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    if reply.body and not head_only:
        data += conn.send(h11.Data(data=reply.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data


async def send_reply(
    stream: trio.abc.HalfCloseableStream,
    conn: h11.Connection,
    reply: Reply,
    *,
    head_only: bool = False,
) -> None:
    """Send ``reply``, half-close, and linger briefly reading what the client still sends.

    Has no overall deadline: the caller bounds it (a client that never reads would block
    ``send_all``). A client that has gone away raises ``trio.BrokenResourceError``.
    """
    await stream.send_all(render_reply(conn, reply, head_only=head_only))
    await stream.send_eof()
    with trio.move_on_after(_LINGER_SECONDS):
        received = 0
        while received < _LINGER_BYTES:
            data = await stream.receive_some(_READ_BYTES)
            if not data:
                break
            received += len(data)


def static_file(static_dir: Path, name: str) -> Path | None:
    """The file ``name`` (``"app.js"``, ``"img/logo.svg"``) inside ``static_dir``, or None.

    None for any segment that is empty, hidden, ``..`` or carries a separator or escape,
    for a path that resolves (through a symlink) outside ``static_dir``, and for anything
    that is not a regular file. Touches the file system (``resolve``, ``is_file``).
    """
    parts = name.split("/")
    if not all(_SEGMENT.match(p) for p in parts):
        return None
    root = static_dir.resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def content_type(path: Path) -> str:
    """The Content-Type for a static file by suffix; ``application/octet-stream`` if unknown."""
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
