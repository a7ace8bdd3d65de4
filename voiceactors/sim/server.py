"""The simulator's WebSocket server: handshake, one reader and one writer per connection.

Per connection, three tasks share a nursery:

* the reader decodes each client frame (``ClientEventDecoder``), records it, fires
  receive-triggered faults and hands the event to the :class:`RealtimeSession`;
* the writer is the only task that writes to the socket: it takes server events (and
  fault actions, so they happen in order with the events) from a bounded channel, stamps
  ``event_id``, applies the active fault modifiers (slow, stall, duplicate, reorder, beta
  names) and fires send-triggered faults;
* a response task while a response streams (started by the session).

Timers (``after_ms`` faults, session expiry) are cancel scopes in a fourth task. The
outgoing channel holds 64 items and blocks when full: a client that stops reading slows
the session down rather than growing memory (events held during a ``stall`` are bounded
by ``max_held_events``, oldest dropped and counted).
"""

from __future__ import annotations

import json
import math
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ..realtime import codec
from ..realtime import events as ev
from .config import SimConfig, is_known_model
from .faults import ConnectionFaults, Fault
from .session import ConnectionRecord, RealtimeSession

__all__ = ["Simulator", "serve_simulator"]

_BETA = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}

_REJECT_BODY = {
    400: ("invalid_request_error", "invalid_request", "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "forbidden", "You are not allowed to use this model."),
    404: ("invalid_request_error", "not_found", "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
    500: ("server_error", "server_error", "The server had an error processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
}


class _Stop(Exception):
    """The connection ends now (the writer closed or dropped it)."""


@dataclass(frozen=True, slots=True)
class _Raw:
    text: str
    label: str


class Simulator:
    """A Realtime GA server with deterministic behaviour and injectable faults.

    ``Simulator(config)`` or ``Simulator(**fields of SimConfig)``. Serve with
    ``await nursery.start(sim.serve, host, port)`` (returns the bound port). ``connections``
    holds a :class:`ConnectionRecord` per handshake, in order (capped at
    ``max_connections_recorded``; ``connections_seen`` counts all).
    """

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = SimConfig(**overrides)
        elif overrides:
            raise TypeError("give a SimConfig or keyword overrides, not both")
        self.config = config
        self.connections: list[ConnectionRecord] = []
        self.connections_seen = 0
        self.active_connections = 0
        self.port: int | None = None

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = a free port) until cancelled; reports the port.

        Cancellation closes the listener and every connection (no close handshake
        beyond ``close_timeout_s``) and leaves no task behind.
        """
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    host,
                    port,
                    None,
                    handler_nursery=nursery,
                    max_message_size=self.config.max_message_bytes,
                    message_queue_size=8,
                    connect_timeout=10,
                    disconnect_timeout=self.config.close_timeout_s,
                    task_status=task_status,
                )
            )
            self.port = server.port
            task_status.started(server.port)

    # ------------------------------------------------------------------ handshake

    async def _handle(self, request: WebSocketRequest) -> None:
        index = self.connections_seen
        self.connections_seen += 1
        rec = ConnectionRecord(index=index, path=request.path)
        rec.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        if len(self.connections) < self.config.max_connections_recorded:
            self.connections.append(rec)
        faults = ConnectionFaults(self.config.faults, index, self.config.seed)
        url = urlsplit(request.path)
        if url.path.rstrip("/") != "/v1/realtime":
            await self._reject(request, rec, 404)
            return
        if (f := faults.rejection()) is not None:
            rec.faults_fired.append(f.describe())
            await self._reject(request, rec, f.status)
            return
        key = _api_key(rec.headers)
        subprotocol = "realtime" if "realtime" in request.proposed_subprotocols else None
        auth_ok = self.config.api_key is None or key == self.config.api_key
        if not auth_ok and self.config.auth_failure == "reject":
            await self._reject(request, rec, 401)
            return
        ws = await request.accept(subprotocol=subprotocol)
        model = (parse_qs(url.query).get("model") or [None])[0]
        rec.model = model
        self.active_connections += 1
        try:
            conn = _Connection(self, ws, rec, faults)
            if not auth_ok:
                await conn.fatal(
                    "invalid_api_key",
                    f"Incorrect API key provided: {_redact(key)}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    3000,
                )
            elif rec.headers.get("openai-beta", "").replace(" ", "") == "realtime=v1":
                await conn.fatal(
                    "beta_api_shape_disabled",
                    "The Realtime API beta shape (OpenAI-Beta: realtime=v1) is disabled; "
                    "use the GA interface.",
                    4000,
                )
            elif model is None or not is_known_model(model):
                await conn.fatal(
                    "model_not_found",
                    f"The model '{model}' does not exist or you do not have access to it.",
                    3000,
                )
            else:
                await conn.run(model)
        finally:
            self.active_connections -= 1

    async def _reject(self, request: WebSocketRequest, rec: ConnectionRecord, status: int) -> None:
        rec.rejected_status = status
        type_, code, message = _REJECT_BODY.get(status, _REJECT_BODY[500])
        body = json.dumps(
            {"error": {"message": message, "type": type_, "code": code, "param": None}}
        )
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", b"1"))
        await request.reject(status, extra_headers=headers, body=body.encode())


def _api_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for proto in headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith("openai-insecure-api-key."):
            return proto[len("openai-insecure-api-key.") :]
    return None


def _redact(key: str | None) -> str:
    if not key:
        return "(none)"
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "****"


# ------------------------------------------------------------------------ connection


class _Connection:
    def __init__(
        self,
        sim: Simulator,
        ws: WebSocketConnection,
        rec: ConnectionRecord,
        faults: ConnectionFaults,
    ) -> None:
        self.sim = sim
        self.cfg = sim.config
        self.ws = ws
        self.rec = rec
        self.faults = faults
        # Two streams so ids do not depend on how reader and writer interleave.
        self.rng = random.Random(f"ids:{self.cfg.seed}:{rec.index}")
        self.event_rng = random.Random(f"events:{self.cfg.seed}:{rec.index}")
        self.encoder = codec.ServerEventEncoder()
        self.decoder = codec.ClientEventDecoder()
        self.send_out, self.recv_out = trio.open_memory_channel[Any](64)
        self.sent = 0
        self.received = 0
        self.scope = trio.CancelScope()
        self.started_at = trio.current_time()
        # Writer modifiers.
        self.stall_until = -math.inf
        self.held: deque[Any] = deque()
        self.slow: list[tuple[Fault, int | None]] = []
        self.duplicates = 0
        self.reorders = 0
        self.betas = 0
        self.reordered: Any = None
        self.last_text: str | None = None
        self.last_type: str | None = None

    def _event_id(self) -> str:
        return "event_" + "".join(
            self.event_rng.choice("0123456789ABCDEFabcdef") for _ in range(20)
        )

    async def fatal(self, code: str, message: str, close_code: int) -> None:
        """Error event then close (auth, beta shape, unknown model)."""
        with self.scope:
            try:
                await self._write(
                    ev.ErrorEvent(
                        error=ev.ErrorDetail(
                            type="invalid_request_error", code=code, message=message
                        )
                    )
                )
                self.rec.errors_sent.append(code)
                reason = f"invalid_request_error.{code}" if close_code == 3000 else code
                await self._close(close_code, reason)
            except (_Stop, ConnectionClosed):
                pass

    async def run(self, model: str) -> None:
        async with trio.open_nursery() as nursery:
            with self.scope:
                self.session = RealtimeSession(
                    self.cfg, self.rec, self.send_out.send, nursery, self.rng, model
                )
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timers)
                for f in self.faults.at_connect():
                    await self.send_out.send(f)
                await self.session.start()
                await self._reader()
            nursery.cancel_scope.cancel()

    # -------------------------------------------------------------------------- reader

    async def _reader(self) -> None:
        while True:
            try:
                msg = await self.ws.get_message()
            except ConnectionClosed as e:
                if self.rec.closed_by is None:
                    self.rec.closed_by = "client"
                    self.rec.close_code = e.reason.code if e.reason else None
                self.scope.cancel()
                return
            if isinstance(msg, bytes):
                await self.send_out.send(_Close(1003, "binary frames are not supported"))
                continue
            try:
                event = self.decoder.decode(msg)
            except codec.ProtocolError as err:
                self.rec.protocol_errors.append(err)
                await self.session.error(err.code, err.message, err.param, err.event_id)
                continue
            self.received += 1
            if len(self.rec.received_events) < self.cfg.max_recorded_events:
                self.rec.received_events.append(event)
            else:
                self.rec.dropped_events += 1
            tag = type(event).__struct_config__.tag
            assert isinstance(tag, str)
            for f in self.faults.received(tag, self.received):
                await self.send_out.send(f)
            await self.session.handle(event)

    async def _timers(self) -> None:
        plan = sorted(
            [(f.after_ms / 1000, f) for f in self.faults.timed() if f.after_ms is not None],
            key=lambda x: x[0],
        )
        plan.append((self.cfg.max_session_s, Fault(kind="expire")))
        for delay, f in plan:
            await trio.sleep_until(self.started_at + delay)
            await self.send_out.send(f)

    # -------------------------------------------------------------------------- writer

    async def _writer(self) -> None:
        try:
            while True:
                now = trio.current_time()
                if self.held and now >= self.stall_until:
                    while self.held:
                        await self._emit(self.held.popleft())
                deadline = self.stall_until if self.held else math.inf
                with trio.move_on_at(deadline):
                    item = await self.recv_out.receive()
                    await self._dispatch(item)
        except (_Stop, ConnectionClosed):
            if self.rec.closed_by is None:
                self.rec.closed_by = "client"
            self.scope.cancel()

    async def _dispatch(self, item: Any) -> None:
        if isinstance(item, Fault):
            await self._act(item)
        elif isinstance(item, _Close):
            await self._close(item.code, item.reason)
        elif trio.current_time() < self.stall_until:
            if len(self.held) >= self.cfg.max_held_events:
                self.held.popleft()
                self.rec.held_dropped += 1
            self.held.append(item)
        else:
            await self._emit(item)

    async def _emit(self, item: Any) -> None:
        """Write one event with the active modifiers, then fire send-triggered faults."""
        if self.slow:
            f, left = self.slow[0]
            await trio.sleep(self.faults.delay_s(f))
            if left is not None:
                self.slow = [] if left <= 1 else [(f, left - 1)]
        if self.reorders and self.reordered is None:
            self.reordered = item
            return
        await self._write(item)
        if self.reordered is not None:
            held, self.reordered = self.reordered, None
            self.reorders -= 1
            await self._write(held)

    async def _write(self, item: Any) -> None:
        if isinstance(item, _Raw):
            text, tag = item.text, item.label
        else:
            item = msgspec.structs.replace(item, event_id=self._event_id())
            tag = type(item).__struct_config__.tag
            text = self.encoder.encode_text(item)
            if self.betas and tag in _BETA:
                self.betas -= 1
                text = text.replace(f'"type":"{tag}"', f'"type":"{_BETA[tag]}"', 1)
                tag = _BETA[tag]
        await self.ws.send_message(text)
        self._count(tag, text)
        while self.duplicates:
            self.duplicates -= 1
            await self.ws.send_message(text)
            self._count(tag, text)
        for f in self.faults.sent(tag, self.sent):
            await self._act(f)

    def _count(self, tag: str, text: str) -> None:
        self.sent += 1
        self.last_text, self.last_type = text, tag
        if len(self.rec.sent_types) < self.cfg.max_recorded_events:
            self.rec.sent_types.append(tag)

    async def _close(self, code: int, reason: str) -> None:
        self.rec.closed_by, self.rec.close_code = "server", code
        with trio.move_on_after(self.cfg.close_timeout_s):
            await self.ws.aclose(code, reason)
        raise _Stop

    async def _act(self, f: Fault) -> None:
        """Perform a fault now (from the writer, in order with the events)."""
        self.rec.faults_fired.append(f.describe())
        match f.kind:
            case "drop":
                self.rec.closed_by, self.rec.close_code = "drop", None
                stream = self.ws._stream  # trio-websocket has no public abort
                if f.reset and isinstance(stream, trio.SocketStream):
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                await stream.aclose()
                raise _Stop
            case "close":
                await self._close(f.code, f.reason)
            case "expire":
                minutes = self.cfg.max_session_s / 60
                await self._write(
                    ev.ErrorEvent(
                        error=ev.ErrorDetail(
                            type="invalid_request_error",
                            code="session_expired",
                            message=f"Your session hit the maximum duration of {minutes:g} minutes.",
                        )
                    )
                )
                self.rec.errors_sent.append("session_expired")
                await self._close(1001, "session_expired")
            case "error":
                await self._write(
                    ev.ErrorEvent(
                        error=ev.ErrorDetail(
                            type=f.error_type, code=f.error_code, message=f.message
                        )
                    )
                )
                self.rec.errors_sent.append(f.error_code)
                if f.close_code is not None:
                    await self._close(f.close_code, f"{f.error_type}.{f.error_code}")
            case "malformed":
                await self._write(_Raw(f.frame, "(malformed)"))
            case "unknown_event":
                text = json.dumps({"type": f.event_type, "event_id": self._event_id()})
                await self._write(_Raw(text, f.event_type))
            case "stall":
                dur = math.inf if f.duration_ms is None else f.duration_ms / 1000
                self.stall_until = trio.current_time() + dur
            case "slow":
                self.slow = [(f, f.count)]
            case "duplicate":
                if self.last_text is not None:
                    text, tag = self.last_text, self.last_type or ""
                    await self.ws.send_message(text)
                    self._count(tag, text)
                self.duplicates += (f.count or 1) - 1
            case "reorder":
                self.reorders += f.count or 1
            case "beta_name":
                self.betas += f.count or 1
            case "reject":  # only meaningful at the handshake
                pass


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


async def serve_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    simulator: Simulator | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    **config: Any,
) -> None:
    """Serve a simulator (``simulator`` or a new one from ``config``) until cancelled.

    ``port = await nursery.start(serve_simulator, "127.0.0.1", 0)`` gives the bound port.
    """
    sim = simulator if simulator is not None else Simulator(**config)
    await sim.serve(host, port, task_status=task_status)


class LoopbackURLs:
    """The addresses of a server listening on 127.0.0.1:``port`` (a mixin)."""

    __slots__ = ()
    port: int

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/v1/realtime`` (add ``?model=...`` as clients do)."""
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def base_url(self) -> str:
        """``ws://127.0.0.1:PORT/v1``: the ``websocket_base_url`` for the openai SDK."""
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@dataclass(frozen=True, slots=True)
class RunningSimulator(LoopbackURLs):
    """A simulator serving on 127.0.0.1:``port`` (see ``testing.sim.open_simulator``)."""

    sim: Simulator
    port: int
