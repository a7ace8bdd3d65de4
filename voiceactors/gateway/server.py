"""The gateway: one port for client sessions, the browser page, probes and metrics.

Theory of operation
-------------------
Per TCP connection, one task (in the connections nursery of :meth:`Gateway.serve`):

1. **Head.** h11 reads one request head under a deadline of ``handshake_timeout`` for
   the whole head (a client dribbling a byte at a time is answered 408 and cut off) and a
   size limit (431). Malformed input gets h11's 400. Nothing else is parsed by hand.
2. **Plain routes** (``/``, ``/static/<name>``, ``/healthz``, ``/readyz``, ``/metrics``)
   are answered by h11 with ``Connection: close``: one request per connection.
3. **``/v1/realtime``.** The head is checked as an RFC 6455 handshake, then the bytes
   already read are replayed into trio-websocket (``wrap_server_stream`` on a
   :class:`~.http.ReplayStream`). The gateway then refuses (HTTP 503 draining, 403
   foreign ``Origin``, 401 bad token), accepts and closes at once (``error`` event and
   4000 for the beta shape, 1013 at capacity), or accepts and runs the session handler.

Bounds: at most ``max_connections`` open connections (beyond that the gateway stops
accepting, so new clients wait in the kernel's backlog instead of costing memory), at
most ``max_sessions`` sessions, ``max_message_bytes`` per client message (trio-websocket
closes with 1009), and every write the gateway itself makes to a client has a deadline.

A handler that raises is logged and its client gets 1011; a handler that returns leaves
the client a 1000 close. Neither touches any other connection.

:meth:`Gateway.drain` stops accepting, closes every session with 1001 and waits up to
``drain_timeout`` before cancelling what is left; :meth:`Gateway.serve` then returns.
:func:`serve_until_signal` runs a gateway and drains it on SIGINT/SIGTERM.
"""

from __future__ import annotations

import errno
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qsl, urlsplit

import h11
import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from .. import metrics as m
from ..realtime import codec
from ..realtime import events as ev
from .http import (
    ReplayStream,
    Reply,
    content_type,
    error_reply,
    header_dict,
    read_request_head,
    send_reply,
    static_file,
)
from .security import (
    RateLimiter,
    check_bind,
    origin_allowed,
    own_origins,
    scrub_secrets,
    token_matches,
    websocket_handshake_problem,
)

__all__ = [
    "REALTIME_PATH",
    "ClientHandler",
    "ClientInfo",
    "Gateway",
    "GatewayConfig",
    "serve_until_signal",
]

log = logging.getLogger("voiceactors.gateway")

REALTIME_PATH = "/v1/realtime"
_STATIC_PREFIX = "/static/"
_DEFAULT_STATIC = Path(__file__).resolve().parent.parent / "static"
# wsproto re-parses the head with h11's default buffer limit; a larger head would be
# accepted by us and refused by it.
_H11_DEFAULT_LIMIT = 16 * 1024
# accept() errors that mean "out of descriptors/memory for now": wait and retry, as
# trio.serve_listeners does, instead of crashing the server.
_TRANSIENT_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

REJECT_REASONS = ("draining", "forbidden_origin", "unauthorized", "beta_api_shape", "at_capacity")
HANDSHAKE_FAILURES = ("timeout", "head_too_large", "bad_request", "bad_websocket_handshake")
# Bounded `path` label values for http_requests_total.
_ROUTES = ("/", "/healthz", "/readyz", "/metrics", REALTIME_PATH)


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway listens and what it allows. Invalid values raise ``ValueError``.

    ``port=0`` picks a free port (``serve`` reports it). The gateway's own
    ``http://host:port`` origins are always allowed in addition to ``allowed_origins``.
    The fields after ``allow_insecure_public`` are finer bounds most callers leave alone.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 200
    max_message_bytes: int = 1 << 20
    rate_limit_messages_per_s: float = 200.0
    rate_limit_burst: int = 400
    handshake_timeout: float = 5.0
    drain_timeout: float = 10.0
    static_dir: Path = _DEFAULT_STATIC
    allow_insecure_public: bool = False
    #: open TCP connections (sessions, handshakes, HTTP requests) before accept() pauses
    max_connections: int = 1024
    #: request line + headers, bytes (431 beyond)
    max_head_bytes: int = 16 * 1024
    #: client messages trio-websocket buffers before it stops reading the socket
    message_queue_size: int = 8
    #: how long a close handshake the gateway starts may take before the socket is dropped
    close_timeout: float = 5.0
    #: bind with SO_REUSEPORT so that several processes share the port, the kernel
    #: spreading connections among them (``serve --workers``); needs the platform to have it
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.token is not None and not self.token:
            raise ValueError("token must be None or non-empty")
        positive = {
            "max_sessions": self.max_sessions,
            "max_message_bytes": self.max_message_bytes,
            "rate_limit_messages_per_s": self.rate_limit_messages_per_s,
            "rate_limit_burst": self.rate_limit_burst,
            "handshake_timeout": self.handshake_timeout,
            "drain_timeout": self.drain_timeout,
            "max_connections": self.max_connections,
            "max_head_bytes": self.max_head_bytes,
            "message_queue_size": self.message_queue_size,
            "close_timeout": self.close_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.max_head_bytes > _H11_DEFAULT_LIMIT:
            raise ValueError(f"max_head_bytes must be <= {_H11_DEFAULT_LIMIT}")
        if isinstance(self.allowed_origins, str):
            raise ValueError("allowed_origins is a tuple of origins, not one string")
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError(f"reuse_port: this platform ({sys.platform}) has no SO_REUSEPORT")


def _default_limiter() -> RateLimiter:
    cfg = GatewayConfig()
    return RateLimiter(cfg.rate_limit_messages_per_s, cfg.rate_limit_burst)


@dataclass(frozen=True)
class ClientInfo:
    """What a session handler learns about its client.

    ``headers`` (lower-case names) and ``query`` have the client token removed
    (``authorization``, ``cookie``, ``?token=``, the ``openai-insecure-api-key.*``
    subprotocol). ``subprotocol`` is the one the gateway answered with (``"realtime"``
    when offered, else None). ``model`` is the ``model`` query parameter.
    ``rate_limiter`` is this connection's token bucket: call
    ``rate_limiter.allow(trio.current_time())`` per received message and close with
    ``RateLimiter.CLOSE_CODE``/``CLOSE_REASON`` (1008 ``rate limit``) when it says no.
    """

    session_id: str
    remote: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    subprotocol: str | None
    model: str | None
    rate_limiter: RateLimiter = field(default_factory=_default_limiter, compare=False, repr=False)


class ClientHandler(Protocol):
    """Runs one client session on an accepted WebSocket.

    Returning ends the session (the gateway closes with 1000 if the handler did not
    close). Raising ``ConnectionClosed`` (alone or in a group) means the client left;
    raising anything else is a bug: it is logged and the client gets 1011. Cancellation
    (drain timeout, shutdown) arrives as ``trio.Cancelled``.
    """

    async def __call__(self, ws: WebSocketConnection, info: ClientInfo) -> None: ...


class _GatewayMetrics:
    """The gateway's metric families, with children bound once."""

    def __init__(self, registry: m.Registry) -> None:
        p = "voiceactors_gateway_"
        self.connections_total = registry.counter(
            p + "connections_total", "TCP connections accepted."
        )
        self.connections_active = registry.gauge(p + "connections_active", "TCP connections open.")
        self.sessions_total = registry.counter(
            p + "sessions_total", "WebSocket sessions handed to the session handler."
        )
        self.sessions_active = registry.gauge(
            p + "sessions_active", "Sessions running (or being accepted)."
        )
        rejected = registry.counter(
            p + "sessions_rejected_total", "Session requests refused, by reason.", ["reason"]
        )
        self.rejected = {r: rejected.labels(r) for r in REJECT_REASONS}
        failures = registry.counter(
            p + "handshake_failures_total",
            "Connections that did not produce a valid request, by reason.",
            ["reason"],
        )
        self.failures = {r: failures.labels(r) for r in HANDSHAKE_FAILURES}
        self.http = registry.counter(
            p + "http_requests_total",
            "HTTP responses sent, by route and status.",
            ["path", "status"],
        )
        self.handler_errors = registry.counter(
            p + "session_errors_total", "Session handlers that raised (client got 1011)."
        )
        self.session_seconds = registry.histogram(
            p + "session_duration_seconds",
            "How long sessions lasted.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
        )

    def response(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()


class Gateway:
    """Serves client sessions, the page, probes and metrics on one port.

    Raises :class:`~.security.InsecureBindError` at construction for a non-loopback
    ``host`` without a token (unless ``allow_insecure_public``). ``readiness`` is called
    for each ``/readyz`` and returns ``(ready, detail)``; ``detail`` must be JSON-able.
    The gateway registers its metrics (``voiceactors_gateway_*``) in ``metrics`` and
    serves that registry at ``/metrics``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        handler: ClientHandler,
        *,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: m.Registry,
    ) -> None:
        self.config = config
        self._insecure_public = check_bind(config.host, config.token, config.allow_insecure_public)
        self._handler = handler
        self._readiness = readiness
        self.metrics = metrics
        self._m = _GatewayMetrics(metrics)
        self._encoder = codec.ServerEventEncoder()
        # session id -> its socket once accepted (None while the handshake completes).
        self._sessions: dict[str, WebSocketConnection | None] = {}
        self._origins: frozenset[str] = frozenset()
        self._started = False
        self._draining = False
        self._accept_scope = trio.CancelScope()
        self._connections: trio.Nursery | None = None
        self._stopped = trio.Event()
        #: the bound port, once ``serve`` has started
        self.port: int | None = None

    @property
    def active_sessions(self) -> int:
        """Sessions running their handler or completing their handshake."""
        return len(self._sessions)

    @property
    def draining(self) -> bool:
        return self._draining

    # -- lifecycle ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through ``task_status``, serve until drained.

        Returns after :meth:`drain` has finished. On cancellation every connection is
        cancelled and closed abruptly (clients see 1006): use :meth:`drain` for a clean
        stop. Raises ``OSError`` if the address cannot be bound, ``RuntimeError`` if
        called twice.
        """
        if self._started:
            raise RuntimeError("a Gateway serves once")
        self._started = True
        cfg = self.config
        if self._insecure_public:
            log.warning(
                "SERVING %s WITHOUT A TOKEN (--insecure-public): anyone who can reach this "
                "port can use the upstream API key",
                cfg.host,
            )
        try:
            await self._serve(task_status)
        finally:
            # Also on a failed bind, so that a concurrent drain() does not wait forever.
            self._stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        cfg = self.config
        if cfg.reuse_port:
            listeners = await _open_reuse_port_listeners(cfg.port, cfg.host or None)
        else:
            listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host or None)
        if cfg.port == 0:
            # Each address family would get its own free port; one port is what we report.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.port = listeners[0].socket.getsockname()[1]
        allowed = [*own_origins(cfg.host, self.port), *cfg.allowed_origins]
        self._origins = frozenset(a.rstrip("/").lower() for a in allowed)
        slots = trio.Semaphore(cfg.max_connections)
        async with trio.open_nursery() as connections:
            self._connections = connections
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections, slots)
                        log.info("gateway listening on %s:%d", cfg.host, self.port)
                        task_status.started(self.port)
            finally:
                # Refuse new clients now, not when the last session has drained.
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def drain(self) -> None:
        """Stop accepting, close every session with 1001 ``server draining``, then wait.

        Handshakes still in flight are refused with 503. Waits up to ``drain_timeout``
        for every connection to finish, then cancels what is left, and returns once
        :meth:`serve` has finished. Safe to call more than once, concurrently, or before
        ``serve`` (then ``serve`` returns at once). If ``drain`` itself is cancelled the
        remaining connections are not cancelled by it.
        """
        self._draining = True
        self._accept_scope.cancel()
        if not self._started:
            return
        with trio.move_on_after(self.config.drain_timeout):
            async with trio.open_nursery() as closing:
                for ws in self._sessions.values():
                    if ws is not None:
                        closing.start_soon(ws.aclose, 1001, "server draining")
            await self._stopped.wait()
        if not self._stopped.is_set() and self._connections is not None:
            log.warning("drain timeout: cancelling %d sessions", self.active_sessions)
            self._connections.cancel_scope.cancel()
        await self._stopped.wait()

    async def _accept(
        self,
        listener: trio.SocketListener,
        connections: trio.Nursery,
        slots: trio.Semaphore,
    ) -> None:
        while True:
            # Take the slot before accepting: at the cap, clients queue in the backlog.
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                    raise
                log.error("accept() failed (%s): retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            connections.start_soon(self._connection, stream, slots)

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        self._m.connections_total.inc()
        self._m.connections_active.inc()
        remote = _peer(stream)
        try:
            await self._serve_connection(stream, remote)
        except Exception as exc:
            if _only(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.debug("%s: connection lost", remote)
            else:
                log.exception("%s: connection failed", remote)
        finally:
            await trio.aclose_forcefully(stream)
            self._m.connections_active.dec()
            slots.release()

    async def _serve_connection(self, stream: trio.SocketStream, remote: str) -> None:
        cfg = self.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_head_bytes)
        deadline = trio.current_time() + cfg.handshake_timeout
        request: h11.Request | None = None
        with trio.move_on_at(deadline):
            try:
                request, raw = await read_request_head(stream, conn, cfg.max_head_bytes)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = "head_too_large" if status == 431 else "bad_request"
                self._m.failures[reason].inc()
                await self._reply(stream, conn, "other", error_reply(status, reason, str(exc)))
                return
            if request is None:
                return  # closed without asking anything (a browser's spare connection)
        if request is None:
            self._m.failures["timeout"].inc()
            reply = error_reply(408, "timeout", "the request head took too long")
            await self._reply(stream, conn, "other", reply)
            return
        url = urlsplit(request.target.decode("ascii"))  # h11 admits printable ASCII only
        headers = header_dict(request)
        if url.path == REALTIME_PATH:
            await self._websocket(stream, conn, request, headers, url, raw, deadline, remote)
        else:
            await self._http(stream, conn, request, headers, url)

    async def _reply(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        route: str,
        reply: Reply,
        *,
        head_only: bool = False,
    ) -> None:
        self._m.response(route, reply.status)
        with trio.move_on_after(self.config.handshake_timeout):
            await send_reply(stream, conn, reply, head_only=head_only)

    # -- plain HTTP -----------------------------------------------------------------------

    async def _http(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        headers: dict[str, str],
        url: SplitResult,
    ) -> None:
        path = url.path
        route = (
            path if path in _ROUTES else "/static" if path.startswith(_STATIC_PREFIX) else "other"
        )
        if request.method not in (b"GET", b"HEAD"):
            reply = error_reply(
                405, "method_not_allowed", "use GET", headers=(("allow", "GET, HEAD"),)
            )
        else:
            reply = await self._route(path, headers, url.query)
        await self._reply(stream, conn, route, reply, head_only=request.method == b"HEAD")

    async def _route(self, path: str, headers: dict[str, str], query_text: str) -> Reply:
        if path == "/healthz":
            return Reply(200, b"ok\n")
        if path == "/readyz":
            return self._readyz()
        if path == "/metrics":
            token = self.config.token
            query = dict(parse_qsl(query_text))
            if token is not None and not token_matches(token, headers, query, ()):
                return error_reply(
                    401,
                    "invalid_token",
                    "a token is required",
                    headers=(("www-authenticate", 'Bearer realm="voiceactors"'),),
                )
            return Reply(200, self.metrics.render().encode(), m.CONTENT_TYPE)
        if path == "/":
            return await self._static("index.html")
        if path.startswith(_STATIC_PREFIX):
            return await self._static(path[len(_STATIC_PREFIX) :])
        return error_reply(404, "not_found", f"no such path: {path}")

    def _readyz(self) -> Reply:
        try:
            ready, detail = self._readiness()
        except Exception as exc:
            log.exception("readiness check failed")
            ready, detail = False, {"error": repr(exc)}
        if self._draining:
            ready, detail = False, {**detail, "draining": True}
        body = msgspec.json.encode({"ready": ready, "detail": detail}, enc_hook=repr)
        return Reply(200 if ready else 503, body, "application/json")

    async def _static(self, name: str) -> Reply:
        path = await trio.to_thread.run_sync(static_file, self.config.static_dir, name)
        if path is None:
            return error_reply(404, "not_found", f"no such file: {name}")
        return Reply(200, await trio.Path(path).read_bytes(), content_type(path))

    # -- WebSocket sessions ---------------------------------------------------------------

    async def _websocket(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        headers: dict[str, str],
        url: SplitResult,
        raw: bytes,
        deadline: float,
        remote: str,
    ) -> None:
        problem = websocket_handshake_problem(
            request.method.decode("ascii"), request.http_version.decode("ascii"), headers
        )
        if problem is not None:
            self._m.failures["bad_websocket_handshake"].inc()
            reply = error_reply(
                problem.status, "bad_websocket_handshake", problem.message, headers=problem.headers
            )
            await self._reply(stream, conn, REALTIME_PATH, reply)
            return
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        async with trio.open_nursery() as ws_nursery:
            try:
                await self._admit(
                    ws_nursery,
                    ReplayStream(stream, raw),
                    headers,
                    url.path,
                    query,
                    deadline,
                    remote,
                )
            finally:
                # trio-websocket's reader task lives here. It ends by itself once the
                # socket closes, and it is what completes a close handshake someone else
                # started (drain): give it close_timeout, not forever.
                ws_nursery.cancel_scope.deadline = trio.current_time() + self.config.close_timeout

    async def _admit(
        self,
        nursery: trio.Nursery,
        stream: ReplayStream,
        headers: dict[str, str],
        path: str,
        query: dict[str, str],
        deadline: float,
        remote: str,
    ) -> None:
        cfg = self.config
        request: WebSocketRequest | None = None
        with trio.move_on_at(deadline):
            # Immediate: the whole head is in the replay prefix and was checked above.
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=cfg.message_queue_size,
                max_message_size=cfg.max_message_bytes,
            )
        if request is None:
            self._m.failures["timeout"].inc()
            return
        offered = request.proposed_subprotocols
        subprotocol = "realtime" if "realtime" in offered else None
        refusal = self._refusal(headers, query, offered)
        if refusal is not None:
            reason, reply = refusal
            self._m.rejected[reason].inc()
            self._m.response(REALTIME_PATH, reply.status)
            extra = [(b"content-type", reply.content_type.encode())]
            extra += [(k.encode(), v.encode()) for k, v in reply.headers]
            with trio.move_on_at(deadline):
                await request.reject(reply.status, extra_headers=extra, body=reply.body)
            return
        if headers.get("openai-beta", "").replace(" ", "").lower() == "realtime=v1":
            # As the real API does: accept, explain, close. Decided here so a beta client
            # never costs a session slot or an upstream connection.
            self._m.rejected["beta_api_shape"].inc()
            await self._accept_and_close(
                request, subprotocol, deadline, 4000, "beta_api_shape_disabled", _BETA_ERROR
            )
            return
        if len(self._sessions) >= cfg.max_sessions:
            self._m.rejected["at_capacity"].inc()
            await self._accept_and_close(request, subprotocol, deadline, 1013, "at capacity")
            return
        session_id = "sess_" + secrets.token_hex(12)
        self._sessions[session_id] = None  # the slot is taken before the first await
        self._m.sessions_active.inc()
        try:
            ws: WebSocketConnection | None = None
            with trio.move_on_at(deadline):
                ws = await request.accept(subprotocol=subprotocol)
            if ws is None:
                self._m.failures["timeout"].inc()
                return
            self._m.response(REALTIME_PATH, 101)
            self._sessions[session_id] = ws
            if self._draining:  # drain() began while we were accepting: it missed us
                await self._close(ws, 1001, "server draining")
                return
            clean_headers, clean_query = scrub_secrets(headers, query)
            info = ClientInfo(
                session_id=session_id,
                remote=remote,
                path=path,
                query=clean_query,
                headers=clean_headers,
                subprotocol=subprotocol,
                model=query.get("model"),
                rate_limiter=RateLimiter(cfg.rate_limit_messages_per_s, cfg.rate_limit_burst),
            )
            await self._run_session(ws, info)
        finally:
            del self._sessions[session_id]
            self._m.sessions_active.dec()

    def _refusal(
        self, headers: dict[str, str], query: dict[str, str], offered: Sequence[str]
    ) -> tuple[str, Reply] | None:
        if self._draining:
            reply = error_reply(
                503,
                "server_draining",
                "the server is shutting down; reconnect",
                type="server_error",
                headers=(("retry-after", "1"),),
            )
            return "draining", reply
        # Origin before token: a foreign page must not learn whether a token is valid.
        if not origin_allowed(headers.get("origin"), self._origins):
            return "forbidden_origin", error_reply(403, "forbidden_origin", "origin not allowed")
        token = self.config.token
        if token is not None and not token_matches(token, headers, query, offered):
            return "unauthorized", error_reply(401, "invalid_api_key", "missing or wrong token")
        return None

    async def _accept_and_close(
        self,
        request: WebSocketRequest,
        subprotocol: str | None,
        deadline: float,
        code: int,
        reason: str,
        error: ev.ErrorDetail | None = None,
    ) -> None:
        ws: WebSocketConnection | None = None
        with trio.move_on_at(deadline):
            ws = await request.accept(subprotocol=subprotocol)
            self._m.response(REALTIME_PATH, 101)
            if error is not None:
                event = ev.ErrorEvent(event_id="event_" + secrets.token_hex(10), error=error)
                try:
                    await ws.send_message(self._encoder.encode_text(event))
                except ConnectionClosed:
                    return
        if ws is not None:
            await self._close(ws, code, reason)

    async def _close(self, ws: WebSocketConnection, code: int, reason: str | None) -> None:
        # aclose waits for the client's close frame; a client that never sends one is
        # dropped after close_timeout (aclose closes the socket even when cancelled).
        with trio.move_on_after(self.config.close_timeout):
            await ws.aclose(code, reason)

    async def _run_session(self, ws: WebSocketConnection, info: ClientInfo) -> None:
        self._m.sessions_total.inc()
        started = trio.current_time()
        code, reason = 1000, None
        try:
            await self._handler(ws, info)
        except Exception as exc:
            if not _only(exc, (ConnectionClosed,)):
                log.exception("session %s (%s): handler failed", info.session_id, info.remote)
                self._m.handler_errors.inc()
                code, reason = 1011, "internal error"
        finally:
            self._m.session_seconds.observe(trio.current_time() - started)
        await self._close(ws, code, reason)


_BETA_ERROR = ev.ErrorDetail(
    type="invalid_request_error",
    code="beta_api_shape_disabled",
    message=(
        "The Realtime API beta shape (OpenAI-Beta: realtime=v1) is disabled; use the GA interface."
    ),
)


def _only(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """True if ``exc`` is one of ``types``, or a group made only of them."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(types)
        return rest is None
    return isinstance(exc, types)


async def _open_reuse_port_listeners(port: int, host: str | None) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with SO_REUSEPORT set on every socket before bind.

    One listener per address ``host`` resolves to (``None``: both wildcards). Raises
    ``OSError`` if any of them cannot be bound (after closing those that were).
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT and len(addresses) > 1:
                    continue  # e.g. no IPv6 here: the other family is enough
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(0xFFFF)  # the kernel caps it at its configured maximum
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} is supported here")
    return listeners


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:  # already disconnected
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_until_signal(
    gateway: Gateway,
    *,
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``gateway.serve`` until one of ``signals`` arrives, then drain it.

    Reports the bound port through ``task_status``. The first signal starts
    :meth:`Gateway.drain` (bounded by ``drain_timeout``); a second one cancels everything
    at once. Returns when the gateway has stopped. Must run in the main thread (Trio's
    signal handling). Cancellation stops the gateway abruptly, as for ``serve``.
    """
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
                await gateway.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop listening for signals

            async def on_signals() -> None:
                async for signum in received:
                    name = signal.Signals(signum).name
                    if gateway.draining:
                        log.warning("%s again: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    log.warning("%s: draining (up to %ss)", name, gateway.config.drain_timeout)
                    nursery.start_soon(gateway.drain)

            nursery.start_soon(on_signals)
            task_status.started(await nursery.start(serve_then_stop))
