"""The playback actor alone: the turn machine's driver, with a recording client link.

These drive ``Playback`` with upstream events as the upstream actor would deliver them,
so the server-first barge-in (the upstream's ``speech_started`` before any local VAD) and
the pacing are checked without sockets, in virtual time.
"""

from __future__ import annotations

import base64
from typing import Any

import trio
import trio.testing

from voiceactors.channels import open_edge
from voiceactors.machines.turn import TurnConfig
from voiceactors.realtime import events as ev
from voiceactors.realtime.codec import ServerEventDecoder
from voiceactors.runtime import RuntimeConfig
from voiceactors.runtime.client import ClientLink
from voiceactors.runtime.context import SessionContext
from voiceactors.runtime.playback import Playback


class Port:
    """A client socket that records (time, decoded server event) for every frame sent."""

    closed = None

    def __init__(self) -> None:
        self.sent: list[tuple[float, Any]] = []
        self._decoder = ServerEventDecoder()

    async def send_message(self, text: str) -> None:
        self.sent.append((trio.current_time(), self._decoder.decode(text)))

    def types(self) -> list[str]:
        return [type(e).__struct_config__.tag for _, e in self.sent]  # type: ignore[attr-defined]


def recording_link() -> tuple[ClientLink, Port]:
    port = Port()
    return ClientLink(port, send_timeout=5.0), port  # type: ignore[arg-type]


class Upstream:
    def input_origin_ms(self) -> float:
        return 0.0


def delta(item: str, ms: int, rid: str = "resp_1") -> ev.ResponseOutputAudioDelta:
    audio = base64.b64encode(bytes(48 * ms)).decode()
    return ev.ResponseOutputAudioDelta(
        response_id=rid, item_id=item, output_index=0, content_index=0, delta=audio
    )


async def test_server_speech_first_pauses_then_barges_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No local VAD at all: the upstream's ``speech_started`` alone pauses playback, and
    after min speech (counted from the onset it reports) flushes, cancels and truncates at
    the played position."""
    cfg = RuntimeConfig(turn=TurnConfig(min_speech_ms=400.0))
    ctx = SessionContext(opened_at=trio.current_time())
    link, port = recording_link()
    up = open_edge("up", 16)
    tools = open_edge("tools", 4)
    play = open_edge("play", 16)
    pb = Playback(ctx, cfg, link, up.sender, tools.sender, Upstream())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pb.run, play.receiver)
        t0 = trio.current_time()
        created = ev.ResponseCreated(response=ev.Response(id="resp_1", status="in_progress"))
        await play.sender.send(created)
        for _ in range(30):  # 3 s of agent audio, bursting in at once
            await play.sender.send(delta("item_a", 100))
        await trio.sleep_until(t0 + 1.0)  # the user has heard ~1 s
        # The user started 300 ms ago (prefix padding 300 ms: audio_start_ms = onset - 300).
        ctx.input_ms = 5000.0
        await play.sender.send(
            ev.InputAudioBufferSpeechStarted(audio_start_ms=5000 - 300 - 300, item_id="u1")
        )
        await trio.sleep_until(t0 + 1.5)
        nursery.cancel_scope.cancel()
    sent_up = []
    while True:
        try:
            sent_up.append(up.receiver.receive_nowait())
        except trio.WouldBlock:
            break
    for e in (up, tools, play):
        e.close()
    types = port.types()
    assert "output_audio_buffer.cleared" in types
    cleared_at = next(t for t, e in port.sent if isinstance(e, ev.OutputAudioBufferCleared))
    # min speech from the reported onset (0.7 s), not from when the event arrived (1.0 s).
    assert abs((cleared_at - t0) - (0.7 + 0.4)) < 1e-6
    cancel = [m for m in sent_up if isinstance(m, ev.ResponseCancel)]
    truncate = [m for m in sent_up if isinstance(m, ev.ConversationItemTruncate)]
    assert [c.response_id for c in cancel] == ["resp_1"]
    assert len(truncate) == 1 and truncate[0].item_id == "item_a"
    # Playback paused at 1.0 s: the client plays out what it had (sent up to the lead) and
    # the truncation is exactly what was sent, i.e. played, never the 3 s received.
    sent_ms = sum(100 for _, e in port.sent if isinstance(e, ev.ResponseOutputAudioDelta))
    assert truncate[0].audio_end_ms == sent_ms
    assert 1000 <= sent_ms <= 1000 + cfg.playback.max_lead_ms + 100
    # Nothing was sent to the client after the pause except the clear and no audio.
    after = [e for t, e in port.sent if t > t0 + 1.0]
    assert not any(isinstance(e, ev.ResponseOutputAudioDelta) for e in after)


async def test_audio_is_paced_against_the_playout_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """10 s of audio arriving at once is released so that the client never holds more than
    the target lead plus one chunk; the response's other events follow their audio."""
    cfg = RuntimeConfig()
    ctx = SessionContext(opened_at=trio.current_time())
    link, port = recording_link()
    up, tools, play = open_edge("up", 16), open_edge("tools", 4), open_edge("play", 256)
    pb = Playback(ctx, cfg, link, up.sender, tools.sender, Upstream())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pb.run, play.receiver)
        t0 = trio.current_time()
        await play.sender.send(
            ev.ResponseCreated(response=ev.Response(id="resp_1", status="in_progress"))
        )
        for _ in range(100):
            await play.sender.send(delta("item_a", 100))
        await play.sender.send(
            ev.ResponseDone(response=ev.Response(id="resp_1", status="completed"))
        )
        await trio.sleep_until(t0 + 11.0)
        nursery.cancel_scope.cancel()
    for e in (up, tools, play):
        e.close()
    audio = [(t, e) for t, e in port.sent if isinstance(e, ev.ResponseOutputAudioDelta)]
    assert len(audio) == 100
    lead = cfg.playback.min_lead_ms  # no client jitter measured
    for k, (t, _) in enumerate(audio):
        sent_before = k * 100
        played = (t - t0) * 1000
        assert sent_before - played <= lead + 1e-6
    done_at = next(t for t, e in port.sent if isinstance(e, ev.ResponseDone))
    assert done_at >= audio[-1][0]
    assert ctx.underruns == 0 and ctx.audio_ms_out == 10_000


async def test_overflowing_audio_is_dropped_counted_and_the_client_told(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from voiceactors.runtime import PlaybackConfig

    cfg = RuntimeConfig(playback=PlaybackConfig(max_buffer_ms=1000.0))
    ctx = SessionContext(opened_at=trio.current_time())
    link, port = recording_link()
    up, tools, play = open_edge("up", 16), open_edge("tools", 4), open_edge("play", 64)
    pb = Playback(ctx, cfg, link, up.sender, tools.sender, Upstream())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pb.run, play.receiver)
        await play.sender.send(
            ev.ResponseCreated(response=ev.Response(id="resp_1", status="in_progress"))
        )
        for _ in range(30):  # 3 s at once against a 1 s buffer
            await play.sender.send(delta("item_a", 100))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    for e in (up, tools, play):
        e.close()
    errors = [e for _, e in port.sent if isinstance(e, ev.ErrorEvent)]
    assert [e.error.code for e in errors] == ["agent_audio_dropped"]
    played = sum(100 for _, e in port.sent if isinstance(e, ev.ResponseOutputAudioDelta))
    assert played + ctx.audio_ms_dropped == 3000
    assert 1000 <= played <= 1000 + cfg.playback.min_lead_ms + 100
