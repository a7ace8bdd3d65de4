"""The relay benchmark: the simulator's mirror mode, the load generator's stamp reader,
and the tool end to end (both arms, real subprocesses, a couple of seconds).

Rules: loopback only, every real-socket test under ``fail_after``; the end-to-end run is
a subprocess under a timeout.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceactors.testing.sim import connect_client, open_simulator

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_relay.py"
_spec = importlib.util.spec_from_file_location("bench_relay", TOOL)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_relay"] = bench
_spec.loader.exec_module(bench)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------ mirror mode


async def test_mirror_opens_one_response_and_echoes_each_append_unchanged():
    texts = [b64(bench.frame_pcm(k, 20)) for k in range(3)] + [b64(b"\x01\x02\x03")]
    with trio.fail_after(10):
        async with open_simulator(mirror=True) as rt, connect_client(rt.url) as c:
            created = await c.recv()
            assert created["session"]["audio"]["input"]["turn_detection"] is None
            for text in texts:
                await c.send({"type": "input_audio_buffer.append", "audio": text})
            opened = await c.recv_until("response.content_part.added")
            deltas = [await c.recv() for _ in texts]
    assert [e["type"] for e in opened] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    response_id = opened[0]["response"]["id"]
    item_id = opened[1]["item"]["id"]
    assert opened[3]["part"]["type"] == "audio"
    assert [d["type"] for d in deltas] == ["response.output_audio.delta"] * len(texts)
    assert [d["delta"] for d in deltas] == texts
    assert {(d["response_id"], d["item_id"]) for d in deltas} == {(response_id, item_id)}


async def test_mirror_after_cancel_the_next_append_opens_a_new_response():
    text = b64(bench.frame_pcm(0, 20))
    with trio.fail_after(10):
        async with open_simulator(mirror=True) as rt, connect_client(rt.url) as c:
            await c.recv_until("session.created")
            await c.send({"type": "input_audio_buffer.append", "audio": text})
            first = (await c.recv_until("response.output_audio.delta"))[0]
            await c.send({"type": "response.cancel"})
            done = (await c.recv_until("response.done"))[-1]
            await c.send({"type": "input_audio_buffer.append", "audio": text})
            later = await c.recv_until("response.output_audio.delta")
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["id"] == first["response"]["id"]
    assert [e["type"] for e in later].count("response.created") == 1
    second = next(e for e in later if e["type"] == "response.created")
    assert second["response"]["id"] != first["response"]["id"]
    assert later[-1]["response_id"] == second["response"]["id"]


async def test_mirror_off_keeps_server_vad_and_answers_no_silence():
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            created = await c.recv()
            await c.send({"type": "input_audio_buffer.append", "audio": b64(bytes(4800))})
            await c.send({"type": "input_audio_buffer.clear"})
            after = await c.recv()
    assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert after["type"] == "input_audio_buffer.cleared"


# ------------------------------------------------------------------ the stamp reader

FRAME_MS = 10
FRAME_BYTES = FRAME_MS * bench.BYTES_PER_MS


def stamp_reader(frames: int) -> bench.LoadSession:
    s = bench.LoadSession(0, frames, FRAME_BYTES)
    for k in range(frames):
        s.sent_at[k] = float(k)
    return s


def test_stamp_round_trips_and_is_quiet():
    for seq in (0, 1, 255, 256, 65_537, 2**32 - 1):
        assert bench.read_stamp(bench.stamp(seq)) == seq
    pcm = bench.frame_pcm(123_456, 20)
    assert len(pcm) == 20 * bench.BYTES_PER_MS
    samples = memoryview(pcm).cast("h")
    assert max(abs(x) for x in samples) <= 255  # -42 dBFS at the loudest: the VAD stays quiet
    assert bench.read_stamp(pcm[: bench.STAMP_BYTES]) == 123_456
    assert bench.read_stamp(pcm[2 : 2 + bench.STAMP_BYTES]) is None


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(1, 12 * FRAME_BYTES), min_size=1, max_size=40))
def test_reader_finds_every_stamp_however_the_audio_is_cut(cuts):
    n = 12
    stream = b"".join(bench.frame_pcm(k, FRAME_MS) for k in range(n))
    s = stamp_reader(n)
    edges = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
        s.on_audio(base64.b64encode(stream[a:b]), now=100.0 + i)
    assert s.mismatched == 0 and s.duplicates == 0
    assert s.back == n and s.all_back.is_set()
    for k in range(n):
        # A frame is back when the delta holding the last byte of its stamp arrives.
        last = k * FRAME_BYTES + bench.STAMP_BYTES - 1
        delta = next(
            i for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False)) if a <= last < b
        )
        assert s.rtt[k] == 100.0 + delta - k


def test_reader_resyncs_after_a_lost_frame_and_counts_it():
    frames = [bench.frame_pcm(k, FRAME_MS) for k in range(6)]
    s = stamp_reader(6)
    for k in (0, 1, 2, 4, 5):  # frame 3 never comes back
        s.on_audio(base64.b64encode(frames[k]), now=10.0)
    assert s.mismatched == 1
    assert [k for k in range(6) if s.rtt[k] == s.rtt[k]] == [0, 1, 2, 4, 5]
    assert s.back == 5 and not s.all_back.is_set()


def test_reader_takes_the_delta_text_from_either_json_spacing():
    s = stamp_reader(3)
    for k, separators in ((0, (",", ":")), (1, (", ", ": ")), (2, (",", ":"))):
        event = {
            "type": "response.output_audio.delta",
            "event_id": "e",
            "delta": b64(bench.frame_pcm(k, FRAME_MS)),
        }
        s.on_text(json.dumps(event, separators=separators).encode(), now=5.0)
    s.on_text(b'{"type":"error","error":{"message":"nope"}}', now=5.0)
    assert list(s.rtt) == [5.0, 4.0, 3.0]
    assert s.errors == 1 and "nope" in s.first_error


def server_frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    n = len(payload)
    size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    return bytes([(0x80 if final else 0) | opcode]) + size + payload


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(1, 700))
def test_feed_reassembles_frames_answers_pings_and_stops_at_close(cut):
    delta = [
        json.dumps(
            {"type": "response.output_audio.delta", "delta": b64(bench.frame_pcm(k, FRAME_MS))},
            separators=(",", ":"),
        ).encode()
        for k in range(3)
    ]
    wire = (
        server_frame(0x1, b'{"type":"session.created"}')
        + server_frame(0x1, delta[0])
        + server_frame(0x9, b"hi")
        + server_frame(0x1, delta[1][:100], final=False)
        + server_frame(0x0, delta[1][100:])
        + server_frame(0x8, (1000).to_bytes(2, "big"))
        + server_frame(0x1, delta[2])  # after the close: never read
    )
    s = stamp_reader(3)
    for i in range(0, len(wire), cut):
        s.feed(wire[i : i + cut], now=7.0)
    assert s.created.is_set() and s.ended.is_set()
    assert s.closed == "closed by the server (1000)"
    assert list(s.rtt[:2]) == [7.0, 6.0] and s.rtt[2] != s.rtt[2]
    (pong,) = s._control
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2  # final pong, masked, 2 bytes
    assert bytes(b ^ pong[2 + i % 4] for i, b in enumerate(pong[6:])) == b"hi"


# --------------------------------------------------------------------------- the tool


@pytest.mark.timeout(60)
def test_tool_runs_both_arms_and_writes_sane_json(tmp_path):
    out = tmp_path / "relay.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--sessions",
            "2",
            "--seconds",
            "1",
            "--warmup",
            "0.2",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["sessions"] == 2
    for arm in ("direct", "relay"):
        r = run[arm]
        assert r["frames_measured"] == 2 * 50
        assert r["lost"] == 0 and r["frames_back"] == r["frames_measured"], r
        assert r["stamp_mismatches"] == 0 and r["errors"] == 0 and not r["closed_early"]
        assert 0 < r["rtt_ms"]["p50"] <= r["rtt_ms"]["p99"] <= r["rtt_ms"]["max"] < 1000
        assert r["cpu"]["window_s"] > 0.9 and r["cpu"]["simulator"]["pct"] >= 0
    assert run["relay"]["cpu"]["gateway"]["pct"] > 0
    assert run["added_ms"]["p50"] == pytest.approx(
        run["relay"]["rtt_ms"]["p50"] - run["direct"]["rtt_ms"]["p50"]
    )
    assert "relay/direct" in proc.stdout
