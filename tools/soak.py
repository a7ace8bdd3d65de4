"""Soak the real server: waves of voice clients for minutes, watching for leaks.

Starts ``python -m voiceactors serve --host 127.0.0.1 --port 0`` (embedded simulator) as
a subprocess and keeps ``--concurrency`` clients on it for ``--minutes``. Each client
connects, waits for ``session.created``, does 1-3 voice turns with the fixture speech
(tests/fixtures/audio, 24 kHz) streamed in real time as 20 ms appends (a microphone: when
there is nothing to say it sends silence), sends ``voiceactors.playback`` reports while
agent audio plays, and leaves; a new client takes its slot. Some clients barge in (speak
over the answer and expect ``output_audio_buffer.cleared``), some send bad input (a
malformed event, bad base64, an unknown event type, a binary frame) and expect an
``error`` event for each, some hang up in the middle of an answer with a TCP close and no
close frame (FIN or RST). The first four sessions cover each behaviour once; the rest are
drawn from ``--seed``. The leading silence of each fixture is trimmed so turns are short.

Every ``--sample-every`` seconds (60), once the warm-up is over and once at the end, the
server is sampled: RSS (/proc/PID/status VmRSS), threads, open fds (/proc/PID/fd) and
``/metrics`` (sessions active, ended by reason, barge-ins, client errors). After the last
client leaves, the tool waits for ``voiceactors_gateway_sessions_active`` to be 0 and for
the fd count to come back to the baseline taken before the first client.

Verdict (exit 1 on any): fds not back to baseline, sessions_active not back to 0, RSS
growth per 1000 sessions after the warm-up above ``--max-growth-mb`` (judged only when at
least ``--min-judged-sessions`` sessions ran after the warm-up: below that, allocator noise
dominates the ratio), an unexpected client error (an ``error`` event nobody provoked, a
missing answer to bad input, a close the client did not ask for, a timeout), or the server
exiting. Tracebacks in the server's stderr are reported.

    python tools/soak.py [--minutes 5] [--concurrency 20] [--sessions N] [--seed 0]
        [--warmup S] [--sample-every 60] [--max-growth-mb 20] [--json PATH]

Exit codes: 0 pass, 1 the verdict failed or the server did not start, 2 bad arguments.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from voiceactors.audio.wav import read_wav

AUDIO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
FRAME_S = 0.02
FRAME_BYTES = 960  # 20 ms of PCM16 at 24 kHz
BYTES_PER_MS = 48
LEAD_MS = 200  # speech fixtures start with 500 ms of silence: keep this much of it
TAIL_MS = 700  # after the speech: past the server VAD's 500 ms of silence
_LISTENING = re.compile(rb"voiceactors listening on http://([^/\s]+)/")
START_TIMEOUT_S = 20.0
CREATED_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 20.0  # end of speech to the first agent audio
DONE_TIMEOUT_S = 30.0  # first agent audio to response.done (audio is paced in real time)
ERROR_TIMEOUT_S = 5.0  # bad input to its error event
CLOSE_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 30.0  # last client gone to sessions_active == 0 and fds at baseline
BAD_INPUTS = ("malformed_json", "bad_base64", "unknown_event", "binary_frame")


class SoakError(Exception):
    """The soak cannot run: the server did not start or died."""


class Unexpected(Exception):
    """Something a client saw that its script did not provoke."""


# ------------------------------------------------------------------------------ audio


@dataclass(frozen=True)
class Utterance:
    name: str
    frames: tuple[str, ...]  # ``input_audio_buffer.append`` JSON texts, 20 ms each


def load_utterances(audio_dir: Path = AUDIO) -> dict[str, Utterance]:
    """The 24 kHz speech fixtures, trimmed to LEAD_MS before and TAIL_MS after the speech,
    as append events (base64 encoded once, shared by every client)."""
    labels = json.loads((audio_dir / "labels.json").read_text())
    out = {}
    for name, label in labels.items():
        fmt, pcm = read_wav(audio_dir / f"{name}_24k.wav")
        if (fmt.encoding, fmt.rate) != ("pcm16", 24000):
            raise SoakError(f"{name}_24k.wav: expected PCM16 24 kHz, got {fmt}")
        start = max(0, int(label["speech_start_ms"]) - LEAD_MS) * BYTES_PER_MS
        end = min(len(pcm), int(label["speech_end_ms"] + TAIL_MS) * BYTES_PER_MS)
        start -= start % FRAME_BYTES
        out[name] = Utterance(
            name,
            tuple(
                append_text(pcm[i : i + FRAME_BYTES])
                for i in range(start, end - FRAME_BYTES + 1, FRAME_BYTES)
            ),
        )
    return out


def append_text(pcm: bytes, event_id: str | None = None) -> str:
    event: dict[str, str] = {"type": "input_audio_buffer.append"}
    if event_id:
        event["event_id"] = event_id
    event["audio"] = base64.b64encode(pcm).decode("ascii")
    return json.dumps(event, separators=(",", ":"))


SILENCE = append_text(bytes(FRAME_BYTES))


def bad_input(kind: str, event_id: str) -> str | bytes:
    """The frame for one bad input; each earns the client an ``error`` event."""
    if kind == "malformed_json":
        return '{"type": "input_audio_buffer.append", "audio": '
    if kind == "bad_base64":
        return json.dumps(
            {"type": "input_audio_buffer.append", "event_id": event_id, "audio": "AAA*AAA="}
        )
    if kind == "unknown_event":
        return json.dumps({"type": "soak.no_such_event", "event_id": event_id})
    if kind == "binary_frame":
        return b"\x00\x01 not a json text frame"
    raise ValueError(kind)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What one client does. ``turns`` are utterance names; a turn in ``barge`` is
    interrupted by the ``change`` utterance (which then gets its own answer); ``hangup``
    drops the connection during the answer of the last turn; ``bad`` is sent before turn
    ``bad_at``."""

    turns: tuple[str, ...]
    barge: frozenset[int] = frozenset()
    hangup: str | None = None  # None, "fin" or "rst"
    bad: str | None = None
    bad_at: int = 0


def make_plan(index: int, seed: int) -> Plan:
    """Session ``index``'s plan: the first four cover plain, barge-in, bad input and
    hang-up once each; the rest are drawn from (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    names = ("order", "menu", "confirm", "change")
    turns = tuple(rng.choice(names) for _ in range(rng.randint(1, 3)))
    if index < 4:
        kind = ("plain", "barge", "bad", "hangup")[index]
        return Plan(
            turns=turns[:1] if kind != "barge" else ("order",),
            barge=frozenset({0}) if kind == "barge" else frozenset(),
            hangup="fin" if kind == "hangup" else None,
            bad=BAD_INPUTS[rng.randrange(len(BAD_INPUTS))] if kind == "bad" else None,
        )
    # A barge-in needs the agent still talking when the interruption is detected: only
    # the long "order" utterance guarantees that.
    barge = frozenset(i for i, t in enumerate(turns) if t == "order" and rng.random() < 0.5)
    hangup = rng.choice(("fin", "rst")) if rng.random() < 0.15 else None
    bad = BAD_INPUTS[rng.randrange(len(BAD_INPUTS))] if rng.random() < 0.3 else None
    return Plan(turns, barge, hangup, bad, rng.randrange(len(turns)))


# ----------------------------------------------------------------------- one client


class Client:
    """One Realtime client over a raw TCP stream with wsproto (so it can hang up without
    a close frame). ``receive`` runs in a task and keeps the state the script waits on;
    sends are serialized by a lock (wsproto's bytes must reach the socket in order)."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, index: int) -> None:
        self.stream = stream
        self.ws = ws
        self.index = index
        self._send_lock = trio.StrictFIFOLock()
        self._changed = trio.Event()
        self._text: list[str] = []
        self.created = False
        self.closed_code: int | None = None  # the server's close frame
        self.eof = False
        self.we_closed = False
        self.statuses: list[str] = []  # response.done statuses, in order
        self.audio_responses = 0  # responses with agent audio so far
        self.cleared = 0
        self.errors: list[dict[str, Any]] = []  # error events not provoked
        self.bad_pending: dict[str, str] = {}  # event_id ("" if none) -> kind
        self.item: str | None = None
        self.item_ms = 0.0
        self.item_started = 0.0
        self.events = 0

    # -- sending

    async def _send(self, data: bytes) -> None:
        # A send_all cancelled half way would leave half a frame on the wire (the server
        # then drops us as a protocol error): sends are shielded, bounded instead.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S) as cs:
            async with self._send_lock:
                await self.stream.send_all(data)
        if cs.cancelled_caught:
            raise Unexpected(f"the server did not read {len(data)} bytes in {CLOSE_TIMEOUT_S} s")

    async def send_text(self, text: str) -> None:
        await self._send(self.ws.send(Message(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        await self._send(self.ws.send(Message(data=data)))

    async def close(self) -> None:
        """Close handshake with 1000; the server's close frame must follow."""
        self.we_closed = True
        await self._send(self.ws.send(CloseConnection(code=1000)))
        await self.until(
            lambda: self.closed_code is not None or self.eof,
            CLOSE_TIMEOUT_S,
            "the server's close frame",
            closing=True,
        )

    async def hang_up(self, how: str) -> None:
        """Drop the TCP connection without a close frame: FIN, or RST (SO_LINGER 0)."""
        self.we_closed = True
        if how == "rst":
            self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()

    # -- receiving

    async def receive(self, early: Sequence[object] = ()) -> None:
        """Read until the connection ends; every server event updates the state.
        ``early``: events wsproto parsed with the handshake's answer (the server sends
        ``session.created`` right behind its 101, often in the same read)."""
        for event in early:
            await self._handle(event)
        self._wake()
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                await self._handle(event)
            self._wake()
            if not data:
                self.eof = True
                self._wake()
                return

    async def _handle(self, event: object) -> None:
        if isinstance(event, TextMessage):
            self._text.append(event.data)
            if event.message_finished:
                self._on_event(json.loads("".join(self._text)))
                self._text.clear()
        elif isinstance(event, Ping):
            await self._send(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection) and self.closed_code is None:
            # wsproto reports EOF as a 1006 close even after a close frame: keep the
            # first, the one the server sent.
            self.closed_code = event.code
            if not self.we_closed:
                await self._send(self.ws.send(event.response()))
        elif isinstance(event, BytesMessage):
            self.errors.append({"unexpected": "binary frame from the server"})

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events += 1
        t = event.get("type")
        if t == "session.created":
            self.created = True
        elif t == "response.output_audio.delta":
            if event["item_id"] != self.item:
                self.item, self.item_ms = event["item_id"], 0.0
                self.item_started = trio.current_time()
                self.audio_responses += 1
            self.item_ms += len(base64.b64decode(event["delta"])) / BYTES_PER_MS
        elif t == "output_audio_buffer.cleared":
            self.cleared += 1
        elif t == "response.done":
            self.statuses.append(event["response"]["status"])
        elif t == "error":
            error = event.get("error") or {}
            key = error.get("event_id") or ""
            if key in self.bad_pending:
                del self.bad_pending[key]
            else:
                self.errors.append(error)

    def played_ms(self) -> float:
        """What a device would have played of the current item by now."""
        elapsed = (trio.current_time() - self.item_started) * 1000.0
        return min(self.item_ms, elapsed)

    async def until(
        self, done: Callable[[], bool], timeout: float, what: str, *, closing: bool = False
    ) -> None:
        """Wait until ``done()``; raise Unexpected on timeout, on an error event nobody
        provoked, or when the server closes first (unless ``closing``)."""
        with trio.move_on_after(timeout):
            while not done():
                if self.errors:
                    raise Unexpected(f"error event: {self.errors[0]}")
                if not closing and (self.closed_code is not None or self.eof):
                    raise Unexpected(f"server closed ({self.closed_code}) awaiting {what}")
                await self._changed.wait()
            return
        raise Unexpected(f"timed out after {timeout:g} s awaiting {what}")


@asynccontextmanager
async def open_client(
    host: str, port: int, index: int
) -> AsyncIterator[tuple[Client, list[object]]]:
    """Connect and upgrade; yield the client and the events that came with the 101 (pass
    them to ``receive``). Raise Unexpected if the server refuses or does not answer."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=_TARGET)))
        early: list[object] = []
        with trio.move_on_after(CREATED_TIMEOUT_S):
            while ws.state.name != "OPEN":
                data = await stream.receive_some(1 << 16)
                ws.receive_data(data or None)
                events = list(ws.events())
                if not data or any(isinstance(e, RejectConnection | RejectData) for e in events):
                    raise Unexpected(f"handshake refused: {events}")
                early = [e for e in events if not isinstance(e, AcceptConnection)]
        if ws.state.name != "OPEN":
            raise Unexpected("no handshake answer")
        yield Client(stream, ws, index), early
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


_TARGET = "/v1/realtime?model=gpt-realtime"


@dataclass
class Tally:
    """What the clients saw, summed."""

    started: int = 0
    completed: int = 0  # ran their script to the end (hang-ups included)
    turns: int = 0
    barge_ins: int = 0
    hangups: int = 0
    bad_inputs: int = 0
    bad_answered: int = 0
    unexpected: int = 0
    unexpected_samples: list[str] = field(default_factory=list)
    setup_ms: list[float] = field(default_factory=list)  # connect to session.created

    def fail(self, index: int, why: str) -> None:
        self.unexpected += 1
        if len(self.unexpected_samples) < 20:
            self.unexpected_samples.append(f"session {index}: {why}")


async def run_client(host: str, port: int, index: int, plan: Plan, tally: Tally) -> None:
    """One client's script (see the module docstring). Anything that goes wrong (an
    Unexpected, a socket error, a protocol error) is counted in ``tally``, not raised."""
    tally.started += 1
    opened = trio.current_time()
    try:
        async with open_client(host, port, index) as (client, early):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.receive, early)
                await client.until(lambda: client.created, CREATED_TIMEOUT_S, "session.created")
                tally.setup_ms.append((trio.current_time() - opened) * 1000.0)
                async with trio.open_nursery() as talking:
                    mic = Mic(client)
                    talking.start_soon(mic.run)
                    talking.start_soon(_report_playback, client)
                    hangup = await _script(client, mic, plan, tally)
                    talking.cancel_scope.cancel()
                if hangup is None:
                    await client.close()
                    if client.closed_code != 1000:
                        raise Unexpected(f"our close was answered with {client.closed_code}")
                nursery.cancel_scope.cancel()
            if hangup is not None:
                await client.hang_up(hangup)
        tally.completed += 1
    except* Exception as group:
        tally.fail(index, _describe(group))


def _describe(group: BaseExceptionGroup[Exception]) -> str:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]  # type: ignore[assignment]
    e: BaseException = group
    return str(e) if isinstance(e, Unexpected) else repr(e)


async def _script(client: Client, mic: Mic, plan: Plan, tally: Tally) -> str | None:
    """The turns of ``plan``; returns how to hang up (None: close normally)."""
    for turn, name in enumerate(plan.turns):
        if plan.bad is not None and turn == plan.bad_at:
            key = f"soak-bad-{client.index}"
            # Without a parseable event there is no event_id to echo: matched by "".
            parseable = plan.bad in ("bad_base64", "unknown_event")
            client.bad_pending[key if parseable else ""] = plan.bad
            frame = bad_input(plan.bad, key)
            tally.bad_inputs += 1
            await (client.send_text if isinstance(frame, str) else client.send_bytes)(frame)
            await client.until(
                lambda: not client.bad_pending, ERROR_TIMEOUT_S, f"the error for {plan.bad}"
            )
            tally.bad_answered += 1
        answers = client.audio_responses
        done = len(client.statuses)
        await mic.say(UTTERANCES[name])
        await client.until(
            lambda n=answers: client.audio_responses > n, ANSWER_TIMEOUT_S, "the first agent audio"
        )
        if turn == len(plan.turns) - 1 and plan.hangup:
            await trio.sleep(random.uniform(0.1, 1.0))
            tally.hangups += 1
            tally.turns += 1
            return plan.hangup
        if turn in plan.barge:
            await trio.sleep(0.5)
            cleared = client.cleared
            await mic.say(UTTERANCES["change"])  # returns once all of it was sent
            await client.until(
                lambda n=cleared: client.cleared > n, 1.0, "output_audio_buffer.cleared"
            )
            await client.until(
                lambda n=done: len(client.statuses) > n,
                DONE_TIMEOUT_S,
                "response.done of the interrupted answer",
            )
            if client.statuses[done] != "cancelled":
                raise Unexpected(f"interrupted answer ended {client.statuses[done]!r}")
            tally.barge_ins += 1
            done += 1
        await client.until(lambda n=done: len(client.statuses) > n, DONE_TIMEOUT_S, "response.done")
        if client.statuses[done] != "completed":
            raise Unexpected(f"answer ended {client.statuses[done]!r}")
        tally.turns += 1
    return None


class Mic:
    """Sends a 20 ms append every 20 ms on an absolute schedule: the current utterance's
    frames, else silence, like a microphone that is always on."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._frames: tuple[str, ...] = ()
        self._next = 0
        self._said = trio.Event()

    async def say(self, utterance: Utterance) -> None:
        """Queue ``utterance`` (replacing any) and wait until it has been sent."""
        self._frames, self._next, self._said = utterance.frames, 0, trio.Event()
        await self._said.wait()

    async def run(self) -> None:
        start = trio.current_time()
        k = 0
        while True:
            k = max(k + 1, math.floor((trio.current_time() - start) / FRAME_S))
            await trio.sleep_until(start + k * FRAME_S)
            if self._next < len(self._frames):
                text = self._frames[self._next]
                self._next += 1
            else:
                text = SILENCE
                self._said.set()
            await self.client.send_text(text)


async def _report_playback(client: Client) -> None:
    """``voiceactors.playback`` every 100 ms while agent audio plays, as the page does."""
    while True:
        await trio.sleep(0.1)
        if client.item is not None and client.played_ms() < client.item_ms:
            await client.send_text(
                json.dumps(
                    {
                        "type": "voiceactors.playback",
                        "item_id": client.item,
                        "played_ms": round(client.played_ms(), 1),
                    }
                )
            )


UTTERANCES: dict[str, Utterance] = {}


# ------------------------------------------------------------------------- sampling


def read_proc(pid: int) -> dict[str, Any]:
    """RSS (MB), threads and open fds of ``pid`` from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024.0,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "fd_kinds": fd_kinds(pid),
    }


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of ``pid`` by kind (socket, pipe, anon_inode:[eventpoll], file...)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":")[0] if target.startswith(("socket:", "pipe:")) else target] += 1
    return dict(sorted(kinds.items()))


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {``name{labels}``: value}; comments and odd lines skipped."""
    out = {}
    for line in text.splitlines():
        if (m := _SERIES.match(line.strip())) is not None:
            try:
                out[m[1]] = float(m[2])
            except ValueError:
                continue
    return out


async def fetch_metrics(host: str, port: int) -> dict[str, float]:
    """GET /metrics (Connection: close, read to EOF); SoakError if it is not a 200."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            chunks = []
            while data := await stream.receive_some(1 << 16):
                chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SoakError(f"/metrics answered {head[:40]!r}")
    return parse_metrics(body.decode("utf-8", "replace"))


def summarize_metrics(series: dict[str, float]) -> dict[str, Any]:
    """The figures a soak watches, from a /metrics scrape."""
    ended = {
        m[1]: v
        for k, v in series.items()
        if (m := re.fullmatch(r'voiceactors_session_ended_total\{reason="([^"]*)"\}', k)) and v
    }
    return {
        "sessions_active": series.get("voiceactors_gateway_sessions_active"),
        "sessions_total": series.get("voiceactors_gateway_sessions_total"),
        "connections_active": series.get("voiceactors_gateway_connections_active"),
        "session_errors": series.get("voiceactors_gateway_session_errors_total"),
        "ended": ended,
        "barge_ins": series.get("voiceactors_session_barge_ins_total"),
        "client_errors": series.get("voiceactors_session_client_errors_total"),
    }


async def sample(pid: int, host: str, port: int, t0: float, label: str) -> dict[str, Any]:
    """/proc first (so the scrape's own connection is not counted), then /metrics."""
    proc = read_proc(pid)
    metrics = summarize_metrics(await fetch_metrics(host, port))
    return {"label": label, "t_s": round(trio.current_time() - t0, 2), **proc, **metrics}


# ------------------------------------------------------------------------- the server


@asynccontextmanager
async def serve(argv: list[str]) -> AsyncIterator[tuple[trio.Process, str, int, Path]]:
    """Run the server until it prints its address; yield (process, host, port, stderr
    file). Leaving sends SIGINT, waits 10 s (the gateway drains), then kills, and deletes
    the stderr file (read it inside the block)."""
    with tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False) as log:
        errors = Path(log.name)
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=log)
        try:
            assert proc.stdout is not None
            seen = b""
            with trio.move_on_after(START_TIMEOUT_S):
                while (m := _LISTENING.search(seen)) is None:
                    data = await proc.stdout.receive_some(4096)
                    if not data:
                        break
                    seen += data
            if m is None:
                raise SoakError(f"the server did not start: {' '.join(argv)}\n{tail(errors)}")
            host, _, port = m[1].decode().rpartition(":")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_discard, proc.stdout)
                yield proc, host, int(port), errors
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                    with trio.move_on_after(10):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await trio.Path(errors).unlink(missing_ok=True)


async def _discard(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass


def tail(path: Path, n: int = 1500) -> str:
    return path.read_bytes()[-n:].decode("utf-8", "replace").strip()


def server_problems(path: Path) -> list[str]:
    """Tracebacks and ERROR/CRITICAL lines the server logged (first lines of each)."""
    lines = path.read_text("utf-8", "replace").splitlines()
    found = [
        f"{i + 1}: {line[:200]}"
        for i, line in enumerate(lines)
        if line.startswith("Traceback") or re.search(r"\b(ERROR|CRITICAL)\b", line)
    ]
    return found[:20]


# ---------------------------------------------------------------------------- soak


@dataclass
class Options:
    minutes: float
    concurrency: int
    sessions: int  # 0: no bound
    seed: int
    warmup: float
    sample_every: float
    max_growth_mb: float
    min_judged_sessions: int
    json_path: Path
    progress: bool


async def soak(opts: Options) -> dict[str, Any]:
    """Run the whole soak; returns the JSON document (``verdict`` inside)."""
    UTTERANCES.update(load_utterances())
    argv = [
        *(sys.executable, "-m", "voiceactors", "serve", "--host", "127.0.0.1", "--port", "0"),
        *("--max-sessions", str(max(200, 2 * opts.concurrency))),
    ]
    tally = Tally()
    samples: list[dict[str, Any]] = []
    async with serve(argv) as (proc, host, port, log):
        pid = proc.pid
        t0 = trio.current_time()
        await trio.sleep(1.0)  # let the warm pool fill
        samples.append(await sample(pid, host, port, t0, "baseline"))
        stop_at = t0 + opts.minutes * 60.0
        counter = iter(range(10**9))

        async def slot(k: int) -> None:
            await trio.sleep(k * 2.0 / opts.concurrency)  # stagger the first wave
            while trio.current_time() < stop_at and proc.returncode is None:
                index = next(counter)
                if opts.sessions and index >= opts.sessions:
                    return
                await run_client(host, port, index, make_plan(index, opts.seed), tally)

        async def sampler() -> None:
            warm_at = t0 + opts.warmup
            await trio.sleep_until(warm_at)
            samples.append({**await sample(pid, host, port, t0, "warm"), **_tally(tally)})
            nxt = warm_at + opts.sample_every
            while True:
                await trio.sleep_until(nxt)
                samples.append({**await sample(pid, host, port, t0, "periodic"), **_tally(tally)})
                nxt += opts.sample_every

        async with trio.open_nursery() as outer:
            outer.start_soon(sampler)
            if opts.progress:
                outer.start_soon(_progress, tally, t0, stop_at)
            async with trio.open_nursery() as clients:
                for k in range(opts.concurrency):
                    clients.start_soon(slot, k)
            outer.cancel_scope.cancel()
        if opts.progress:
            print(file=sys.stderr, flush=True)
        if proc.returncode is not None:
            raise SoakError(f"the server exited with {proc.returncode}\n{tail(log)}")
        # Idle: sessions_active back to 0, then fds back to the baseline.
        # The gateway's connection gauge is watched too (reported, not judged: it is a
        # count, and the fds say whether a socket is really left open).
        idle = {
            "sessions_active_zero": False,
            "fds_at_baseline": False,
            "connections_active_at_baseline": False,
        }
        last: dict[str, Any] = {}
        with trio.move_on_after(IDLE_TIMEOUT_S):
            while True:
                last = await sample(pid, host, port, t0, "idle")
                idle["sessions_active_zero"] = last["sessions_active"] == 0
                idle["fds_at_baseline"] = last["fds"] <= samples[0]["fds"]
                idle["connections_active_at_baseline"] = (
                    last["connections_active"] <= samples[0]["connections_active"]
                )
                if all(idle.values()):
                    break
                await trio.sleep(0.25)
        samples.append({**last, **_tally(tally)})
        problems = server_problems(log)
    return document(opts, samples, tally, idle, problems)


def _tally(tally: Tally) -> dict[str, int]:
    return {"client_sessions_started": tally.started, "client_sessions_completed": tally.completed}


def document(
    opts: Options,
    samples: list[dict[str, Any]],
    tally: Tally,
    idle: dict[str, bool],
    problems: list[str],
) -> dict[str, Any]:
    """The JSON document and the verdict."""
    base, end = samples[0], samples[-1]
    warm = next((s for s in samples if s["label"] == "warm"), None)
    growth: dict[str, Any] = {"judged": False}
    if warm is not None:
        n = (end["sessions_total"] or 0) - (warm["sessions_total"] or 0)
        delta = end["rss_mb"] - warm["rss_mb"]
        growth.update(
            sessions_after_warmup=int(n),
            rss_delta_mb=round(delta, 2),
            mb_per_1000_sessions=round(delta / n * 1000.0, 2) if n > 0 else None,
            judged=n >= opts.min_judged_sessions,
        )
    failures = []
    if not idle["sessions_active_zero"]:
        failures.append(f"sessions_active is {end['sessions_active']} after the last client left")
    if not idle["fds_at_baseline"]:
        failures.append(f"fds {end['fds']} did not return to the baseline {base['fds']}")
    if growth["judged"] and (growth["mb_per_1000_sessions"] or 0.0) > opts.max_growth_mb:
        failures.append(
            f"RSS grew {growth['mb_per_1000_sessions']} MB per 1000 sessions "
            f"(limit {opts.max_growth_mb:g})"
        )
    if tally.unexpected:
        failures.append(f"{tally.unexpected} unexpected client error(s)")
    if tally.completed == 0:
        failures.append("no session completed")
    return {
        "tool": "soak",
        "config": {
            "minutes": opts.minutes,
            "concurrency": opts.concurrency,
            "sessions_bound": opts.sessions or None,
            "seed": opts.seed,
            "warmup_s": opts.warmup,
            "sample_every_s": opts.sample_every,
            "max_growth_mb": opts.max_growth_mb,
            "min_judged_sessions": opts.min_judged_sessions,
        },
        "python": sys.version.split()[0],
        "clients": {k: v for k, v in vars(tally).items() if k != "setup_ms"},
        "setup_ms": percentiles(tally.setup_ms),
        "rss": {
            "baseline_mb": round(base["rss_mb"], 2),
            "warm_mb": round(warm["rss_mb"], 2) if warm else None,
            "end_mb": round(end["rss_mb"], 2),
            "growth": growth,
        },
        "fds": {
            "baseline": base["fds"],
            "end_idle": end["fds"],
            "baseline_kinds": base["fd_kinds"],
            "end_kinds": end["fd_kinds"],
        },
        "idle": idle,
        "server_log_problems": problems,
        "samples": samples,
        "verdict": {"ok": not failures, "failures": failures},
    }


def percentiles(xs: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max of ``xs`` (nearest rank), rounded to 0.1; None if empty."""
    if not xs:
        return None
    xs = sorted(xs)
    at = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {k: xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)] for k, q in at.items()}
    return {k: round(v, 1) for k, v in {**out, "max": xs[-1]}.items()}


async def _progress(tally: Tally, t0: float, end: float) -> None:
    while True:
        now = trio.current_time()
        done = min(1.0, (now - t0) / (end - t0))
        bar = "#" * round(30 * done) + "-" * (30 - round(30 * done))
        print(
            f"\rsoak [{bar}] {now - t0:6.0f}/{end - t0:.0f} s  sessions {tally.started}"
            f" done {tally.completed}  barge-ins {tally.barge_ins}  hang-ups {tally.hangups}"
            f"  unexpected {tally.unexpected}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        await trio.sleep(1.0)


def report(doc: dict[str, Any]) -> str:
    """The human summary."""
    c, rss, fds, g = doc["clients"], doc["rss"], doc["fds"], doc["rss"]["growth"]
    end = doc["samples"][-1]
    cfg = doc["config"]
    per = g.get("mb_per_1000_sessions")
    lines = [
        "",
        f"soak: {cfg['concurrency']} clients for {cfg['minutes']:g} min (seed {cfg['seed']})",
        f"  sessions      {c['started']} started, {c['completed']} completed; "
        f"{c['turns']} turns, {c['barge_ins']} barge-ins, {c['hangups']} hang-ups, "
        f"{c['bad_inputs']} bad inputs ({c['bad_answered']} answered)",
        f"  server saw    {end['sessions_total']:.0f} sessions, ended {end['ended']}, "
        f"barge-ins {end['barge_ins']:.0f}, client errors {end['client_errors']:.0f}",
        "  setup         "
        + (
            "connect to session.created "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in doc["setup_ms"].items())
            if doc["setup_ms"]
            else "-"
        ),
        f"  unexpected    {c['unexpected']}",
        *[f"    {s}" for s in c["unexpected_samples"][:5]],
        f"  RSS           baseline {rss['baseline_mb']:.1f} MB, after warm-up "
        f"{rss['warm_mb'] or math.nan:.1f} MB, end {rss['end_mb']:.1f} MB: "
        + (
            f"{per:+.2f} MB per 1000 sessions over {g['sessions_after_warmup']}"
            + ("" if g["judged"] else " (too few sessions to judge)")
            if per is not None
            else "no sessions after warm-up"
        ),
        f"  fds           baseline {fds['baseline']}, idle at end {fds['end_idle']}"
        + (
            ""
            if fds["baseline_kinds"] == fds["end_kinds"]
            else f"  (was {fds['baseline_kinds']}, now {fds['end_kinds']})"
        ),
        f"  threads       {doc['samples'][0]['threads']} -> {end['threads']}",
    ]
    if not doc["idle"]["connections_active_at_baseline"]:
        lines.append(
            f"  note          voiceactors_gateway_connections_active is {end['connections_active']:g}"
            f" at idle (baseline {doc['samples'][0]['connections_active']:g})"
        )
    if doc["server_log_problems"]:
        lines.append("  server log    " + "\n                ".join(doc["server_log_problems"][:5]))
    v = doc["verdict"]
    lines.append("  verdict       " + ("PASS" if v["ok"] else "FAIL: " + "; ".join(v["failures"])))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long clients run (5)")
    parser.add_argument("--concurrency", type=int, default=20, help="clients at once (20)")
    parser.add_argument("--sessions", type=int, default=0, help="stop after N sessions (no bound)")
    parser.add_argument("--seed", type=int, default=0, help="what the clients do (0)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the RSS reference (min(60, 20%%))"
    )
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds (60)")
    parser.add_argument("--max-growth-mb", type=float, default=20.0, help="per 1000 sessions (20)")
    parser.add_argument(
        "--min-judged-sessions",
        type=int,
        default=300,
        help="sessions after the warm-up needed to judge RSS growth (300)",
    )
    parser.add_argument(
        "--json", type=Path, help="write the figures here (default: $TMP/soak.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.sessions < 0 or args.sample_every <= 0:
        parser.error("--minutes and --sample-every must be > 0, --concurrency >= 1")
    warmup = args.warmup if args.warmup is not None else min(60.0, args.minutes * 60.0 * 0.2)
    return Options(
        minutes=args.minutes,
        concurrency=args.concurrency,
        sessions=args.sessions,
        seed=args.seed,
        warmup=warmup,
        sample_every=args.sample_every,
        max_growth_mb=args.max_growth_mb,
        min_judged_sessions=args.min_judged_sessions,
        json_path=args.json or Path(tempfile.gettempdir()) / "soak.json",
        progress=sys.stderr.isatty() and not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    failures: list[BaseException] = []
    try:
        doc = trio.run(soak, opts)
    except* SoakError as group:
        failures.extend(group.exceptions)
    if failures:
        for e in failures:
            print(f"soak: {e}", file=sys.stderr)
        return 1
    print(report(doc), flush=True)
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON: {opts.json_path}")
    return 0 if doc["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
