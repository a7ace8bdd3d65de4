"""The gateway over real sockets on 127.0.0.1: HTTP routes, handshakes, sessions, limits.

Rules (as trio-websocket's own tests): loopback only; every test under ``trio.fail_after``;
``autojump_clock`` wherever a timeout is involved (virtual time: a 5 s handshake deadline
costs nothing); no sleeping to wait for something. HTTP clients are raw sockets driven by
h11, WebSocket clients are trio-websocket's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket,
)

from voiceactors.gateway import (
    ClientInfo,
    Gateway,
    GatewayConfig,
    InsecureBindError,
    serve_until_signal,
)
from voiceactors.metrics import Registry

HOST = "127.0.0.1"
TIMEOUT = 10  # real seconds for real-clock tests; virtual ones use far less real time
KEY = base64.b64encode(b"0123456789abcdef").decode()

# -- handlers ------------------------------------------------------------------------------


async def echo(ws: WebSocketConnection, info: ClientInfo) -> None:
    while True:
        await ws.send_message(await ws.get_message())


async def crash_on_first_message(ws: WebSocketConnection, info: ClientInfo) -> None:
    await ws.get_message()
    raise RuntimeError("handler bug")


async def deaf(ws: WebSocketConnection, info: ClientInfo) -> None:
    await trio.sleep_forever()  # ignores its client, even a closed one


class Recorder:
    """Echoes, and keeps the ClientInfo of each session."""

    def __init__(self) -> None:
        self.infos: list[ClientInfo] = []

    async def __call__(self, ws: WebSocketConnection, info: ClientInfo) -> None:
        self.infos.append(info)
        await echo(ws, info)


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    d = tmp_path / "static"
    (d / "img").mkdir(parents=True)
    (d / "index.html").write_text("<!doctype html><title>voiceactors</title>")
    (d / "app.js").write_text("console.log('hi')")
    (d / "style.css").write_text("body{}")
    (d / "img" / "logo.svg").write_text("<svg/>")
    (d / "blob.xyz").write_bytes(b"\x00\x01")
    (d / ".env").write_text("SECRET=1")
    (tmp_path / "secret.txt").write_text("do not serve")
    (d / "escape.txt").symlink_to(tmp_path / "secret.txt")
    return d


@asynccontextmanager
async def serving(
    handler: Any = echo,
    *,
    registry: Registry | None = None,
    readiness: Any = lambda: (True, {"upstream": "sim"}),
    **config: Any,
) -> AsyncIterator[Gateway]:
    config.setdefault("static_dir", Path("/nonexistent"))
    gw = Gateway(
        GatewayConfig(host=HOST, port=0, **config),
        handler,
        readiness=readiness,
        metrics=registry if registry is not None else Registry(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        yield gw
        nursery.cancel_scope.cancel()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Response:
    head: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode(): v.decode() for k, v in head.headers}
            return Response(head.status_code, headers, body)


async def request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
) -> Response:
    """One HTTP request through h11, on a fresh connection."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        req = h11.Request(method=method, target=target, headers=[("host", HOST), *headers])
        await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
        return await read_response(stream, conn)


async def raw_exchange(port: int, data: bytes) -> Response:
    """Send ``data`` as is (possibly malformed) and read the response with h11."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(data)
        conn = h11.Connection(h11.CLIENT)
        # h11 needs to have "sent" a request to read a response; the bytes went raw.
        conn.send(h11.Request(method="GET", target="/", headers=[("host", HOST)]))
        conn.send(h11.EndOfMessage())
        return await read_response(stream, conn)


def upgrade_headers(**overrides: str) -> tuple[tuple[str, str], ...]:
    h = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": KEY,
        "sec-websocket-version": "13",
    }
    h.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return tuple((k, v) for k, v in h.items() if v)


def sample(text: str, series: str) -> float:
    """The value of one exposition line, by its exact series text (name and labels)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line[len(series) + 1 :])
    raise KeyError(series)


@asynccontextmanager
async def client(port: int, resource: str = "/v1/realtime", **kw: Any) -> AsyncIterator[Any]:
    async with open_websocket(HOST, port, resource, use_ssl=False, **kw) as ws:
        yield ws


async def close_reason(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code, info.value.reason.reason


async def rejected(port: int, resource: str = "/v1/realtime", **kw: Any) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with client(port, resource, **kw):
            pass
    return info.value


# -- plain HTTP ----------------------------------------------------------------------------


async def test_healthz_and_head() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            r = await request(gw.port, "/healthz")
            assert (r.status, r.body) == (200, b"ok\n")
            assert r.headers["connection"] == "close"
            head = await request(gw.port, "/healthz", method="HEAD")
            assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")


async def test_readyz_reports_readiness_and_draining() -> None:
    state: dict[str, Any] = {"ready": False}

    def readiness() -> tuple[bool, dict[str, Any]]:
        if state.get("boom"):
            raise RuntimeError("probe bug")
        return state["ready"], {"breaker": "open"}

    with trio.fail_after(TIMEOUT):
        async with serving(readiness=readiness) as gw:
            r = await request(gw.port, "/readyz")
            assert r.status == 503
            assert r.json() == {"ready": False, "detail": {"breaker": "open"}}
            state["ready"] = True
            assert (await request(gw.port, "/readyz")).status == 200
            state["boom"] = True
            r = await request(gw.port, "/readyz")
            assert r.status == 503 and "probe bug" in r.json()["detail"]["error"]


async def test_static_files_with_content_types(static_dir: Path) -> None:
    expected = {
        "/": ("text/html; charset=utf-8", b"<!doctype html><title>voiceactors</title>"),
        "/static/app.js": ("text/javascript; charset=utf-8", b"console.log('hi')"),
        "/static/style.css": ("text/css; charset=utf-8", b"body{}"),
        "/static/img/logo.svg": ("image/svg+xml", b"<svg/>"),
        "/static/blob.xyz": ("application/octet-stream", b"\x00\x01"),
        "/static/app.js?v=3": ("text/javascript; charset=utf-8", b"console.log('hi')"),
    }
    with trio.fail_after(TIMEOUT):
        async with serving(static_dir=static_dir) as gw:
            for target, (ctype, body) in expected.items():
                r = await request(gw.port, target)
                assert (r.status, r.headers["content-type"], r.body) == (200, ctype, body), target
                assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "target",
    [
        "/static/../secret.txt",
        "/static/..%2fsecret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/img/../../secret.txt",
        "/static//etc/passwd",
        "/static/.env",
        "/static/escape.txt",  # a symlink out of the directory
        "/static/img",  # a directory
        "/static/",
        "/static/missing.js",
        "/index.html/../../secret.txt",
        "/secret.txt",
    ],
)
async def test_static_refuses_traversal(static_dir: Path, target: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(static_dir=static_dir) as gw:
            r = await request(gw.port, target)
            assert r.status == 404
            assert b"do not serve" not in r.body and b"SECRET" not in r.body


async def test_unknown_path_and_method() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            assert (await request(gw.port, "/nope")).status == 404
            r = await request(gw.port, "/healthz", method="DELETE")
            assert (r.status, r.headers["allow"]) == (405, "GET, HEAD")
            assert r.json()["error"]["code"] == "method_not_allowed"


async def test_metrics_count_requests_by_route_and_status() -> None:
    registry = Registry()
    with trio.fail_after(TIMEOUT):
        async with serving(registry=registry) as gw:
            await request(gw.port, "/healthz")
            await request(gw.port, "/healthz")
            await request(gw.port, "/nope")
            r = await request(gw.port, "/metrics")
            assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = r.body.decode()
            route = "voiceactors_gateway_http_requests_total"
            assert sample(text, route + '{path="/healthz",status="200"}') == 2
            assert sample(text, route + '{path="other",status="404"}') == 1
            # The scrape itself is counted after it is rendered.
            assert sample(text, "voiceactors_gateway_connections_total") == 4
            assert sample(text, "voiceactors_gateway_connections_active") == 1
            assert "# TYPE voiceactors_gateway_session_duration_seconds histogram" in text


async def test_malformed_request_gets_400_and_server_survives() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            r = await raw_exchange(gw.port, b"GARBAGE\r\n\r\n")
            assert r.status == 400
            r = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
            assert r.status == 400
            r = await raw_exchange(gw.port, b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host
            assert r.status == 400
            assert (await request(gw.port, "/healthz")).status == 200
            text = gw.metrics.render()
            failures = 'voiceactors_gateway_handshake_failures_total{reason="bad_request"}'
            assert sample(text, failures) == 3


async def test_oversized_head_gets_431() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(max_head_bytes=2048) as gw:
            ok = await request(gw.port, "/healthz", headers=(("x-pad", "a" * 1500),))
            assert ok.status == 200
            big = await request(gw.port, "/healthz", headers=(("x-pad", "a" * 2100),))
            assert big.status == 431
            # Far past the limit, sent in one go: still a clean 431, not a reset.
            huge = await request(gw.port, "/healthz", headers=(("x-pad", "a" * 60000),))
            assert huge.status == 431
            text = gw.metrics.render()
            failures = 'voiceactors_gateway_handshake_failures_total{reason="head_too_large"}'
            assert sample(text, failures) == 2


async def test_slowloris_is_cut_off_at_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    head = b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
    with trio.fail_after(60):
        async with serving(handshake_timeout=5.0) as gw:
            stream = await trio.open_tcp_stream(HOST, gw.port)
            start = trio.current_time()
            async with stream, trio.open_nursery() as nursery:

                async def dribble() -> None:
                    for i in range(len(head)):
                        try:
                            await stream.send_all(head[i : i + 1])
                        except trio.BrokenResourceError:
                            return
                        await trio.sleep(0.5)

                nursery.start_soon(dribble)
                conn = h11.Connection(h11.CLIENT)
                conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
                conn.send(h11.EndOfMessage())
                r = await read_response(stream, conn)
                assert r.status == 408
                assert 5.0 <= trio.current_time() - start < 5.5
                while await stream.receive_some():  # then the server hangs up
                    pass
                assert trio.current_time() - start < 7.0
                nursery.cancel_scope.cancel()
            failures = 'voiceactors_gateway_handshake_failures_total{reason="timeout"}'
            assert sample(gw.metrics.render(), failures) == 1


async def test_connection_cap_queues_new_clients(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with serving(max_connections=2, handshake_timeout=5.0) as gw:
            idle = [await trio.open_tcp_stream(HOST, gw.port) for _ in range(2)]
            start = trio.current_time()
            r = await request(gw.port, "/healthz")  # waits for a slot
            waited = trio.current_time() - start
            assert r.status == 200
            # A slot frees only once an idle connection was cut off at its deadline.
            assert 5.0 <= waited < 7.0
            for s in idle:
                await s.aclose()


# -- WebSocket sessions --------------------------------------------------------------------


async def test_session_gets_client_info_without_secrets() -> None:
    recorder = Recorder()
    with trio.fail_after(TIMEOUT):
        async with serving(recorder, token="s3cret") as gw:
            resource = "/v1/realtime?model=gpt-realtime&token=s3cret&voice=marin"
            async with client(
                gw.port,
                resource,
                subprotocols=["realtime", "openai-insecure-api-key.s3cret"],
                extra_headers=[(b"X-Trace", b"abc"), (b"Authorization", b"Bearer s3cret")],
            ) as ws:
                assert ws.subprotocol == "realtime"
                await ws.send_message("ping")
                assert await ws.get_message() == "ping"
                assert gw.active_sessions == 1
        info = recorder.infos[0]
        assert re.fullmatch(r"sess_[0-9a-f]{24}", info.session_id)
        assert info.remote.startswith("127.0.0.1:")
        assert (info.path, info.model, info.subprotocol) == (
            "/v1/realtime",
            "gpt-realtime",
            "realtime",
        )
        assert info.query == {"model": "gpt-realtime", "voice": "marin"}
        assert info.headers["x-trace"] == "abc"
        assert "authorization" not in info.headers
        assert info.headers["sec-websocket-protocol"] == "realtime"
        assert "s3cret" not in repr(info)
        assert info.rate_limiter.rate == 200 and info.rate_limiter.burst == 400


@pytest.mark.parametrize(
    "how",
    [
        {"extra_headers": [(b"Authorization", b"Bearer s3cret")]},
        {"extra_headers": [(b"Authorization", b"bearer s3cret")]},
        {"resource": "/v1/realtime?token=s3cret"},
        {"subprotocols": ["realtime", "openai-insecure-api-key.s3cret"]},
    ],
)
async def test_token_accepted_in_each_place(how: dict[str, Any]) -> None:
    resource = how.pop("resource", "/v1/realtime")
    with trio.fail_after(TIMEOUT):
        async with serving(token="s3cret") as gw, client(gw.port, resource, **how) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"


@pytest.mark.parametrize(
    "how",
    [
        {},
        {"extra_headers": [(b"Authorization", b"Bearer wrong")]},
        {"extra_headers": [(b"Authorization", b"Basic s3cret")]},
        {"extra_headers": [(b"Authorization", b"Bearer s3cre")]},
        {"resource": "/v1/realtime?token="},
        {"resource": "/v1/realtime?token=S3CRET"},
        {"subprotocols": ["realtime", "openai-insecure-api-key.nope"]},
    ],
)
async def test_wrong_or_missing_token_is_401(how: dict[str, Any]) -> None:
    resource = how.pop("resource", "/v1/realtime")
    with trio.fail_after(TIMEOUT):
        async with serving(token="s3cret") as gw:
            err = await rejected(gw.port, resource, **how)
            assert err.status_code == 401
            assert err.body is not None
            assert json.loads(err.body)["error"]["code"] == "invalid_api_key"
            text = gw.metrics.render()
            assert (
                sample(text, 'voiceactors_gateway_sessions_rejected_total{reason="unauthorized"}')
                == 1
            )
            assert gw.active_sessions == 0


async def test_metrics_need_the_token_but_healthz_does_not() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(token="s3cret") as gw:
            r = await request(gw.port, "/metrics")
            assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert (await request(gw.port, "/metrics?token=nope")).status == 401
            bearer = (("authorization", "Bearer s3cret"),)
            assert (await request(gw.port, "/metrics", headers=bearer)).status == 200
            assert (await request(gw.port, "/metrics?token=s3cret")).status == 200
            assert (await request(gw.port, "/healthz")).status == 200
            assert (await request(gw.port, "/readyz")).status == 200


async def test_origin_allow_list() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(allowed_origins=("https://app.example.com",), token="t") as gw:
            auth = [(b"Authorization", b"Bearer t")]

            async def open_with(origin: str | None) -> None:
                headers = auth + ([(b"Origin", origin.encode())] if origin is not None else [])
                async with client(gw.port, extra_headers=headers) as ws:
                    await ws.send_message("o")
                    assert await ws.get_message() == "o"

            await open_with(None)  # not a browser
            await open_with(f"http://127.0.0.1:{gw.port}")  # our own page
            await open_with(f"http://localhost:{gw.port}")
            await open_with("https://APP.example.com/")
            for foreign in ("https://evil.example", "null", f"http://127.0.0.1:{gw.port + 1}"):
                err = await rejected(gw.port, extra_headers=auth + [(b"Origin", foreign.encode())])
                assert err.status_code == 403, foreign
            # A foreign page learns nothing about tokens: 403 comes first.
            err = await rejected(gw.port, extra_headers=[(b"Origin", b"https://evil.example")])
            assert err.status_code == 403


async def test_session_cap_accepts_then_closes_1013() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(max_sessions=1) as gw, client(gw.port) as first:
            await first.send_message("1")
            assert await first.get_message() == "1"
            async with client(gw.port) as second:
                assert await close_reason(second) == (1013, "at capacity")
            await first.send_message("still here")
            assert await first.get_message() == "still here"
            text = gw.metrics.render()
            assert (
                sample(text, 'voiceactors_gateway_sessions_rejected_total{reason="at_capacity"}')
                == 1
            )
            assert sample(text, "voiceactors_gateway_sessions_active") == 1


async def test_message_over_the_limit_closes_1009() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(max_message_bytes=1024) as gw, client(gw.port) as ws:
            await ws.send_message("a" * 1024)
            assert await ws.get_message() == "a" * 1024
            await ws.send_message(b"b" * 1025)
            code, _ = await close_reason(ws)
            assert code == 1009


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", "/v1/realtime", upgrade_headers(sec_websocket_version="8"), 426),
        ("GET", "/v1/realtime", upgrade_headers(sec_websocket_version=""), 400),
        ("GET", "/v1/realtime", upgrade_headers(sec_websocket_key="short"), 400),
        ("GET", "/v1/realtime", upgrade_headers(sec_websocket_key="not base64!!!!!!!!!!!!=="), 400),
        ("GET", "/v1/realtime", upgrade_headers(sec_websocket_key=""), 400),
        ("GET", "/v1/realtime", upgrade_headers(connection="keep-alive"), 400),
        ("GET", "/v1/realtime", (), 426),
        ("POST", "/v1/realtime", upgrade_headers(), 405),
        ("GET", "/v1/other", upgrade_headers(), 404),
    ],
)
async def test_bad_handshakes_get_4xx(
    method: str, target: str, headers: tuple[tuple[str, str], ...], status: int
) -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            r = await request(gw.port, target, method=method, headers=headers)
            assert r.status == status
            if status == 426 and headers:
                assert r.headers["sec-websocket-version"] == "13"
            async with client(gw.port) as ws:  # and the server is fine
                await ws.send_message("ok")
                assert await ws.get_message() == "ok"


async def test_handler_crash_closes_1011_and_spares_neighbours() -> None:
    crashed = trio.Event()

    async def handler(ws: WebSocketConnection, info: ClientInfo) -> None:
        if info.query.get("crash"):
            try:
                await crash_on_first_message(ws, info)
            finally:
                crashed.set()
        await echo(ws, info)

    with trio.fail_after(TIMEOUT):
        async with serving(handler) as gw, client(gw.port) as calm:
            async with client(gw.port, "/v1/realtime?crash=1") as doomed:
                await doomed.send_message("boom")
                assert await close_reason(doomed) == (1011, "internal error")
            await crashed.wait()
            await calm.send_message("fine")
            assert await calm.get_message() == "fine"
            assert sample(gw.metrics.render(), "voiceactors_gateway_session_errors_total") == 1


async def test_handler_returning_closes_1000() -> None:
    async def one_reply(ws: WebSocketConnection, info: ClientInfo) -> None:
        await ws.send_message("bye")

    with trio.fail_after(TIMEOUT):
        async with serving(one_reply) as gw, client(gw.port) as ws:
            assert await ws.get_message() == "bye"
            assert (await close_reason(ws))[0] == 1000


async def test_handler_seeing_the_client_leave_is_not_an_error() -> None:
    done = trio.Event()

    async def handler(ws: WebSocketConnection, info: ClientInfo) -> None:
        try:
            await echo(ws, info)
        finally:
            done.set()

    with trio.fail_after(TIMEOUT):
        async with serving(handler) as gw:
            async with client(gw.port) as ws:
                await ws.send_message("x")
                await ws.get_message()
            await done.wait()
            assert sample(gw.metrics.render(), "voiceactors_gateway_session_errors_total") == 0


async def test_beta_header_gets_error_event_and_4000() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            beta = [(b"OpenAI-Beta", b"realtime=v1")]
            async with client(gw.port, extra_headers=beta, subprotocols=["realtime"]) as ws:
                event = json.loads(await ws.get_message())
                assert event["type"] == "error"
                assert event["event_id"].startswith("event_")
                assert event["error"]["code"] == "beta_api_shape_disabled"
                assert await close_reason(ws) == (4000, "beta_api_shape_disabled")
            assert gw.active_sessions == 0


# -- shutdown ------------------------------------------------------------------------------


async def test_drain_closes_sessions_1001_and_stops_serving() -> None:
    with trio.fail_after(TIMEOUT):
        gw = Gateway(
            GatewayConfig(host=HOST, port=0),
            echo,
            readiness=lambda: (True, {}),
            metrics=Registry(),
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve)
            async with client(port) as a, client(port) as b:
                await gw.drain()
                assert await close_reason(a) == (1001, "server draining")
                assert await close_reason(b) == (1001, "server draining")
            # serve() has returned (the nursery can exit) and the port is closed.
        with pytest.raises(OSError):
            await trio.open_tcp_stream(HOST, port)


async def test_drain_cancels_handlers_that_ignore_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with serving(deaf, drain_timeout=3.0) as gw, client(gw.port) as ws:
            start = trio.current_time()
            await gw.drain()
            assert trio.current_time() - start == pytest.approx(3.0, abs=0.1)
            assert await close_reason(ws) == (1001, "server draining")
            assert gw.active_sessions == 0


async def test_handshake_in_flight_during_drain_gets_503() -> None:
    with trio.fail_after(TIMEOUT):
        gw = Gateway(
            GatewayConfig(host=HOST, port=0),
            echo,
            readiness=lambda: (True, {}),
            metrics=Registry(),
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve)
            stream = await trio.open_tcp_stream(HOST, port)
            conn = h11.Connection(h11.CLIENT)
            req = h11.Request(
                method="GET", target="/v1/realtime", headers=[("host", HOST), *upgrade_headers()]
            )
            data = conn.send(req)
            await stream.send_all(data[:-2])  # all but the final CRLF
            nursery.start_soon(gw.drain)
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(data[-2:])
            r = await read_response(stream, conn)
            assert r.status == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_draining"
            await stream.aclose()


async def test_sigterm_drains(autojump_clock: trio.testing.MockClock) -> None:
    gw = Gateway(
        GatewayConfig(host=HOST, port=0),
        echo,
        readiness=lambda: (True, {}),
        metrics=Registry(),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_until_signal, gw)
            async with client(port) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
                os.kill(os.getpid(), signal.SIGTERM)
                assert await close_reason(ws) == (1001, "server draining")
        assert gw.draining and gw.active_sessions == 0


async def test_second_signal_stops_at_once(autojump_clock: trio.testing.MockClock) -> None:
    gw = Gateway(
        GatewayConfig(host=HOST, port=0, drain_timeout=1000.0),
        deaf,
        readiness=lambda: (True, {}),
        metrics=Registry(),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_until_signal, gw)
            async with client(port) as ws:
                start = trio.current_time()
                os.kill(os.getpid(), signal.SIGINT)
                assert await close_reason(ws) == (1001, "server draining")
                os.kill(os.getpid(), signal.SIGINT)
        assert trio.current_time() - start < 1.0  # did not wait out drain_timeout


# -- configuration -------------------------------------------------------------------------


def test_refuses_public_bind_without_token() -> None:
    def make(**kw: Any) -> Gateway:
        return Gateway(GatewayConfig(**kw), echo, readiness=lambda: (True, {}), metrics=Registry())

    with pytest.raises(InsecureBindError, match="without a client token"):
        make(host="0.0.0.0")
    with pytest.raises(InsecureBindError):
        make(host="192.0.2.7")
    make(host="0.0.0.0", token="t")
    make(host="0.0.0.0", allow_insecure_public=True)
    make(host="::1")
    make(host="localhost")


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 70000},
        {"token": ""},
        {"max_sessions": 0},
        {"handshake_timeout": 0},
        {"max_head_bytes": 1 << 20},
        {"allowed_origins": "https://a.example"},
        {"rate_limit_messages_per_s": -1},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GatewayConfig(**bad)


async def test_serve_twice_is_an_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as gw:
            with pytest.raises(RuntimeError):
                await gw.serve()


async def test_drain_before_serve_makes_serve_return_at_once() -> None:
    gw = Gateway(
        GatewayConfig(host=HOST, port=0), echo, readiness=lambda: (True, {}), metrics=Registry()
    )
    with trio.fail_after(TIMEOUT):
        await gw.drain()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve)
        assert port == gw.port and gw.active_sessions == 0


async def test_failed_bind_raises_and_drain_does_not_hang() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving() as first:
            second = Gateway(
                GatewayConfig(host=HOST, port=first.port or 0),
                echo,
                readiness=lambda: (True, {}),
                metrics=Registry(),
            )
            with pytest.raises(OSError):
                await second.serve()
            await second.drain()


async def test_mutated_handshakes_never_crash(caplog: pytest.LogCaptureFixture) -> None:
    """Seeded mutations of a valid upgrade request: each gets an HTTP status or a close,
    and no connection ends in the gateway's "connection failed" path."""
    import random

    rng = random.Random(1234)
    valid = (
        b"GET /v1/realtime?model=m HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime\r\n\r\n"
    )

    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            i = rng.randrange(len(b))
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                del b[i : i + rng.randint(1, 8)]
            elif op == 2:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                b[i:i] = rng.choice([b"\r\n", b":", b" ", b"\x00", b"\xff", b"%", b"\r\n\r\n"])
        return bytes(b)

    seen: set[bytes] = set()
    with trio.fail_after(30):
        async with serving() as gw:
            for _ in range(200):
                stream = await trio.open_tcp_stream(HOST, gw.port)
                async with stream:
                    await stream.send_all(mutate(valid))
                    await stream.send_eof()  # an unfinished head ends here
                    reply = b""
                    while chunk := await stream.receive_some():
                        reply += chunk
                if reply:
                    assert reply.startswith(b"HTTP/1.1 "), reply[:40]
                    status = reply.split(b" ", 2)[1]
                    seen.add(status)
                    assert status in {b"101", b"400", b"404", b"405", b"426", b"431"}, reply
            assert (await request(gw.port, "/healthz")).status == 200
    assert {b"101", b"400"} <= seen
    assert not [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("voiceactors")]
