"""``python -m voiceactors run``: the in-memory socket pair, the virtual device, the report.

The client is first tested against a scripted fake server on the memory pair (exact
timings on the autojump clock), then end to end through the runtime and the embedded
simulator, in process; one small subprocess test covers the command line.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from voiceactors.audio import PCM16_16K, PCM16_24K, PCM16_48K, PCMA_8K, PCMU_8K, read_wav
from voiceactors.audio.codecs import ulaw_to_pcm16
from voiceactors.machines.turn import TurnConfig
from voiceactors.run import (
    ClientInput,
    Playout,
    RunOptions,
    UsageError,
    VirtualClient,
    load_input,
    main,
    memory_client_pair,
    run_session,
    silence,
)
from voiceactors.run.report import _barge_report, _turn_report
from voiceactors.sim.audio import tone

AUDIO = Path(__file__).resolve().parent / "fixtures" / "audio"
LABELS = json.loads((AUDIO / "labels.json").read_text())


# -- the in-memory pair ------------------------------------------------------------------


async def test_pair_carries_messages_both_ways_in_order():
    server, client = memory_client_pair()
    await client.send_message("a")
    await client.send_message(b"b")
    await server.send_message("c")
    assert [await server.get_message(), await server.get_message()] == ["a", b"b"]
    assert await client.get_message() == "c"
    assert server.closed is None and client.closed is None


async def test_close_is_seen_by_both_ends_and_the_peer_drains_first():
    server, client = memory_client_pair()
    await client.send_message("last words")
    await server.send_message("never read")
    await client.aclose(1000, "bye")
    for port in (server, client):
        assert (port.closed.code, port.closed.reason) == (1000, "bye")
        assert port.closed_by == "client"
    assert await server.get_message() == "last words"  # sent before the close: delivered
    for call in (server.get_message(), client.get_message(), server.send_message("x")):
        with pytest.raises(ConnectionClosed) as info:
            await call
        assert info.value.reason.code == 1000
    await server.aclose(1011)  # idempotent: the first close wins
    assert client.closed.code == 1000 and client.closed_by == "client"


async def test_buffers_are_bounded_and_a_close_wakes_blocked_senders(autojump_clock):
    server, client = memory_client_pair(capacity=2)
    await client.send_message("1")
    await client.send_message("2")
    with trio.move_on_after(5) as scope:
        await client.send_message("3")  # nobody reads: backpressure, not a queue
    assert scope.cancelled_caught
    assert await server.get_message() == "1"  # the cancelled send queued nothing
    assert await server.get_message() == "2"

    woken: list[int] = []

    async def blocked_sender() -> None:
        await server.send_message("x")
        await server.send_message("y")
        with pytest.raises(ConnectionClosed) as info:
            await server.send_message("z")
        woken.append(info.value.reason.code)

    async def blocked_reader(port: Any) -> None:
        with pytest.raises(ConnectionClosed):
            await port.get_message()
        woken.append(0)

    other_server, other_client = memory_client_pair(capacity=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        nursery.start_soon(blocked_reader, other_server)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose(4000, "done")
        await other_server.aclose()  # its own pending read ends too
    assert sorted(woken) == [0, 4000]
    assert other_client.closed.code == 1000


async def test_pair_refuses_bad_use():
    server, _ = memory_client_pair()
    with pytest.raises(TypeError):
        await server.send_message(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await server.aclose(999)
    assert server.closed is None
    with pytest.raises(ValueError):
        memory_client_pair(capacity=0)


# -- the loudspeaker ---------------------------------------------------------------------


def pcm(ms: int, value: int = 1000) -> bytes:
    return struct.pack("<h", value) * (24 * ms)


def test_playout_plays_at_real_time_from_arrival_sample_exact():
    p = Playout(PCM16_24K)
    p.push(10.0, "r1", "i1", pcm(100, 1))
    p.push(10.02, "r1", "i1", pcm(100, 2))
    p.advance(10.05)
    item = p.items["i1"]
    assert item.started_at == 10.0
    assert p.ms(item.played) == 50.0 and p.ms(item.received) == 200.0
    assert p.busy_until() == pytest.approx(10.2)
    p.advance(10.3)
    assert p.idle and p.ms(item.played) == 200.0
    assert bytes(p.audio) == pcm(100, 1) + pcm(100, 2)  # what played, in order
    assert [i.item_id for i in p.take_progress()] == ["i1"]
    assert p.take_progress() == []
    p.push(10.5, "r1", "i1", pcm(20, 3))  # the item ran dry and resumed: an underrun
    assert p.underruns == 1


def test_playout_flush_drops_what_was_not_played():
    p = Playout(PCM16_24K)
    p.push(0.0, "r1", "a", pcm(60))
    p.push(0.0, "r1", "b", pcm(60))
    hit = p.flush(0.0804)  # 80 ms and change: 80 whole ms of samples have played
    assert [i.item_id for i in hit] == ["b"]  # "a" had played in full
    a, b = p.items["a"], p.items["b"]
    assert (p.ms(a.played), p.ms(a.flushed)) == (60.0, 0.0)
    assert p.ms(b.played) == pytest.approx(20.4, abs=0.05)
    assert a.played + b.played + a.flushed + b.flushed == len(pcm(120))
    assert p.idle and len(p.audio) == p.played
    assert {i.item_id for i in p.take_progress()} == {"a", "b"}  # due for a report now
    p.push(1.0, "r2", "c", pcm(10))  # a new answer plays from its own arrival
    p.advance(1.005)
    assert p.items["c"].started_at == 1.0 and p.ms(p.items["c"].played) == 5.0


def test_playout_buffer_is_bounded():
    p = Playout(PCM16_24K, max_buffer_ms=100, keep_ms=150)
    p.push(0.0, "r", "i", pcm(80))
    p.push(0.0, "r", "i", pcm(80))
    assert p.ms(p.overflow) == 60.0 and p.ms(p.items["i"].received) == 160.0
    p.advance(1.0)
    p.push(1.0, "r", "i", pcm(100))
    p.advance(2.0)
    assert p.ms(p.played) == 200.0 and len(p.audio) == PCM16_24K.bytes_for_ms(150)
    assert not p.kept_all


# -- inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["order_24k.wav", "order_16k.wav", "order_48k.wav", "order_8k_ulaw.wav"]
)
@pytest.mark.parametrize("fmt", [PCM16_24K, PCM16_16K, PCM16_48K, PCMU_8K, PCMA_8K], ids=str)
def test_inputs_load_at_any_rate_into_any_client_format(name, fmt):
    item = load_input(AUDIO / name, fmt)
    chunk = fmt.bytes_for_ms(20)
    assert item.fmt == fmt and len(item.audio) % chunk == 0
    assert item.duration_ms == pytest.approx(LABELS["order"]["duration_ms"], abs=20)
    assert all(len(c) == chunk for c in item.chunks())
    # Speech is where the labels put it, whatever the rate and codec it came through.
    assert item.onset_ms("normal") == pytest.approx(LABELS["order"]["speech_start_ms"], abs=15)


def test_g711_silence_decodes_to_zero():
    assert silence(PCMU_8K, 160) == b"\xff" * 160
    assert ulaw_to_pcm16(silence(PCMU_8K, 8)) == bytes(16)
    assert silence(PCM16_16K, 640) == bytes(640)


def test_bad_wav_files_are_usage_errors(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    eight_bit = tmp_path / "u8.wav"
    eight_bit.write_bytes(
        b"RIFF" + struct.pack("<I", 36 + 4) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8)
        + b"data" + struct.pack("<I", 4) + b"\x80" * 4
    )  # fmt: skip
    empty = tmp_path / "empty.wav"
    empty.write_bytes(
        b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
        + b"data" + struct.pack("<I", 0)
    )  # fmt: skip
    for path, words in [
        (tmp_path / "missing.wav", "No such file"),
        (text, "not a WAV"),
        (eight_bit, "8-bit"),
        (empty, "no audio"),
    ]:
        with pytest.raises(UsageError, match=words) as info:
            load_input(path, PCM16_24K)
        assert str(path) in str(info.value)


# -- arguments ---------------------------------------------------------------------------

ORDER = str(AUDIO / "order_24k.wav")
CHANGE = str(AUDIO / "change_24k.wav")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--input", ORDER, "--speed", "0"], "--speed must be in (0, 100]"),
        (["--input", ORDER, "--speed", "101"], "--speed must be in (0, 100]"),
        (["--input", ORDER, "--speed", "nan"], "--speed"),
        (["--input", ORDER, "--barge-in-at", "500"], "at least two --input"),
        (["--input", ORDER, "--input", CHANGE, "--barge-in-at", "-1"], ">= 0"),
        (["--input", ORDER, "--upstream", "http://example.com"], "ws(s):// URL"),
        (["--input", ORDER, "--upstream", "ws://127.0.0.1:9", "--script", "x.toml"], "--script"),
        (["--input", ORDER, "--script", "/nonexistent/s.toml"], "s.toml"),
        (["--input", "/nonexistent/a.wav"], "/nonexistent/a.wav"),
        (["--input", ORDER, "--json", "/nonexistent/dir/r.json"], "no such directory"),
        (["--input", ORDER, "--upstream", "openai"], "OPENAI_API_KEY"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("voiceactors run: ") and words in err


def test_argparse_errors_exit_2(capsys):
    for argv in ([], ["--input", ORDER, "--format", "mp3"], ["--input", ORDER, "--speed", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


# -- the virtual client against a scripted server ----------------------------------------


def _event(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, "event_id": "evt", **fields})


def _response(rid: str, status: str = "in_progress") -> dict[str, Any]:
    return {"id": rid, "object": "realtime.response", "status": status}


def _delta(rid: str, item: str, data: bytes) -> str:
    return _event(
        "response.output_audio.delta",
        response_id=rid,
        item_id=item,
        output_index=0,
        content_index=0,
        delta=base64.b64encode(data).decode(),
    )


class FakeServer:
    """Answers like a Realtime server, on cue: ``on_chunk[n]`` runs when the n-th append
    (counting from 1) arrives. Records every append and playback report with its time."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self.chunks: list[tuple[float, bytes]] = []
        self.reports: list[tuple[float, str, float]] = []
        self.on_chunk: dict[int, Any] = {}

    async def send(self, *frames: str) -> None:
        for frame in frames:
            await self.port.send_message(frame)

    async def run(self) -> None:
        await self.send(_event("session.created", session={"type": "realtime"}))
        try:
            while True:
                event = json.loads(await self.port.get_message())
                now = trio.current_time()
                if event["type"] == "session.update":
                    fmt = event["session"]["audio"]["input"]["format"]
                    assert fmt == {"type": "audio/pcm", "rate": 24000}
                    await self.send(_event("session.updated", session={"type": "realtime"}))
                elif event["type"] == "input_audio_buffer.append":
                    self.chunks.append((now, base64.b64decode(event["audio"])))
                    cue = self.on_chunk.get(len(self.chunks))
                    if cue is not None:
                        await cue()
                elif event["type"] == "voiceactors.playback":
                    self.reports.append((now, event["item_id"], event["played_ms"]))
        except ConnectionClosed:
            pass

    async def answer(self, end_ms: int, rid: str, item: str, audio: bytes) -> None:
        await self.send(
            _event("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u"),
            _event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id="u"),
            _event("response.created", response=_response(rid)),
            *(_delta(rid, item, audio[i : i + 960 * 2]) for i in range(0, len(audio), 1920)),
            _event("response.done", response=_response(rid, "completed")),
        )


def speech(ms: int) -> ClientInput:
    return ClientInput("speech", PCM16_24K, tone(ms))


async def run_pair(client: VirtualClient, server: FakeServer) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await client.run()


async def test_next_input_waits_for_the_answer_to_play_out(autojump_clock):
    server_port, client_port = memory_client_pair()
    client = VirtualClient(client_port, [speech(200), speech(100)], PCM16_24K, settle_s=0.2)
    server = FakeServer(server_port)
    reply = pcm(200, 7)
    server.on_chunk[20] = lambda: server.answer(300, "r1", "i1", reply)
    server.on_chunk[55] = lambda: server.answer(1160, "r2", "i2", pcm(40, 9))
    await run_pair(client, server)

    t0 = client.stream_t0
    assert client.port.closed.code == 1000 and client.port.closed_by == "client"
    assert client.problems == []
    # The answer arrives with chunk 20 (t0 + 0.4 s) and plays until t0 + 0.6 s; after the
    # 200 ms settle the second input starts on the chunk grid at t0 + 0.8 s: chunk 40.
    assert client.turns[1].start_chunk == 40
    assert [c for _, c in server.chunks[40:45]] == client.inputs[1].chunks()
    assert all(c == bytes(960) for _, c in server.chunks[10:40])  # silence in between
    # Chunks leave when their 20 ms have been captured, not earlier, not later.
    assert [round(t - t0, 6) for t, _ in server.chunks[:3]] == [0.02, 0.04, 0.06]
    assert bytes(client.playout.audio) == reply + pcm(40, 9)
    # Reports: every 100 ms while playing, each the exact device position then.
    first = [(t, ms) for t, item, ms in server.reports if item == "i1"]
    assert len(first) >= 2 and first[-1][1] == 200.0
    for t, ms in first:
        assert ms == pytest.approx(min(200.0, (t - (t0 + 0.4)) * 1000), abs=0.05)
    gaps = {round(b[0] - a[0], 6) for a, b in zip(first, first[1:], strict=False)}
    assert gaps == {0.1}
    turn = _turn_report(client, client.turns[0])
    assert turn.speech_end_audio_ms == 300
    assert turn.first_audio_ms == pytest.approx(100.0)  # captured at t0+0.3, heard t0+0.4
    assert turn.responses[0].played_ms == 200.0


async def test_barge_in_flush_is_reported_at_once_with_the_played_position(autojump_clock):
    server_port, client_port = memory_client_pair()
    client = VirtualClient(
        client_port,
        [speech(200), speech(300)],
        PCM16_24K,
        barge_in_at_ms=100,
        barge_in_onset_ms=50,
    )
    server = FakeServer(server_port)
    reply = pcm(400, 7)
    cleared_at: list[float] = []

    async def halt() -> None:
        cleared_at.append(trio.current_time())
        await server.send(
            _event("output_audio_buffer.cleared", response_id="r1"),
            _delta("r1", "i1", pcm(20, 5)),  # stale: after the clear, never played
            _event("conversation.item.truncated", item_id="i1", content_index=0, audio_end_ms=220),
            _event("response.done", response=_response("r1", "cancelled")),
        )

    server.on_chunk[20] = lambda: server.answer(300, "r1", "i1", reply)
    server.on_chunk[31] = halt
    server.on_chunk[60] = lambda: server.answer(1100, "r2", "i2", pcm(20, 9))
    await run_pair(client, server)

    t0 = client.stream_t0
    assert client.problems == [] and client.port.closed.code == 1000
    # Playback of r1 began at t0 + 0.4; the last input starts 100 ms later, on the grid.
    assert client.turns[1].start_chunk == 25
    halted = cleared_at[0]
    assert halted - t0 == pytest.approx(0.62)
    # The flush report goes out at the very time of the clear, with the exact position.
    assert (halted, "i1", 220.0) in [(t, i, ms) for t, i, ms in server.reports]
    b = _barge_report(client)
    assert b.started_after_playback_ms == pytest.approx(100.0)
    assert b.onset_ms == pytest.approx((t0 + 0.55 - client.opened_at) * 1000)
    assert b.latency_ms == pytest.approx(70.0)
    assert (b.item_id, b.played_ms, b.received_ms, b.truncated_ms) == ("i1", 220.0, 400.0, 220)
    assert b.playing_at_onset is True
    assert client.late_audio == len(pcm(20))
    assert bytes(client.playout.audio) == reply[: len(pcm(220))] + pcm(20, 9)


async def test_setup_timeout_and_server_close_end_the_client(autojump_clock):
    server_port, client_port = memory_client_pair()
    client = VirtualClient(client_port, [speech(100)], PCM16_24K, setup_timeout_s=3)
    start = trio.current_time()
    await client.run()  # the server never says session.created
    assert trio.current_time() - start == pytest.approx(3.0)
    assert client.problems == ["gave up after 3 s waiting for session.created"]
    assert server_port.closed.code == 1000 and server_port.closed_by == "client"

    server_port, client_port = memory_client_pair()
    client = VirtualClient(client_port, [speech(100)], PCM16_24K)

    async def hang_up() -> None:
        await server_port.send_message(_event("session.created", session={"type": "realtime"}))
        await server_port.get_message()  # the session.update
        await server_port.send_message(
            _event("error", error={"type": "server_error", "message": "bye"})
        )
        await server_port.aclose(1011, "internal error")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        with trio.fail_after(1):
            await client.run()
    assert client.port.closed_by == "server" and client.port.closed.code == 1011
    assert client.error_log[-1] == "server_error: bye"  # sent before the close: read


# -- end to end: runtime + embedded simulator --------------------------------------------


@pytest.fixture
def session_clock() -> trio.testing.MockClock:
    """Autojump virtual time that also flows with real time (rate 1). With rate 0 a task
    that loops without ever blocking freezes the clock and hangs the test (and a timeout
    firing inside Trio's run loop breaks every later Trio test); here such a bug costs CPU
    time instead. Real time only adds the CPU the session uses, a few ms."""
    return trio.testing.MockClock(rate=1, autojump_threshold=0)


async def test_barge_in_session_on_the_simulator(session_clock, tmp_path):
    out = tmp_path / "reply.wav"
    inputs = (load_input(ORDER, PCM16_24K), load_input(CHANGE, PCM16_24K))
    report = await run_session(RunOptions(inputs=inputs, barge_in_at_ms=1000, output=out))

    assert report.problems == [] and report.ok
    assert (report.closed_by, report.close_code) == ("client", 1000)
    assert report.created_ms is not None and report.updated_ms >= report.created_ms
    assert [t.input for t in report.turns] == ["order_24k.wav", "change_24k.wav"]
    for turn in report.turns:
        assert turn.speech_end_audio_ms is not None and turn.first_audio_ms > 0
        assert turn.first_played_ms >= turn.first_audio_ms
    b = report.barge_in
    min_speech = TurnConfig().min_speech_ms
    assert 1000 <= b.started_after_playback_ms < 1020
    assert b.playing_at_onset and 0 < b.latency_ms < min_speech + 200
    assert b.truncated_ms is not None and b.truncated_ms <= b.received_ms
    assert b.truncated_ms == pytest.approx(b.played_ms, abs=20)
    assert report.frames.lost == 0 and report.frames.source == "simulator"
    assert report.frames.upstream_ms == report.frames.sent_ms
    assert report.tasks_left == 0 and report.reconnects == 0
    fmt, audio = read_wav(out)
    assert fmt == PCM16_24K and fmt.duration_ms(len(audio)) == report.played_ms
    assert report.played_ms == report.output_ms > 0


async def test_mulaw_client_on_the_simulator(session_clock):
    inputs = (load_input(AUDIO / "order_8k_ulaw.wav", PCMU_8K),)
    report = await run_session(RunOptions(inputs=inputs, fmt=PCMU_8K))
    assert report.ok, report.problems
    assert report.format == "pcmu@8000" and report.barge_in is None
    # 8 kHz in, 24 kHz upstream: the same duration arrives, frame for frame.
    assert report.frames.upstream_ms == pytest.approx(report.frames.sent_ms, abs=1)
    (turn,) = report.turns
    assert turn.responses and turn.responses[0].played_ms > 0


async def test_other_upstreams_report_the_runtime_counters(session_clock):
    from voiceactors.testing.sim import open_simulator

    async with open_simulator() as sim:  # reached by URL, as any Realtime server would be
        opts = RunOptions(inputs=(load_input(CHANGE, PCM16_24K),), upstream=sim.url)
        report = await run_session(opts)
    assert report.upstream == sim.url and report.turns[0].first_audio_ms > 0
    frames = report.frames
    assert (frames.source, frames.upstream_ms) == ("runtime counters", None)
    assert frames.lost == frames.runtime_dropped == report.session["frames_dropped"] == 0
    assert frames.runtime_in == frames.sent


async def test_a_session_that_gets_no_answer_fails_but_closes_normally(session_clock):
    from voiceactors.runtime import RuntimeConfig
    from voiceactors.sim import SimConfig

    # Without server VAD the simulator never ends the turn: nothing answers.
    config = RuntimeConfig(sim=SimConfig(turn_detection=None))
    opts = RunOptions(inputs=(load_input(CHANGE, PCM16_24K),), turn_timeout_s=2)
    report = await run_session(opts, config)
    assert not report.ok
    assert report.problems == ["gave up after 2 s waiting for the answer to turn 1 to play out"]
    assert (report.closed_by, report.close_code, report.tasks_left) == ("client", 1000, 0)


def test_cli_subprocess_writes_the_json_report(tmp_path):
    out = tmp_path / "report.json"
    argv = ["--input", ORDER, "--input", CHANGE, "--barge-in-at", "800", "--speed", "20"]
    proc = subprocess.run(
        [sys.executable, "-m", "voiceactors", "run", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "barge-in" in proc.stdout and "result       ok" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["speed"] == 20.0
    assert report["barge_in"]["latency_ms"] > 0
    assert report["session"]["reason"] == "client_closed"
