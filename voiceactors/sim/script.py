"""The simulator's "brain": what it answers, from a script file or by echo.

Script format (TOML or JSON, same shape; example in ``specs/sim-examples/order.toml``)::

    [[turn]]                        # one per response, consumed in order
    transcript = "Two cheeseburgers and fries. Anything else?"
    audio = {tone_hz = 440, ms = 1500}   # or "reply.wav" (relative to the script),
                                         # {silence_ms = 400}, or "echo" (the default:
                                         # play back the user's last committed audio)
    user_transcript = "I'd like two cheeseburgers"  # reported by input transcription

    [[turn]]
    [[turn.function_call]]          # a turn may call functions instead of speaking
    name = "place_order"
    arguments = '{"items": ["cheeseburger"]}'   # JSON text, or a table
    [turn.after_output]             # the reply once the client returned every output
    transcript = "Your order is in."            # (function_call_output) and asked
    audio = {tone_hz = 660, ms = 800}           # for a response

When the turns run out the simulator echoes. A reply's ``text`` (text modality) defaults
to its transcript. Bad files raise :class:`ScriptError` with the file and the key path.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audio import read_wav, silence, tone

__all__ = ["FunctionCall", "Reply", "Script", "ScriptError", "load_script"]


class ScriptError(ValueError):
    """A script or fault-plan file that cannot be used; the message names file and key."""


@dataclass(frozen=True, slots=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text, streamed as argument deltas


@dataclass(frozen=True, slots=True)
class Reply:
    """One response. ``audio`` is PCM16 24 kHz, or None to echo the user's audio."""

    audio: bytes | None = None
    transcript: str | None = None
    text: str | None = None
    function_calls: tuple[FunctionCall, ...] = ()
    after_output: Reply | None = None
    user_transcript: str | None = None


@dataclass(frozen=True, slots=True)
class Script:
    turns: tuple[Reply, ...] = field(default_factory=tuple)


def load_script(path: str | Path) -> Script:
    """Read a script file (``.toml`` or ``.json``). Raises ScriptError on any problem."""
    p = Path(path)
    data = _load_data(p)
    return parse_script(data, base=p.parent, where=str(p))


def _load_data(p: Path) -> dict[str, Any]:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ScriptError(f"{p}: cannot read ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ScriptError(f"{p}: not valid {p.suffix.lstrip('.') or 'TOML'} ({e})") from None
    if not isinstance(data, dict):
        raise ScriptError(f"{p}: the top level must be a table/object")
    return data


def parse_script(data: dict[str, Any], *, base: Path, where: str = "script") -> Script:
    """Build a Script from already-parsed data; WAV paths are relative to ``base``."""
    _only(data, {"turn"}, where)
    turns = data.get("turn", [])
    if not isinstance(turns, list):
        raise ScriptError(f"{where}: 'turn' must be a list of tables ([[turn]])")
    return Script(tuple(_reply(t, base, f"{where}: turn[{i}]") for i, t in enumerate(turns)))


def _only(d: Any, keys: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ScriptError(f"{where}: must be a table")
    extra = sorted(set(d) - keys)
    if extra:
        raise ScriptError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(keys))})")


def _str(d: dict[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise ScriptError(f"{where}.{key}: must be a string")
    return v


def _reply(d: Any, base: Path, where: str, *, nested: bool = False) -> Reply:
    keys = {"transcript", "text", "audio", "function_call"}
    if not nested:
        keys |= {"after_output", "user_transcript"}
    _only(d, keys, where)
    calls = d.get("function_call", [])
    if not isinstance(calls, list):
        raise ScriptError(f"{where}.function_call: must be a list ([[turn.function_call]])")
    after = d.get("after_output")
    return Reply(
        audio=_audio(d.get("audio", "echo"), base, f"{where}.audio"),
        transcript=_str(d, "transcript", where),
        text=_str(d, "text", where),
        function_calls=tuple(_call(c, f"{where}.function_call[{i}]") for i, c in enumerate(calls)),
        after_output=None
        if after is None
        else _reply(after, base, f"{where}.after_output", nested=True),
        user_transcript=_str(d, "user_transcript", where),
    )


def _call(d: Any, where: str) -> FunctionCall:
    _only(d, {"name", "arguments"}, where)
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ScriptError(f"{where}.name: required, a non-empty string")
    args = d.get("arguments", "{}")
    if isinstance(args, dict):
        args = json.dumps(args, separators=(",", ":"))
    elif isinstance(args, str):
        try:
            json.loads(args)
        except ValueError as e:
            raise ScriptError(f"{where}.arguments: not JSON ({e})") from None
    else:
        raise ScriptError(f"{where}.arguments: must be JSON text or a table")
    return FunctionCall(name, args)


def _audio(v: Any, base: Path, where: str) -> bytes | None:
    if v == "echo":
        return None
    if isinstance(v, str):
        try:
            return read_wav(base / v)
        except (OSError, ValueError) as e:
            raise ScriptError(f"{where}: {e}") from None
    if isinstance(v, dict):
        if "silence_ms" in v:
            _only(v, {"silence_ms"}, where)
            return silence(_positive(v["silence_ms"], f"{where}.silence_ms"))
        _only(v, {"tone_hz", "ms", "level_dbfs"}, where)
        ms = _positive(v.get("ms"), f"{where}.ms")
        hz = _positive(v.get("tone_hz", 440), f"{where}.tone_hz")
        level = v.get("level_dbfs", -12)
        if not isinstance(level, int | float) or level > 0:
            raise ScriptError(f"{where}.level_dbfs: must be a number <= 0")
        return tone(ms, hz, float(level))
    raise ScriptError(
        f"{where}: must be 'echo', a WAV path, {{tone_hz, ms}} or {{silence_ms}}, got {v!r}"
    )


def _positive(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or v > 600_000:
        raise ScriptError(f"{where}: must be a number of ms in (0, 600000]")
    return float(v)
