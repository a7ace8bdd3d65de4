"""The gateway's security edges, as pure functions: no I/O, no clock (``now`` is passed in).

* who may bind where (:func:`check_bind`): a non-loopback address needs a client token;
* who may connect (:func:`token_matches`, :func:`origin_allowed`);
* whether an upgrade request is a well-formed RFC 6455 handshake
  (:func:`websocket_handshake_problem`);
* how fast a client may send (:class:`RateLimiter`);
* what the session handler may see (:func:`scrub_secrets`: the token never reaches it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "INSECURE_KEY_PREFIX",
    "HandshakeProblem",
    "InsecureBindError",
    "RateLimiter",
    "check_bind",
    "is_loopback_host",
    "origin_allowed",
    "own_origins",
    "scrub_secrets",
    "token_matches",
    "websocket_handshake_problem",
]

#: Browsers cannot set headers on a WebSocket, so the Realtime API takes the key as a
#: subprotocol: ``Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.<key>``.
INSECURE_KEY_PREFIX = "openai-insecure-api-key."


class InsecureBindError(ValueError):
    """Refusing to listen on a non-loopback address without a client token."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``).

    Any other name is treated as public: resolving it would be I/O, and a name can
    resolve differently tomorrow. ``""``/``0.0.0.0``/``::`` (all interfaces) are public.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allow_insecure_public: bool) -> bool:
    """Decide whether the gateway may listen on ``host``.

    Returns True when the bind is public *and* unauthenticated but explicitly allowed (the
    caller must warn loudly), False when it is fine. Raises :class:`InsecureBindError`
    when it is public, has no token and is not allowed: anyone who can reach the port
    would spend the operator's upstream API key.
    """
    if token or is_loopback_host(host):
        return False
    if allow_insecure_public:
        return True
    raise InsecureBindError(
        f"refusing to listen on {host!r} (not loopback) without a client token: "
        "set --token or VOICEACTORS_TOKEN, or pass --insecure-public if you really mean "
        "to let anyone who can reach this port use your upstream API key"
    )


def token_matches(
    expected: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    subprotocols: Iterable[str],
) -> bool:
    """True when the client presented ``expected`` in any of the three accepted places.

    ``Authorization: Bearer <t>`` (scheme case-insensitive), a ``token`` query parameter,
    or a ``openai-insecure-api-key.<t>`` subprotocol. Every comparison is
    ``hmac.compare_digest`` on UTF-8 bytes, so timing does not reveal a prefix. An empty
    candidate never matches.
    """
    want = expected.encode()
    candidates: list[str] = []
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(credentials.strip())
    if "token" in query:
        candidates.append(query["token"])
    candidates.extend(
        p[len(INSECURE_KEY_PREFIX) :] for p in subprotocols if p.startswith(INSECURE_KEY_PREFIX)
    )
    ok = False
    for c in candidates:
        # No short cut: every candidate is compared, so timing does not tell which one.
        ok |= bool(c) and hmac.compare_digest(c.encode(), want)
    return ok


def own_origins(host: str, port: int) -> frozenset[str]:
    """The browser origins of the gateway's own page when bound to ``host:port``.

    For a loopback bind every loopback spelling (``localhost``, ``127.0.0.1``,
    ``[::1]``) is included. For a wildcard or public bind the page's origin depends on
    the name the browser used, which the gateway cannot know (and the ``Host`` header
    cannot be trusted: DNS rebinding): list it with ``allowed_origins``.
    """
    if is_loopback_host(host):
        names = {"localhost", "127.0.0.1", "[::1]"}
    elif host in ("", "0.0.0.0", "::"):
        names = set()
    else:
        names = {f"[{host}]" if ":" in host else host.lower()}
    return frozenset(f"http://{name}:{port}" for name in names)


def origin_allowed(origin: str | None, allowed: Iterable[str]) -> bool:
    """No ``Origin`` (a non-browser client) is allowed; a browser's must be listed.

    Comparison ignores case and a trailing slash. ``"null"`` (sandboxed frames, file://
    pages) is a foreign origin like any other. This is what stops cross-site WebSocket
    hijacking: a page elsewhere can open a socket to us, but cannot forge ``Origin``.
    """
    if origin is None:
        return True
    return _norm_origin(origin) in {_norm_origin(a) for a in allowed}


def _norm_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


@dataclass(frozen=True, slots=True)
class HandshakeProblem:
    """Why an upgrade request is refused, and with which HTTP status (and extra headers)."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def websocket_handshake_problem(
    method: str, http_version: str, headers: Mapping[str, str]
) -> HandshakeProblem | None:
    """Check an upgrade request against RFC 6455 section 4.2.1; None when it is sound.

    ``headers`` has lower-case names. wsproto checks most of this too, but answers a bare
    400 with no body and does not check the key; deciding here gives the client a clear
    reason and the metrics an exact status.
    """
    if method != "GET":
        return HandshakeProblem(405, "a WebSocket handshake must be a GET", (("allow", "GET"),))
    if http_version != "1.1":
        return HandshakeProblem(400, "a WebSocket handshake needs HTTP/1.1")
    # wsproto decodes these as ASCII (and Host as IDNA) inside trio-websocket's reader
    # task, where a UnicodeDecodeError would drop the connection without an answer.
    for name in _ASCII_HEADERS:
        if not headers.get(name, "").isascii():
            return HandshakeProblem(400, f"the {name} header must be ASCII")
    try:
        headers.get("host", "").encode("latin-1").decode("idna")
    except UnicodeError:
        return HandshakeProblem(400, "malformed Host header")
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        return HandshakeProblem(
            426,
            "this endpoint speaks WebSocket only",
            (("upgrade", "websocket"), ("connection", "Upgrade")),
        )
    if "upgrade" not in _tokens(headers.get("connection", "")):
        return HandshakeProblem(400, "missing 'Connection: Upgrade'")
    version = headers.get("sec-websocket-version")
    if version != "13":
        # RFC 6455 4.4: an unsupported version is answered with the versions we speak.
        status = 426 if version else 400
        return HandshakeProblem(
            status, "Sec-WebSocket-Version must be 13", (("sec-websocket-version", "13"),)
        )
    key = headers.get("sec-websocket-key", "")
    try:
        nonce = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        return HandshakeProblem(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


_ASCII_HEADERS = (
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
)


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def scrub_secrets(headers: Mapping[str, str], query: Mapping[str, str]) -> tuple[dict, dict]:
    """Copies of ``headers`` and ``query`` without the client token.

    Drops ``authorization`` and ``cookie``, the ``token`` query parameter, and the
    ``openai-insecure-api-key.*`` entries of ``sec-websocket-protocol``, so a session
    handler cannot log or forward the token by accident.
    """
    h = {k: v for k, v in headers.items() if k not in ("authorization", "cookie")}
    if "sec-websocket-protocol" in h:
        kept = [
            p.strip()
            for p in h["sec-websocket-protocol"].split(",")
            if not p.strip().startswith(INSECURE_KEY_PREFIX)
        ]
        h["sec-websocket-protocol"] = ", ".join(kept)
        if not kept:
            del h["sec-websocket-protocol"]
    q = {k: v for k, v in query.items() if k != "token"}
    return h, q


class RateLimiter:
    """A token bucket: ``rate`` messages per second on average, bursts up to ``burst``.

    Pure and cheap: :meth:`allow` takes the current time (``trio.current_time()``) and
    does a few float operations. It starts full. The session side calls it once per
    received client message and, when it says no, closes with 1008 ``rate limit``
    (:data:`CLOSE_CODE`, :data:`CLOSE_REASON`). ``denied`` counts refusals.
    """

    CLOSE_CODE = 1008
    CLOSE_REASON = "rate limit"

    __slots__ = ("_last", "_tokens", "burst", "denied", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate!r}, {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None
        self.denied = 0

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough at time ``now``; False otherwise.

        A ``now`` earlier than the last call (a caller mixing clocks) adds nothing rather
        than draining the bucket.
        """
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        self.denied += 1
        return False
