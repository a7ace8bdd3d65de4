"""The specs in ``specs/*.toml`` run as tests against the machines' code.

For every machine: its table equals the spec's, every named scenario replays, every
(state, event) pair is either in the table (and lands in an allowed state) or raises with
the machine unchanged, every table row is exercised by a scenario or a reach path, and the
committed Mermaid diagram is what the table generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from voiceactors.machines._core import IllegalTransition, Machine, event_type
from voiceactors.specs import MACHINE_NAMES, Runner, Spec, load_machine, load_spec, mermaid, replay

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"


def _spec(name: str) -> tuple[type[Machine[Any]], Spec]:
    return load_machine(name), load_spec(SPEC_DIR / f"{name}.toml")


def _scenarios() -> list[Any]:
    out = []
    for name in MACHINE_NAMES:
        spec = load_spec(SPEC_DIR / f"{name}.toml")
        out += [pytest.param(name, sc, id=f"{name}:{sc['name']}") for sc in spec.scenarios]
    return out


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_code_table_equals_spec(name: str) -> None:
    cls, spec = _spec(name)
    assert cls.NAME == spec.machine == name
    assert str(cls.INITIAL) == spec.initial
    assert [s.value for s in cls.State] == spec.states
    assert [event_type(e()) for e in cls.EVENTS] == spec.events
    assert sorted(a.__struct_config__.tag for a in cls.ACTIONS) == sorted(spec.actions)
    assert cls.transitions() == spec.transitions
    # No row names a state or an event that does not exist.
    for src, ev, dst in spec.transitions:
        assert src in spec.states and dst in spec.states and ev in spec.events


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_spec_has_scenarios_and_reaches_every_state(name: str) -> None:
    _, spec = _spec(name)
    assert len(spec.scenarios) >= 3
    assert set(spec.reach) | {spec.initial} == set(spec.states)


@pytest.mark.parametrize(("name", "scenario"), _scenarios())
def test_scenario_replays(name: str, scenario: dict[str, Any]) -> None:
    cls, spec = _spec(name)
    steps = replay(cls, spec, scenario)
    assert steps, "a scenario with no steps proves nothing"


def _reach(cls: type[Machine[Any]], spec: Spec, state: str) -> Runner:
    runner = Runner(cls.from_spec(spec.config, 0))
    for raw in spec.reach.get(state, []):
        runner.step(raw)
    assert str(runner.machine.state) == state, f"reach path for {state} ends elsewhere"
    return runner


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_every_state_event_pair_is_in_table_or_raises_unchanged(name: str) -> None:
    cls, spec = _spec(name)
    table = spec.table()
    for state in spec.states:
        for event_cls in cls.EVENTS:
            runner = _reach(cls, spec, state)
            m = runner.machine
            event = event_cls()
            kind = event_type(event)
            before = m.snapshot()
            targets = table.get(state, {}).get(kind)
            if targets is None:
                with pytest.raises(IllegalTransition) as info:
                    m.handle(event, runner.now)
                assert (info.value.state, info.value.event) == (state, kind)
                assert m.snapshot() == before, f"{name}: {state} x {kind} changed the machine"
            else:
                m.handle(event, max(runner.now, min(m.next_deadline(), runner.now + 3600)))
                assert str(m.state) in targets


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_every_transition_is_exercised(name: str) -> None:
    """Each (from, event, to) row is taken by some scenario or reach path: no dead rows."""
    cls, spec = _spec(name)
    seen: set[tuple[str, str, str]] = set()
    for scenario in spec.scenarios:
        seen |= {step.transition for step in replay(cls, spec, scenario)}
    for state, path in spec.reach.items():
        runner = Runner(cls.from_spec(spec.config, 0))
        seen |= {runner.step(raw).transition for raw in path}
        assert str(runner.machine.state) == state
    missing = sorted(set(spec.transitions) - seen)
    assert not missing, f"{name}: rows never taken by a scenario: {missing}"


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_committed_diagram_is_fresh(name: str) -> None:
    cls, _ = _spec(name)
    committed = (SPEC_DIR / f"{name}.mmd").read_text(encoding="utf-8")
    assert committed == mermaid(cls), (
        f"specs/{name}.mmd is stale: run `python -m voiceactors specs`"
    )
