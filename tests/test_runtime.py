"""The session runtime end to end: gateway, actors, embedded simulator, in virtual time.

A test client plays agent audio like a device (a playout clock that starts when audio
arrives, drops its buffer on ``output_audio_buffer.cleared``) and sends the
``voiceactors.playback`` reports the browser page sends, so the tests can compare what the
runtime truncates with what the user actually heard.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from voiceactors.audio.wav import read_wav
from voiceactors.machines.turn import TurnConfig
from voiceactors.realtime import events as ev
from voiceactors.runtime import RuntimeConfig
from voiceactors.runtime.playback import PlayoutClock, b64_len
from voiceactors.sim.config import SimConfig
from voiceactors.testing.gateway import open_gateway
from voiceactors.testing.sim import connect_client

AUDIO = Path(__file__).parent / "fixtures" / "audio"
CHUNK = 960  # 20 ms of PCM16 at 24 kHz
LABELS = json.loads((AUDIO / "labels.json").read_text())


def speech(name: str) -> bytes:
    fmt, pcm = read_wav(AUDIO / name)
    assert (fmt.encoding, fmt.rate) == ("pcm16", 24000)
    return pcm


# -- the playout clock (pure) ---------------------------------------------------------------


def test_clock_follows_sent_audio_and_never_passes_it() -> None:
    c = PlayoutClock()
    assert c.played(5.0) == 0.0 and c.dry_at() == float("inf")
    c.sent(10.0, "a", 0.0, 100.0)
    assert c.played(10.05) == pytest.approx(50.0)
    assert c.played(11.0) == 100.0  # never past what was sent
    assert c.item_played(10.05, "a") == pytest.approx(50.0)
    c.sent(10.1, "a", 100.0, 100.0)  # back to back: one span
    assert len(c.spans) == 1 and c.dry_at() == pytest.approx(10.2)
    # A client that ran dry resumes when new audio reaches it, not before.
    c.sent(11.0, "b", 0.0, 40.0)
    assert c.played(11.0) == pytest.approx(200.0)
    assert c.item_played(11.02, "b") == pytest.approx(20.0)
    assert c.item_played(11.02, "a") == pytest.approx(200.0)


def test_clock_reports_reanchor_and_flush_ends_the_timeline() -> None:
    c = PlayoutClock()
    c.sent(0.0, "a", 0.0, 300.0)
    # The client started late (its own buffer): at 0.2 s it has played only 120 ms.
    assert c.report(0.2, "a", 120.0)
    assert c.item_played(0.2, "a") == pytest.approx(120.0)
    assert c.item_played(0.25, "a") == pytest.approx(170.0)
    assert not c.report(0.25, "zzz", 10.0)  # unknown item: ignored
    c.flush(0.25)
    assert c.sent_ms == pytest.approx(170.0)
    assert c.played(5.0) == pytest.approx(170.0)  # the rest was dropped by the client


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "report", "flush"]),
            st.floats(0.0, 0.5),
            st.floats(0.0, 400.0),
        ),
        max_size=40,
    )
)
def test_clock_invariants(steps: list[tuple[str, float, float]]) -> None:
    """Played never exceeds sent and never goes negative; item positions stay inside what
    was sent of the item, whatever order sends, reports and flushes come in."""
    c = PlayoutClock()
    now, offset = 0.0, 0.0
    for op, dt, ms in steps:
        now += dt
        if op == "send" and ms > 0:
            c.sent(now, "a", offset, ms)
            offset += ms
        elif op == "report":
            c.report(now, "a", ms)
        elif op == "flush":
            c.flush(now)
        p = c.played(now)
        assert 0.0 <= p <= c.sent_ms + 1e-9
        ip = c.item_played(now, "a")
        if ip is not None:
            assert -1e-9 <= ip <= offset + 1e-9


def test_b64_len() -> None:
    for n in range(0, 12):
        assert b64_len(base64.b64encode(bytes(n)).decode()) == n


# -- a client that plays like a device --------------------------------------------------------


@dataclass
class Device:
    """Plays agent audio in real (virtual) time from the moment it arrives."""

    client: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    received: dict[str, float] = field(default_factory=dict)  # item -> ms received
    item: str | None = None
    start: float | None = None  # when the current item's position 0 played
    base: float = 0.0  # ms of the item already played when ``start`` was set
    cleared_at: float | None = None
    played_at_clear: float | None = None
    deltas: list[tuple[float, float]] = field(default_factory=list)  # (arrival, cumulative ms)
    reports: bool = True
    audible: trio.Event = field(default_factory=trio.Event)  # the first agent audio arrived

    def played(self, now: float) -> float:
        if self.item is None or self.start is None:
            return 0.0
        return min(self.received[self.item], self.base + (now - self.start) * 1000.0)

    async def listen(self, until: str, stop: trio.Event | None = None) -> None:
        while True:
            event = json.loads(await self.client.ws.get_message())
            now = trio.current_time()
            self.events.append(event)
            t = event["type"]
            if t == "response.output_audio.delta":
                ms = len(base64.b64decode(event["delta"])) / 48.0
                item = event["item_id"]
                if item != self.item:
                    self.item, self.start, self.base = item, now, 0.0
                    self.audible.set()
                elif self.start is not None and self.played(now) >= self.received[item]:
                    # Ran dry: playout resumes now.
                    self.base, self.start = self.received[item], now
                self.received[item] = self.received.get(item, 0.0) + ms
                total = sum(self.received.values())
                self.deltas.append((now, total))
            elif t == "output_audio_buffer.cleared":
                self.cleared_at = now
                self.played_at_clear = self.played(now)
                if self.item is not None:
                    self.received[self.item] = self.played_at_clear  # dropped the rest
            if t == until:
                if stop is not None:
                    stop.set()
                return

    async def report_forever(self) -> None:
        while True:
            await trio.sleep(0.1)
            if self.reports and self.item is not None and self.cleared_at is None:
                await self.client.send(
                    {
                        "type": "voiceactors.playback",
                        "item_id": self.item,
                        "played_ms": self.played(trio.current_time()),
                    }
                )


class Sender:
    """``send(dict)`` over a bare socket-like port (``send_message``)."""

    def __init__(self, port: Any) -> None:
        self.port = port

    async def send(self, event: dict[str, Any]) -> None:
        await self.port.send_message(json.dumps(event))


async def stream(client: Any, pcm: bytes) -> None:
    """Send ``pcm`` as 20 ms appends in real (virtual) time."""
    start = trio.current_time()
    for k, i in enumerate(range(0, len(pcm), CHUNK)):
        await trio.sleep_until(start + k * 0.02)
        audio = base64.b64encode(pcm[i : i + CHUNK]).decode()
        await client.send({"type": "input_audio_buffer.append", "audio": audio})


def config(speed: float = 4.0, **kw: Any) -> RuntimeConfig:
    sim = SimConfig(first_byte_ms=200.0, speed=speed, chunk_ms=100)
    return RuntimeConfig(sim=sim, pool=kw.pop("pool", RuntimeConfig().pool), **kw)


# -- end to end -------------------------------------------------------------------------------


async def test_a_turn_is_paced_with_a_bounded_lead(autojump_clock: trio.testing.MockClock) -> None:
    """The simulator bursts its answer at 4x real time; the client receives it paced: the
    audio it holds unplayed never exceeds the lead bound (plus one upstream chunk)."""
    cfg = config()
    with trio.fail_after(60):
        async with open_gateway(cfg) as gw, connect_client(gw.url) as client:
            device = Device(client)
            first = json.loads(await client.ws.get_message())
            assert first["type"] == "session.created"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, client, speech("order_24k.wav") + bytes(CHUNK * 100))
                await device.listen("response.done")
                nursery.cancel_scope.cancel()
    types = [e["type"] for e in device.events]
    assert types.index("response.created") < types.index("response.output_audio.delta")
    # The response's other events keep their place behind the audio.
    assert types.index("response.output_audio.done") > max(
        i for i, t in enumerate(types) if t == "response.output_audio.delta"
    )
    t0 = device.deltas[0][0]
    lead_bound = cfg.playback.max_lead_ms + 100.0  # one upstream chunk
    for at, total in device.deltas:
        assert total - (at - t0) * 1000.0 <= lead_bound + 1e-6
    # Everything the upstream said arrived (echo of the user's ~5 s utterance).
    assert device.deltas[-1][1] > 3000


@pytest.mark.parametrize("reports", [True, False], ids=["reports", "estimate"])
async def test_barge_in_truncates_at_what_was_played(
    autojump_clock: trio.testing.MockClock, reports: bool
) -> None:
    """Speech over the agent: after min speech the client is told to clear, the response is
    cancelled and the item truncated exactly where the device stopped playing, never past
    what it received."""
    # At real-time speed the answer is still streaming upstream when the user cuts in.
    cfg = config(speed=1.0, turn=TurnConfig(min_speech_ms=300.0))
    with trio.fail_after(60):
        async with open_gateway(cfg) as gw, connect_client(gw.url) as client:
            device = Device(client, reports=reports)
            await client.ws.get_message()  # session.created
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.listen, "conversation.item.truncated", done)
                nursery.start_soon(device.report_forever)
                nursery.start_soon(stream, client, speech("order_24k.wav") + bytes(CHUNK * 40))
                # The user talks over the agent once it has been audible for a second.
                await device.audible.wait()
                assert device.start is not None
                await trio.sleep_until(device.start + 1.0)
                item = device.item
                onset = trio.current_time() + LABELS["change"]["speech_start_ms"] / 1000
                nursery.start_soon(stream, client, speech("change_24k.wav") + bytes(CHUNK * 60))
                await done.wait()
                nursery.cancel_scope.cancel()
    types = [e["type"] for e in device.events]
    assert "output_audio_buffer.cleared" in types
    done = [e for e in device.events if e["type"] == "response.done"]
    assert done and done[0]["response"]["status"] == "cancelled"
    truncated = device.events[-1]
    assert truncated["item_id"] == item
    assert device.played_at_clear is not None and device.cleared_at is not None
    # What the user heard, to the ms; never more than the device received.
    assert abs(truncated["audio_end_ms"] - device.played_at_clear) <= 1.0
    assert truncated["audio_end_ms"] <= device.received[item]
    # The flush came min speech after the labelled onset (within the VAD's 60 ms and a few
    # 20 ms frames of scheduling), not after the server's VAD (its prefix padding and a
    # round trip later).
    latency = device.cleared_at - onset
    assert 0.3 - 0.06 <= latency <= 0.3 + 0.1


async def test_a_cough_pauses_and_resumes_without_losing_the_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Speech shorter than min speech over the agent: no clear, no cancel; the whole answer
    still arrives."""
    cfg = config(turn=TurnConfig(min_speech_ms=800.0, false_interruption_timeout_ms=300.0))
    cough = speech("change_24k.wav")
    with trio.fail_after(60):
        async with open_gateway(cfg) as gw, connect_client(gw.url) as client:
            device = Device(client)
            await client.ws.get_message()
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, client, speech("order_24k.wav") + bytes(CHUNK * 40))
                nursery.start_soon(device.listen, "response.done", done)
                await device.audible.wait()
                assert device.start is not None
                await trio.sleep_until(device.start + 0.5)
                # ~240 ms of voice: the start of the sentence, then silence.
                lead = int(LABELS["change"]["speech_start_ms"] / 20) * CHUNK
                nursery.start_soon(stream, client, cough[: lead + CHUNK * 12] + bytes(CHUNK * 200))
                await done.wait()
                nursery.cancel_scope.cancel()
    types = [e["type"] for e in device.events]
    assert "output_audio_buffer.cleared" not in types
    done = [e for e in device.events if e["type"] == "response.done"][0]
    assert done["response"]["status"] == "completed"
    assert sum(device.received.values()) > 3000


async def test_a_tool_call_is_answered_server_side_and_the_agent_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The order script's second turn calls ``place_order``: the runtime's tool-runner
    answers it once, asks for the follow-up after the calling response is done, and the
    client hears the confirmation."""
    from voiceactors.sim.script import load_script

    script = load_script(Path(__file__).parent.parent / "specs/sim-examples/order.toml")
    sim = SimConfig(first_byte_ms=200.0, speed=4.0, chunk_ms=100, script=script)
    with trio.fail_after(120):
        async with open_gateway(RuntimeConfig(sim=sim)) as gw, connect_client(gw.url) as client:
            device = Device(client)
            await client.ws.get_message()
            await stream(client, speech("order_24k.wav") + bytes(CHUNK * 50))
            await device.listen("response.done")
            await stream(client, speech("confirm_24k.wav") + bytes(CHUNK * 50))
            await device.listen("response.done")  # the one that called the tool
            await device.listen("response.done")  # the follow-up after its output
            received = [e for c in gw.runtime.sim.sim.connections for e in c.received_events]
    calls = [e for e in device.events if e["type"] == "response.function_call_arguments.done"]
    assert [c["name"] for c in calls] == ["place_order"]
    outputs = [
        e
        for e in received
        if isinstance(e, ev.ConversationItemCreate)
        and isinstance(e.item, ev.FunctionCallOutputItem)
    ]
    assert len(outputs) == 1 and outputs[0].item.call_id == calls[0]["call_id"]
    assert json.loads(outputs[0].item.output)["ready_in_minutes"] == 10
    said = [
        e["transcript"]
        for e in device.events
        if e["type"] == "response.output_audio_transcript.done"
    ]
    assert said[-1] == "Your order is placed. It will be ready in ten minutes."


@pytest.mark.parametrize("pool", [0, 2], ids=["cold", "warm-pool"])
async def test_an_early_session_update_is_answered(
    autojump_clock: trio.testing.MockClock, pool: int
) -> None:
    """A client that sends ``session.update`` before its upstream is ready (as SDK code
    usually does, right after connecting) still gets ``session.created`` and then its
    ``session.updated``, showing what it asked for; so does a later one."""
    from voiceactors.upstream import PoolConfig

    cfg = config(pool=PoolConfig(size=pool))
    update = {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"output": {"speed": 1.25}}},
    }
    with trio.fail_after(30):
        async with open_gateway(cfg) as gw:
            if pool:
                await gw.runtime.pool.wait_filled()
            async with connect_client(gw.url) as client:
                await client.send(update)
                created = await client.recv()
                updated = await client.recv()
                await client.send(
                    {**update, "session": {"type": "realtime", "audio": {"output": {"speed": 0.9}}}}
                )
                again = await client.recv()
    assert created["type"] == "session.created"
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["output"]["speed"] == 1.25
    assert again["type"] == "session.updated"
    assert again["session"]["audio"]["output"]["speed"] == 0.9


@pytest.mark.parametrize(("code", "reason"), [(1000, "client_closed"), (1006, "client_lost")])
async def test_a_goodbye_and_a_lost_client_are_told_apart(
    autojump_clock: trio.testing.MockClock, code: int, reason: str
) -> None:
    """A close frame is a goodbye; a socket that just dies (1006) is a lost client: the
    metrics tell an operator which."""
    from voiceactors.gateway import ClientInfo
    from voiceactors.run import memory_client_pair
    from voiceactors.runtime import open_runtime_from_config

    with trio.fail_after(30):
        async with open_runtime_from_config(config()) as rt:
            server, client = memory_client_pair()
            info = ClientInfo("sess_t", "memory", "/v1/realtime", {}, {}, None, None)
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    assert json.loads(await client.get_message())["type"] == "session.created"
                    await client.aclose(code, "")

                nursery.start_soon(hang_up)
                report = await rt.run_client(server, info)
            text = rt.metrics.render()
    assert report.reason == reason
    assert f'voiceactors_session_ended_total{{reason="{reason}"}} 1' in text


async def test_a_client_that_stops_reading_is_cut_off_not_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that sends but never reads: once its socket's buffer is full, a write waits
    ``client_send_timeout_s`` and the session ends (``client_not_reading``, 1011) instead
    of blocking its actors forever."""
    from voiceactors.gateway import ClientInfo
    from voiceactors.run import memory_client_pair
    from voiceactors.runtime import open_runtime_from_config

    cfg = config(client_send_timeout_s=2.0)
    with trio.fail_after(60):
        async with open_runtime_from_config(cfg) as rt:
            server, client = memory_client_pair(capacity=4)
            info = ClientInfo("sess_deaf", "memory", "/v1/realtime", {}, {}, None, None)
            async with trio.open_nursery() as nursery:

                async def talk_but_never_read() -> None:
                    with pytest.raises(ConnectionClosed) as closed:
                        await stream(Sender(client), speech("order_24k.wav") + bytes(CHUNK * 400))
                    assert closed.value.reason.code == 1011  # the server closed on it

                nursery.start_soon(talk_but_never_read)
                report = await rt.run_client(server, info)
    assert (report.reason, report.code) == ("client_not_reading", 1011)
    assert "2 s" in report.detail
