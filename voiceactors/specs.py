"""Machine specs: ``specs/<machine>.toml`` loaded, compared with the code, replayed, drawn.

A spec file holds::

    machine = "reconnect"
    initial = "idle"
    states = ["idle", ...]
    events = ["start", ...]          # event types (the structs' tags)
    actions = ["open_connection", ...]
    [config]                         # the machine's Config for scenarios (defaults elsewhere)

    [[transitions]]                  # one row per (from, event): the allowed targets
    from = "idle"
    event = "start"
    to = ["connecting"]
    why = "optional: the guard that picks among several targets"

    [reach]                          # a witness path from the initial state to each state
    backoff = [{type = "start"}, {type = "connect_failed"}]

    [[scenarios]]
    name = "upstream drops twice then recovers"
    seed = 7                         # for the machine's random.Random
    config = {}                      # overrides of [config]
    [[scenarios.steps]]
    at = 0.0                         # monotonic seconds; a timer step may omit it and
                                     # fires at the machine's next_deadline()
    event = {type = "start"}
    actions = [{type = "open_connection", attempt = 1}]   # the exact list, in order;
                                     # listed fields must match, a field may be given as
                                     # {min = a, max = b} for a range
    state = "connecting"             # optional: expected state after the step
    deadline = 5.0                   # optional: expected next_deadline() (inf as "inf")

Steps in ``reach`` paths take the same ``at`` rule (default: the previous time, or the
deadline for a timer).
"""

from __future__ import annotations

import importlib
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .machines._core import Machine

__all__ = [
    "MACHINE_NAMES",
    "Spec",
    "SpecMismatch",
    "load_machine",
    "load_spec",
    "mermaid",
    "replay",
    "walk",
]

MACHINE_NAMES = ("reconnect", "breaker", "turn")
FLOAT_TOLERANCE = 1e-9


class SpecMismatch(AssertionError):
    """A scenario step did not produce what the spec says."""


@dataclass(frozen=True)
class Spec:
    machine: str
    initial: str
    states: list[str]
    events: list[str]
    actions: list[str]
    config: dict[str, Any]
    transitions: list[tuple[str, str, str]]
    reach: dict[str, list[dict[str, Any]]]
    scenarios: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, frozenset[str]]]:
        out: dict[str, dict[str, frozenset[str]]] = {}
        for src, ev, dst in self.transitions:
            row = out.setdefault(src, {})
            row[ev] = row.get(ev, frozenset()) | {dst}
        return out


def load_machine(name: str) -> type[Machine[Any]]:
    """The machine class registered under ``name`` (its module is ``machines.<name>``)."""
    module = importlib.import_module(f"voiceactors.machines.{name}")
    cls: type[Machine[Any]] = module.MACHINE
    return cls


def load_spec(path: Path) -> Spec:
    """Parse a spec file; a malformed one raises ``ValueError`` naming the file and field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        transitions = sorted(
            (row["from"], row["event"], dst) for row in data["transitions"] for dst in row["to"]
        )
        return Spec(
            machine=data["machine"],
            initial=data["initial"],
            states=list(data["states"]),
            events=list(data["events"]),
            actions=list(data["actions"]),
            config=dict(data.get("config", {})),
            transitions=transitions,
            reach={k: list(v) for k, v in data.get("reach", {}).items()},
            scenarios=list(data.get("scenarios", [])),
        )
    except (KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: malformed spec ({exc!r})") from exc


def _decode_event(cls: type[Machine[Any]], raw: Mapping[str, Any]) -> msgspec.Struct:
    return msgspec.convert(dict(raw), cls.event_union())


@dataclass
class Step:
    """One replayed step: what went in, what came out."""

    at: float
    event: msgspec.Struct
    actions: list[msgspec.Struct]
    state: str
    deadline: float
    transition: tuple[str, str, str]


class Runner:
    """Feeds spec step tables to one machine, keeping the scenario clock.

    A step's ``at`` defaults to the previous step's time, or for a timer step to the
    machine's ``next_deadline()``.
    """

    def __init__(self, machine: Machine[Any]) -> None:
        self.machine = machine
        self.now = 0.0

    def step(self, raw: Mapping[str, Any]) -> Step:
        m = self.machine
        event = _decode_event(type(m), raw["event"] if "event" in raw else raw)
        tag = type(event).__struct_config__.tag
        if "at" in raw:
            self.now = float(raw["at"])
        elif tag == "timer":
            deadline = m.next_deadline()
            if math.isinf(deadline):
                raise SpecMismatch(f"timer step at {self.now}: the machine has no deadline")
            self.now = max(self.now, deadline)
        before = str(m.state)
        actions = m.handle(event, self.now)
        return Step(
            self.now, event, actions, str(m.state), m.next_deadline(), (before, tag, str(m.state))
        )


def walk(
    cls: type[Machine[Any]],
    steps: list[Mapping[str, Any]],
    *,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Machine[Any], list[Step]]:
    """Feed ``steps`` (spec step tables or bare events) to a new machine."""
    runner = Runner(cls.from_spec(config, seed))
    return runner.machine, [runner.step(raw) for raw in steps]


def _match_value(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict) and set(expected) <= {"min", "max"} and expected:
        lo = expected.get("min", -math.inf)
        hi = expected.get("max", math.inf)
        return isinstance(actual, int | float) and lo - FLOAT_TOLERANCE <= actual <= hi + FLOAT_TOLERANCE
    if expected == "inf":
        return actual == math.inf
    if isinstance(expected, float) or isinstance(actual, float):
        return isinstance(actual, int | float) and math.isclose(
            expected, actual, rel_tol=0, abs_tol=1e-6
        )
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(k in actual and _match_value(v, actual[k]) for k, v in expected.items())
    return bool(expected == actual)


def _builtins(action: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(action)
    out["type"] = type(action).__struct_config__.tag
    return out


def _match_action(expected: Mapping[str, Any], action: msgspec.Struct) -> bool:
    actual = _builtins(action)
    return all(k in actual and _match_value(v, actual[k]) for k, v in expected.items())


def replay(cls: type[Machine[Any]], spec: Spec, scenario: Mapping[str, Any]) -> list[Step]:
    """Replay one named scenario; raise ``SpecMismatch`` at the first step that differs."""
    config = {**spec.config, **scenario.get("config", {})}
    runner = Runner(cls.from_spec(config, int(scenario.get("seed", 0))))
    done: list[Step] = []
    for i, raw in enumerate(scenario["steps"], 1):
        step = runner.step(raw)
        done.append(step)
        where = f"{spec.machine} scenario {scenario['name']!r} step {i} ({raw['event']})"
        if "actions" in raw:
            want = raw["actions"]
            got = [_builtins(a) for a in step.actions]
            if len(want) != len(step.actions) or not all(
                _match_action(w, a) for w, a in zip(want, step.actions, strict=True)
            ):
                raise SpecMismatch(f"{where}: actions {got}, spec says {want}")
        if "state" in raw and raw["state"] != step.state:
            raise SpecMismatch(f"{where}: state {step.state!r}, spec says {raw['state']!r}")
        if "deadline" in raw and not _match_value(raw["deadline"], step.deadline):
            raise SpecMismatch(f"{where}: deadline {step.deadline}, spec says {raw['deadline']}")
    return done


def iter_specs(spec_dir: Path) -> Iterator[tuple[type[Machine[Any]], Spec]]:
    for name in MACHINE_NAMES:
        yield load_machine(name), load_spec(spec_dir / f"{name}.toml")


def mermaid(cls: type[Machine[Any]]) -> str:
    """A Mermaid ``stateDiagram-v2`` drawn from the machine's table (deterministic text)."""
    lines = [
        f"%% Generated by `python -m voiceactors specs` from voiceactors/machines/{cls.NAME}.py.",
        "%% Do not edit: change the table (and specs/*.toml), then regenerate.",
        "stateDiagram-v2",
        f"    [*] --> {cls.INITIAL}",
    ]
    edges: dict[tuple[str, str], list[str]] = {}
    for src, ev, dst in cls.transitions():
        edges.setdefault((src, dst), []).append(ev)
    for (src, dst), evs in sorted(edges.items()):
        lines.append(f"    {src} --> {dst} : {', '.join(evs)}")
    return "\n".join(lines) + "\n"


def describe(cls: type[Machine[Any]]) -> str:
    """A plain-text table of the machine for the terminal."""
    rows = [f"{cls.NAME}: initial {cls.INITIAL}; states {', '.join(s.value for s in cls.State)}"]
    width = max(len(s.value) for s in cls.State)
    for state in cls.State:
        row = cls.TABLE.get(state, {})
        for ev in sorted(row):
            targets = ", ".join(sorted(str(t) for t in row[ev]))
            rows.append(f"  {state.value:<{width}}  --{ev}-->  {targets}")
    return "\n".join(rows)
