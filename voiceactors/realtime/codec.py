"""Encode and decode Realtime events at the edge, with precise errors for bad input.

One encoder and one decoder per connection and direction (msgspec reuses their state).
Everything that can go wrong with untrusted bytes becomes a :class:`ProtocolError`
carrying the code, message and ``param`` the Realtime API itself would put in an
``error`` event: invalid UTF-8, JSON that is truncated, not an object, nested past
``max_depth``, carrying NaN/Infinity, lone surrogates, integers too large, duplicate keys;
unknown event types; missing, mistyped or unknown fields (with their path). Nothing in
here raises ``RecursionError``, ``ValueError`` or ``UnicodeError`` on bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import msgspec

from .events import (
    ClientEvent,
    InputAudioBufferAppend,
    ServerEvent,
    UnknownServerEvent,
    client_event_types,
    server_event_types,
)

__all__ = [
    "ClientEventDecoder",
    "ClientEventEncoder",
    "ProtocolError",
    "ServerEventDecoder",
    "ServerEventEncoder",
    "b64decode_strict",
    "b64encode",
    "unknown_parameter",
]

_CLIENT_TYPES = client_event_types()
_SERVER_TYPES = server_event_types()


class ProtocolError(Exception):
    """A client or server frame that cannot be accepted.

    ``code``/``message``/``param`` are what an ``error`` event reports (``type`` is
    always ``invalid_request_error``); ``event_id`` echoes the offending event's id when
    it could be read.
    """

    def __init__(
        self, code: str, message: str, param: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.type = "invalid_request_error"

    def __repr__(self) -> str:
        return f"ProtocolError(code={self.code!r}, message={self.message!r}, param={self.param!r})"


# ------------------------------------------------------------------------------ base64


def b64encode(data: bytes) -> str:
    """Standard base64 (with padding) of ``data`` as ``str``."""
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(s: str | bytes, *, param: str = "audio") -> bytes:
    """Decode standard, padded base64, refusing anything ``base64.b64decode`` would guess.

    Raises ProtocolError (code ``invalid_value``, ``param`` as given) naming the fault:
    whitespace, the URL-safe alphabet, other non-alphabet characters, a length that is not
    a multiple of 4 or padding in the wrong place.
    """
    try:
        raw = s.encode("ascii") if isinstance(s, str) else s
        data = binascii.a2b_base64(raw, strict_mode=True)
        # strict_mode still takes excess padding ("AAAA===="); RFC 4648 does not.
        if not raw.endswith(b"===") and not len(raw) % 4:
            return data
    except (UnicodeEncodeError, binascii.Error, ValueError):
        pass
    text = s.decode("latin-1") if isinstance(s, bytes) else s
    if any(c.isspace() for c in text):
        why = "contains whitespace"
    elif "-" in text or "_" in text:
        why = "uses the URL-safe alphabet ('-', '_'); standard base64 ('+', '/') is required"
    elif re.search(r"[^A-Za-z0-9+/=]", text):
        why = "contains characters outside the base64 alphabet"
    elif len(text) % 4:
        why = f"has length {len(text)}, not a multiple of 4 (missing or bad padding)"
    else:
        why = "has padding ('=') in the wrong place"
    raise ProtocolError("invalid_value", f"Invalid base64 in '{param}': the string {why}.", param)


# ------------------------------------------------------------------- JSON guard rails


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _param(path: str) -> str:
    """msgspec's ``$.session.tools[0].name`` -> the API's ``session.tools[0].name``."""
    return path[1:] if path.startswith(".") else path


def _from_validation(err: msgspec.ValidationError, event_id: str | None) -> ProtocolError:
    text = str(err)
    m = _MSGSPEC_PATH.search(text)
    path = _param(m["path"]) if m else ""
    head = text[: m.start()] if m else text
    if mm := re.fullmatch(r"Object missing required field `(.+)`", head):
        param = f"{path}.{mm[1]}" if path else mm[1]
        return ProtocolError(
            "missing_required_parameter", f"Missing required parameter: '{param}'.", param, event_id
        )
    if mm := re.fullmatch(r"Object contains unknown field `(.+)`", head):
        param = f"{path}.{mm[1]}" if path else mm[1]
        return ProtocolError("unknown_parameter", f"Unknown parameter: '{param}'.", param, event_id)
    if mm := re.fullmatch(r"Expected `(.+)`, got `(.+)`", head):
        return ProtocolError(
            "invalid_type",
            f"Invalid type for '{path}': expected {_kind(mm[1])}, but got {_kind(mm[2])} instead.",
            path or None,
            event_id,
        )
    return ProtocolError("invalid_value", f"Invalid value for '{path}': {head}.", path, event_id)


def _kind(name: str) -> str:
    return " or ".join(_JSON_KIND.get(n.strip(), n.strip()) for n in name.split("|"))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _check_duplicates(data: bytes, event_id: str | None = None) -> None:
    """Second pass over an already-valid, depth-bounded document: duplicate keys only.

    msgspec keeps the last of duplicate keys silently; a client relying on the first would
    see different behaviour here and upstream, so duplicates are refused.
    """
    try:
        json.loads(data, object_pairs_hook=_reject_duplicates, parse_constant=_no_constant)
    except _Duplicate as d:
        raise ProtocolError(
            "invalid_json",
            f"Invalid JSON: the key '{d.key}' appears more than once.",
            None,
            event_id,
        ) from None
    except (ValueError, RecursionError):
        # msgspec accepted it; stdlib limits differ (e.g. int digits). Not a duplicate.
        return


def _depth_ok(data: bytes, max_depth: int) -> bool:
    # Cheap upper bound: nesting can't exceed the count of opening brackets.
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return True
    depth = 0
    in_str = esc = False
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def _to_bytes(frame: bytes | str) -> bytes:
    if isinstance(frame, str):
        try:
            return frame.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                "invalid_json", "Invalid JSON: the text contains a lone surrogate."
            ) from None
    return frame


class _Raw:
    """Shared first stage: bytes -> checked JSON value, with every failure typed."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._any = msgspec.json.Decoder()

    def load(self, data: bytes) -> Any:
        if not _depth_ok(data, self.max_depth):
            raise ProtocolError(
                "invalid_json", f"Invalid JSON: nested deeper than {self.max_depth} levels."
            )
        try:
            return self._any.decode(data)
        except UnicodeDecodeError:
            raise ProtocolError("invalid_json", "Invalid JSON: the text is not UTF-8.") from None
        except msgspec.ValidationError as e:  # numbers out of range
            raise ProtocolError("invalid_json", f"Invalid JSON: {e}.") from None
        except msgspec.DecodeError as e:
            raise ProtocolError("invalid_json", f"Invalid JSON: {_decode_msg(e, data)}.") from None
        except RecursionError:  # pragma: no cover - _depth_ok bounds it first
            raise ProtocolError("invalid_json", "Invalid JSON: nested too deeply.") from None


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _decode_msg(e: Exception, data: bytes) -> str:
    text = str(e)
    if "truncated" in text and _SURROGATE.search(data):
        # msgspec reports an unpaired \ud800 as truncation; say what it is.
        return "a string contains a lone UTF-16 surrogate escape"
    if "invalid character" in text and re.search(rb"\b(NaN|-?Infinity)\b", data):
        return f"{text} (NaN and Infinity are not JSON)"
    return text


_JSON_KIND = {
    "int": "an integer",
    "str": "a string",
    "float": "a number",
    "bool": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def _event_header(obj: Any) -> tuple[str, str | None]:
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        raise ProtocolError(
            "invalid_json", f"Invalid event: expected a JSON object, got {kind}.", None
        )
    event_id = obj.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    t = obj.get("type")
    if t is None:
        raise ProtocolError(
            "missing_required_parameter", "Missing required parameter: 'type'.", "type", event_id
        )
    if not isinstance(t, str):
        raise ProtocolError(
            "invalid_type",
            f"Invalid type for 'type': expected a string, but got {type(t).__name__} instead.",
            "type",
            event_id,
        )
    return t, event_id


# ------------------------------------------------------------------------------ decoders


def _envelope(data: bytes) -> bytes | None:
    """``data`` without the characters of its compact ``"audio":"..."`` value, or None."""
    i = data.find(b'"audio":"')
    j = data.find(b'"', i + 9) if i > 0 else -1
    return data[: i + 9] + data[j:] if j > 0 else None


class ClientEventDecoder:
    """Decode frames a client sends (the simulator's and the gateway's inbound edge).

    ``decode`` returns one of the 11 client event Structs or raises ProtocolError. Top-level
    fields are strict; with ``strict=True`` (default) nested names are checked too
    (``unknown_parameter`` with the path, e.g. ``session.audio.input.foo``), a missing
    ``session.type`` is refused, and duplicate keys are refused. Audio appends take the
    fast path: one msgspec pass (base64 is not decoded here; see ``b64decode_strict``).
    """

    def __init__(self, *, strict: bool = True, max_depth: int = 64) -> None:
        self.strict = strict
        self._raw = _Raw(max_depth)
        self._append = msgspec.json.Decoder(InputAudioBufferAppend)

    def decode(self, frame: bytes | str) -> ClientEvent:
        data = _to_bytes(frame)
        if data.startswith(b'{"type":"input_audio_buffer.append"') and (env := _envelope(data)):
            # Hot path. The audio value holds no quote, so everything around it (the
            # envelope) is small; with no escapes there, every key is literal and counting
            # the three allowed keys finds duplicates. Other keys: the strict struct.
            if (
                b"\\" not in env
                and env.count(b'"audio"') == 1
                and env.count(b'"type"') == 1
                and env.count(b'"event_id"') <= 1
            ):
                try:
                    return self._append.decode(data)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    pass  # fall through for the precise error
        obj = self._raw.load(data)
        t, event_id = _event_header(obj)
        cls = _CLIENT_TYPES.get(t)
        if cls is None:
            raise ProtocolError(
                "invalid_value",
                f"Invalid value: '{t}'. Supported values are: "
                + ", ".join(f"'{n}'" for n in _CLIENT_TYPES)
                + ".",
                "type",
                event_id,
            )
        try:
            event = msgspec.convert(obj, cls)
        except msgspec.ValidationError as e:
            raise _from_validation(e, event_id) from None
        if self.strict:
            _check_duplicates(data, event_id)
            if param := unknown_parameter(obj, cls):
                raise ProtocolError(
                    "unknown_parameter", f"Unknown parameter: '{param}'.", param, event_id
                )
            if t == "session.update" and "type" not in obj.get("session", {}):
                raise ProtocolError(
                    "missing_required_parameter",
                    "Missing required parameter: 'session.type'.",
                    "session.type",
                    event_id,
                )
        return event


class ServerEventDecoder:
    """Decode frames the server sends (the runtime's upstream edge).

    Known types decode to their Struct (unknown fields ignored: the server adds them over
    time). An unknown ``type`` becomes :class:`UnknownServerEvent` and is counted in
    ``unknown_count``/``unknown_types`` (bounded: at most 64 distinct names are kept).
    Malformed JSON or a known type with wrong fields raises ProtocolError.
    """

    def __init__(self, *, max_depth: int = 64) -> None:
        self._raw = _Raw(max_depth)
        self._typed = msgspec.json.Decoder(ServerEvent)
        self.unknown_count = 0
        self.unknown_types: dict[str, int] = {}

    def decode(self, frame: bytes | str) -> ServerEvent | UnknownServerEvent:
        data = _to_bytes(frame)
        try:
            return self._typed.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass  # rare path: find out why, precisely
        obj = self._raw.load(data)
        t, event_id = _event_header(obj)
        cls = _SERVER_TYPES.get(t)
        if cls is None:
            self.unknown_count += 1
            if t in self.unknown_types or len(self.unknown_types) < 64:
                self.unknown_types[t] = self.unknown_types.get(t, 0) + 1
            return UnknownServerEvent(type=t, raw=obj)
        try:
            return msgspec.convert(obj, cls)
        except msgspec.ValidationError as e:
            raise _from_validation(e, event_id) from None


# ------------------------------------------------------------------------------ encoders


class _Encoder:
    def __init__(self) -> None:
        self._enc = msgspec.json.Encoder()

    def encode(self, event: Any) -> bytes:
        """JSON bytes of ``event`` (unset fields omitted)."""
        return self._enc.encode(event)

    def encode_text(self, event: Any) -> str:
        """The same as ``str``, for a WebSocket text frame."""
        return self._enc.encode(event).decode("utf-8")


class ClientEventEncoder(_Encoder):
    """Encode client events (the runtime's upstream edge)."""


class ServerEventEncoder(_Encoder):
    """Encode server events (the simulator's and gateway's outbound edge)."""


# ------------------------------------------------------------------- nested strictness

_info_cache: dict[Any, Any] = {}


def unknown_parameter(obj: Any, tp: Any) -> str | None:
    """First field name in decoded JSON ``obj`` that type ``tp`` does not define, as an
    API param path (``session.audio.input.foo``), or None. ``obj`` must already convert
    to ``tp``; this only finds the names msgspec ignored."""
    info = _info_cache.get(tp)
    if info is None:
        info = _info_cache[tp] = msgspec.inspect.type_info(tp)
    return _walk(obj, info, "")


def _walk(obj: Any, info: Any, path: str) -> str | None:
    mi = msgspec.inspect
    if isinstance(info, mi.StructType) and isinstance(obj, dict):
        fields = {f.encode_name: f for f in info.fields}
        for key, value in obj.items():
            here = f"{path}.{key}" if path else key
            if key == info.tag_field:
                continue
            f = fields.get(key)
            if f is None:
                return here
            if (found := _walk(value, f.type, here)) is not None:
                return found
        return None
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        if isinstance(obj, dict):
            for t in structs:
                if t.tag_field is None or obj.get(t.tag_field) == t.tag:
                    return _walk(obj, t, path)
            for t in info.types:
                if isinstance(t, mi.DictType):
                    return None
            return None
        if isinstance(obj, list):
            for t in info.types:
                if isinstance(t, mi.ListType):
                    return _walk(obj, t, path)
        return None
    if isinstance(info, mi.ListType) and isinstance(obj, list):
        for i, v in enumerate(obj):
            if (found := _walk(v, info.item_type, f"{path}[{i}]")) is not None:
                return found
    return None
