"""The TCP fault proxy, then the upstream actor and the gateway surviving socket-level faults.

First each toxic on raw TCP (a recording echo server behind the proxy), then a session
(the upstream actor and a scripted client, as in test_upstream.py) whose upstream goes
client -> proxy -> simulator, with the fault injected at a chosen moment of the session.
User audio is stamped with its sequence number, so "nothing lost" is checked frame by frame
against what the simulator received.

Rules: loopback only, virtual time (``autojump_clock``), every test under ``fail_after``,
no sleeping to wait for something; the plugin's leak check runs after each test.
"""

from __future__ import annotations

import random
import sys
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from voiceactors.machines import reconnect as rc
from voiceactors.messages import AudioFrame, UpstreamStatus
from voiceactors.realtime import ResponseDone, ResponseOutputAudioDelta, Session
from voiceactors.runtime import RuntimeConfig
from voiceactors.session import Session as VSession
from voiceactors.sim.config import SimConfig
from voiceactors.testing import stamps
from voiceactors.testing.gateway import open_gateway
from voiceactors.testing.proxy import FaultProxy, Toxics, open_proxy
from voiceactors.testing.sim import connect_client, open_simulator
from voiceactors.upstream import (
    BreakerRegistry,
    Endpoint,
    PoolConfig,
    UpstreamActor,
    UpstreamConfig,
)

AUDIO = Path(__file__).parent / "fixtures" / "audio"
FRAME = 960  # 20 ms of PCM16 at 24 kHz
TIMEOUT = 60  # virtual seconds; every test ends far sooner


# -- raw TCP -------------------------------------------------------------------------------


@dataclass
class Recorder:
    """What the echo server saw: bytes and reads per connection, and how each ended."""

    received: list[bytearray] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    endings: list[str] = field(default_factory=list)
    eof_at: list[float] = field(default_factory=list)
    echo: bool = True
    ended: trio.Event = field(default_factory=trio.Event)  # a connection ended


@asynccontextmanager
async def echo_server(rec: Recorder) -> AsyncIterator[int]:
    async def handle(stream: trio.SocketStream) -> None:
        i = len(rec.received)
        rec.received.append(bytearray())
        rec.reads.append(0)
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    rec.received[i] += data
                    rec.reads[i] += 1
                    if rec.echo:
                        await stream.send_all(data)
                rec.eof_at.append(trio.current_time())
                rec.endings.append("eof")
        except trio.BrokenResourceError:
            rec.endings.append("reset")
        rec.ended.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxied(rec: Recorder, **toxics: Any) -> AsyncIterator[FaultProxy]:
    with trio.fail_after(TIMEOUT):
        async with echo_server(rec) as port, open_proxy(port, seed=7) as proxy:
            if toxics:
                proxy.set(**toxics)
            yield proxy


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


async def test_without_toxics_bytes_pass_intact_and_are_counted(autojump_clock) -> None:
    rec = Recorder()
    payload = random.Random(1).randbytes(300_000)
    async with proxied(rec) as proxy:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            async with trio.open_nursery() as n:
                n.start_soon(s.send_all, payload)
                assert await receive_exactly(s, len(payload)) == payload
            await s.send_eof()
            assert await s.receive_some(1) == b""  # the EOF came back through the proxy
        assert proxy.counters.connections == 1
        assert proxy.counters.bytes_upstream == proxy.counters.bytes_downstream == len(payload)
    assert rec.endings == ["eof"]


async def test_latency_with_jitter_delays_each_direction(autojump_clock) -> None:
    rec = Recorder()
    async with proxied(rec, latency_ms=200, jitter_ms=50) as proxy:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            rtts = []
            for i in range(20):
                started = trio.current_time()
                await s.send_all(b"ping %d" % i)
                assert await receive_exactly(s, len(b"ping %d" % i)) == b"ping %d" % i
                rtts.append(trio.current_time() - started)
    assert all(0.3 <= r <= 0.5 for r in rtts), rtts
    assert len({round(r, 4) for r in rtts}) > 5, "jitter should vary the delay"


async def test_latency_delays_without_cutting_throughput(autojump_clock) -> None:
    rec = Recorder(echo=False)
    async with proxied(rec) as proxy:
        proxy.set("upstream", latency_ms=500)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            started = trio.current_time()
            for _ in range(40):  # 40 writes 10 ms apart: not 40 x 500 ms
                await s.send_all(b"x" * 1000)
                await trio.sleep(0.01)
            await s.send_eof()
            with trio.fail_after(5):
                await rec.ended.wait()
    assert len(rec.received[0]) == 40_000
    # Held back by 0.5 s, not by 40 x 0.5 s.
    assert 0.9 <= rec.eof_at[0] - started <= 1.2


async def test_bandwidth_caps_bytes_per_second(autojump_clock) -> None:
    rec = Recorder()
    async with proxied(rec) as proxy:
        proxy.set("upstream", bandwidth=10_000)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            started = trio.current_time()
            async with trio.open_nursery() as n:
                n.start_soon(s.send_all, b"y" * 50_000)
                assert len(await receive_exactly(s, 50_000)) == 50_000
            elapsed = trio.current_time() - started
    assert 4.5 <= elapsed <= 5.5


async def test_slicer_splits_writes_into_small_delayed_pieces(autojump_clock) -> None:
    rec = Recorder(echo=False)
    payload = bytes(range(256)) * 2
    async with proxied(rec) as proxy:
        proxy.set("upstream", slice_bytes=2, slice_variation=1, slice_delay_ms=1)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            await s.send_all(payload)
            await s.send_eof()
            with trio.fail_after(5):
                await rec.ended.wait()
    assert bytes(rec.received[0]) == payload
    assert rec.reads[0] >= len(payload) // 3, "pieces of 1-3 bytes should arrive one by one"


async def test_blackhole_holds_data_and_closes_nothing_until_cleared(autojump_clock) -> None:
    rec = Recorder()
    async with proxied(rec) as proxy:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            await s.send_all(b"before")
            assert await receive_exactly(s, 6) == b"before"
            proxy.set("downstream", blackhole=True)
            await s.send_all(b"during")
            with trio.move_on_after(30) as waited:
                await s.receive_some(100)
            assert waited.cancelled_caught, "a blackhole must deliver nothing"
            assert bytes(rec.received[0]) == b"beforeduring"  # the other way still flows
            assert rec.endings == [] and proxy.counters.active == 1
            proxy.clear()
            assert await receive_exactly(s, 6) == b"during"


async def test_blackhole_pushes_back_instead_of_buffering(autojump_clock) -> None:
    rec = Recorder(echo=False)
    async with proxied(rec, blackhole=True) as proxy:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            sent = 0
            with trio.move_on_after(5):
                while True:
                    await s.send_all(b"z" * 65536)
                    sent += 65536
            # The proxy holds at most its queue; the rest waits in kernel buffers.
            assert sent < 64 * 1024 * 1024
            assert rec.received == [bytearray()] or rec.received == []
            assert proxy.counters.bytes_upstream == 0


async def test_reset_aborts_every_connection_and_both_peers_see_it(autojump_clock) -> None:
    rec = Recorder()
    async with proxied(rec) as proxy:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            await s.send_all(b"hello")
            assert await receive_exactly(s, 5) == b"hello"
            assert proxy.reset() == 1
            with pytest.raises(trio.BrokenResourceError):
                await s.receive_some(10)
        with trio.fail_after(5):
            await rec.ended.wait()
        assert rec.endings == ["reset"]
        assert proxy.counters.resets == 1 and proxy.counters.active == 0


async def test_limit_data_closes_after_n_bytes(autojump_clock) -> None:
    rec = Recorder(echo=False)
    async with proxied(rec) as proxy:
        proxy.set("upstream", limit_bytes=100)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            await s.send_all(b"a" * 300)
            assert await s.receive_some(10) == b""  # the proxy closed the path
        with trio.fail_after(5):
            await rec.ended.wait()
    assert bytes(rec.received[0]) == b"a" * 100 and rec.endings == ["eof"]


async def test_slow_close_delays_the_eof(autojump_clock) -> None:
    rec = Recorder(echo=False)
    async with proxied(rec) as proxy:
        proxy.set("upstream", slow_close_ms=3000)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
            await s.send_all(b"bye")
            closed_at = trio.current_time()
            await s.send_eof()
            with trio.fail_after(10):
                await rec.ended.wait()
    assert bytes(rec.received[0]) == b"bye"
    assert 3.0 <= rec.eof_at[0] - closed_at <= 3.1


async def test_down_refuses_and_resets_up_accepts_again(autojump_clock) -> None:
    rec = Recorder()
    async with proxied(rec) as proxy:
        s = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with s:
            await s.send_all(b"x")
            assert await receive_exactly(s, 1) == b"x"
            proxy.down()
            with pytest.raises(trio.BrokenResourceError):
                await s.receive_some(1)
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", proxy.port)
        proxy.up()
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as again:
            await again.send_all(b"back")
            assert await receive_exactly(again, 4) == b"back"
        assert proxy.counters.connections == 2


async def test_a_refusing_target_resets_the_client(autojump_clock) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_proxy(1) as proxy:  # nothing listens on port 1
            async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as s:
                with pytest.raises(trio.BrokenResourceError):
                    await s.send_all(b"x" * 10)
                    await s.receive_some(1)
            assert proxy.counters.refused == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"latency_ms": -1},
        {"latency_ms": float("nan")},
        {"latency_ms": 10, "jitter_ms": 20},
        {"bandwidth": 0},
        {"slice_bytes": 0},
        {"limit_bytes": -5},
    ],
)
def test_bad_toxics_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Toxics(**bad)


async def test_set_with_an_unknown_toxic_changes_nothing(autojump_clock) -> None:
    async with proxied(Recorder(), latency_ms=10) as proxy:
        with pytest.raises(TypeError):
            proxy.set(latency_ms=50, nonsense=1)
        with pytest.raises(ValueError):
            proxy.set(latency_ms=50, jitter_ms=80)
        assert proxy.toxics("upstream") == proxy.toxics("downstream") == Toxics(latency_ms=10)


# -- the upstream actor through the proxy ---------------------------------------------------


def speech(name: str = "confirm_24k.wav") -> bytes:
    with wave.open(str(AUDIO / name)) as w:
        return w.readframes(w.getnframes())


@dataclass
class Outcome:
    reason: str
    code: int
    detail: str
    events: list[Any]
    sent_audio: bytes
    actor: UpstreamActor
    sim: Any
    proxy: FaultProxy

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def statuses(self) -> list[str]:
        return [e.state for e in self.of(UpstreamStatus)]

    def completed(self) -> list[ResponseDone]:
        return [e for e in self.of(ResponseDone) if e.response.status == "completed"]


#: Called with each event the client receives and the proxy: inject faults mid-session.
Script = Callable[[Any, FaultProxy], None]


async def run_session(
    script: Script | None = None,
    *,
    toxics: dict[str, Any] | None = None,
    audio: bytes | None = None,
    quiet_first_ms: int = 0,
    config: UpstreamConfig | None = None,
    max_time: float = 60.0,
) -> Outcome:
    """Stream stamped audio (after ``quiet_first_ms`` without any) through the proxy until
    a response completed; ``script`` sees every event the client gets."""
    audio = (speech() if audio is None else audio) + b"\0\0" * 24 * 1500

    with trio.fail_after(max_time + 30):
        async with open_simulator(seed=3) as running, open_proxy(running.port, seed=11) as proxy:
            if toxics:
                proxy.set(**toxics)
            actor = UpstreamActor(
                Endpoint(proxy.url_for("/v1/realtime"), model="gpt-realtime"),
                breakers=BreakerRegistry(),
                session=Session(instructions="You take orders."),
                config=config
                or UpstreamConfig(
                    reconnect=rc.Config(cap=1.0, retry_budget=30.0), stall_timeout=2.0
                ),
                rng=random.Random(5),
            )
            s = VSession("proxy-test", max_duration=max_time)
            inbox = s.edge("to-upstream", 16)
            out = s.edge("from-upstream", 256)
            events: list[Any] = []
            sent = bytearray()

            async def client() -> None:
                done = trio.Event()

                async def listen() -> None:
                    async for ev in out.receiver:
                        events.append(ev)
                        if script is not None:
                            script(ev, proxy)
                        if isinstance(ev, ResponseDone) and ev.response.status == "completed":
                            done.set()
                            return

                async with trio.open_nursery() as n:
                    n.start_soon(listen)
                    await trio.sleep(quiet_first_ms / 1000)
                    async with inbox.sender:
                        seq = 0
                        while seq * FRAME < len(audio) or not done.is_set():
                            chunk = audio[seq * FRAME : (seq + 1) * FRAME].ljust(FRAME, b"\0")
                            chunk = stamps.stamp(chunk, seq)
                            await inbox.sender.send(AudioFrame(pcm=chunk, seq=seq))
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
                proxy,
            )


def assert_no_audio_lost(o: Outcome) -> None:
    """The connections' runs of received frames are unaltered and leave no gap."""
    received = [conn.received_audio for conn in o.sim.connections]
    stamps.assert_no_audio_lost(o.sent_audio, received, FRAME)


def clear_on_reconnecting(ev: Any, proxy: FaultProxy) -> None:
    if isinstance(ev, UpstreamStatus) and ev.state == "reconnecting":
        proxy.clear()


async def test_a_turn_completes_through_the_proxy(autojump_clock) -> None:
    o = await run_session()
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.sim.connections_seen == o.proxy.counters.connections == 1
    assert o.proxy.counters.bytes_downstream > 100_000  # agent audio came through it
    assert_no_audio_lost(o)


async def test_blackhole_mid_response_is_a_stall_then_a_replayed_turn(autojump_clock) -> None:
    deltas = 0

    def script(ev: Any, proxy: FaultProxy) -> None:
        nonlocal deltas
        if isinstance(ev, ResponseOutputAudioDelta):
            deltas += 1
            if deltas == 2:
                proxy.set(blackhole=True)
        clear_on_reconnecting(ev, proxy)

    o = await run_session(script)
    assert o.reason == "client_end" and len(o.completed()) == 1
    statuses = [e.response.status for e in o.of(ResponseDone)]
    assert statuses[0] == "incomplete" and statuses[-1] == "completed"
    assert o.of(ResponseDone)[0].response.status_details.reason == "upstream_reconnected"
    assert "reconnected" in o.statuses() and o.actor.reconnects == 1
    assert o.proxy.counters.connections == 2
    assert_no_audio_lost(o)


async def test_blackhole_while_idle_is_caught_by_the_heartbeat(autojump_clock) -> None:
    seen = 0

    def script(ev: Any, proxy: FaultProxy) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:  # the session is configured and nothing was said yet: idle
            proxy.set(blackhole=True)
        clear_on_reconnecting(ev, proxy)

    config = UpstreamConfig(
        reconnect=rc.Config(cap=1.0, retry_budget=30.0),
        heartbeat_interval=2.0,
        heartbeat_timeout=1.0,
        stall_timeout=2.0,
    )
    o = await run_session(script, config=config, quiet_first_ms=6000)
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert not [e for e in o.of(ResponseDone) if e.response.status != "completed"]
    assert o.statuses()[:1] == ["reconnecting"] and o.actor.reconnects == 1
    assert o.proxy.counters.connections == 2
    assert_no_audio_lost(o)


async def test_each_reconnect_is_reported_once(autojump_clock) -> None:
    seen = 0

    def script(ev: Any, proxy: FaultProxy) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            proxy.reset()

    o = await run_session(script)
    assert o.reason == "client_end" and o.actor.reconnects == 1
    assert o.statuses() == ["reconnecting", "reconnected"]


async def test_reset_mid_response_reconnects_and_loses_nothing(autojump_clock) -> None:
    deltas = 0

    def script(ev: Any, proxy: FaultProxy) -> None:
        nonlocal deltas
        if isinstance(ev, ResponseOutputAudioDelta):
            deltas += 1
            if deltas == 2:
                assert proxy.reset() == 1

    o = await run_session(script)
    assert o.reason == "client_end" and len(o.completed()) == 1
    # The reset, and maybe the end of the session (a socket closed with unread data).
    assert o.proxy.counters.resets >= 1 and o.proxy.counters.connections == 2
    assert [e.response.status for e in o.of(ResponseDone)][0] == "incomplete"
    assert_no_audio_lost(o)


async def test_latency_both_ways_still_completes_a_turn(autojump_clock) -> None:
    o = await run_session(toxics={"latency_ms": 200, "jitter_ms": 50})
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.proxy.counters.connections == 1 and o.actor.reconnects == 0
    assert_no_audio_lost(o)


async def test_sliced_frames_reassemble(autojump_clock) -> None:
    o = await run_session(
        toxics={"slice_bytes": 24, "slice_variation": 23}, audio=speech()[: 24_000 * 2 * 2]
    )
    assert o.reason == "client_end" and len(o.completed()) == 1
    assert o.proxy.counters.connections == 1 and o.actor.reconnects == 0
    assert o.actor.protocol_errors == 0
    assert_no_audio_lost(o)


# -- a whole gateway session through the proxy ----------------------------------------------


async def test_upstream_down_past_the_retry_budget_ends_sessions_then_fails_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sim_config = SimConfig(first_byte_ms=50, speed=20)
    with trio.fail_after(TIMEOUT):
        async with open_simulator(first_byte_ms=50, speed=20) as running:
            async with open_proxy(running.port) as proxy:
                cfg = RuntimeConfig(
                    upstream=proxy.url_for("/v1/realtime"),
                    sim=sim_config,
                    pool=PoolConfig(size=0),
                    upstream_config=UpstreamConfig(
                        reconnect=rc.Config(cap=0.5, retry_budget=4.0, connect_timeout=1.0)
                    ),
                )
                async with open_gateway(cfg) as gw:
                    async with connect_client(gw.url) as client:
                        first = await client.recv()
                        assert first["type"] == "session.created"
                        proxy.down()
                        started = trio.current_time()
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                await client.recv()
                        ended = trio.current_time() - started
                    reason = closed.value.reason
                    assert reason.code in (1011, 1013)
                    assert reason.reason in ("upstream_failed", "upstream_unavailable")
                    errors = [e for e in client.seen if e["type"] == "error"]
                    assert errors and errors[-1]["error"]["code"] == reason.reason
                    assert ended <= 4.0 + 1.0 + 1.0
                    # The breaker saw the outage: the next session is told at once.
                    async with connect_client(gw.url) as second:
                        started = trio.current_time()
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                await second.recv()
                        assert closed.value.reason.code == 1013
                        assert trio.current_time() - started < 0.5
                    assert proxy.counters.connections == 1  # the outage took no new links


# -- the fault campaign tool (smoke) ---------------------------------------------------------

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "fault_campaign.py"


async def test_fault_campaign_smoke(autojump_clock) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_campaign", _TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    with trio.fail_after(300):
        report = await tool.campaign(sessions=4, concurrency=2, seed=1, fault_every=1.5)
    assert sum(report.faults_injected.values()) >= 2
    ended = sum(report.sessions_ended_with_reason.values())
    assert report.sessions_completed + ended + report.sessions_ended_unclearly == 4
    assert report.sessions_completed >= 1 and report.audio_frames_sent > 0
    assert report.audio_frames_lost == 0
    assert report.tasks_left == 0
