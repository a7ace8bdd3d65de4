"""The shape every voiceactors state machine shares.

Theory of operation
-------------------
A machine is a plain object that decides and never acts. Its driver (an actor) feeds it
events with the current monotonic time, ``handle(event, now)``, and performs the actions it
returns. When the machine wants to be woken up it says so through ``next_deadline()``
(``math.inf`` when it has nothing pending); the driver sleeps until then and feeds it a
``Timer`` event. Two rules, as in h11:

1. Everything that affects a machine's decisions lives in its module, starting with its
   transition table; the table is data and equals ``specs/<name>.toml``.
2. A machine knows nothing about I/O or clocks: no ``await``, no ``trio.current_time()``,
   no sockets. Randomness is an injected ``random.Random``.

The table maps ``state -> event type -> the states the event may lead to``. Several targets
mean the machine chooses by a guard (a rate over a threshold, a budget left). A (state,
event) pair that is not in the table is illegal: ``handle`` raises ``IllegalTransition``
before anything changes, so the machine is exactly as it was.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

__all__ = [
    "IllegalTransition",
    "Machine",
    "Table",
    "Timer",
    "event_type",
]

S = TypeVar("S", bound=StrEnum)

#: ``state -> event type -> allowed next states``.
Table = Mapping[Any, Mapping[str, frozenset[Any]]]


class Timer(msgspec.Struct, frozen=True, tag="timer"):
    """The deadline returned by ``next_deadline()`` has passed (or is being checked).

    A machine treats a timer that arrives before its deadline as a no-op, so drivers may
    wake up early without harm.
    """


class IllegalTransition(Exception):
    """An event arrived in a state whose table row does not list it.

    The machine is left exactly as it was before the call.
    """

    def __init__(self, machine: str, state: str, event: str) -> None:
        super().__init__(f"{machine}: event {event!r} is not allowed in state {state!r}")
        self.machine = machine
        self.state = state
        self.event = event


def event_type(event: msgspec.Struct) -> str:
    """The wire name (msgspec tag) of an event or action struct."""
    tag = type(event).__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{type(event).__name__} has no string tag")
    return tag


class Machine(Generic[S]):
    """Base class: table lookup, the illegal-pair rule and introspection for specs.

    Subclasses set the class attributes and implement ``_handle`` (the decision for a legal
    pair) and ``next_deadline``. ``_handle`` may assume the pair is legal; it must leave the
    machine in one of the table's targets for that pair (checked after every call).
    """

    NAME: ClassVar[str]
    State: ClassVar[type[StrEnum]]
    INITIAL: ClassVar[StrEnum]
    #: Event structs the machine accepts (each with a string tag and defaults for every
    #: field, so ``Event()`` is a valid example).
    EVENTS: ClassVar[tuple[type[msgspec.Struct], ...]]
    #: Action structs the machine may return.
    ACTIONS: ClassVar[tuple[type[msgspec.Struct], ...]]
    TABLE: ClassVar[Table]
    #: The machine's configuration struct (every field with a default).
    Config: ClassVar[type[msgspec.Struct]]

    state: S

    def handle(self, event: msgspec.Struct, now: float) -> list[msgspec.Struct]:
        """Feed one event at monotonic time ``now``; return the actions to perform, in order.

        Raises ``IllegalTransition`` (state unchanged) when the table has no entry for the
        current state and this event type.
        """
        kind = event_type(event)
        targets = self.TABLE.get(self.state, {}).get(kind)
        if targets is None:
            raise IllegalTransition(self.NAME, str(self.state), kind)
        actions = self._handle(event, now)
        if self.state not in targets:  # pragma: no cover - a bug in the machine, not input
            raise AssertionError(
                f"{self.NAME}: {kind} led to {self.state!r}, table allows {sorted(targets)}"
            )
        return actions

    def _handle(self, event: msgspec.Struct, now: float) -> list[msgspec.Struct]:
        raise NotImplementedError

    def next_deadline(self) -> float:
        """Monotonic time at which the driver must deliver ``Timer()``; ``math.inf`` if none."""
        return math.inf

    # -- introspection used by specs and tests ------------------------------------------

    @classmethod
    def from_spec(cls, config: Mapping[str, Any] | None = None, seed: int = 0) -> Machine[Any]:
        """Build a machine from a spec's config table and a seed for its randomness."""
        cfg = msgspec.convert(dict(config or {}), cls.Config)
        return cls(cfg, rng=random.Random(seed))  # type: ignore[call-arg]

    @classmethod
    def event_union(cls) -> Any:
        """The tagged union of the machine's events, for decoding spec and test data."""
        return _union(cls.EVENTS)

    @classmethod
    def transitions(cls) -> list[tuple[str, str, str]]:
        """Every (from, event, to) triple of the table, sorted."""
        return sorted(
            (str(src), ev, str(dst))
            for src, row in cls.TABLE.items()
            for ev, dsts in row.items()
            for dst in dsts
        )

    def snapshot(self) -> dict[str, Any]:
        """A deep, comparable copy of everything the machine holds."""
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if isinstance(value, random.Random):
                out[key] = value.getstate()
            else:
                out[key] = copy.deepcopy(value)
        return out


def _union(types: tuple[type[msgspec.Struct], ...]) -> Any:
    union: Any = types[0]
    for t in types[1:]:
        union = union | t
    return union
