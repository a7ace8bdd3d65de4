"""The browser page in real headless Chromium (Debian's ``/usr/bin/chromium``, Playwright),
through the real gateway.

The product path: the gateway serves the page at ``/``, the page opens the gateway's
``/v1/realtime`` with a token, and the session runtime relays to the embedded simulator
(``voiceactors.testing.open_gateway``). Chromium's fake microphone plays a WAV once
(``%noloop``); the simulator answers each turn by echoing the user's audio, with the
transcripts a script gives it. What each test proves is checked on every side it
touches: the page's counters (``window.voiceactors``) and DOM, the gateway's ``/metrics``
and the simulator's recording of what arrived upstream. The page's own protocol rules
that the gateway cannot show deterministically (late deltas after a flush, the fallback
for servers that interrupt by themselves) are checked against a scripted server, the
page still served by the gateway.

One Chromium per module: its fake-microphone file is reopened by every ``getUserMedia``,
so each test puts its own WAV in place first (``Microphone.play``).

Rules: loopback only; every wait is for a condition, bounded (``WAIT_MS``); Playwright's
sync API runs its own loop, so these are plain sync tests and each server runs
``trio.run`` in a thread of its own, reached with ``trio.from_thread``. A missing
Chromium or Playwright FAILS (CI must run this), unless ``VOICEACTORS_SKIP_BROWSER=1``.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import threading
import urllib.request
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
import numpy as np
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from voiceactors.gateway import GatewayConfig
from voiceactors.realtime import events as ev
from voiceactors.runtime import RuntimeConfig
from voiceactors.sim import SimConfig
from voiceactors.sim.script import Reply, Script
from voiceactors.sim.session import ConnectionRecord
from voiceactors.testing.gateway import RunningGateway, open_gateway

AUDIO = Path(__file__).resolve().parent / "fixtures" / "audio"
LABELS = json.loads((AUDIO / "labels.json").read_text())
CHROMIUM = os.environ.get("VOICEACTORS_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token"
WAIT_MS = 30_000
SCREENSHOT = "/tmp/voiceactors-page.png"

if os.environ.get("VOICEACTORS_SKIP_BROWSER") == "1":
    pytest.skip("VOICEACTORS_SKIP_BROWSER=1", allow_module_level=True)


# ------------------------------------------------------------------------ servers in threads


class TrioThread:
    """Run ``serve(task_status)`` under ``trio.run`` in a thread, for a sync test.

    ``with TrioThread(serve) as t:`` returns once ``serve`` called ``task_status.started(v)``
    (``t.value``) and raises if it failed first. ``t.call(fn)`` runs ``fn`` in the Trio
    thread (safe access to the server's state); ``t.run(afn)`` awaits ``afn()`` there.
    Leaving the block cancels everything and joins the thread (10 s at most).
    """

    def __init__(self, serve: Callable[..., Any]) -> None:
        self._serve = serve
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.value: Any = None

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self.value = await nursery.start(self._serve)
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:  # reported to the test thread by __enter__
            self._error = e
        finally:
            self._ready.set()

    def __enter__(self) -> TrioThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("server thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scope is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive(), "server thread did not stop"
        assert self._error is None, f"server thread failed: {self._error!r}"

    def call(self, fn: Callable[[], Any]) -> Any:
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def run(self, afn: Callable[[], Any]) -> Any:
        return trio.from_thread.run(afn, trio_token=self._token)

    def settle(self) -> None:
        """Wait until every task in the thread is blocked: once the page saw its close
        handshake complete, the session's end has then run through the gateway, the
        runtime and the simulator."""

        async def settled() -> None:
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)

        self.run(settled)


class GatewayThread(TrioThread):
    """``python -m voiceactors serve`` in-process: gateway + runtime + embedded simulator on
    127.0.0.1 (free port, token ``TOKEN``); the simulator follows ``script`` (``sim``: more
    ``SimConfig`` fields)."""

    def __init__(self, script: Script | None = None, **sim: Any) -> None:
        self.config = RuntimeConfig(sim=SimConfig(script=script, **sim))
        super().__init__(self._serve_gateway)

    async def _serve_gateway(self, task_status: trio.TaskStatus[RunningGateway]) -> None:
        gateway = GatewayConfig(host="127.0.0.1", port=0, token=TOKEN)
        async with open_gateway(self.config, gateway) as running:
            task_status.started(running)
            await trio.sleep_forever()

    def page_url(self, **params: str) -> str:
        return f"{self.value.http_url}?{urlencode({'token': TOKEN, **params})}"

    def upstream(self) -> ConnectionRecord:
        """The one simulator connection that carried the page's session (the warm pool
        opens others, which never hear audio)."""

        def find() -> list[ConnectionRecord]:
            sim = self.value.runtime.sim.sim
            return [c for c in sim.connections if c.received_audio_bytes > 0]

        (record,) = self.call(find)
        return record

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample with labels: value} (the token opens it)."""
        request = urllib.request.Request(
            self.value.http_url + "metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


@pytest.fixture
def gateway() -> Iterator[GatewayThread]:
    """A gateway whose simulator only echoes (tests needing a script make their own)."""
    with GatewayThread() as gw:
        yield gw


# ------------------------------------------------------------------------ the browser


class Microphone:
    """The file Chromium's fake microphone plays; ``play`` swaps in what the next
    ``getUserMedia`` hears (atomically: Chromium never reads a half-written file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def play(self, pcm: bytes, rate: int = 24000) -> None:
        tmp = self.path.with_suffix(".tmp")
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm)
        os.replace(tmp, self.path)

    def play_file(self, name: str) -> None:
        rate, pcm = read_fixture(name)
        self.play(pcm, rate)


def read_fixture(name: str) -> tuple[int, bytes]:
    with wave.open(str(AUDIO / name)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2), name
        return w.getframerate(), w.readframes(w.getnframes())


@pytest.fixture(scope="module")
def browser_and_mic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Microphone]]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (apt-get install -y chromium), set "
            "VOICEACTORS_CHROMIUM, or set VOICEACTORS_SKIP_BROWSER=1 to skip the browser tests"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: pip install playwright (test extra)")
    # Chromium reads any WAV rate (it converts to its fake device's rate itself); the
    # temporary path is free of characters the flag parser would trip on.
    mic = Microphone(tmp_path_factory.mktemp("capture") / "mic.wav")
    mic.play(b"\0\0" * 2400)
    args = [
        "--no-sandbox",
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic.path}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield b, mic
        finally:
            b.close()


@pytest.fixture
def mic(browser_and_mic: tuple[Any, Microphone]) -> Microphone:
    return browser_and_mic[1]


@dataclass
class PageErrors:
    items: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser_and_mic: tuple[Any, Microphone]) -> Iterator[Any]:
    """A fresh page; uncaught exceptions and console errors in it fail the test."""
    context = browser_and_mic[0].new_context()
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors = PageErrors()
    pg.on("pageerror", lambda e: errors.items.append(f"pageerror: {e}"))
    pg.on(
        "console", lambda m: errors.items.append(f"console: {m.text}") if m.type == "error" else 0
    )
    try:
        yield pg
    finally:
        context.close()
    assert errors.items == []


def stats(page: Any) -> dict[str, Any]:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.voiceactors))")


def start(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="Start conversation").click()
    page.get_by_role("button", name="Stop conversation").wait_for()


def stop(page: Any) -> None:
    """Press Stop; returns once the socket's close handshake is complete."""
    page.get_by_role("button", name="Stop conversation").click()
    page.wait_for_function(
        "() => window.voiceactors.state === 'idle' && window.voiceactors.closeCode !== null"
    )


def lines(page: Any) -> list[tuple[str, str]]:
    """The conversation view: (role classes, text) per line."""
    return [
        (c, t)
        for c, t in page.eval_on_selector_all(
            "#transcript li", "els => els.map(e => [e.className, e.textContent])"
        )
    ]


# ------------------------------------------------------------------------ tests


def test_resampler_in_the_browser(page: Any, gateway: GatewayThread) -> None:
    """resample.js (as the gateway serves it): right length, passband kept, aliases
    removed, blocks = one shot."""
    page.goto(gateway.value.http_url)
    r = page.evaluate(
        """async () => {
        const { Resampler } = await import('/static/resample.js');
        const tone = (f, rate, n) =>
            Float32Array.from({ length: n }, (_, i) => 0.5 * Math.sin(2 * Math.PI * f * i / rate));
        const rms = (x) => Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length);
        const run = (f, inRate, outRate, block) => {
            const r = new Resampler(inRate, outRate), x = tone(f, inRate, inRate), out = [];
            for (let i = 0; i < x.length; i += block) {
                out.push(...r.process(x.subarray(i, i + block)));
            }
            return Float32Array.from(out);
        };
        const down = run(1000, 48000, 24000, 128), oneShot = run(1000, 48000, 24000, 48000);
        const odd = run(1000, 44100, 24000, 441);
        const alias = run(20000, 48000, 24000, 128);
        const up = run(1000, 24000, 48000, 100);
        let same = true;
        for (let i = 0; i < down.length; i++) same = same && down[i] === oneShot[i];
        return { downLen: down.length, downRms: rms(down.subarray(100)), same,
                 oddLen: odd.length, oddRms: rms(odd.subarray(100)),
                 aliasRms: rms(alias.subarray(100)),
                 upLen: up.length, upRms: rms(up.subarray(100)) };
    }"""
    )
    tone_rms = 0.5 / math.sqrt(2)
    assert r["same"]
    # Up-sampling holds back the outputs that fall after the last input (they need the next).
    assert r["downLen"] == 24000 and r["oddLen"] == 24000 and r["upLen"] == 48000 - 1
    for key in ("downRms", "oddRms", "upRms"):
        assert r[key] == pytest.approx(tone_rms, rel=0.02), key
    # 20 kHz would fold to 4 kHz at 24 kHz: the low-pass takes it down by more than 40 dB.
    assert r["aliasRms"] < tone_rms / 100


ORDER_REPLY = "Two cheeseburgers and a large fries. Anything else?"


@pytest.mark.parametrize("rate", [24000, 48000])
def test_a_spoken_turn_goes_through_the_gateway_and_back(
    page: Any, mic: Microphone, rate: int
) -> None:
    """The fake microphone's sentence (the fixture at the page's rate) reaches the
    simulator through the gateway and becomes one committed item; its echo comes back
    paced by the gateway and is played in full, once; the conversation view shows both
    transcripts and the latency; the page's playback reports are accepted. At 48 kHz the
    worklets resample both ways."""
    mic.play_file(f"order_{rate // 1000}k.wav")
    script = Script((Reply(transcript=ORDER_REPLY, user_transcript=LABELS["order"]["text"]),))
    with GatewayThread(script) as gw:
        start(page, gw.page_url(rate=str(rate)))
        page.wait_for_function(
            """() => { const v = window.voiceactors;
                       return v.events.includes('response.done') && v.latencies.length > 0
                              && v.samplesPlayed > 0 && v.bufferMs === 0
                              && v.state === 'listening'; }"""
        )
        if rate == 24000:
            page.screenshot(path=SCREENSHOT, full_page=True)
        shown = {
            key: page.eval_on_selector(f"#{key}", "e => e.textContent")
            for key in ("state", "latency-last", "frames-played", "underruns", "clears")
        }
        stop(page)
        v = stats(page)
        gw.settle()
        rec = gw.upstream()
        metrics = gw.metrics()

    assert v["sampleRate"] == rate
    # The page obeyed the gateway's session: interrupt_response false, no local flush.
    assert v["flushOnSpeech"] is False
    # The gateway took every frame the page sent and refused nothing (every playback
    # report included: the page never saw an error).
    assert metrics["voiceactors_session_audio_frames_in_total"] == v["framesSent"] > 100
    assert metrics["voiceactors_session_client_errors_total"] == 0
    assert metrics['voiceactors_session_ended_total{reason="client_closed"}'] == 1
    assert v["errors"] == [] and "error" not in v["events"] and v["playbackReports"] is True
    # ... reports about every 100 ms while the ~5 s answer played.
    assert v["reportsSent"] >= 25 and v["lastReport"]["played_ms"] > 4000
    assert v["framesDropped"] == 0
    # Upstream: 20 ms frames whole (PCM16 at 24 kHz), all of them but the few that may
    # still be in flight inside the gateway when the page hangs up (none, in practice);
    # the reports stayed in the gateway; the page's session.update (input transcription)
    # went through.
    assert rec.model == "gpt-realtime" and rec.protocol_errors == []
    assert rec.received_audio_bytes % 960 == 0
    assert 0 <= v["framesSent"] - rec.received_audio_bytes // 960 <= 5
    assert "voiceactors.playback" not in rec.received_types()
    updates = [e for e in rec.received_events if isinstance(e, ev.SessionUpdate)]
    assert any(_asks_transcription(u) for u in updates)
    # One user turn: the sentence (4.8 s of speech) with the server VAD's padding.
    assert len(rec.committed_audio) == 1
    (turn,) = rec.committed_audio.values()
    turn_ms = len(turn) / 48
    assert 4800 <= turn_ms <= 6000, turn_ms
    assert _dbfs(turn) > -40
    assert _correlates_with_fixture(turn, "order_24k.wav")
    # The echo (exactly the committed audio) was played to the last sample, once.
    assert v["samplesPlayed"] == len(turn) // 2
    assert v["framesPlayed"] >= math.floor(len(turn) / 2 / 24000 * rate / 128)
    assert v["overflow"] == 0 and v["clears"] == 0 and v["cancelled"] == 0
    assert v["responding"] is False
    # End of speech -> first audio heard: at least the server VAD's 500 ms silence window
    # plus the simulator's 300 ms first byte; and what the gateway measured (its local
    # VAD's end of speech -> first audio sent) plus the last hop, give or take a VAD frame.
    (latency,) = v["latencies"]
    assert 800 <= latency < 3000
    assert metrics["voiceactors_session_first_audio_seconds_count"] == 1
    gateway_ms = metrics["voiceactors_session_first_audio_seconds_sum"] * 1000
    assert -60 <= latency - gateway_ms <= 250, (latency, gateway_ms)
    for kind in (
        "session.created",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.output_audio.delta",
        "response.output_audio_transcript.done",
    ):
        assert kind in v["events"]
    # What the page shows.
    assert lines(page) == [("user", LABELS["order"]["text"]), ("agent", ORDER_REPLY)]
    assert shown["state"] == "Listening"
    assert shown["latency-last"] == f"{round(v['latencies'][0])} ms"
    assert shown["frames-played"].startswith(f"{v['framesPlayed']} (")
    assert shown["underruns"] == str(v["underruns"]) and shown["clears"] == "0"
    # The gateway paces the answer at about real time with a small lead: the page rides
    # it without running dry more than once or twice (a loaded CI machine).
    assert v["underruns"] <= 2


def _asks_transcription(update: ev.SessionUpdate) -> bool:
    session = msgspec.to_builtins(update.session)
    return bool(session.get("audio", {}).get("input", {}).get("transcription"))


def _dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return 10 * math.log10(float(np.mean(x * x)) / 32768**2 + 1e-12)


def _correlates_with_fixture(pcm: bytes, fixture: str) -> bool:
    """The audio's envelope (20 ms RMS) matches the fixture's at some offset: it is the
    same sentence, not noise or a wrongly resampled copy."""
    _, ref_bytes = read_fixture(fixture)
    ref = np.frombuffer(ref_bytes, dtype="<i2")
    got = np.frombuffer(pcm, dtype="<i2")

    def envelope(x: np.ndarray) -> np.ndarray:
        n = len(x) // 480
        frames = x[: n * 480].astype(np.float64).reshape(n, 480)
        e = np.log10(np.sqrt((frames**2).mean(axis=1)) + 1.0)
        return (e - e.mean()) / (e.std() + 1e-9)

    a, b = envelope(got), envelope(ref)
    if len(a) > len(b):
        return False
    best = max(float(np.mean(a * b[k : k + len(a)])) for k in range(len(b) - len(a) + 1))
    return best > 0.8


# ------------------------------------------------------------------------ barge-in


def test_talking_over_the_agent_clears_its_audio_and_cancels_the_answer(
    page: Any, mic: Microphone
) -> None:
    """A question, then a second sentence while the agent echoes the first: the gateway's
    turn machine pauses the agent, decides it is a barge-in, sends
    ``output_audio_buffer.cleared`` (the page flushes: nothing of that answer is played
    after it), cancels the response upstream and truncates it at what the page reports
    it played. The simulator generates at real time here, so the answer is still
    streaming upstream when the user cuts in (one that is done is truncated, not
    cancelled)."""
    _, menu = read_fixture("menu_24k.wav")  # speech 0.5-2.33 s, then 1.5 s of silence
    _, change = read_fixture("change_24k.wav")  # speech 0.5-3.32 s
    onset = LABELS["change"]["speech_start_ms"]
    mic.play(menu + change[int(onset * 48) :])  # 2 bytes a sample at 24 kHz
    answer = "We have burgers, fries and shakes."
    with GatewayThread(Script((Reply(transcript=answer),)), speed=1.0) as gw:
        start(page, gw.page_url())
        page.wait_for_function(
            """() => { const v = window.voiceactors;
                       return v.clears === 1 && v.cancelled === 1 && v.bufferMs === 0; }"""
        )
        shown = {
            key: page.eval_on_selector(f"#{key}", "e => e.textContent")
            for key in ("state", "clears")
        }
        stop(page)
        v = stats(page)
        gw.settle()
        rec = gw.upstream()
        metrics = gw.metrics()

    # The page: the server's speech_started did not flush (the gateway decides), its
    # cleared did, and nothing of the cut answer was played after it.
    assert v["flushOnSpeech"] is False
    events = v["events"]
    first_answer = events.index("response.created")
    cleared = events.index("output_audio_buffer.cleared")
    assert events.count("output_audio_buffer.cleared") == 1
    assert events.index("input_audio_buffer.speech_started", first_answer) < cleared
    assert "response.output_audio.delta" not in events[cleared:]
    assert shown["clears"] == "1" and shown["state"] in ("Interrupted", "Agent thinking")
    # The answer (the echo of the question, ~2.6 s) was cut short ...
    question = next(iter(rec.committed_audio.values()))
    assert 0 < v["samplesPlayed"] < len(question) // 2 - 12_000
    ((cls, text),) = [line for line in lines(page) if "agent" in line[0]]
    # The view marks it cut, with what the agent had said by then.
    assert (
        cls.split() == ["agent", "cut"] and answer.startswith(text) and 0 < len(text) < len(answer)
    )
    # ... and upstream: cancelled, and truncated where the page said it had got to.
    cancel = next(e for e in rec.received_events if isinstance(e, ev.ResponseCancel))
    truncate = next(e for e in rec.received_events if isinstance(e, ev.ConversationItemTruncate))
    assert cancel.response_id
    assert "conversation.item.truncated" in rec.sent_types
    report = v["lastReport"]
    assert truncate.item_id == report["item_id"]
    # The gateway paused the agent at the user's onset and the page played out its small
    # lead before the flush, so both count the same audio (exactly so in practice).
    assert abs(truncate.audio_end_ms - report["played_ms"]) <= 150, (truncate, report)
    assert report["played_ms"] == v["samplesPlayed"] // 24
    assert metrics["voiceactors_session_barge_ins_total"] == 1
    assert metrics["voiceactors_session_false_interruptions_total"] == 0
    assert metrics["voiceactors_session_client_errors_total"] == 0


# ------------------------------------------------------------------------ page protocol


@dataclass
class ScriptedServer:
    """A Realtime-speaking server with exact timing, for what the gateway cannot show
    deterministically: it describes a session with ``interrupt_response``, plays 3 s of
    tone, says ``speech_started`` once the page reports 300 ms played; without
    interrupt_response it waits until the page reports 300 ms more and sends
    ``output_audio_buffer.cleared``. Then one late delta of the same item (in flight when
    the client flushed) and ``response.done``."""

    interrupt_response: bool
    protocols: list[str] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    reported: trio.Event = field(default_factory=trio.Event)  # set at each report, renewed
    speech_at_ms: int | None = None  # played_ms in the report that triggered speech_started

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_websocket, self.handle, "127.0.0.1", 0, None)
            )
            task_status.started(server.port)

    async def wait_for_report(self, report: dict[str, Any]) -> None:
        """Until the last report received is ``report`` (fails after 10 s)."""
        with trio.fail_after(10):
            while not self.reports or self.reports[-1] != report:
                await self.reported.wait()

    async def handle(self, request: WebSocketRequest) -> None:
        self.protocols = list(request.proposed_subprotocols)
        ws = await request.accept(subprotocol="realtime")

        async def send(**event: Any) -> None:
            await ws.send_message(json.dumps(event))

        async def played_at_least(ms: float) -> int:
            while True:
                event = json.loads(await ws.get_message())
                if event["type"] == "voiceactors.playback":
                    self.reports.append(event)
                    self.reported.set()
                    self.reported = trio.Event()
                    if event["played_ms"] >= ms:
                        return int(event["played_ms"])

        t = np.arange(2400) / 24000
        chunk = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
        delta = {
            "type": "response.output_audio.delta", "response_id": "resp_A", "item_id": "item_A",
            "output_index": 0, "content_index": 0, "delta": base64.b64encode(chunk).decode(),
        }  # fmt: skip
        vad = {"type": "server_vad", "interrupt_response": self.interrupt_response}
        try:
            await send(
                type="session.created",
                session={"type": "realtime", "audio": {"input": {"turn_detection": vad}}},
            )
            while json.loads(await ws.get_message())["type"] != "input_audio_buffer.append":
                pass
            await send(type="response.created", response={"id": "resp_A"})
            for _ in range(30):  # 3 s, sent at once as the bare API does
                await send(**delta)
            self.speech_at_ms = await played_at_least(300)
            await send(type="input_audio_buffer.speech_started", item_id="item_U",
                       audio_start_ms=1000)  # fmt: skip
            if not self.interrupt_response:
                await played_at_least(self.speech_at_ms + 300)
                await send(type="output_audio_buffer.cleared", response_id="resp_A")
            await send(**delta)
            await send(
                type="response.done",
                response={"id": "resp_A", "status": "cancelled", "output": [{"id": "item_A"}]},
            )
            await played_at_least(math.inf)
        except ConnectionClosed:
            pass


@pytest.mark.parametrize("interrupt_response", [False, True])
def test_who_stops_the_agent_follows_the_session(
    page: Any, gateway: GatewayThread, interrupt_response: bool
) -> None:
    """With ``interrupt_response`` false the page plays on through ``speech_started`` and
    drops its audio on ``output_audio_buffer.cleared``; with it true (the API's default,
    the bare simulator's) it drops it on ``speech_started`` itself. Either way buffered
    audio goes unplayed, late deltas of the flushed item are ignored, and the final
    ``voiceactors.playback`` names exactly what was heard. Also: ``?token=`` becomes the
    subprotocol pair, for a server on another origin (``?ws=``)."""
    server = ScriptedServer(interrupt_response)
    with TrioThread(server.serve) as thread:
        url = f"ws://127.0.0.1:{thread.value}/v1/realtime"
        start(page, f"{gateway.value.http_url}?{urlencode({'ws': url, 'token': 'tok-1'})}")
        page.wait_for_function(
            "() => window.voiceactors.events.includes('response.done')"
            " && window.voiceactors.clears === 1"
        )
        v = stats(page)
        final = v["lastReport"]
        thread.run(
            functools.partial(server.wait_for_report, {"type": "voiceactors.playback", **final})
        )
        reports = thread.call(lambda: list(server.reports))
        protocols = thread.call(lambda: list(server.protocols))
        speech_at_ms = thread.call(lambda: server.speech_at_ms)
        stop(page)

    assert protocols == ["realtime", "openai-insecure-api-key.tok-1"]
    assert v["flushOnSpeech"] is interrupt_response
    assert ("output_audio_buffer.cleared" in v["events"]) is not interrupt_response
    assert v["state"] == "interrupted" and v["cancelled"] == 1
    # Nothing left to play, and not a sample more than the 3 s the flushed item had before
    # the flush: played + dropped accounts for all of it, the late delta was ignored.
    assert v["bufferMs"] == 0
    assert v["samplesPlayed"] + v["droppedOnClear"] == 3 * 24000
    assert final == {"item_id": "item_A", "played_ms": v["samplesPlayed"] // 24}
    # Playing on through speech_started, or stopping there (the page got it within a
    # report or two).
    if interrupt_response:
        assert speech_at_ms * 24 <= v["samplesPlayed"] < (speech_at_ms + 250) * 24
    else:
        assert (speech_at_ms + 300) * 24 <= v["samplesPlayed"] < 3 * 24000
    # Reports came about every 100 ms while playing, never going backwards.
    played = [r["played_ms"] for r in reports]
    assert played == sorted(played) and len(played) >= 3
    gaps = [b - a for a, b in zip(played[:-2], played[1:-1], strict=True)]
    assert 75 <= float(np.median(gaps)) <= 150, gaps
    assert all(
        r["item_id"] == "item_A" and set(r) == {"type", "item_id", "played_ms"} for r in reports
    )
    assert page.eval_on_selector("#state", "e => e.textContent") == "Idle"
