"""The simulator speaks Realtime GA: lifecycle, VAD on real speech, responses, errors.

Rules (as trio-websocket's own tests): loopback only, every test under ``fail_after``,
``autojump_clock`` wherever the simulator paces or waits, no sleeping to wait.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from voiceactors.sim import Simulator, parse_script
from voiceactors.sim.audio import read_wav, silence, tone
from voiceactors.testing.sim import connect_client, open_simulator

AUDIO = Path(__file__).parent / "fixtures" / "audio"
LABELS = json.loads((AUDIO / "labels.json").read_text())
FAST = {"first_byte_ms": 200, "speed": 8.0}


def order_pcm() -> bytes:
    return read_wav(AUDIO / "order_24k.wav")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_of(events: list[dict]) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


# ------------------------------------------------------------------------ lifecycle


async def test_session_created_then_update_returns_full_effective_config(autojump_clock):
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            created = await c.recv()
            assert created["type"] == "session.created"
            s = created["session"]
            assert s["id"].startswith("sess_") and s["model"] == "gpt-realtime"
            assert s["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
            await c.send(
                {
                    "type": "session.update",
                    "event_id": "e1",
                    "session": {
                        "type": "realtime",
                        "instructions": "Be brief.",
                        "audio": {
                            "input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}}
                        },
                    },
                }
            )
            updated = (await c.recv())["session"]
            assert updated["instructions"] == "Be brief."
            td = updated["audio"]["input"]["turn_detection"]
            # Only present fields change; server defaults stay filled in.
            assert td["threshold"] == 0.7 and td["prefix_padding_ms"] == 300
            assert updated["audio"]["output"] == {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "marin",
                "speed": 1.0,
            }
            assert updated["tools"] == [] and updated["max_output_tokens"] == "inf"
            await c.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
                }
            )
            assert (await c.recv())["session"]["audio"]["input"]["turn_detection"] is None


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ({"type": "realtime", "foo": 1}, "unknown_parameter", "session.foo"),
        ({"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
        ({"instructions": "x"}, "missing_required_parameter", "session.type"),
        (
            {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}},
            },
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}},
            },
            "unknown_parameter",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            },
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {"type": "realtime", "audio": {"output": {"speed": 3}}},
            "invalid_value",
            "session.audio.output.speed",
        ),
        ({"type": "realtime", "model": "gpt-4o"}, "invalid_value", "session.model"),
        (
            {"type": "realtime", "output_modalities": ["text", "audio"]},
            "invalid_value",
            "session.output_modalities",
        ),
        (
            {"type": "realtime", "tools": [{"type": "function"}]},
            "missing_required_parameter",
            "session.tools[0].name",
        ),
        (
            {"type": "realtime", "max_output_tokens": "lots"},
            "invalid_value",
            "session.max_output_tokens",
        ),
    ],
)
async def test_bad_session_update_is_an_error_and_the_session_goes_on(session, code, param):
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.send({"type": "session.update", "event_id": "evt_9", "session": session})
            err = await c.recv()
            assert err["type"] == "error"
            assert (err["error"]["code"], err["error"]["param"]) == (code, param)
            assert err["error"]["type"] == "invalid_request_error"
            assert err["error"]["event_id"] == "evt_9"
            await c.send({"type": "session.update", "session": {"type": "realtime"}})
            assert (await c.recv())["type"] == "session.updated"


async def test_beta_header_gets_beta_api_shape_disabled_then_close_4000():
    with trio.fail_after(10):
        async with (
            open_simulator() as rt,
            connect_client(rt.url, headers=[("OpenAI-Beta", "realtime=v1")]) as c,
        ):
            err = await c.recv()
            assert err["error"]["code"] == "beta_api_shape_disabled"
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.reason.code == 4000


async def test_unknown_model_is_an_error_then_close():
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url, model="gpt-9-turbo") as c:
            assert (await c.recv())["error"]["code"] == "model_not_found"
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.reason.code == 3000


async def test_wrong_api_key_like_the_real_api_and_as_401():
    with trio.fail_after(10):
        async with open_simulator(api_key="sk-right-key-1234") as rt:
            async with connect_client(
                rt.url, headers=[("Authorization", "Bearer sk-wrong-key-99")]
            ) as c:
                err = await c.recv()
                assert err["error"]["code"] == "invalid_api_key"
                assert "sk-right" not in err["error"]["message"]
                with pytest.raises(ConnectionClosed) as closed:
                    await c.recv()
                assert closed.value.reason.code == 3000
                assert closed.value.reason.reason == "invalid_request_error.invalid_api_key"
            async with connect_client(
                rt.url, headers=[("Authorization", "Bearer sk-right-key-1234")]
            ) as c:
                assert (await c.recv())["type"] == "session.created"
        async with open_simulator(api_key="k", auth_failure="reject") as rt:
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(rt.url + "?model=gpt-realtime"):
                    pass  # pragma: no cover
            assert rejected.value.status_code == 401
            assert json.loads(rejected.value.body)["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------- VAD


async def test_vad_timings_on_real_speech_follow_the_audio_timeline(autojump_clock):
    label = LABELS["order"]
    with trio.fail_after(30):
        async with open_simulator(**FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            # Sent as fast as possible: the times must come from the audio, not the clock.
            await c.append_audio(order_pcm() + silence(1000))
            started = (await c.recv_until("input_audio_buffer.speech_started"))[-1]
            stopped = (await c.recv_until("input_audio_buffer.speech_stopped"))[-1]
    # 20 ms frames: the start is the first loud frame (label 500 ms is frame-aligned) minus
    # the 300 ms prefix; the end is the last loud frame's end (rounded up to a frame, or
    # one frame early on a tail below -40 dBFS) plus 500 ms of silence.
    assert started["audio_start_ms"] == pytest.approx(label["speech_start_ms"] - 300, abs=20)
    assert stopped["audio_end_ms"] == pytest.approx(label["speech_end_ms"] + 500, abs=25)
    assert started["item_id"] == stopped["item_id"]


async def test_vad_settings_move_the_timings(autojump_clock):
    label = LABELS["order"]
    with trio.fail_after(30):
        async with open_simulator(**FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            td = {
                "type": "server_vad",
                "prefix_padding_ms": 100,
                "silence_duration_ms": 400,
                "create_response": False,
            }
            await c.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": td}}},
                }
            )
            await c.recv()
            await c.append_audio(order_pcm() + silence(1000))
            got = await c.recv_until("conversation.item.done")
            assert "response.created" not in types(got)
            with trio.move_on_after(5):  # create_response false: nothing else comes
                extra = await c.recv()
                pytest.fail(f"unexpected {extra}")
    started, stopped = got[0], got[1]
    assert started["audio_start_ms"] == pytest.approx(label["speech_start_ms"] - 100, abs=20)
    assert stopped["audio_end_ms"] == pytest.approx(label["speech_end_ms"] + 400, abs=25)


async def test_noise_alone_never_starts_speech(autojump_clock):
    with trio.fail_after(30):
        async with open_simulator(**FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.append_audio(read_wav(AUDIO / "noise_24k.wav"))
            await c.send({"type": "input_audio_buffer.clear"})
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"


async def test_pcmu_input_gets_the_same_timings(autojump_clock):
    raw = (AUDIO / "order_8k_ulaw.wav").read_bytes()
    data = raw[raw.index(b"data") + 8 :]
    with trio.fail_after(30):
        async with open_simulator(**FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            fmt = {"type": "audio/pcmu"}
            await c.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "audio": {"input": {"format": fmt}, "output": {"format": fmt}},
                    },
                }
            )
            assert (await c.recv())["session"]["audio"]["input"]["format"] == fmt
            await c.append_audio(data + b"\xff" * 8000, chunk_bytes=1600)
            got = await c.recv_until("response.done")
    assert got[0]["audio_start_ms"] == pytest.approx(200, abs=20)
    assert got[1]["audio_end_ms"] == pytest.approx(LABELS["order"]["speech_end_ms"] + 500, abs=25)
    # Echo in mu-law: one byte per sample at 8 kHz, as long as the committed turn.
    committed = rt.sim.connections[0].committed_audio[got[0]["item_id"]]
    assert abs(len(audio_of(got)) - len(committed)) <= 8


# ---------------------------------------------------------------------- responses


async def test_echo_brain_plays_back_the_committed_turn_and_nothing_is_lost(autojump_clock):
    pcm = order_pcm() + silence(1000)
    with trio.fail_after(30):
        async with open_simulator(**FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.append_audio(pcm)
            got = await c.recv_until("response.done")
            limits = await c.recv()
    t = types(got)
    assert t[:7] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
    ]
    assert t[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert limits["type"] == "rate_limits.updated"
    committed = got[2]
    assert committed["item_id"] == got[0]["item_id"] and committed["previous_item_id"] is None
    rec = rt.sim.connections[0]
    # Every byte sent arrived; the committed item is exactly speech start..stop.
    assert rec.received_audio == pcm and rec.received_audio_bytes == len(pcm)
    start, end = got[0]["audio_start_ms"], got[1]["audio_end_ms"]
    assert rec.committed_audio[committed["item_id"]] == pcm[start * 48 : end * 48]
    assert audio_of(got) == pcm[start * 48 : end * 48]
    deltas = [e for e in got if e["type"] == "response.output_audio.delta"]
    assert all(len(base64.b64decode(d["delta"])) == 4800 for d in deltas[:-1])
    done = got[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["total_tokens"] > 0
    assert done["output"][0]["role"] == "assistant"


async def test_audio_is_paced_faster_than_real_time_after_the_first_byte_delay(autojump_clock):
    with trio.fail_after(30):
        async with open_simulator(first_byte_ms=400, speed=4.0) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.append_audio(order_pcm() + silence(1000))
            await c.recv_until("response.created")
            t0 = trio.current_time()
            got = await c.recv_until("response.output_audio.delta")
            first = trio.current_time() - t0
            await c.recv_until("response.output_audio.done")
            total = trio.current_time() - t0
    assert first == pytest.approx(0.4, abs=0.01)
    played_s = 5.58  # the echoed turn (5780 - 200 ms)
    assert total == pytest.approx(0.4 + (played_s - 0.1) / 4, abs=0.05)
    assert got[-1]["type"] == "response.output_audio.delta"


async def test_text_modality_streams_output_text(autojump_clock):
    script = parse_script({"turn": [{"transcript": "Two burgers coming up."}]}, base=Path("."))
    with trio.fail_after(10):
        async with open_simulator(script=script, **FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "output_modalities": ["text"]},
                }
            )
            await c.recv()
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "two burgers"}],
                    },
                }
            )
            assert types(await c.recv_until("conversation.item.done")) == [
                "conversation.item.added",
                "conversation.item.done",
            ]
            await c.send({"type": "response.create"})
            got = await c.recv_until("response.done")
    assert (
        "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
        == "Two burgers coming up."
    )
    assert not any("audio" in x for x in types(got))
    assert got[-1]["response"]["output"][0]["content"] == [
        {"type": "output_text", "text": "Two burgers coming up."}
    ]


async def test_scripted_function_call_round_trip(autojump_clock):
    script = parse_script(
        {
            "turn": [
                {
                    "function_call": [
                        {
                            "name": "place_order",
                            "arguments": {"items": ["burger", "fries"], "note": "x" * 60},
                        }
                    ],
                    "after_output": {
                        "transcript": "Order placed.",
                        "audio": {"tone_hz": 500, "ms": 700},
                    },
                }
            ]
        },
        base=Path("."),
    )
    with trio.fail_after(30):
        async with open_simulator(script=script, **FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.append_audio(order_pcm() + silence(1000))
            got = await c.recv_until("response.done")
            assert (await c.recv())["type"] == "rate_limits.updated"
            deltas = [e for e in got if e["type"] == "response.function_call_arguments.delta"]
            args_done = next(e for e in got if e["type"] == "response.function_call_arguments.done")
            item_done = next(e for e in got if e["type"] == "response.output_item.done")
            # The same call twice on the wire, as upstream sends it.
            assert len(deltas) > 1 and "".join(d["delta"] for d in deltas) == args_done["arguments"]
            assert json.loads(args_done["arguments"])["items"] == ["burger", "fries"]
            assert item_done["item"]["call_id"] == args_done["call_id"]
            assert item_done["item"]["arguments"] == args_done["arguments"]
            assert args_done["name"] == "place_order"
            assert not any(e["type"] == "response.output_audio.delta" for e in got)
            # An output for an unknown call is refused; the right one is accepted.
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "function_call_output",
                        "call_id": "call_nope",
                        "output": "{}",
                    },
                }
            )
            err = await c.recv()
            assert (err["error"]["code"], err["error"]["param"]) == (
                "invalid_value",
                "item.call_id",
            )
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "function_call_output",
                        "call_id": args_done["call_id"],
                        "output": '{"ok": true}',
                    },
                }
            )
            added = await c.recv()
            assert added["type"] == "conversation.item.added"
            assert added["previous_item_id"] == item_done["item"]["id"]
            await c.recv()
            await c.send({"type": "response.create"})
            after = await c.recv_until("response.done")
    transcript = next(e for e in after if e["type"] == "response.output_audio_transcript.done")
    assert transcript["transcript"] == "Order placed."
    assert audio_of(after) == tone(700, 500)


async def test_response_create_while_active_and_cancel_semantics(autojump_clock):
    script = parse_script({"turn": [{"audio": {"tone_hz": 300, "ms": 3000}}] * 3}, base=Path("."))
    with trio.fail_after(30):
        async with (
            open_simulator(script=script, first_byte_ms=100, speed=1.0) as rt,
            connect_client(rt.url) as c,
        ):
            await c.recv()
            await c.send({"type": "response.cancel", "event_id": "c0"})
            err = await c.recv()
            assert (err["error"]["code"], err["error"]["event_id"]) == (
                "response_cancel_not_active",
                "c0",
            )
            await c.send({"type": "response.create"})
            created = await c.recv()
            assert created["type"] == "response.created"
            await c.send({"type": "response.create", "event_id": "c1"})
            got = await c.recv_until("error")
            assert got[-1]["error"]["code"] == "conversation_already_has_active_response"
            await c.recv_until("response.output_audio.delta")
            await c.send({"type": "response.cancel"})
            got = await c.recv_until("response.done")
            done = got[-1]["response"]
            assert done["id"] == created["response"]["id"]
            assert done["status"] == "cancelled"
            assert done["status_details"]["reason"] == "client_cancelled"
            assert done["output"][0]["status"] == "incomplete"
            # Nothing of the cancelled response follows; the session goes on.
            assert (await c.recv())["type"] == "rate_limits.updated"
            await c.send({"type": "response.create"})
            after = await c.recv()
            assert after["type"] == "response.created"
            assert after["response"]["id"] != done["id"]


async def test_speech_during_a_response_cancels_it_with_turn_detected(autojump_clock):
    script = parse_script({"turn": [{"audio": {"tone_hz": 300, "ms": 8000}}]}, base=Path("."))
    with trio.fail_after(60):
        async with (
            open_simulator(script=script, first_byte_ms=100, speed=1.0) as rt,
            connect_client(rt.url) as c,
        ):
            await c.recv()
            await c.append_audio(order_pcm() + silence(1000))
            await c.recv_until("response.output_audio.delta")
            await c.append_audio(order_pcm())
            got = await c.recv_until("response.done")
    started = types(got).index("input_audio_buffer.speech_started")
    assert started < len(got) - 1
    assert got[-1]["response"]["status"] == "cancelled"
    assert got[-1]["response"]["status_details"]["reason"] == "turn_detected"


async def test_truncate_checks_against_the_audio_sent(autojump_clock):
    script = parse_script(
        {"turn": [{"transcript": "hello there", "audio": {"tone_hz": 300, "ms": 1000}}]},
        base=Path("."),
    )
    with trio.fail_after(30):
        async with open_simulator(script=script, **FAST) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.send({"type": "response.create"})
            got = await c.recv_until("response.done")
            assert (await c.recv())["type"] == "rate_limits.updated"
            item_id = got[-1]["response"]["output"][0]["id"]
            await c.send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": 1500,
                }
            )
            err = await c.recv()
            assert err["type"] == "error" and err["error"]["param"] == "audio_end_ms"
            assert "1000ms" in err["error"]["message"]
            await c.send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": "item_x",
                    "content_index": 0,
                    "audio_end_ms": 0,
                }
            )
            assert (await c.recv())["error"]["param"] == "item_id"
            await c.send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": 400,
                }
            )
            ok = await c.recv_until("conversation.item.truncated")
            assert ok[-1]["audio_end_ms"] == 400
            await c.send({"type": "conversation.item.retrieve", "item_id": item_id})
            retrieved = await c.recv()
            assert retrieved["item"]["content"][0]["transcript"] == ""


async def test_items_create_retrieve_delete_and_unknown_ids():
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            await c.recv()
            item = {
                "id": "item_mine",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            }
            await c.send({"type": "conversation.item.create", "item": item})
            added, done = await c.recv(), await c.recv()
            assert added["item"]["id"] == done["item"]["id"] == "item_mine"
            await c.send({"type": "conversation.item.create", "item": item})
            assert (await c.recv())["error"]["param"] == "item.id"
            await c.send({"type": "conversation.item.retrieve", "item_id": "item_mine"})
            got = await c.recv()
            assert got["type"] == "conversation.item.retrieved"
            assert got["item"]["content"] == [{"type": "input_text", "text": "hi"}]
            await c.send({"type": "conversation.item.delete", "item_id": "item_mine"})
            assert await c.recv() == {
                "type": "conversation.item.deleted",
                "event_id": c.seen[-1]["event_id"],
                "item_id": "item_mine",
            }
            for ev in ("conversation.item.retrieve", "conversation.item.delete"):
                await c.send({"type": ev, "item_id": "item_mine"})
                err = await c.recv()
                assert (err["error"]["code"], err["error"]["param"]) == ("invalid_value", "item_id")
            await c.send(
                {"type": "conversation.item.create", "previous_item_id": "nope", "item": item}
            )
            assert (await c.recv())["error"]["param"] == "previous_item_id"


async def test_manual_commit_clear_and_commit_empty():
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
                }
            )
            await c.recv()
            await c.append_audio(tone(50))
            await c.send({"type": "input_audio_buffer.commit", "event_id": "k1"})
            err = await c.recv()
            assert err["error"]["code"] == "input_audio_buffer_commit_empty"
            assert "50.00ms" in err["error"]["message"]
            await c.append_audio(tone(200))
            await c.send({"type": "input_audio_buffer.commit"})
            committed = await c.recv()
            assert committed["type"] == "input_audio_buffer.committed"
            assert types(await c.recv_until("conversation.item.done")) == [
                "conversation.item.added",
                "conversation.item.done",
            ]
            rec = rt.sim.connections[0]
            assert rec.committed_audio[committed["item_id"]] == tone(50) + tone(200)
            await c.append_audio(tone(300))
            await c.send({"type": "input_audio_buffer.clear"})
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"
            await c.send({"type": "input_audio_buffer.commit"})
            assert (await c.recv())["error"]["code"] == "input_audio_buffer_commit_empty"
            assert rec.received_audio == tone(50) + tone(200) + tone(300)


@pytest.mark.parametrize(
    ("frame", "code", "param"),
    [
        ('{"type": "response.create"', "invalid_json", None),
        ('{"type": "response.creat"}', "invalid_value", "type"),
        ('{"type": "input_audio_buffer.append", "audio": "AA-_"}', "invalid_value", "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAA"}', "invalid_value", "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AA=="}', "invalid_value", "audio"),
        (
            '{"type": "input_audio_buffer.append", "audio": "AAAA", "audoi": "x"}',
            "unknown_parameter",
            "audoi",
        ),
        (
            '{"type": "conversation.item.truncate", "item_id": "a", "content_index": 0}',
            "missing_required_parameter",
            "audio_end_ms",
        ),
        ('{"type": "output_audio_buffer.clear"}', "invalid_value", "type"),
    ],
)
async def test_bad_client_frames_get_errors_and_the_session_goes_on(frame, code, param):
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.ws.send_message(frame)
            err = await c.recv()
            assert err["type"] == "error"
            assert (err["error"]["code"], err["error"]["param"]) == (code, param)
            await c.send({"type": "input_audio_buffer.clear"})
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"


async def test_binary_frame_closes_1003():
    with trio.fail_after(10):
        async with open_simulator() as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.ws.send_message(b"\x00\x01")
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.reason.code == 1003


async def test_session_expires_with_session_expired_then_1001(autojump_clock):
    with trio.fail_after(600):
        async with open_simulator(max_session_s=120) as rt, connect_client(rt.url) as c:
            t0 = trio.current_time()
            await c.recv()
            err = await c.recv()
            assert err["error"]["code"] == "session_expired"
            assert err["error"]["message"] == "Your session hit the maximum duration of 2 minutes."
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.reason.code == 1001
            assert trio.current_time() - t0 == pytest.approx(120, abs=0.5)


async def test_same_seed_same_conversation(autojump_clock):
    async def one_run() -> list[dict]:
        async with open_simulator(seed=42, **FAST) as rt, connect_client(rt.url) as c:
            await c.append_audio(order_pcm() + silence(1000))
            return await c.recv_until("response.done")

    with trio.fail_after(60):
        a, b = await one_run(), await one_run()
    assert a == b


async def test_simulator_serve_reports_port_and_stops_cleanly():
    sim = Simulator()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve, "127.0.0.1", 0)
            assert port == sim.port and port > 0
            async with connect_client(f"ws://127.0.0.1:{port}/v1/realtime") as c:
                assert (await c.recv())["type"] == "session.created"
                # Cancelling the server with a client still connected ends both.
                nursery.cancel_scope.cancel()
    assert sim.active_connections == 0


def _task_count() -> int:
    stack, n = [trio.lowlevel.current_root_task()], 0
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


async def test_open_simulator_leaves_no_task_behind(autojump_clock):
    before = _task_count()
    script = parse_script({"turn": [{"audio": {"tone_hz": 300, "ms": 5000}}]}, base=Path("."))
    with trio.fail_after(30):
        async with open_simulator(script=script, speed=1.0) as rt:
            async with connect_client(rt.url) as c:
                await c.send({"type": "response.create"})
                await c.recv_until("response.output_audio.delta")
                assert _task_count() > before
            # The client left mid-response; the server side winds down with it.
    assert _task_count() == before
    assert rt.sim.active_connections == 0
