"""The session nursery with test actors: every way a session ends, and edge policies.

Each test also runs under the plugin's leak check (no task, deadline or open edge left).
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from voiceactors.channels import Full, open_edge
from voiceactors.messages import AudioFrame
from voiceactors.session import EndSession, Session
from voiceactors.testing.leaks import live_tasks


def _frame(seq: int) -> AudioFrame:
    return AudioFrame(pcm=b"\0\0" * 480, seq=seq, captured_at=trio.current_time())


async def _produce(out, n: int, interval: float = 0.02) -> None:
    async with out:
        for seq in range(n):
            await out.send(_frame(seq))
            await trio.sleep(interval)


async def _relay(inbox, out) -> None:
    async with inbox, out:
        async for msg in inbox:
            await out.send(msg)


async def _collect(inbox, seen: list[int]) -> None:
    async with inbox:
        async for msg in inbox:
            seen.append(msg.seq)


def _pipeline(n: int, *, capture_ends: bool = True) -> tuple[Session, list[int]]:
    s = Session("s-test")
    a = s.edge("capture->upstream", 4)
    b = s.edge("upstream->playback", 4)
    seen: list[int] = []
    s.actor("capture", _produce, a.sender, n, ends_session="client_end" if capture_ends else None)
    s.actor("upstream", _relay, a.receiver, b.sender)
    s.actor("playback", _collect, b.receiver, seen)
    return s, seen


async def test_all_actors_finish_on_their_own(autojump_clock) -> None:
    s, seen = _pipeline(50, capture_ends=False)
    summary = await s.run()
    assert seen == list(range(50))
    assert (summary.reason, summary.code) == ("completed", 1000)
    assert {a.outcome for a in summary.actors} == {"returned"}
    assert summary.edges["capture->upstream"]["sent"] == 50
    assert summary.edges["capture->upstream"]["dropped"] == 0
    assert all(e.closed for e in s.edges)


async def test_client_end_cancels_the_rest(autojump_clock) -> None:
    s = Session()
    inbox = s.edge("in", 2)

    async def client() -> None:
        await trio.sleep(1.5)  # the client talks for 1.5 s, then hangs up

    async def upstream(rx) -> None:
        async with rx:
            await trio.sleep_forever()

    s.actor("capture", client, ends_session="client_end")
    s.actor("upstream", upstream, inbox.receiver)
    inbox.sender.close()
    summary = await s.run()
    assert summary.reason == "client_end"
    assert summary.duration == pytest.approx(1.5)
    assert [(a.name, a.outcome) for a in summary.actors] == [
        ("capture", "returned"),
        ("upstream", "cancelled"),
    ]


async def test_end_session_carries_reason_and_code(autojump_clock) -> None:
    s = Session()

    async def upstream() -> None:
        await trio.sleep(0.3)
        raise EndSession("upstream_fatal", 1011, "invalid_api_key")

    s.actor("upstream", upstream)
    s.actor("watchdog", trio.sleep_forever)
    summary = await s.run()
    assert (summary.reason, summary.code, summary.detail) == ("upstream_fatal", 1011, "invalid_api_key")
    assert summary.error is None


async def test_a_bug_in_an_actor_ends_only_its_session(autojump_clock) -> None:
    async def buggy() -> None:
        await trio.sleep(0.1)
        raise ZeroDivisionError("oops")

    good, _ = _pipeline(20, capture_ends=True)
    bad = Session("bad")
    bad.actor("tool-runner", buggy)
    bad.actor("playback", trio.sleep_forever)
    results = {}

    async def run(s: Session) -> None:
        results[s.id] = await s.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, good)
        nursery.start_soon(run, bad)
    assert results["bad"].reason == "internal_error"
    assert results["bad"].code == 1011
    assert "ZeroDivisionError" in (results["bad"].error or "")
    assert results["s-test"].reason == "client_end"


async def test_first_reason_wins(autojump_clock) -> None:
    s = Session()

    async def ender(reason: str, after: float) -> None:
        await trio.sleep(after)
        raise EndSession(reason)

    s.actor("a", ender, "first", 0.5)
    s.actor("b", ender, "second", 1.0)
    assert (await s.run()).reason == "first"


async def test_max_duration(autojump_clock) -> None:
    s = Session(max_duration=30.0)
    s.actor("idle", trio.sleep_forever)
    summary = await s.run()
    assert (summary.reason, summary.code) == ("max_duration", 1001)
    assert summary.duration == pytest.approx(30.0)


async def test_outside_cancellation_raises_and_leaves_a_summary(autojump_clock) -> None:
    s, _ = _pipeline(10_000)
    with trio.move_on_after(2.0) as scope:
        await s.run()
    assert scope.cancelled_caught
    assert s.summary is not None and s.summary.reason == "cancelled"
    assert all(e.closed for e in s.edges)


async def test_end_before_run_ends_at_once(autojump_clock) -> None:
    s, seen = _pipeline(10)
    s.end("client_end")
    summary = await s.run()
    assert summary.reason == "client_end" and summary.duration == 0
    assert seen == []


async def test_run_twice_is_refused(autojump_clock) -> None:
    s, _ = _pipeline(1)
    await s.run()
    with pytest.raises(RuntimeError, match="already ran"):
        await s.run()
    with pytest.raises(RuntimeError):
        s.edge("late", 1)


async def test_block_edge_applies_backpressure() -> None:
    edge = open_edge("block", 2, Full.BLOCK)
    edge.sender.send_nowait(1)
    edge.sender.send_nowait(2)
    with pytest.raises(trio.WouldBlock):
        edge.sender.send_nowait(3)
    with trio.move_on_after(0.01) as scope:  # a full BLOCK edge makes the sender wait
        await edge.sender.send(3)
    assert scope.cancelled_caught
    assert [edge.receiver.receive_nowait(), edge.receiver.receive_nowait()] == [1, 2]
    assert edge.stats.as_dict() == {"sent": 2, "dropped": 0, "high_water": 2}
    edge.close()


async def test_drop_oldest_edge_keeps_the_newest() -> None:
    edge = open_edge("meter", 3, Full.DROP_OLDEST)
    for i in range(10):
        await edge.sender.send(i)
    assert [edge.receiver.receive_nowait() for _ in range(3)] == [7, 8, 9]
    assert edge.stats.dropped == 7 and edge.stats.sent == 10
    edge.receiver.close()
    with pytest.raises(trio.BrokenResourceError):
        for i in range(5):
            edge.sender.send_nowait(i)
    edge.close()
    assert edge.closed


def test_edge_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        open_edge("zero", 0)


async def test_many_sessions_cancelled_at_random_points_leave_nothing(autojump_clock) -> None:
    """Open 200 sessions with random shapes; cancel each at a random (seeded) moment."""
    rng = random.Random(20261121)
    summaries = []
    baseline = len(live_tasks())

    async def one(i: int) -> None:
        s = Session(f"stress-{i}", max_duration=rng.choice([1.0, 60.0]))
        edges = [s.edge(f"e{j}", rng.randint(1, 4), rng.choice(list(Full))) for j in range(3)]

        async def chatter(tx, rx, period: float) -> None:
            async with tx, rx:
                while True:
                    await trio.sleep(period)
                    with trio.move_on_after(period):
                        await rx.receive()
                    await tx.send(_frame(0))

        for j in range(3):
            s.actor(f"a{j}", chatter, edges[j].sender, edges[(j + 1) % 3].receiver, rng.uniform(0.01, 0.2))
        if rng.random() < 0.2:
            s.actor("crasher", _crash_after, rng.uniform(0, 2))
        with trio.move_on_after(rng.uniform(0, 3)):
            summaries.append(await s.run())
        if s.summary is not None and s.summary.reason == "cancelled":
            summaries.append(s.summary)
        assert all(e.closed for e in s.edges)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert len(summaries) == 200
    reasons = {s.reason for s in summaries}
    assert {"cancelled", "max_duration", "internal_error"} <= reasons
    assert len(live_tasks()) == baseline


async def _crash_after(delay: float) -> None:
    await trio.sleep(delay)
    raise RuntimeError("injected")
