"""The official ``openai`` SDK talks to the simulator, and every frame both ways validates
against the SDK's own models (discriminated on ``type``, so a wrong shape fails).

The SDK's sync client uses ``websockets.sync``; the simulator runs in its own thread with
its own ``trio.run``. Bounds: the simulator's ``max_session_s`` ends a stuck session (the
SDK's ``recv`` has no timeout of its own) and every join has a timeout.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
import trio
from openai import OpenAI
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import Field, TypeAdapter

from voiceactors.sim import Simulator, parse_script
from voiceactors.sim.audio import read_wav, silence

AUDIO = Path(__file__).parent / "fixtures" / "audio"
SERVER_EVENTS = TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])
CLIENT_EVENTS = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])


@contextmanager
def simulator_thread(**config: Any) -> Iterator[tuple[Simulator, int]]:
    sim = Simulator(max_session_s=20, first_byte_ms=50, speed=20.0, **config)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            box["port"] = await nursery.start(sim.serve, "127.0.0.1", 0)
            box["token"] = trio.lowlevel.current_trio_token()
            box["cancel"] = nursery.cancel_scope.cancel
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(10), "simulator did not start"
    try:
        yield sim, box["port"]
    finally:
        trio.from_thread.run_sync(box["cancel"], trio_token=box["token"])
        thread.join(10)
        assert not thread.is_alive()


def recv_until(conn, type_: str, frames: list[bytes]) -> list[dict]:
    out = []
    while True:
        raw = conn.recv_bytes()
        frames.append(raw)
        SERVER_EVENTS.validate_json(raw)  # raises on a wrong shape
        event = json.loads(raw)
        out.append(event)
        if event["type"] == type_:
            return out


def check_client_events(sim: Simulator) -> int:
    enc = msgspec.json.Encoder()
    events = sim.connections[0].received_events
    for e in events:
        CLIENT_EVENTS.validate_json(enc.encode(e))
    return len(events)


def test_sdk_full_voice_turn():
    pcm = read_wav(AUDIO / "order_24k.wav") + silence(1000)
    frames: list[bytes] = []
    with simulator_thread() as (sim, port):
        client = OpenAI(api_key="x", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        with client.realtime.connect(model="gpt-realtime") as conn:
            assert recv_until(conn, "session.created", frames)[0]["session"]["type"] == "realtime"
            conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "Take food orders.",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "transcription": {"model": "gpt-4o-mini-transcribe"},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                        },
                        "output": {"voice": "marin"},
                    },
                }
            )
            recv_until(conn, "session.updated", frames)
            for i in range(0, len(pcm), 4800):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
            got = recv_until(conn, "response.done", frames)
            got += recv_until(conn, "rate_limits.updated", frames)
            # The SDK's own parser agrees on every frame too.
            assert [type(conn.parse_event(f)).__name__ for f in frames[-2:]] == [
                "ResponseDoneEvent",
                "RateLimitsUpdatedEvent",
            ]
        accepted = check_client_events(sim)
    types = [e["type"] for e in got]
    for needed in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio_transcript.done",
        "response.done",
    ):
        assert needed in types
    assert got[types.index("response.done")]["response"]["status"] == "completed"
    assert accepted == 1 + len(range(0, len(pcm), 4800))
    assert sim.connections[0].received_audio == pcm


def test_sdk_function_call_turn():
    script = parse_script(
        {
            "turn": [
                {
                    "function_call": [
                        {"name": "place_order", "arguments": '{"items": ["burger"]}'}
                    ],
                    "after_output": {"transcript": "Done.", "audio": {"tone_hz": 400, "ms": 300}},
                }
            ]
        },
        base=Path("."),
    )
    frames: list[bytes] = []
    with simulator_thread(script=script) as (sim, port):
        client = OpenAI(api_key="x", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        with client.realtime.connect(model="gpt-realtime") as conn:
            recv_until(conn, "session.created", frames)
            conn.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "tools": [
                        {
                            "type": "function",
                            "name": "place_order",
                            "description": "Place the order.",
                            "parameters": {
                                "type": "object",
                                "properties": {"items": {"type": "array"}},
                            },
                        }
                    ],
                    "tool_choice": "auto",
                    "audio": {"input": {"turn_detection": None}},
                }
            )
            recv_until(conn, "session.updated", frames)
            conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a burger"}],
                }
            )
            conn.response.create()
            got = recv_until(conn, "response.done", frames)
            call = next(e for e in got if e["type"] == "response.function_call_arguments.done")
            assert call["name"] == "place_order"
            conn.conversation.item.create(
                item={
                    "type": "function_call_output",
                    "call_id": call["call_id"],
                    "output": '{"ok": true}',
                }
            )
            conn.response.create(response={"output_modalities": ["audio"]})
            after = recv_until(conn, "response.done", frames)
            conn.response.cancel()
            err = recv_until(conn, "error", frames)[-1]
            assert err["error"]["code"] == "response_cancel_not_active"
        check_client_events(sim)
    assert after[-1]["response"]["status"] == "completed"
    assert any(e["type"] == "response.output_audio.delta" for e in after)


@pytest.mark.parametrize(
    "frame", [b'{"type":"response.audio.delta"}', b'{"type":"error","event_id":"e"}']
)
def test_the_sdk_check_is_strict(frame):
    with pytest.raises(ValueError):
        SERVER_EVENTS.validate_json(frame)
