"""The leak check itself: it must fail on each kind of leak and pass on a clean run."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from voiceactors.channels import open_edge
from voiceactors.testing.leaks import LeakError, leak_checked_run, live_tasks


def test_clean_run_passes() -> None:
    async def clean() -> int:
        edge = open_edge("e", 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 1)
        edge.close()
        return 42

    assert leak_checked_run(clean, clock=trio.testing.MockClock(autojump_threshold=0)) == 42


def test_open_channel_is_a_leak() -> None:
    async def forgets_to_close() -> None:
        open_edge("forgotten", 2)

    with pytest.raises(LeakError, match="channels not closed: <Edge forgotten"):
        leak_checked_run(forgets_to_close)


def test_half_closed_channel_is_a_leak() -> None:
    async def closes_one_end() -> None:
        open_edge("half", 2).sender.close()

    with pytest.raises(LeakError, match="half"):
        leak_checked_run(closes_one_end)


def test_task_and_deadline_left_behind_are_leaks() -> None:
    async def orphan() -> None:
        await trio.sleep(3600)

    async def spawns_system_task() -> None:
        trio.lowlevel.spawn_system_task(orphan, name="orphan")
        await trio.testing.wait_all_tasks_blocked()

    with pytest.raises(LeakError) as info:
        leak_checked_run(spawns_system_task)
    assert "tasks still alive: orphan" in str(info.value)
    assert "deadline is still pending" in str(info.value)


def test_live_tasks_sees_nested_children() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever, name="child")
            await trio.testing.wait_all_tasks_blocked()
            assert "child" in {t.name for t in live_tasks()}
            nursery.cancel_scope.cancel()

    leak_checked_run(main)


async def test_plugin_tracks_edges_in_trio_tests() -> None:
    from voiceactors import channels

    assert channels._tracker is not None
    edge = open_edge("tracked", 1)
    assert edge in channels._tracker
    edge.close()


def test_plugin_fails_a_leaking_test(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        import trio
        from voiceactors.channels import open_edge

        async def test_leaks_an_edge():
            open_edge("leaky", 1)

        async def test_clean():
            open_edge("fine", 1).close()

        def test_sync_tests_are_untouched():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "voiceactors.testing.plugin")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*LeakError: channels not closed: <Edge leaky*"])
