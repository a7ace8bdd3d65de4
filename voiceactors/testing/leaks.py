"""Proof that a test left nothing behind: tasks, pending deadlines, open channels.

``leak_checked_run`` wraps ``trio.run`` for one test. It records every task spawned
(through a ``trio.abc.Instrument``) and every edge opened with
``voiceactors.channels.open_edge``. When the test and all of its fixtures have finished,
still inside the Trio run, it checks that

* no task spawned during the test is still alive,
* no deadline is pending (``trio.lowlevel.current_statistics()``), and
* every edge opened during the test is closed at both ends,

and raises ``LeakError`` listing each offender otherwise. The pytest plugin
(``voiceactors.testing.plugin``) installs it for every Trio test through the autouse
``leak_check`` fixture.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from .. import channels

__all__ = ["LeakError", "TaskLedger", "leak_checked_run", "live_tasks"]

T = TypeVar("T")


class LeakError(AssertionError):
    """A test left tasks, deadlines or channels behind."""


class TaskLedger(trio.abc.Instrument):
    """Knows which tasks are alive, in spawn order."""

    def __init__(self) -> None:
        self.alive: dict[trio.lowlevel.Task, None] = {}

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.alive[task] = None

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.alive.pop(task, None)


def live_tasks() -> list[trio.lowlevel.Task]:
    """Every task of the current run, found by walking the task tree from the root."""
    out: list[trio.lowlevel.Task] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        out.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return out


def leak_checked_run(
    fn: Callable[[], Awaitable[T]],
    *,
    clock: trio.abc.Clock | None = None,
    instruments: Sequence[trio.abc.Instrument] = (),
    run: Callable[..., Any] = trio.run,
) -> T:
    """``trio.run(fn)``, then prove nothing was left behind (see module doc)."""
    ledger = TaskLedger()

    async def main() -> T:
        me = trio.lowlevel.current_task()
        baseline = set(ledger.alive)
        opened: list[channels.Edge[object]] = []
        previous, channels._tracker = channels._tracker, opened
        try:
            result = await fn()
        finally:
            channels._tracker = previous
        problems = []
        leaked = [t for t in ledger.alive if t not in baseline and t is not me]
        leaked = [t for t in leaked if not _is_trio_internal(t)]
        if leaked:
            problems.append("tasks still alive: " + ", ".join(t.name for t in leaked))
        pending = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if not math.isinf(pending):
            problems.append(f"a deadline is still pending ({pending:.3f} s from now)")
        open_edges = [e for e in opened if not e.closed]
        if open_edges:
            problems.append("channels not closed: " + ", ".join(map(repr, open_edges)))
        if problems:
            raise LeakError("; ".join(problems))
        return result

    return run(main, clock=clock, instruments=[ledger, *instruments])  # type: ignore[no-any-return]


def _is_trio_internal(task: trio.lowlevel.Task) -> bool:
    # MockClock's autojump helper is a system task trio starts on demand.
    return task.name.startswith("trio.") or "autojump" in task.name
