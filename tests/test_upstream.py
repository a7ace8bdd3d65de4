"""The upstream actor against the simulator: every fault class, in virtual time.

Each test runs one session (the upstream actor plus a scripted client actor) against an
in-process simulator with a fault plan, then checks what the client saw, what the
simulator received (no user audio lost), and how the session ended. The plugin's leak
check then proves nothing was left behind.
"""

from __future__ import annotations

import random
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from voiceactors.machines import reconnect as rc
from voiceactors.machines.breaker import Config as BreakerConfig
from voiceactors.messages import AudioFrame, UpstreamStatus
from voiceactors.realtime import (
    ConversationItemCreate,
    ErrorEvent,
    FunctionCallOutputItem,
    ResponseCreate,
    ResponseDone,
    ResponseOutputAudioDelta,
    Session,
    UnknownServerEvent,
)
from voiceactors.realtime.events import BETA_EVENT_NAMES
from voiceactors.session import Session as VSession
from voiceactors.sim.faults import Fault, FaultPlan
from voiceactors.testing import stamps
from voiceactors.testing.sim import open_simulator
from voiceactors.upstream import (
    BreakerRegistry,
    Endpoint,
    PoolConfig,
    UpstreamActor,
    UpstreamConfig,
    WarmPool,
)

AUDIO = Path(__file__).parent / "fixtures" / "audio"
FRAME = 960  # 20 ms of PCM16 at 24 kHz


def _speech(name: str = "order_24k.wav") -> bytes:
    with wave.open(str(AUDIO / name)) as w:
        return w.readframes(w.getnframes())


def _silence(ms: int) -> bytes:
    return b"\0\0" * (24 * ms)


@dataclass
class Outcome:
    reason: str
    code: int
    detail: str
    events: list[Any]
    sent_audio: bytes
    actor: UpstreamActor
    sim: Any
    statuses: list[UpstreamStatus] = field(default_factory=list)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def completed(self) -> list[ResponseDone]:
        return [e for e in self.of(ResponseDone) if e.response.status == "completed"]


async def run_session(
    *faults: Fault,
    audio: bytes | None = None,
    responses: int = 1,
    reconnect: rc.Config | None = None,
    breakers: BreakerRegistry | None = None,
    pool: WarmPool | None = None,
    sim: Any = None,
    tail_silence_ms: int = 1500,
    stall_timeout: float = 3.0,
    max_time: float = 120.0,
    **sim_config: Any,
) -> Outcome:
    """Stream ``audio`` (then silence) in 20 ms frames until ``responses`` completed."""
    audio = _speech() if audio is None else audio
    audio += _silence(tail_silence_ms)

    async def body(running: Any) -> Outcome:
        endpoint = Endpoint(running.url, model="gpt-realtime")
        actor = UpstreamActor(
            endpoint,
            breakers=breakers or BreakerRegistry(),
            session=Session(instructions="You take orders."),
            pool=pool,
            config=UpstreamConfig(
                reconnect=reconnect or rc.Config(cap=1.0, retry_budget=30.0),
                stall_timeout=stall_timeout,
            ),
            rng=random.Random(5),
        )
        s = VSession("upstream-test", max_duration=max_time)
        inbox = s.edge("to-upstream", 16)
        out = s.edge("from-upstream", 256)
        events: list[Any] = []
        sent = bytearray()

        async def client() -> None:
            done = trio.Event()

            async def listen() -> None:
                if True:  # the receiver stays open: the session closes it at the end
                    async for ev in out.receiver:
                        events.append(ev)
                        finished = [
                            e
                            for e in events
                            if isinstance(e, ResponseDone) and e.response.status == "completed"
                        ]
                        if len(finished) >= responses:
                            done.set()
                            return

            async with trio.open_nursery() as n:
                n.start_soon(listen)
                async with inbox.sender:
                    seq = 0
                    while seq * FRAME < len(audio) or not done.is_set():
                        chunk = audio[seq * FRAME : (seq + 1) * FRAME].ljust(FRAME, b"\0")
                        chunk = stamps.stamp(chunk, seq)
                        await inbox.sender.send(
                            AudioFrame(pcm=chunk, seq=seq, captured_at=trio.current_time())
                        )
                        sent.extend(chunk)
                        seq += 1
                        await trio.sleep(0.02)

        s.actor("upstream", actor.run, inbox.receiver, out.sender)
        s.actor("client", client, ends_session="client_end")
        summary = await s.run()
        return Outcome(
            summary.reason,
            summary.code,
            summary.detail,
            events,
            bytes(sent),
            actor,
            running.sim,
            [e for e in events if isinstance(e, UpstreamStatus)],
        )

    with trio.fail_after(max_time + 60):
        if sim is not None:
            return await body(sim)
        async with open_simulator(faults=FaultPlan(tuple(faults)), seed=3, **sim_config) as running:
            return await body(running)


def assert_no_audio_lost(o: Outcome) -> None:
    """Each connection got a contiguous run of the frames sent, and the runs leave no gap."""
    received = [conn.received_audio for conn in o.sim.connections]
    stamps.assert_no_audio_lost(o.sent_audio, received, FRAME)


async def test_a_turn_completes_through_the_actor(autojump_clock) -> None:
    o = await run_session()
    assert o.reason == "client_end"
    assert len(o.completed()) == 1
    assert o.of(ResponseOutputAudioDelta), "no agent audio came back"
    assert o.sim.connections_seen == 1
    first = o.sim.connections[0].received_events[0]
    assert type(first).__struct_config__.tag == "session.update"
    assert first.session.instructions == "You take orders."
    assert_no_audio_lost(o)


async def test_drop_mid_response_recovers_with_replay_and_no_audio_lost(autojump_clock) -> None:
    o = await run_session(Fault("drop", connection=0, on_sent="response.output_audio.delta", nth=3))
    assert o.reason == "client_end"
    assert o.sim.connections_seen == 2
    # The cut-off response was closed for the client and asked for again.
    statuses = [e.response.status for e in o.of(ResponseDone)]
    assert statuses[0] == "incomplete" and statuses[-1] == "completed"
    second = o.sim.connections[1]
    kinds = (
        second.event_types()
        if callable(getattr(second, "event_types", None))
        else [type(e).__struct_config__.tag for e in second.received_events]
    )
    assert kinds[0] == "session.update"
    replayed = [e for e in second.received_events if isinstance(e, ConversationItemCreate)]
    user_items = [e.item for e in replayed if getattr(e.item, "role", None) == "user"]
    assert user_items, "the user's committed turn was not replayed"
    assert user_items[0].id in o.sim.connections[0].committed_audio
    assert any(isinstance(e, ResponseCreate) for e in second.received_events)
    assert [s.state for s in o.statuses][-1] == "reconnected"
    assert o.actor.reconnects == 1
    assert_no_audio_lost(o)


async def test_close_with_code_reconnects(autojump_clock) -> None:
    o = await run_session(Fault("close", connection=0, code=1011, after_received=40))
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == 2
    assert_no_audio_lost(o)


async def test_stall_during_a_response_is_detected_and_recovered(autojump_clock) -> None:
    o = await run_session(
        Fault("stall", connection=0, on_sent="response.output_audio.delta", nth=1),
        stall_timeout=2.0,
    )
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == 2
    assert_no_audio_lost(o)


async def test_slow_events_are_not_a_stall(autojump_clock) -> None:
    o = await run_session(Fault("slow", delay_ms=200.0, jitter_ms=50.0), stall_timeout=2.0)
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == 1


async def test_malformed_frame_is_skipped_and_counted(autojump_clock) -> None:
    o = await run_session(Fault("malformed", connection=0, after_sent=3))
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.actor.protocol_errors == 1
    assert o.sim.connections_seen == 1


async def test_unknown_and_beta_events_pass_through_counted(autojump_clock) -> None:
    o = await run_session(
        Fault("unknown_event", connection=0, after_sent=2, event_type="response.future_event"),
        Fault("beta_name", connection=0, on_sent="response.created", count=1),
    )
    assert o.reason == "client_end" and len(o.completed()) == 1
    unknown = {e.type for e in o.of(UnknownServerEvent)}
    assert "response.future_event" in unknown
    assert unknown & BETA_EVENT_NAMES, "the beta-named event was not passed through"
    assert o.sim.connections_seen == 1


async def test_recoverable_error_event_is_forwarded_and_the_session_goes_on(autojump_clock) -> None:
    o = await run_session(
        Fault("error", connection=0, after_sent=2, error_code="rate_limit_exceeded")
    )
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert [e.error.code for e in o.of(ErrorEvent)] == ["rate_limit_exceeded"]
    assert o.sim.connections_seen == 1


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_refused_handshake_is_retried(autojump_clock, status: int) -> None:
    o = await run_session(Fault("reject", connection=0, status=status))
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == 2


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_end_the_session_at_once(autojump_clock, status: int) -> None:
    o = await run_session(Fault("reject", status=status))
    assert (o.reason, o.code) == ("upstream_failed", 1011)
    assert o.sim.connections_seen == 1


async def test_invalid_api_key_error_is_fatal(autojump_clock) -> None:
    o = await run_session(
        api_key="sk-the-right-one"
    )  # we send none: the sim answers invalid_api_key
    assert (o.reason, o.code) == ("upstream_failed", 1011)
    assert "invalid_api_key" in o.detail
    assert o.sim.connections_seen == 1


async def test_session_expiry_is_a_planned_reconnect(autojump_clock) -> None:
    o = await run_session(Fault("expire", connection=0, after_received=60))
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == 2
    assert not o.of(ErrorEvent), "the client should not see the upstream's session_expired"
    assert_no_audio_lost(o)


async def test_accepted_then_closed_repeatedly_ends_the_session(autojump_clock) -> None:
    o = await run_session(
        Fault("close", code=1011, after_sent=1),
        reconnect=rc.Config(cap=0.5, max_quick_failures=3, retry_budget=30.0),
    )
    assert (o.reason, o.code) == ("upstream_failed", 1011)
    assert 3 <= o.sim.connections_seen <= 4


async def test_retry_budget_is_explicit(autojump_clock) -> None:
    o = await run_session(
        Fault("reject", status=503),
        reconnect=rc.Config(cap=1.0, retry_budget=5.0),
        # A breaker that never opens, so the budget is what ends it.
        breakers=BreakerRegistry(
            BreakerConfig(sliding_window_type="time", minimum_number_of_calls=10_000)
        ),
    )
    assert (o.reason, o.code) == ("upstream_failed", 1011)
    assert "budget" in o.detail
    # Full jitter within a 5 s budget and a 1 s cap: a handful of attempts, not a storm.
    assert 3 <= o.sim.connections_seen <= 40


async def test_open_breaker_fails_new_sessions_fast(autojump_clock) -> None:
    breakers = BreakerRegistry(BreakerConfig(minimum_number_of_calls=2, sliding_window_size=4))
    async with open_simulator() as running:
        breaker = breakers.get(Endpoint(running.url, model="gpt-realtime"))
        for _ in range(2):
            breaker.try_acquire(trio.current_time())
            breaker.record(False, 0.1, trio.current_time())
        started = trio.current_time()
        o = await run_session(breakers=breakers, sim=running)
        assert (o.reason, o.code) == ("upstream_unavailable", 1013)
        assert "circuit open" in o.detail
        assert trio.current_time() - started < 0.1
        assert running.sim.connections_seen == 0


async def test_planned_recycle_waits_for_the_response_and_loses_nothing(autojump_clock) -> None:
    o = await run_session(
        audio=_speech() + _silence(1500) + _speech("menu_24k.wav"),
        responses=2,
        reconnect=rc.Config(cap=1.0, recycle_after=6.5, stable_after=5.0),
    )
    assert o.reason == "client_end" and len(o.completed()) == 2
    assert o.sim.connections_seen >= 2
    assert not [e for e in o.of(ResponseDone) if e.response.status != "completed"], (
        "a recycle cut a response"
    )
    assert_no_audio_lost(o)


async def test_session_starts_from_the_warm_pool_without_a_handshake(autojump_clock) -> None:
    breakers = BreakerRegistry()
    async with open_simulator() as running, trio.open_nursery() as nursery:
        endpoint = Endpoint(running.url, model="gpt-realtime")
        pool = WarmPool(endpoint, breakers, PoolConfig(size=2))
        await nursery.start(pool.run)
        with trio.fail_after(10):
            await pool.wait_filled()
        o = await run_session(breakers=breakers, pool=pool, sim=running)
        assert o.reason == "client_end" and len(o.completed()) == 1
        assert pool.taken == 1
        # The pool refilled behind the session's back: no session waited for a handshake.
        with trio.fail_after(10):
            await pool.wait_filled()
        assert running.sim.connections_seen == 3
        nursery.cancel_scope.cancel()


async def test_tool_output_sent_during_an_outage_is_delivered_once(autojump_clock) -> None:
    """A function output recorded while disconnected arrives exactly once after replay."""
    async with open_simulator(
        faults=FaultPlan((Fault("drop", connection=0, after_received=5),))
    ) as running:
        endpoint = Endpoint(running.url, model="gpt-realtime")
        actor = UpstreamActor(
            endpoint,
            breakers=BreakerRegistry(),
            rng=random.Random(1),
            config=UpstreamConfig(reconnect=rc.Config(cap=1.0)),
        )
        s = VSession()
        inbox = s.edge("in", 8)
        out = s.edge("out", 64)

        async def client() -> None:
            async with inbox.sender, out.receiver:
                for i in range(10):
                    await inbox.sender.send(AudioFrame(pcm=_silence(20), seq=i))
                await inbox.sender.send(
                    ConversationItemCreate(
                        item=FunctionCallOutputItem(call_id="call_1", output='{"ok": true}')
                    )
                )
                async for msg in out.receiver:  # wait until the actor says it is back
                    if isinstance(msg, UpstreamStatus) and msg.state == "reconnected":
                        break
                await trio.sleep(1.0)  # virtual time: the replayed events reach the simulator

        s.actor("upstream", actor.run, inbox.receiver, out.sender)
        s.actor("client", client, ends_session="client_end")
        with trio.fail_after(60):
            await s.run()
        outputs = [
            e
            for c in running.sim.connections
            for e in c.received_events
            if isinstance(e, ConversationItemCreate) and isinstance(e.item, FunctionCallOutputItem)
        ]
        on_last = [e for e in running.sim.connections[-1].received_events if e in outputs]
        assert len(on_last) == 1 and on_last[0].item.call_id == "call_1"
