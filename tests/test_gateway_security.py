"""The gateway's security decisions as pure functions (no sockets, no clock)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceactors.gateway import security as sec
from voiceactors.gateway.http import static_file
from voiceactors.gateway.security import RateLimiter

KEY = base64.b64encode(bytes(16)).decode()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert sec.is_loopback_host(host) is loopback


def test_check_bind() -> None:
    assert sec.check_bind("127.0.0.1", None, False) is False
    assert sec.check_bind("0.0.0.0", "t", False) is False
    assert sec.check_bind("0.0.0.0", None, True) is True  # allowed, caller must warn
    with pytest.raises(sec.InsecureBindError):
        sec.check_bind("0.0.0.0", None, False)


@pytest.mark.parametrize(
    ("headers", "query", "subprotocols", "ok"),
    [
        ({"authorization": "Bearer tok"}, {}, (), True),
        ({"authorization": "BEARER  tok "}, {}, (), True),
        ({"authorization": "Bearer tok2"}, {}, (), False),
        ({"authorization": "Basic tok"}, {}, (), False),
        ({"authorization": "tok"}, {}, (), False),
        ({}, {"token": "tok"}, (), True),
        ({}, {"token": ""}, (), False),
        ({}, {}, ("realtime", "openai-insecure-api-key.tok"), True),
        ({}, {}, ("openai-insecure-api-key.", "realtime"), False),
        ({}, {}, ("realtime",), False),
        ({"authorization": "Bearer bad"}, {"token": "tok"}, (), True),  # any place will do
        ({}, {}, (), False),
    ],
)
def test_token_matches(
    headers: dict[str, str], query: dict[str, str], subprotocols: tuple[str, ...], ok: bool
) -> None:
    assert sec.token_matches("tok", headers, query, subprotocols) is ok


def test_token_matches_non_ascii_tokens() -> None:
    assert sec.token_matches("pässwörd", {}, {"token": "pässwörd"}, ())
    assert not sec.token_matches("pässwörd", {}, {"token": "passwort"}, ())


def test_own_origins() -> None:
    assert sec.own_origins("127.0.0.1", 8080) == {
        "http://localhost:8080",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
    }
    assert sec.own_origins("0.0.0.0", 8080) == frozenset()
    assert sec.own_origins("Voice.Example.com", 80) == {"http://voice.example.com:80"}
    assert sec.own_origins("2001:db8::1", 80) == {"http://[2001:db8::1]:80"}


def test_origin_allowed() -> None:
    allowed = ["https://app.example.com", "http://127.0.0.1:8080/"]
    assert sec.origin_allowed(None, allowed)
    assert sec.origin_allowed("https://APP.example.com", allowed)
    assert sec.origin_allowed("http://127.0.0.1:8080", allowed)
    assert not sec.origin_allowed("https://app.example.com.evil.io", allowed)
    assert not sec.origin_allowed("http://app.example.com", allowed)  # scheme matters
    assert not sec.origin_allowed("null", allowed)
    assert not sec.origin_allowed("", allowed)


def _upgrade(**kw: str) -> dict[str, str]:
    h = {
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": KEY,
    }
    h.update({k.replace("_", "-"): v for k, v in kw.items()})
    return {k: v for k, v in h.items() if v}


@pytest.mark.parametrize(
    ("method", "version", "headers", "status"),
    [
        ("GET", "1.1", _upgrade(), None),
        ("GET", "1.1", _upgrade(upgrade="WebSocket"), None),
        ("POST", "1.1", _upgrade(), 405),
        ("GET", "1.0", _upgrade(), 400),
        ("GET", "1.1", _upgrade(upgrade=""), 426),
        ("GET", "1.1", _upgrade(upgrade="h2c"), 426),
        ("GET", "1.1", _upgrade(connection="close"), 400),
        ("GET", "1.1", _upgrade(sec_websocket_version="12"), 426),
        ("GET", "1.1", _upgrade(sec_websocket_version=""), 400),
        ("GET", "1.1", _upgrade(sec_websocket_key=""), 400),
        ("GET", "1.1", _upgrade(sec_websocket_key=base64.b64encode(bytes(15)).decode()), 400),
        ("GET", "1.1", _upgrade(sec_websocket_key=base64.b64encode(bytes(17)).decode()), 400),
        ("GET", "1.1", _upgrade(sec_websocket_key=KEY.rstrip("=")), 400),  # bad padding
        ("GET", "1.1", _upgrade(sec_websocket_key="AAAA AAAA AAAA AAAA AAAA AA=="), 400),
        ("GET", "1.1", _upgrade(sec_websocket_protocol="realtime, r\xe9altime"), 400),
        ("GET", "1.1", _upgrade(sec_websocket_extensions="\xff"), 400),
        ("GET", "1.1", _upgrade(connection="Upgrade, \xe9"), 400),
        ("GET", "1.1", _upgrade(host="xn--a.example"), 400),
        ("GET", "1.1", _upgrade(host="127.0.0.1:8080"), None),
    ],
)
def test_websocket_handshake_problem(
    method: str, version: str, headers: dict[str, str], status: int | None
) -> None:
    problem = sec.websocket_handshake_problem(method, version, headers)
    assert (problem.status if problem else None) == status


def test_version_problem_names_the_supported_version() -> None:
    problem = sec.websocket_handshake_problem("GET", "1.1", _upgrade(sec_websocket_version="8"))
    assert problem is not None and ("sec-websocket-version", "13") in problem.headers


def test_scrub_secrets() -> None:
    headers = {
        "authorization": "Bearer t",
        "cookie": "sid=1",
        "sec-websocket-protocol": "realtime, openai-insecure-api-key.t",
        "x-trace": "1",
    }
    h, q = sec.scrub_secrets(headers, {"token": "t", "model": "m"})
    assert h == {"sec-websocket-protocol": "realtime", "x-trace": "1"}
    assert q == {"model": "m"}
    h, _ = sec.scrub_secrets({"sec-websocket-protocol": "openai-insecure-api-key.t"}, {})
    assert h == {}
    assert headers["authorization"] == "Bearer t"  # the input is not modified


# -- rate limiter --------------------------------------------------------------------------


def test_rate_limiter_burst_then_rate() -> None:
    limiter = RateLimiter(rate=10, burst=5)
    assert [limiter.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.denied == 1
    assert not limiter.allow(0.05)  # half a token back
    assert limiter.allow(0.1)  # one token back
    assert not limiter.allow(0.1)
    assert [limiter.allow(100.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_rate_limiter_ignores_time_going_backwards() -> None:
    limiter = RateLimiter(rate=1, burst=1)
    assert limiter.allow(10.0)
    assert not limiter.allow(5.0)
    assert not limiter.allow(10.5)  # still measured from 10.0, not from 5.0
    assert limiter.allow(11.0)


def test_rate_limiter_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(1, 1000),
    burst=st.integers(1, 500),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_rate_limiter_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate, burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += limiter.allow(now)
    assert allowed <= burst + rate * now + 1e-6
    assert allowed + limiter.denied == len(gaps)


# -- static paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "", "/etc/passwd", ".hidden", "a//b", "a\\b", "%2e%2e", "a/.", "~x"],
)
def test_static_file_refuses_odd_names(tmp_path: Path, name: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("b")
    (tmp_path / "x").write_text("x")
    assert static_file(tmp_path / "a", name) is None


def test_static_file_finds_nested_files(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "logo.svg").write_text("<svg/>")
    assert static_file(tmp_path, "img/logo.svg") == (tmp_path / "img" / "logo.svg").resolve()
    assert static_file(tmp_path, "img") is None


def test_public_exports() -> None:
    import voiceactors.gateway as gateway

    assert sorted(gateway.__all__) == [
        "ClientHandler",
        "ClientInfo",
        "Gateway",
        "GatewayConfig",
        "InsecureBindError",
        "RateLimiter",
        "serve_until_signal",
    ]
    for name in gateway.__all__:
        assert getattr(gateway, name).__module__.startswith("voiceactors.gateway.")
    for method in ("serve", "drain", "active_sessions"):
        assert hasattr(gateway.Gateway, method)
