"""Added latency and CPU of the gateway: N sessions through it vs straight to the simulator.

One run, two arms with the same N, the same frames and the same duration:

- **direct**: load clients -> simulator;
- **relay**: load clients -> gateway (``python -m voiceactors serve``) -> simulator.

The simulator runs in mirror mode (``python -m voiceactors sim --mirror``): it answers
every ``input_audio_buffer.append`` at once with a ``response.output_audio.delta`` of the
same bytes, so the round trip of a frame is the transport, the gateway and nothing else.
Each client sends 20 ms frames of 24 kHz PCM on an absolute schedule (sessions staggered
over the frame period); every frame carries an 8-byte sequence stamp in its first four
samples (values 0-255, the rest of the frame +-2 LSB, so the gateway's VAD stays quiet).
Per frame: round-trip time = stamp seen in a reply - frame sent; a measured frame whose
echo is not back 2 s after the last send is lost. A session starts its schedule once its
first frame has come back (the path is up end to end); frames of the warm-up are sent but
not counted. ``late_sends`` counts frames sent more than a frame period after their due
time (the load generator fell behind).

With two or more CPUs the gateway is pinned alone to one, the load generator and the
simulator share another (the output says which). CPU is utime + stime from /proc over the
measured window, per process: the gateway (relay arm), the simulator and the load
generator (both arms), so the gateway's own share is plain next to the cost of the rest.
The output warns when other processes used those CPUs during an arm (the figures are then
suspect: on a loaded box a stall can leave a standing delay in the gateway's paced
playback) and when a CPU was saturated (latency then includes queueing for it). Linux
only (/proc, epoll).

The load generator is built to cost far less per session than what it measures (its own
CPU is reported next to the others): the WebSocket frames (masked text, JSON inside) are
encoded once per frame index and shared by every session and both arms; one task sends
for all sessions; sockets are driven with trio's low-level waits; replies are not
JSON-decoded, only searched for the audio delta's base64 text, and just the characters
that hold a stamp are decoded.

    python tools/bench_relay.py [--sessions 50 | --sessions 10,50,100] [--seconds 8]
        [--warmup 2] [--frame-ms 20] [--arms direct,relay] [--json PATH | --out DIR]

Exit codes: 0 done, 1 an arm could not run (a process failed to start, a session failed
to open), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import functools
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from array import array
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

BYTES_PER_MS = 48  # 24 kHz PCM16 mono, the session's default input and output format
STAMP_BYTES = 8
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_AUDIO_DELTA = b'"response.output_audio.delta"'
_DELTA_KEY = b'"delta":"'
_ERROR_TYPE = re.compile(rb'"type"\s*:\s*"error"')
_SESSION_CREATED = b'"session.created"'
_SIM_LISTENING = re.compile(rb"voiceactors sim listening on (ws://\S+)")
_GATEWAY_LISTENING = re.compile(rb"voiceactors listening on http://([^/\s]+)/")
OPEN_TIMEOUT_S = 15.0
DRAIN_S = 2.0
OTHER_LOAD_WARN_PCT = 10.0
SATURATED_PCT = 90.0


class BenchError(Exception):
    """An arm cannot run: a process did not start, a session did not open."""


# ------------------------------------------------------------------------------ frames


def stamp(seq: int) -> bytes:
    """The stamp of frame ``seq``: its four bytes as four PCM16 samples of 0-255."""
    return bytes(b for i in range(4) for b in ((seq >> 8 * i) & 0xFF, 0))


def read_stamp(data: bytes) -> int | None:
    """The sequence number in an 8-byte stamp, or None if ``data`` is not a stamp."""
    if len(data) != STAMP_BYTES or data[1::2] != bytes(4):
        return None
    return data[0] | data[2] << 8 | data[4] << 16 | data[6] << 24


def frame_pcm(seq: int, frame_ms: int) -> bytes:
    """``frame_ms`` of near-silence (+-2 LSB, fixed seed) that starts with the stamp."""
    return stamp(seq) + _noise(frame_ms)


@functools.cache
def _noise(frame_ms: int) -> bytes:
    rng = random.Random(frame_ms)
    return b"".join(
        rng.randint(-2, 2).to_bytes(2, "little", signed=True)
        for _ in range((frame_ms * BYTES_PER_MS - STAMP_BYTES) // 2)
    )


def ws_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client WebSocket frame (RFC 6455 5.2), masked with ``mask``."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )
    return head + mask + masked


def build_frames(count: int, frame_ms: int) -> list[bytes]:
    """The wire bytes of frames 0..count-1: ``input_audio_buffer.append`` events in masked
    text frames, each with its own random mask. Built once, sent by every session."""
    return [
        ws_frame(
            0x1,
            b'{"type":"input_audio_buffer.append","audio":"'
            + base64.b64encode(frame_pcm(seq, frame_ms))
            + b'"}',
            os.urandom(4),
        )
        for seq in range(count)
    ]


def _decode_at(b64: bytes, offset: int, count: int) -> bytes:
    """Bytes ``offset`` to ``offset + count`` of the data ``b64`` encodes, decoding only the
    4-character groups that hold them. Raises ``binascii.Error`` on bad base64."""
    first = offset // 3 * 4
    last = -(-(offset + count) // 3) * 4
    skip = offset % 3
    return binascii.a2b_base64(b64[first:last])[skip : skip + count]


# ---------------------------------------------------------------------- the WebSocket


class Conn:
    """A non-blocking TCP socket driven with trio's low-level waits.

    Cheaper than ``trio.SocketStream`` where it matters here: a send the kernel takes at
    once returns without a trip through the scheduler (the caller checkpoints:
    :func:`send_on_schedule` sleeps or checkpoints once per round). ``receive_some`` (the
    handshake only; then :class:`Reader` reads) waits for readability first. OSError
    (reset, broken pipe) propagates.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, host: str, port: int) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if (err := sock.connect_ex((host, port))) not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            await trio.lowlevel.wait_writable(sock)
            if err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def receive_some(self, max_bytes: int) -> bytes:
        """Wait until readable, then read; ``b""`` when the peer has closed."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                continue

    def close(self) -> None:
        """Close now; tasks waiting on the socket get ``ClosedResourceError``."""
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


async def open_websocket(url: str) -> tuple[Conn, bytearray]:
    """Connect and complete the client handshake for ``ws://host:port/path?query``.

    Returns the stream and the bytes already read past the handshake. Raises BenchError
    when the server refuses the upgrade or answers nonsense; OSError when it cannot connect.
    """
    m = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
    if m is None:
        raise BenchError(f"expected ws://host:port/path, got {url!r}")
    host, port, target = m[1], int(m[2]), m[3]
    stream = await Conn.connect(host, port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data or len(buf) > 16384:
            stream.close()
            raise BenchError(f"{url}: no handshake answer")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    if not status.startswith(b"HTTP/1.1 101") or headers.get(b"sec-websocket-accept") != accept:
        stream.close()
        raise BenchError(f"{url}: handshake refused: {status.decode('latin-1')}")
    return stream, bytearray(rest)


# ----------------------------------------------------------------------- one session


async def _first(*events: trio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


class Reader:
    """Reads every session's socket from one task.

    The sockets sit in an epoll set of our own, and trio waits for *that* to be readable:
    one wakeup serves every session with data, where a task per socket would cost a
    wakeup (and two epoll updates) per reply. Linux only, like /proc.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sessions: dict[int, LoadSession] = {}

    def add(self, session: LoadSession) -> None:
        assert session.conn is not None
        fd = session.conn.sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._sessions[fd] = session

    async def run(self) -> None:
        """Read until cancelled. A session whose socket ends or fails is dropped from the
        set with ``closed`` saying why."""
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            now = trio.current_time()
            for fd, _ in self._epoll.poll(0):
                s = self._sessions[fd]
                assert s.conn is not None
                try:
                    data = s.conn.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError as e:
                    s.end(f"receive failed: {e!r}")
                    data = b""
                if data:
                    s.feed(data, now)
                else:
                    s.end("connection dropped")
                if s.closed:
                    self._epoll.unregister(fd)
                    del self._sessions[fd]

    def close(self) -> None:
        """Close the set (after ``run`` was cancelled); the sockets stay open."""
        self._epoll.close()


class LoadSession:
    """One client: a sender on an absolute schedule and a receiver that finds stamps.

    Reply audio is followed by position: frame ``k`` starts at byte ``k * frame_bytes`` of
    the reply stream, whatever the sizes of the deltas that carry it, and its stamp (split
    across two deltas if need be) must read ``k``. A valid stamp of another frame (audio
    dropped or repeated on the way) is counted in ``mismatched`` and the position resyncs
    to it; anything else at a frame start is counted and skipped.
    """

    def __init__(self, index: int, frames: int, frame_bytes: int) -> None:
        self.index = index
        self.frame_bytes = frame_bytes
        self.sent_at = array("d", [math.nan]) * frames
        self.rtt = array("d", [math.nan]) * frames
        self.lag = array("d", [math.nan]) * frames
        self.sent = 0
        self.back = 0
        self.mismatched = 0
        self.duplicates = 0
        self.errors = 0
        self.first_error = ""
        self.closed: str | None = None  # why the session ended early (see end())
        self.created = trio.Event()  # session.created seen
        self.primed = trio.Event()  # frame 0 came back: the whole path is up
        self.all_back = trio.Event()
        self.ended = trio.Event()
        self.open_s = math.nan  # connect to primed
        self.conn: Conn | None = None
        self._reply_pos = 0  # bytes of reply audio so far
        self._partial = b""  # the first bytes of a stamp that a delta cut
        self._partial_seq = 0
        self._control: list[bytes] = []  # pongs, sent by the sender (one writer per socket)
        self._buf = bytearray()  # server bytes not yet a whole frame
        self._fragments: bytearray | None = None

    # -- sending

    async def open(self, url: str, frame0: bytes, reader: Reader) -> None:
        """Connect, wait for ``session.created``, send frame 0 and wait for its echo, so
        the schedule starts on a path that is up end to end (a gateway still connecting
        upstream would otherwise queue the first frames and keep that delay). ``reader``
        reads the socket from the handshake on; the connection is ``conn`` (the caller
        closes it). Raises OSError or BenchError if the connection fails."""
        started = trio.current_time()
        stream, rest = await open_websocket(url)
        self.conn = stream
        reader.add(self)
        self.feed(bytes(rest), trio.current_time())
        await _first(self.created, self.ended)
        if self.closed:
            raise BenchError(self.closed)
        self.sent_at[0] = trio.current_time()
        self.sent += 1
        await stream.send_all(frame0)
        await _first(self.primed, self.ended)
        if self.closed:
            raise BenchError(self.closed)
        self.open_s = trio.current_time() - started

    def end(self, why: str) -> None:
        """The session is over early (the first reason is kept)."""
        if self.closed is None:
            self.closed = why
            self.ended.set()

    async def send_frame(self, k: int, frame: bytes, due: float) -> None:
        """Send frame ``k`` (due at ``due``) now, after any pong owed. A failed send marks
        the session closed; a closed session sends nothing."""
        if self.conn is None or self.closed:
            return
        try:
            while self._control:
                await self.conn.send_all(self._control.pop(0))
            now = trio.current_time()
            self.sent_at[k] = now
            self.lag[k] = now - due
            self.sent += 1
            await self.conn.send_all(frame)
        except (OSError, trio.ClosedResourceError) as e:
            self.end(f"send failed: {e!r}")

    # -- receiving

    def feed(self, data: bytes, now: float) -> None:
        """Bytes from the server, read at ``now``: handle every whole frame in them. A close
        frame, or a frame no server may send, sets ``closed`` and ends the session."""
        buf = self._buf
        buf += data
        pos, end_of_data = 0, len(buf)
        while end_of_data - pos >= 2 and not self.closed:
            b0, b1 = buf[pos], buf[pos + 1]
            size, head = b1 & 0x7F, 2
            if size == 126:
                if end_of_data - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if end_of_data - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + size
            if end > end_of_data:
                break
            payload = bytes(buf[pos + head : end])
            pos = end
            opcode, final = b0 & 0x0F, b0 & 0x80
            if b1 & 0x80:
                self.end("the server sent a masked frame")
            elif opcode == 0x1 and final:
                self.on_text(payload, now)
            elif opcode == 0x1:
                self._fragments = bytearray(payload)
            elif opcode == 0x0 and self._fragments is not None:
                self._fragments += payload
                if final:
                    self.on_text(bytes(self._fragments), now)
                    self._fragments = None
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.end(f"closed by the server ({code})")
            elif opcode == 0x9:
                self._control.append(ws_frame(0xA, payload, os.urandom(4)))
        del buf[:pos]

    def on_text(self, payload: bytes, now: float) -> None:
        """One server event. Audio deltas are searched, not decoded: base64 holds no quote,
        so the value of ``"delta":"`` runs to the next quote."""
        if _AUDIO_DELTA in payload:
            start = payload.find(_DELTA_KEY) + len(_DELTA_KEY)
            if start >= len(_DELTA_KEY):
                end = payload.find(b'"', start)
                if end < 0:  # not JSON: nothing to read
                    self.mismatched += 1
                    return
                self.on_audio(payload[start:end], now)
                return
            event = json.loads(payload)  # another encoder's spacing: the slow way
            if event.get("type") == "response.output_audio.delta":
                self.on_audio(event["delta"].encode(), now)
                return
        if not self.created.is_set() and _SESSION_CREATED in payload:
            self.created.set()
        elif _ERROR_TYPE.search(payload):
            self.errors += 1
            self.first_error = self.first_error or payload[:300].decode("utf-8", "replace")

    def on_audio(self, b64: bytes, now: float) -> None:
        """Find the stamps of the frames that start inside this delta (see the class doc)."""
        size = len(b64) // 4 * 3 - b64.endswith(b"=") - b64.endswith(b"==")
        start = self._reply_pos
        self._reply_pos += size
        fb = self.frame_bytes
        try:
            if self._partial:
                need = STAMP_BYTES - len(self._partial)
                self._partial += _decode_at(b64, 0, min(need, size))
                if len(self._partial) == STAMP_BYTES:
                    start += self._stamp(self._partial_seq, self._partial, now)
                    self._partial = b""
            seq = -(-start // fb)
            while (offset := seq * fb - start) < size:
                if offset + STAMP_BYTES <= size:
                    shift = self._stamp(seq, _decode_at(b64, offset, STAMP_BYTES), now)
                    start += shift
                    seq += shift // fb
                else:
                    self._partial = _decode_at(b64, offset, size - offset)
                    self._partial_seq = seq
                seq += 1
        except binascii.Error:
            self.mismatched += 1

    def _stamp(self, expected: int, data: bytes, now: float) -> int:
        """Record the frame whose stamp is ``data``; returns the byte shift to resync."""
        seq = read_stamp(data)
        if seq is None or not 0 <= seq < len(self.sent_at) or math.isnan(self.sent_at[seq]):
            self.mismatched += 1
            return 0
        if not math.isnan(self.rtt[seq]):
            self.duplicates += 1
        else:
            self.rtt[seq] = now - self.sent_at[seq]
            self.back += 1
            if seq == 0:
                self.primed.set()
            if self.back == len(self.sent_at):
                self.all_back.set()
        if seq == expected:
            return 0
        self.mismatched += 1
        shift = (seq - expected) * self.frame_bytes
        self._reply_pos += shift
        return shift


async def send_on_schedule(
    sessions: Sequence[LoadSession], frames: Sequence[bytes], t0: float, period: float
) -> None:
    """Send frame ``k >= 1`` of session ``i`` at ``t0 + (k + i / n) * period``: absolute
    deadlines, sessions spread over the period, late frames sent at once (never skipped).

    One task sends for every session: each wakeup sends all the frames due by then, so
    timers cost per wakeup (trio sleeps in whole ms), not per session. A send the kernel
    cannot take at once holds the others up; ``late_sends`` would show it.
    """
    n = len(sessions)
    for k in range(1, len(frames)):
        frame = frames[k]
        waited = False
        for i, s in enumerate(sessions):
            due = t0 + (k + i / n) * period
            if trio.current_time() < due:
                await trio.sleep_until(due)
                waited = True
            await s.send_frame(k, frame, due)
        if not waited:
            await trio.lowlevel.checkpoint()  # behind schedule: the receivers still run


# ------------------------------------------------------------------------------ figures


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a sorted, non-empty sequence."""
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far, in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_ticks() -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks so far per CPU, from /proc/stat (idle and iowait are
    not busy)."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in values[:8]]
                ticks[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    return ticks


@dataclass(frozen=True)
class CpuSample:
    at: float
    processes: dict[str, float]
    cores: dict[int, tuple[int, int]]

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSample:
        return cls(trio.current_time(), {k: cpu_seconds(p) for k, p in pids.items()}, core_ticks())


def cpu_figures(
    a: CpuSample, b: CpuSample, sessions: int, placement: dict[str, int]
) -> dict[str, Any]:
    """CPU between two samples: per process, % of one core and that per session; per CPU,
    how busy it was and how much of that was not ours (other load spoils the figures)."""
    window = b.at - a.at
    out: dict[str, Any] = {"window_s": window}
    for name, used in b.processes.items():
        pct = (used - a.processes[name]) / window * 100
        out[name] = {"pct": pct, "pct_per_session": pct / sessions}
    busy = {}
    for core, (busy1, total1) in b.cores.items():
        busy0, total0 = a.cores[core]
        busy[core] = (busy1 - busy0) / max(1, total1 - total0) * 100
    out["cpu_busy_pct"] = busy
    ours: dict[int, float] = {}
    for name, core in placement.items():
        if name in out:
            ours[core] = ours.get(core, 0.0) + out[name]["pct"]
    out["other_load_pct"] = {core: max(0.0, busy[core] - pct) for core, pct in ours.items()}
    return out


@dataclass
class Options:
    sessions: list[int]
    seconds: float
    warmup: float
    frame_ms: int
    arms: list[str]
    json_path: Path
    pin: bool = True
    progress: bool = True
    #: process name -> the CPU it is pinned to (empty when not pinned)
    placement: dict[str, int] = field(default_factory=dict)
    period: float = field(init=False)
    warm_frames: int = field(init=False)
    total_frames: int = field(init=False)

    def __post_init__(self) -> None:
        self.period = self.frame_ms / 1000
        self.warm_frames = max(1, round(self.warmup / self.period))  # frame 0 primes
        self.total_frames = self.warm_frames + max(1, round(self.seconds / self.period))


def summarize(
    arm: str,
    sessions: list[LoadSession],
    opts: Options,
    cpu: dict[str, Any],
) -> dict[str, Any]:
    """The figures of one arm over the measured frames (the warm-up left out)."""
    measured = range(opts.warm_frames, opts.total_frames)
    rtts, lags = [], []
    lost = unsent = 0
    for s in sessions:
        for k in measured:
            if math.isnan(s.lag[k]):
                unsent += 1
            else:
                lags.append(s.lag[k] * 1000)
            if math.isnan(s.rtt[k]):
                lost += 1
            else:
                rtts.append(s.rtt[k] * 1000)
    rtts.sort()
    lags.sort()
    opens = sorted(s.open_s * 1000 for s in sessions)
    n = len(sessions)
    rtt = (
        {
            "p50": percentile(rtts, 0.50),
            "p90": percentile(rtts, 0.90),
            "p99": percentile(rtts, 0.99),
            "max": rtts[-1],
            "mean": sum(rtts) / len(rtts),
        }
        if rtts
        else None
    )
    return {
        "arm": arm,
        "sessions": n,
        "frames_measured": n * len(measured),
        "frames_back": len(rtts),
        "lost": lost,
        "unsent": unsent,
        "late_sends": sum(x > opts.frame_ms for x in lags),
        "send_lag_ms": {
            "p50": percentile(lags, 0.5),
            "p99": percentile(lags, 0.99),
            "max": lags[-1],
        }
        if lags
        else None,
        "rtt_ms": rtt,
        "open_ms": {"p50": percentile(opens, 0.5), "max": opens[-1]},
        "stamp_mismatches": sum(s.mismatched for s in sessions),
        "duplicates": sum(s.duplicates for s in sessions),
        "errors": sum(s.errors for s in sessions),
        "first_error": next((s.first_error for s in sessions if s.first_error), None),
        "closed_early": sorted({s.closed for s in sessions if s.closed}),
        "cpu": cpu,
    }


# -------------------------------------------------------------------------------- arms


async def run_arm(
    arm: str, url: str, n: int, frames: list[bytes], opts: Options, pids: dict[str, int]
) -> dict[str, Any]:
    """Open ``n`` sessions at ``url``, send the frames on schedule, collect the replies.

    Raises BenchError when a session cannot open within OPEN_TIMEOUT_S. Every socket is
    closed on return, however it returns.
    """
    frame_bytes = opts.frame_ms * BYTES_PER_MS
    sessions = [LoadSession(i, opts.total_frames, frame_bytes) for i in range(n)]
    reader = Reader()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            opened = await _open_all(sessions, url, frames[0], reader)
            if opened:
                cpu = await _measure(arm, sessions, frames, opts, pids, nursery)
            nursery.cancel_scope.cancel()
    finally:
        close = ws_frame(0x8, (1000).to_bytes(2, "big"), os.urandom(4))
        for s in sessions:
            if s.conn is not None:
                try:
                    s.conn.sock.send(close)  # best effort: the peer sees a clean close
                except OSError:
                    pass
                s.conn.close()
        reader.close()
    if not opened:
        created = sum(s.created.is_set() for s in sessions)
        primed = sum(s.primed.is_set() for s in sessions)
        why = next((s.closed for s in sessions if s.closed), "")
        raise BenchError(
            f"{arm}: within {OPEN_TIMEOUT_S:g} s, {created}/{n} sessions had session.created "
            f"and {primed}/{n} the echo of their first frame {why}".rstrip()
        )
    return summarize(arm, sessions, opts, cpu)


async def _open_all(sessions: list[LoadSession], url: str, frame0: bytes, reader: Reader) -> bool:
    """Open every session, 32 at a time; False if any failed or OPEN_TIMEOUT_S passed."""

    async def open_one(s: LoadSession) -> None:
        async with limit:
            try:
                await s.open(url, frame0, reader)
            except (OSError, BenchError) as e:
                s.end(f"cannot open: {e}")

    limit = trio.CapacityLimiter(32)
    with trio.move_on_after(OPEN_TIMEOUT_S):
        async with trio.open_nursery() as opener:
            for s in sessions:
                opener.start_soon(open_one, s)
    return all(s.primed.is_set() and not s.closed for s in sessions)


async def _measure(
    arm: str,
    sessions: list[LoadSession],
    frames: list[bytes],
    opts: Options,
    pids: dict[str, int],
    nursery: trio.Nursery,
) -> dict[str, Any]:
    """Run the schedule (in ``nursery``), sample CPU over the measured window, then give
    the last replies up to DRAIN_S to come back. Returns the CPU figures."""
    t0 = trio.current_time() + 0.05
    nursery.start_soon(send_on_schedule, sessions, frames, t0, opts.period)
    window = (t0 + opts.warm_frames * opts.period, t0 + opts.total_frames * opts.period)
    if opts.progress:
        nursery.start_soon(_progress, arm, sessions, t0, window[1])
    await trio.sleep_until(window[0])
    before = CpuSample.take(pids)
    await trio.sleep_until(window[1])
    cpu = cpu_figures(before, CpuSample.take(pids), len(sessions), opts.placement)
    with trio.move_on_after(DRAIN_S):
        for s in sessions:
            await s.all_back.wait()
    if opts.progress:
        print(file=sys.stderr, flush=True)
    return cpu


async def _progress(arm: str, sessions: list[LoadSession], t0: float, end: float) -> None:
    while True:
        now = trio.current_time()
        done = min(1.0, max(0.0, (now - t0) / (end - t0)))
        bar = "#" * round(30 * done) + "-" * (30 - round(30 * done))
        sent = sum(s.sent for s in sessions)
        back = sum(s.back for s in sessions)
        print(
            f"\r{arm:>6} x{len(sessions):<4} [{bar}] {max(0.0, now - t0):5.1f}/{end - t0:.1f} s"
            f"  frames sent {sent}, back {back}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        await trio.sleep(0.5)


# --------------------------------------------------------------------------- processes


@asynccontextmanager
async def serve_process(
    name: str, argv: list[str], listening: re.Pattern[bytes], core: int | None
) -> AsyncIterator[tuple[int, re.Match[bytes]]]:
    """Run ``argv`` (pinned to ``core`` with taskset when given) until it prints a line
    matching ``listening``; yields (pid, match). Leaving the block sends SIGINT, waits 5 s,
    then kills. Raises BenchError (with the tail of its stderr) if it never listens."""
    cmd = ["taskset", "-c", str(core), *argv] if core is not None else argv
    with tempfile.TemporaryFile() as errors:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=errors)
        try:
            assert proc.stdout is not None
            seen = b""
            match = None
            with trio.move_on_after(OPEN_TIMEOUT_S):
                while (match := listening.search(seen)) is None:
                    data = await proc.stdout.receive_some(4096)
                    if not data:
                        break
                    seen += data
            if match is None:
                errors.seek(0)
                tail = errors.read()[-800:].decode("utf-8", "replace").strip()
                raise BenchError(f"{name} did not start: {' '.join(argv)}\n{tail}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_discard, proc.stdout)  # a full pipe would block it
                yield proc.pid, match
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                    with trio.move_on_after(5):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _discard(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass


def pick_cores(pin: bool) -> tuple[int | None, int | None, str]:
    """(gateway core, load generator + simulator core, how they are placed)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin:
        return None, None, "not pinned (--no-pin)"
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return (
            None,
            None,
            f"not pinned ({len(cpus)} CPU(s) usable, taskset: {shutil.which('taskset')})",
        )
    return (
        cpus[0],
        cpus[1],
        f"gateway alone on CPU {cpus[0]}; load generator and simulator on CPU {cpus[1]}",
    )


# -------------------------------------------------------------------------------- main


async def bench(opts: Options) -> dict[str, Any]:
    """Every arm for every session count; returns the JSON document."""
    gateway_core, client_core, placement = pick_cores(opts.pin)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
        opts.placement = {
            "gateway": gateway_core,
            "simulator": client_core,
            "load_generator": client_core,
        }
    frames = build_frames(opts.total_frames, opts.frame_ms)
    python = [sys.executable, "-m", "voiceactors"]
    doc: dict[str, Any] = {
        "tool": "bench_relay",
        "config": {
            "sessions": opts.sessions,
            "seconds": opts.seconds,
            "warmup_s": opts.warmup,
            "frame_ms": opts.frame_ms,
            "arms": opts.arms,
            "frame_bytes_on_wire": len(frames[0]),
        },
        "placement": placement,
        "python": sys.version.split()[0],
        "runs": [],
    }
    async with AsyncExitStack() as stack:
        sim_pid, m = await stack.enter_async_context(
            serve_process(
                "simulator",
                [*python, "sim", "--mirror", "--port", "0"],
                _SIM_LISTENING,
                client_core,
            )
        )
        sim_url = m[1].decode() + "?model=gpt-realtime"
        pids = {"simulator": sim_pid, "load_generator": os.getpid()}
        urls = {"direct": sim_url}
        if "relay" in opts.arms:
            gateway_pid, m = await stack.enter_async_context(
                serve_process(
                    "gateway",
                    [
                        *python,
                        "serve",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--upstream",
                        m[1].decode(),
                        "--max-sessions",
                        str(max(200, *opts.sessions)),
                    ],
                    _GATEWAY_LISTENING,
                    gateway_core,
                )
            )
            urls["relay"] = f"ws://{m[1].decode()}/v1/realtime?model=gpt-realtime"
        for n in opts.sessions:
            run: dict[str, Any] = {"sessions": n}
            for arm in opts.arms:
                arm_pids = {**pids, "gateway": gateway_pid} if arm == "relay" else pids
                run[arm] = await run_arm(arm, urls[arm], n, frames, opts, arm_pids)
            if "direct" in run and "relay" in run:
                run["added_ms"], run["ratio_relay_over_direct"] = compare(
                    run["direct"], run["relay"]
                )
            doc["runs"].append(run)
            print(report(run, opts, placement), flush=True)
    return doc


def compare(
    direct: dict[str, Any], relay: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Added latency (relay - direct) and ratios (relay / direct) of the RTT percentiles,
    of the simulator's CPU, and the gateway's CPU over the simulator's (None: 0 below)."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    d, r = direct["rtt_ms"], relay["rtt_ms"]
    if d is None or r is None:
        return {}, {}
    quantiles = ("p50", "p90", "p99", "max")
    sim_d, sim_r = direct["cpu"]["simulator"]["pct"], relay["cpu"]["simulator"]["pct"]
    return {q: r[q] - d[q] for q in quantiles}, {
        **{q: ratio(r[q], d[q]) for q in quantiles},
        "simulator_cpu": ratio(sim_r, sim_d),
        "gateway_cpu_over_simulator_cpu": ratio(relay["cpu"]["gateway"]["pct"], sim_r),
    }


def report(run: dict[str, Any], opts: Options, placement: str) -> str:
    """The human summary of one session count."""
    arms = [a for a in ("direct", "relay") if a in run]
    both = len(arms) == 2

    def row(label: str, cells: list[str], extra: str = "") -> str:
        return f"  {label:<20}" + "".join(f"{c:>12}" for c in cells) + extra

    lines = [
        "",
        f"{run['sessions']} sessions x {opts.frame_ms} ms frames, {opts.seconds:g} s measured "
        f"after {opts.warmup:g} s warm-up; {placement}",
        f"{'round trip':<22}"
        + "".join(f"{a:>12}" for a in arms)
        + ("   relay/direct     added" if both else ""),
    ]
    for q in ("p50", "p90", "p99", "max"):
        cells = [f"{run[a]['rtt_ms'][q]:.2f} ms" if run[a]["rtt_ms"] else "-" for a in arms]
        extra = ""
        if run.get("added_ms"):
            ratio = run["ratio_relay_over_direct"][q]
            extra = f"{ratio or math.nan:>14.1f}x {run['added_ms'][q]:>+8.2f} ms"
        lines.append(row(q, cells, extra))
    lines.append(row("session open p50", [f"{run[a]['open_ms']['p50']:.1f} ms" for a in arms]))
    for label, key in (
        ("lost (no echo)", "lost"),
        ("late sends", "late_sends"),
        ("unsent frames", "unsent"),
        ("stamp mismatches", "stamp_mismatches"),
        ("error events", "errors"),
    ):
        lines.append(row(label, [str(run[a][key]) for a in arms]))
    lines.append(
        f"{'CPU, % of one core':<22}" + "".join(f"{a:>12}" for a in arms) + "   per session"
    )
    for proc in ("gateway", "simulator", "load_generator"):
        figures = {a: run[a]["cpu"][proc] for a in arms if proc in run[a]["cpu"]}
        cells = [f"{figures[a]['pct']:.1f}%" if a in figures else "-" for a in arms]
        per = ", ".join(f"{a} {f['pct_per_session']:.2f}%" for a, f in figures.items())
        lines.append(row(proc.replace("_", " "), cells, "   " + per))
    if both and (x := run["ratio_relay_over_direct"].get("gateway_cpu_over_simulator_cpu")):
        lines.append(f"  gateway CPU / simulator CPU (relay arm): {x:.1f}x")
    for core in sorted({c for a in arms for c in run[a]["cpu"]["other_load_pct"]}):
        others = {a: run[a]["cpu"]["other_load_pct"].get(core) for a in arms}
        cells = [f"{x:.1f}%" if x is not None else "-" for x in others.values()]
        lines.append(row(f"not ours, CPU {core}", cells))
        if max(x or 0.0 for x in others.values()) > OTHER_LOAD_WARN_PCT:
            lines.append(f"  WARNING: other processes used CPU {core}: these figures are suspect")
    for a in arms:
        for proc, core in opts.placement.items():
            busy = run[a]["cpu"]["cpu_busy_pct"].get(core, 0.0)
            if proc in run[a]["cpu"] and proc != "simulator" and busy > SATURATED_PCT:
                whose = "the gateway's" if proc == "gateway" else "the clients' and simulator's"
                lines.append(
                    f"  {a}: CPU {core} ({whose}) was {busy:.0f}% busy: "
                    "its latency includes queueing for that CPU"
                )
        if run[a]["closed_early"]:
            lines.append(f"  {a}: sessions ended early: {'; '.join(run[a]['closed_early'])}")
        if run[a]["first_error"]:
            lines.append(f"  {a}: first error event: {run[a]['first_error']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sessions", default="50", help="concurrent sessions, or a sweep: 10,50,100 (50)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per arm (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not counted (2)")
    parser.add_argument("--frame-ms", type=int, default=20, help="audio per frame, 10-100 ms (20)")
    parser.add_argument("--arms", default="direct,relay", help="direct,relay (both)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, help="or into DIR/bench_relay.json")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line (default: on a terminal)"
    )
    args = parser.parse_args(argv)
    try:
        sessions = [int(x) for x in args.sessions.split(",")]
    except ValueError:
        parser.error(f"--sessions: expected N or N,N,...: {args.sessions!r}")
    arms = args.arms.split(",")
    if not sessions or min(sessions) < 1:
        parser.error("--sessions must be >= 1")
    if not set(arms) <= {"direct", "relay"} or not arms or len(set(arms)) != len(arms):
        parser.error("--arms: direct, relay or both")
    if not 10 <= args.frame_ms <= 100:
        parser.error("--frame-ms must be in [10, 100]")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    path = args.json or (args.out or Path(tempfile.gettempdir())) / "bench_relay.json"
    return Options(
        sessions=sessions,
        seconds=args.seconds,
        warmup=args.warmup,
        frame_ms=args.frame_ms,
        arms=arms,
        json_path=path,
        pin=not args.no_pin,
        progress=sys.stderr.isatty() and not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    failures: list[BaseException] = []
    try:
        doc = trio.run(bench, opts)
    except* BenchError as group:
        failures.extend(group.exceptions)
    if failures:
        for e in failures:
            print(f"bench_relay: {e}", file=sys.stderr)
        return 1
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON: {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
