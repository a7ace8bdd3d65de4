"""Fault plans: data that says which connection misbehaves, when and how.

Format (TOML or JSON; example in ``specs/sim-examples/faults.toml``)::

    seed = 7                  # optional; mixed with the simulator's seed

    [[fault]]
    kind = "drop"             # see KINDS below
    connection = 1            # 0-based connection index; omit (or "*") for every one
    after_sent = 5            # trigger: at most one of after_sent / after_received /
                              # after_ms / on_sent / on_received; none = at connect
    probability = 1.0         # decided once per connection, from the seed

Triggers (each fault fires at most once per connection):

* ``after_sent = N``: right after the N-th server event was written.
* ``after_received = N``: when the N-th client event arrives, before it is handled.
* ``after_ms = T``: T ms (Trio clock) after the handshake.
* ``on_sent = "type"`` / ``on_received = "type"`` with ``nth = K`` (default 1): the K-th
  event of that type (sent: right after writing it; received: before handling it).
  ``on_sent = "response.output_audio.delta", nth = 3`` with ``kind = "drop"`` is a
  disconnect in the middle of a response.
* none: at connect, after the handshake and before ``session.created``.

Kinds and their parameters:

=================  =======================================================================
``drop``           TCP closed without a close frame (``reset = true``: RST instead of FIN)
``close``          close frame with ``code`` (default 1011) and ``reason``
``stall``          nothing written for ``duration_ms`` (default: forever); reading goes on
                   and events are held (bounded) and written when the stall ends
``slow``           each following event delayed ``delay_ms`` +/- ``jitter_ms`` (seeded);
                   ``count`` events (default: all)
``malformed``      one frame of broken JSON (``frame``, default a truncated audio delta)
``unknown_event``  one event of type ``event_type`` (default ``response.future_event``)
``error``          one ``error`` event: ``error_code`` (default ``server_error``),
                   ``error_type``, ``message``; then close with ``close_code`` if given
``reject``         handshake refused with HTTP ``status`` (401/403/429/500/503; no trigger)
``expire``         ``error`` code ``session_expired``, then close 1001
``duplicate``      the event just written is written again (``count`` events in a row)
``reorder``        the next two events are written in swapped order (``count`` times)
``beta_name``      the next ``count`` events with a beta name are sent under it
                   (``response.output_audio.delta`` as ``response.audio.delta``)
=================  =======================================================================
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .script import ScriptError

__all__ = ["KINDS", "ConnectionFaults", "Fault", "FaultPlan", "load_fault_plan", "parse_fault_plan"]

KINDS = frozenset(
    {
        "drop",
        "close",
        "stall",
        "slow",
        "malformed",
        "unknown_event",
        "error",
        "reject",
        "expire",
        "duplicate",
        "reorder",
        "beta_name",
    }
)
_TRIGGERS = ("after_sent", "after_received", "after_ms", "on_sent", "on_received")
REJECT_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 502, 503})


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault. See the module docstring for the meaning of each field."""

    kind: str
    connection: int | None = None
    after_sent: int | None = None
    after_received: int | None = None
    after_ms: float | None = None
    on_sent: str | None = None
    on_received: str | None = None
    nth: int = 1
    probability: float = 1.0
    code: int = 1011
    reason: str = ""
    status: int = 503
    delay_ms: float = 50.0
    jitter_ms: float = 0.0
    duration_ms: float | None = None
    error_code: str = "server_error"
    error_type: str = "server_error"
    message: str = "The server had an error while processing your request."
    close_code: int | None = None
    event_type: str = "response.future_event"
    frame: str = '{"type": "response.output_audio.delta", "delta": "AAAA'
    count: int | None = None
    reset: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(sorted(KINDS))}")
        given = [t for t in _TRIGGERS if getattr(self, t) is not None]
        if len(given) > 1:
            raise ValueError(f"at most one trigger, got {', '.join(given)}")
        if self.kind == "reject":
            if given:
                raise ValueError("a 'reject' fault happens at the handshake; it takes no trigger")
            if self.status not in REJECT_STATUSES:
                raise ValueError(f"status must be one of {sorted(REJECT_STATUSES)}")
        for name in ("after_sent", "after_received", "nth"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.after_ms is not None and not (0 <= self.after_ms < math.inf):
            raise ValueError("after_ms must be a finite number >= 0")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        if self.kind == "close" or self.close_code is not None:
            c = self.code if self.kind == "close" else self.close_code
            if c is None or not (1000 <= c <= 4999) or c in (1004, 1005, 1006, 1015):
                raise ValueError(f"close code {c} cannot be sent (1000-4999, not 1004-1006/1015)")
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.delay_ms:
            raise ValueError("need 0 <= jitter_ms <= delay_ms")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1")

    @property
    def trigger(self) -> str | None:
        return next((t for t in _TRIGGERS if getattr(self, t) is not None), None)

    def applies_to(self, index: int) -> bool:
        return self.connection is None or self.connection == index

    def describe(self) -> str:
        t = self.trigger
        when = f"{t}={getattr(self, t)!r}" if t else "at connect"
        if t in ("on_sent", "on_received"):
            when += f" nth={self.nth}"
        return f"{self.kind} {when}"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()
    seed: int = 0


_FIELDS = {f.name for f in fields(Fault)}


def parse_fault_plan(data: dict[str, Any], where: str = "fault plan") -> FaultPlan:
    """Build a FaultPlan from parsed TOML/JSON data. Raises ScriptError naming the key."""
    if not isinstance(data, dict):
        raise ScriptError(f"{where}: the top level must be a table/object")
    extra = sorted(set(data) - {"fault", "seed"})
    if extra:
        raise ScriptError(f"{where}: unknown key {extra[0]!r} (allowed: fault, seed)")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScriptError(f"{where}: seed must be an integer")
    items = data.get("fault", [])
    if not isinstance(items, list):
        raise ScriptError(f"{where}: 'fault' must be a list of tables ([[fault]])")
    out = []
    for i, d in enumerate(items):
        here = f"{where}: fault[{i}]"
        if not isinstance(d, dict):
            raise ScriptError(f"{here}: must be a table")
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise ScriptError(f"{here}: unknown key {unknown[0]!r}")
        d = dict(d)
        if d.get("connection") == "*":
            d["connection"] = None
        for k, v in d.items():
            want = _TYPES[k]
            ok = (
                v is None
                or (want is bool and isinstance(v, bool))
                or (want is not bool and isinstance(v, want) and not isinstance(v, bool))
            )
            if not ok:
                raise ScriptError(f"{here}.{k}: wrong type {type(v).__name__}")
        try:
            out.append(Fault(**d))
        except (TypeError, ValueError) as e:
            raise ScriptError(f"{here}: {e}") from None
    return FaultPlan(tuple(out), seed)


_TYPES: dict[str, Any] = {
    "kind": str,
    "connection": int,
    "after_sent": int,
    "after_received": int,
    "after_ms": (int, float),
    "on_sent": str,
    "on_received": str,
    "nth": int,
    "probability": (int, float),
    "code": int,
    "reason": str,
    "status": int,
    "delay_ms": (int, float),
    "jitter_ms": (int, float),
    "duration_ms": (int, float),
    "error_code": str,
    "error_type": str,
    "message": str,
    "close_code": int,
    "event_type": str,
    "frame": str,
    "count": int,
    "reset": bool,
}


def load_fault_plan(path: str | Path) -> FaultPlan:
    """Read a fault plan file (``.toml`` or ``.json``). Raises ScriptError on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ScriptError(f"{p}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(raw) if p.suffix.lower() == ".json" else tomllib.loads(raw.decode())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ScriptError(f"{p}: not valid {p.suffix.lstrip('.') or 'TOML'} ({e})") from None
    return parse_fault_plan(data, str(p))


@dataclass
class ConnectionFaults:
    """The faults one connection got (probabilities decided at construction) and the
    counters that fire them. Pure: callers ask, then act."""

    plan: FaultPlan
    index: int
    seed: int = 0
    active: list[Fault] = field(init=False)
    fired: list[Fault] = field(default_factory=list)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.plan.seed}:{self.seed}:{self.index}")
        self.active = [
            f
            for f in self.plan.faults
            if f.applies_to(self.index)
            and (f.probability >= 1 or self.rng.random() < f.probability)
        ]
        self._matches = [0] * len(self.active)

    def _fire(self, i: int) -> Fault:
        f = self.active[i]
        self.active[i] = None  # type: ignore[call-overload]
        self.fired.append(f)
        return f

    def rejection(self) -> Fault | None:
        """The handshake refusal for this connection, if any."""
        for i, f in enumerate(self.active):
            if f is not None and f.kind == "reject":
                return self._fire(i)
        return None

    def at_connect(self) -> list[Fault]:
        return [self._fire(i) for i, f in enumerate(self.active) if f is not None and not f.trigger]

    def timed(self) -> list[Fault]:
        """Faults with ``after_ms``, for the caller to schedule (they count as fired)."""
        return [
            self._fire(i)
            for i, f in enumerate(self.active)
            if f is not None and f.after_ms is not None
        ]

    def sent(self, event_type: str, total: int) -> list[Fault]:
        """Faults that fire now that event ``event_type`` was the ``total``-th written."""
        return self._count(event_type, total, "after_sent", "on_sent")

    def received(self, event_type: str, total: int) -> list[Fault]:
        """Faults that fire now that ``event_type`` arrived as the ``total``-th event."""
        return self._count(event_type, total, "after_received", "on_received")

    def _count(self, event_type: str, total: int, after: str, on: str) -> list[Fault]:
        out = []
        for i, f in enumerate(self.active):
            if f is None:
                continue
            if getattr(f, after) == total:
                out.append(self._fire(i))
            elif getattr(f, on) == event_type:
                self._matches[i] += 1
                if self._matches[i] == f.nth:
                    out.append(self._fire(i))
        return out

    def delay_s(self, f: Fault) -> float:
        """One seeded delay for a ``slow`` fault, in seconds."""
        jitter = self.rng.uniform(-f.jitter_ms, f.jitter_ms) if f.jitter_ms else 0.0
        return max(0.0, f.delay_ms + jitter) / 1000
