"""The official ``openai`` SDK against the gateway (not the bare simulator): a voice turn and
a function-call turn the runtime completes server-side, every frame both ways validated
against the SDK's own models (discriminated on ``type``, so a wrong shape fails).

The SDK's sync client (``websockets.sync``) runs in the test thread; the gateway, the runtime
and its embedded simulator run in a thread of their own under ``leak_checked_run`` (so the
server side must also leave no task, deadline or edge behind) with a ``MockClock`` running
``RATE`` times faster than real time: the runtime paces agent audio at real (virtual) speed,
and this keeps a 5 s answer to a fraction of a second. Bounds: the runtime's
``max_session_s`` (virtual) ends a stuck session, which ends the SDK's ``recv``; every
join has a timeout.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import trio
import trio.testing
from openai import OpenAI
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import Field, TypeAdapter

from voiceactors.audio.wav import read_wav
from voiceactors.gateway import ClientInfo, Gateway, GatewayConfig
from voiceactors.realtime import events as ev
from voiceactors.runtime import RuntimeConfig, open_runtime_from_config
from voiceactors.sim import Simulator, load_script
from voiceactors.sim.config import SimConfig
from voiceactors.testing.leaks import leak_checked_run

AUDIO = Path(__file__).parent / "fixtures" / "audio"
ORDER_SCRIPT = Path(__file__).resolve().parents[1] / "specs" / "sim-examples" / "order.toml"
SERVER_EVENTS = TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])
CLIENT_EVENTS = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])
RATE = 10.0  # virtual seconds per real second in the server thread
CHUNK = 4800  # 100 ms of PCM16 at 24 kHz


def speech(name: str) -> bytes:
    fmt, pcm = read_wav(AUDIO / name)
    assert (fmt.encoding, fmt.rate) == ("pcm16", 24000)
    return pcm


def config(**sim: Any) -> RuntimeConfig:
    # Virtual seconds: max_session_s bounds a stuck SDK recv to 4 s of real time; the
    # send timeout is generous because the reader is another thread of this process.
    return RuntimeConfig(
        sim=SimConfig(first_byte_ms=50, speed=20, **sim),
        max_session_s=40,
        client_send_timeout_s=60,
    )


@dataclass
class Served:
    """The gateway thread's handles: its port, its simulator, the frames clients sent."""

    port: int
    sim: Simulator
    client_frames: list[str | bytes] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"


class RecordingPort:
    """The client's socket as the runtime sees it, keeping every frame the client sent."""

    def __init__(self, ws: Any, frames: list[str | bytes]) -> None:
        self._ws = ws
        self._frames = frames

    @property
    def closed(self) -> Any:
        return self._ws.closed

    async def get_message(self) -> str | bytes:
        message = await self._ws.get_message()
        self._frames.append(message)
        return message

    async def send_message(self, message: str | bytes) -> None:
        await self._ws.send_message(message)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._ws.aclose(code, reason)


@contextmanager
def gateway_thread(cfg: RuntimeConfig) -> Iterator[Served]:
    """Gateway + runtime + embedded simulator in a Trio thread, until the block ends."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with open_runtime_from_config(cfg) as runtime:
            assert runtime.sim is not None
            frames: list[str | bytes] = []

            async def handler(ws: Any, info: ClientInfo) -> None:
                await runtime.handle_client(RecordingPort(ws, frames), info)

            gw = Gateway(
                GatewayConfig(host="127.0.0.1", port=0, handshake_timeout=60.0),
                handler,
                readiness=runtime.readiness,
                metrics=runtime.metrics,
            )
            async with trio.open_nursery() as nursery:
                port = await nursery.start(gw.serve)
                box["served"] = Served(port, runtime.sim.sim, frames)
                box["token"] = trio.lowlevel.current_trio_token()
                box["cancel"] = nursery.cancel_scope.cancel
                ready.set()

    def main() -> None:
        try:
            leak_checked_run(serve, clock=trio.testing.MockClock(rate=RATE))
        except BaseException as exc:  # reported to the test thread below
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10), "gateway did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield box["served"]
    finally:
        trio.from_thread.run_sync(box["cancel"], trio_token=box["token"])
        thread.join(10)
        assert not thread.is_alive(), "gateway thread did not stop"
    if "error" in box:
        raise box["error"]  # e.g. the leak check


def recv_until(conn: Any, type_: str, frames: list[bytes]) -> list[dict[str, Any]]:
    """Server events up to and including the first ``type_``, each validated strictly."""
    out = []
    while True:
        raw = conn.recv_bytes()
        frames.append(raw)
        SERVER_EVENTS.validate_json(raw)  # raises on a wrong shape
        event = json.loads(raw)
        out.append(event)
        if event["type"] == type_:
            return out


def send_audio(conn: Any, pcm: bytes) -> int:
    n = 0
    for i in range(0, len(pcm), CHUNK):
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + CHUNK]).decode())
        n += 1
    return n


def check_client_frames(frames: list[str | bytes]) -> list[str]:
    """Every frame the SDK sent is a valid GA client event; their types."""
    for frame in frames:
        CLIENT_EVENTS.validate_json(frame)
    return [json.loads(f)["type"] for f in frames]


def check_upstream_events(sim: Simulator) -> None:
    """What the runtime sent upstream is GA too (the simulator recorded it decoded)."""
    enc = msgspec.json.Encoder()
    for rec in sim.connections:
        for event in rec.received_events:
            CLIENT_EVENTS.validate_json(enc.encode(event))


def audio_connection(sim: Simulator) -> Any:
    """The one upstream connection that carried the session's audio (the pool opens more)."""
    (rec,) = [r for r in sim.connections if r.received_audio_bytes]
    return rec


# -- tests -----------------------------------------------------------------------------------


def test_sdk_voice_turn_through_the_gateway() -> None:
    pcm = speech("order_24k.wav") + bytes(CHUNK * 10)  # + 1 s of silence ends the turn
    frames: list[bytes] = []
    with gateway_thread(config()) as served:
        client = OpenAI(api_key="x", websocket_base_url=served.base_url)
        with client.realtime.connect(model="gpt-realtime") as conn:
            created = recv_until(conn, "session.created", frames)[-1]
            assert created["session"]["audio"]["input"]["format"] == {
                "type": "audio/pcm",
                "rate": 24000,
            }
            conn.session.update(
                session={
                    "type": "realtime",
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
            updated = recv_until(conn, "session.updated", frames)[-1]
            appends = send_audio(conn, pcm)
            got = recv_until(conn, "response.done", frames)
            # The SDK's own parser agrees on the last frame too.
            assert type(conn.parse_event(frames[-1])).__name__ == "ResponseDoneEvent"
    # The session is over: everything the client sent has been read.
    sent = check_client_frames(served.client_frames)
    check_upstream_events(served.sim)
    rec = audio_connection(served.sim)

    assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    types = [e["type"] for e in got]
    for needed in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio_transcript.done",
    ):
        assert needed in types, needed
    assert "error" not in types
    done = got[-1]["response"]
    assert done["status"] == "completed"
    assert sent == ["session.update"] + ["input_audio_buffer.append"] * appends
    # Every byte reached the upstream, in order (the runtime forwards 24 kHz untouched).
    assert rec.received_audio == pcm
    # The answer (the simulator echoes the committed turn) arrived whole: 24 kHz PCM16.
    heard = sum(
        len(base64.b64decode(e["delta"])) for e in got if e["type"] == "response.output_audio.delta"
    )
    (committed,) = rec.committed_audio.values()
    assert heard == len(committed) > 48 * 3000


def test_sdk_function_call_turn_runs_the_tool_server_side() -> None:
    """order.toml: the first answer is a tone; the second turn calls ``place_order``, which
    the runtime's demo tools run (the client never sends ``function_call_output``); the
    client sees the call, then the model's follow-up answer."""
    frames: list[bytes] = []
    with gateway_thread(config(script=load_script(ORDER_SCRIPT))) as served:
        client = OpenAI(api_key="x", websocket_base_url=served.base_url)
        with client.realtime.connect(model="gpt-realtime") as conn:
            recv_until(conn, "session.created", frames)
            send_audio(conn, speech("order_24k.wav") + bytes(CHUNK * 10))
            first = recv_until(conn, "response.done", frames)
            send_audio(conn, speech("confirm_24k.wav") + bytes(CHUNK * 10))
            call_turn = recv_until(conn, "response.done", frames)
            follow_up = recv_until(conn, "response.done", frames)
    sent = check_client_frames(served.client_frames)
    check_upstream_events(served.sim)
    rec = audio_connection(served.sim)

    assert first[-1]["response"]["status"] == "completed"
    call = next(e for e in call_turn if e["type"] == "response.function_call_arguments.done")
    assert call["name"] == "place_order"
    assert call_turn[-1]["response"]["output"][0]["type"] == "function_call"
    # The runtime answered the call upstream, exactly once, with the demo tool's result.
    outputs = [
        e.item
        for e in rec.received_events
        if isinstance(e, ev.ConversationItemCreate)
        and isinstance(e.item, ev.FunctionCallOutputItem)
    ]
    assert [(o.call_id, json.loads(o.output)) for o in outputs] == [
        (call["call_id"], {"order_id": "order-1", "items": 3, "ready_in_minutes": 10})
    ]
    # ... and the client heard the model's follow-up.
    assert follow_up[-1]["response"]["status"] == "completed"
    transcript = next(e for e in follow_up if e["type"] == "response.output_audio_transcript.done")
    assert transcript["transcript"] == "Your order is placed. It will be ready in ten minutes."
    heard = sum(
        len(base64.b64decode(e["delta"]))
        for e in follow_up
        if e["type"] == "response.output_audio.delta"
    )
    assert heard == len(speech("confirm_24k.wav"))
    assert set(sent) == {"input_audio_buffer.append"}  # nothing but audio from the client
    assert not [e for e in first + call_turn + follow_up if e["type"] == "error"]
