"""``python -m voiceactors run``: one session from WAV files, through the runtime's actors.

Theory of operation
-------------------
The runner plays a person at a device. The runtime is opened exactly as the gateway opens
it (:func:`voiceactors.runtime.open_runtime_from_config`, the embedded simulator upstream
by default) and given one session whose client socket is an in-memory pair
(:func:`memory_client_pair`) instead of a WebSocket. On the other end a
:class:`VirtualClient` behaves like a phone:

- **Microphone.** After ``session.update`` is answered, it streams without a gap: each
  input WAV (converted offline to the client format), silence between inputs, trailing
  silence after the last one, 20 ms per ``input_audio_buffer.append``. Chunk ``k`` is
  captured during ``[t0 + 20k ms, t0 + 20(k+1) ms)`` on the Trio clock and sent when its
  capture ends, so an audio position ``p`` ms on the session's input timeline was captured
  at ``t0 + p``: that is how the server's ``audio_end_ms`` becomes a time.
- **Turns.** Input N+1 starts once the response to input N has been created, is done and
  has played out (and the server hears no speech) for a short settle time. With
  ``barge_in_at_ms`` the *last* input instead starts that long after the previous turn's
  audio began to play: a barge-in.
- **Loudspeaker.** :class:`Playout` plays agent audio at real (Trio) time from the moment it
  arrives, drops what it holds on ``output_audio_buffer.cleared``, and knows to the sample
  what it played of each item; the client reports that (``voiceactors.playback``) every
  100 ms and right after a flush, and keeps the played audio for ``--output``.

Every figure of the :class:`RunReport` is measured from events received and the clock;
nothing is assumed. ``--speed X`` runs the whole ``trio.run`` (client, runtime, simulator)
on ``trio.testing.MockClock(rate=X)``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed

from .audio.codecs import PCM16_16K, PCM16_24K, PCM16_48K, PCMA_8K, PCMU_8K, AudioError, Format
from .audio.resample import convert_offline
from .audio.vad import LocalVAD, SpeechStart
from .audio.wav import read_wav, write_wav
from .realtime import codec
from .realtime import events as ev

if TYPE_CHECKING:  # the runtime is imported when a session runs, not by the CLI's parser
    from .runtime import RuntimeConfig, SessionReport
    from .sim import RunningSimulator, Script

__all__ = [
    "FORMATS",
    "BargeInReport",
    "ClientInput",
    "FramesReport",
    "ItemPlay",
    "MemoryPort",
    "Playout",
    "ResponseReport",
    "RunOptions",
    "RunReport",
    "TurnReport",
    "UsageError",
    "VirtualClient",
    "add_arguments",
    "format_report",
    "load_input",
    "main",
    "memory_client_pair",
    "options_from_args",
    "run",
    "run_session",
    "silence",
]

CHUNK_MS: Final = 20
_CHUNK_S: Final = CHUNK_MS / 1000
REPORT_EVERY_S: Final = 0.1

#: ``--format`` names and the client format each stands for.
FORMATS: Final[dict[str, Format]] = {
    "pcm24k": PCM16_24K,
    "pcm16k": PCM16_16K,
    "pcm48k": PCM16_48K,
    "pcmu": PCMU_8K,
    "pcma": PCMA_8K,
}


class UsageError(ValueError):
    """Bad arguments or input files: the CLI prints the message and exits with 2."""


# -- the in-memory socket pair ----------------------------------------------------------


class _Link:
    __slots__ = ("closed_by", "reason")

    def __init__(self) -> None:
        self.reason: CloseReason | None = None
        self.closed_by: str | None = None


class MemoryPort:
    """One end of an in-memory WebSocket with trio-websocket's surface.

    Built in pairs by :func:`memory_client_pair`. Each direction is a trio memory channel
    of fixed capacity, so a peer that stops reading blocks the sender (backpressure), as a
    full TCP window would; nothing is queued without bound.
    """

    __slots__ = ("_link", "_recv", "_send", "name")

    def __init__(
        self,
        name: str,
        link: _Link,
        send: trio.MemorySendChannel[str | bytes],
        recv: trio.MemoryReceiveChannel[str | bytes],
    ) -> None:
        self.name = name
        self._link = link
        self._send = send
        self._recv = recv

    @property
    def closed(self) -> CloseReason | None:
        """Why the pair was closed (the first ``aclose``'s code and reason), else None."""
        return self._link.reason

    @property
    def closed_by(self) -> str | None:
        """``"server"`` or ``"client"``: the end that closed first, else None."""
        return self._link.closed_by

    async def get_message(self) -> str | bytes:
        """The next message from the peer.

        After the *peer* closed, messages it sent before closing are still delivered (they
        were on the wire before its close frame), then ``ConnectionClosed``. After *this*
        end closed, ``ConnectionClosed`` at once. Cancellation loses no message.
        """
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.reason) from None

    async def send_message(self, message: str | bytes) -> None:
        """Queue ``message`` for the peer, waiting while its buffer is full.

        Raises ``ConnectionClosed`` if either end has closed (also when the close happens
        while waiting), ``TypeError`` for anything but ``str``/``bytes``. A cancelled send
        queued nothing.
        """
        if not isinstance(message, str | bytes):
            raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
        if self._link.reason is not None:
            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(self._link.reason)
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._link.reason) from None

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the pair with ``code``/``reason`` (idempotent; the first close wins).

        Both ends then see ``closed``; this end's pending and future ``get_message`` raise
        ``ConnectionClosed``; the peer first drains what this end sent. Senders blocked on
        either side are woken with ``ConnectionClosed``. A code outside 1000-4999 raises
        ``ValueError`` and closes nothing.
        """
        if not 1000 <= code <= 4999:
            raise ValueError(f"close code must be in 1000-4999, got {code}")
        if self._link.reason is None:
            self._link.reason = CloseReason(code, reason)
            self._link.closed_by = self.name
        self._send.close()
        self._recv.close()
        await trio.lowlevel.checkpoint()


def memory_client_pair(capacity: int = 16) -> tuple[MemoryPort, MemoryPort]:
    """``(server_port, client_port)``: two connected :class:`MemoryPort` ends.

    ``capacity`` (>= 1) is how many messages each direction buffers before ``send_message``
    waits. Closing either end closes both (see :meth:`MemoryPort.aclose`).
    """
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    link = _Link()
    to_client_send, to_client_recv = trio.open_memory_channel[str | bytes](capacity)
    to_server_send, to_server_recv = trio.open_memory_channel[str | bytes](capacity)
    server = MemoryPort("server", link, to_client_send, to_server_recv)
    client = MemoryPort("client", link, to_server_send, to_client_recv)
    return server, client


# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInput:
    """One input WAV as the client sends it: ``audio`` in the client format ``fmt``,
    converted offline (soxr, time-aligned) and padded with silence to whole 20 ms chunks."""

    name: str
    fmt: Format
    audio: bytes

    @property
    def duration_ms(self) -> float:
        return self.fmt.duration_ms(len(self.audio))

    def chunks(self) -> list[bytes]:
        size = self.fmt.bytes_for_ms(CHUNK_MS)
        return [self.audio[i : i + size] for i in range(0, len(self.audio), size)]

    def onset_ms(self, vad_profile: str) -> float | None:
        """Where :class:`~voiceactors.audio.LocalVAD` with ``vad_profile`` first finds
        speech in this input (ms from its start, run offline over the audio as sent), or
        None if it finds none."""
        pcm = convert_offline(self.audio, self.fmt, PCM16_24K)
        vad = LocalVAD(vad_profile, 24000)
        step = PCM16_24K.bytes_for_ms(CHUNK_MS)
        for i in range(0, len(pcm), step):
            for event in vad.process(pcm[i : i + step], PCM16_24K.duration_ms(i)):
                if isinstance(event, SpeechStart):
                    return max(0.0, event.at_ms)
        return None


def load_input(path: str | os.PathLike[str], fmt: Format) -> ClientInput:
    """Read a WAV file (PCM16 at any rate, G.711; mono or stereo) as a :class:`ClientInput`.

    Raises :class:`UsageError` naming the file when it is missing, unreadable, not a WAV
    the audio layer reads, or empty.
    """
    name = os.fspath(path)
    try:
        src, data = read_wav(path)
        audio = convert_offline(data, src, fmt)
    except (OSError, AudioError) as e:
        text = str(e) if name in str(e) else f"{name}: {e}"
        raise UsageError(text) from None
    if not audio:
        raise UsageError(f"{name}: the file holds no audio")
    size = fmt.bytes_for_ms(CHUNK_MS)
    if len(audio) % size:
        audio += silence(fmt, size - len(audio) % size)
    return ClientInput(Path(name).name, fmt, audio)


def silence(fmt: Format, nbytes: int) -> bytes:
    """``nbytes`` (whole samples) of digital silence in ``fmt``: zero bytes for PCM16, the
    codes of zero for G.711 (which are not zero bytes)."""
    zeros = bytes(2 * (nbytes // fmt.sample_width))
    return convert_offline(zeros, Format("pcm16", fmt.rate), fmt)


# -- the loudspeaker ---------------------------------------------------------------------


@dataclass(slots=True)
class ItemPlay:
    """What the device received, played and dropped of one agent item (bytes of the
    client format) and when its first sample played (Trio seconds)."""

    item_id: str
    response_id: str
    received: int = 0
    played: int = 0
    flushed: int = 0
    started_at: float | None = None


class Playout:
    """A device's loudspeaker, sans-IO: times are Trio seconds passed in, never read.

    Audio plays in arrival order at one second per second, starting the moment it arrives
    when the device is idle (an ideal device: no pre-buffering). :meth:`advance` moves the
    play position to ``now``, sample-exact; :meth:`flush` drops everything not yet played.
    The buffer holds at most ``max_buffer_ms``: audio beyond that is dropped and counted in
    ``overflow`` (a paced server never gets near it). The played audio is kept for
    ``--output`` up to ``keep_ms`` (``kept_all`` says whether all of it fit); per-item
    records are kept for the ``max_items`` latest items.
    """

    def __init__(
        self,
        fmt: Format,
        *,
        max_buffer_ms: float = 30_000.0,
        keep_ms: float = 30 * 60_000.0,
        max_items: int = 256,
    ) -> None:
        self.fmt = fmt
        self._width = fmt.sample_width
        self._rate = fmt.rate
        self._max_buffer = fmt.bytes_for_ms(max_buffer_ms)
        self._keep = fmt.bytes_for_ms(keep_ms)
        self._max_items = max_items
        self._queue: deque[list[Any]] = deque()  # [ItemPlay, data, offset]
        self._queued = 0
        # The current run of playback started at _anchor and has played _run samples since:
        # positions are computed from there, so float error does not accumulate.
        self._anchor = 0.0
        self._run = 0
        self._ended_at = -math.inf
        self._dirty: dict[str, ItemPlay] = {}
        self.items: OrderedDict[str, ItemPlay] = OrderedDict()
        self.audio = bytearray()
        self.kept_all = True
        self.played = 0
        self.flushed = 0
        self.overflow = 0
        self.underruns = 0

    def ms(self, nbytes: int) -> float:
        """Duration of ``nbytes`` of the device's format, in ms."""
        return self.fmt.duration_ms(nbytes)

    @property
    def idle(self) -> bool:
        """Nothing left to play (as of the last :meth:`advance`)."""
        return not self._queue

    def busy_until(self) -> float:
        """When playback ends (ended) if nothing more arrives; -inf if it never played."""
        if not self._queue:
            return self._ended_at
        return self._anchor + (self._run + self._queued // self._width) / self._rate

    def push(self, now: float, response_id: str, item_id: str, data: bytes) -> None:
        """Queue agent audio received at ``now``. A trailing partial sample is ignored."""
        self.advance(now)
        item = self._item(item_id, response_id)
        data = data[: len(data) - len(data) % self._width]
        item.received += len(data)
        room = max(0, self._max_buffer - self._queued)
        if len(data) > room:
            keep = room - room % self._width
            self.overflow += len(data) - keep
            data = data[:keep]
        if not data:
            return
        if not self._queue:
            if item.played:
                self.underruns += 1  # this item ran dry and resumes: a gap the user heard
            self._anchor, self._run = now, 0
        self._queue.append([item, data, 0])
        self._queued += len(data)

    def advance(self, now: float) -> None:
        """Play everything whose time has come by ``now`` (earlier ``now`` is a no-op)."""
        if not self._queue:
            return
        # The epsilon keeps a sample due exactly at `now` from being lost to float error.
        due = math.floor((now - self._anchor) * self._rate + 1e-6) - self._run
        budget = due * self._width
        while budget > 0 and self._queue:
            head = self._queue[0]
            item, data, offset = head
            take = min(budget, len(data) - offset)
            if item.started_at is None:
                item.started_at = self._anchor + self._run / self._rate
            self._keep_audio(data[offset : offset + take])
            item.played += take
            self.played += take
            self._run += take // self._width
            self._queued -= take
            budget -= take
            self._dirty[item.item_id] = item
            if offset + take == len(data):
                self._queue.popleft()
            else:
                head[2] = offset + take
        if not self._queue:
            self._ended_at = self._anchor + self._run / self._rate

    def flush(self, now: float) -> list[ItemPlay]:
        """Play up to ``now``, then drop the rest; return the items that lost audio, in
        order (each is also due for a report, see :meth:`take_progress`)."""
        self.advance(now)
        hit: dict[str, ItemPlay] = {}
        for item, data, offset in self._queue:
            item.flushed += len(data) - offset
            hit[item.item_id] = item
        self.flushed += self._queued
        self._queue.clear()
        self._queued = 0
        self._ended_at = self._anchor + self._run / self._rate
        self._dirty.update(hit)
        return list(hit.values())

    def last_item(self) -> ItemPlay | None:
        """The most recent item that played at all."""
        for item in reversed(self.items.values()):
            if item.played:
                return item
        return None

    def take_progress(self) -> list[ItemPlay]:
        """Items whose played position moved, or that were flushed, since the last call."""
        out = list(self._dirty.values())
        self._dirty.clear()
        return out

    def _item(self, item_id: str, response_id: str) -> ItemPlay:
        item = self.items.get(item_id)
        if item is None:
            item = self.items[item_id] = ItemPlay(item_id, response_id)
            while len(self.items) > self._max_items:
                self.items.popitem(last=False)
        return item

    def _keep_audio(self, data: bytes) -> None:
        room = self._keep - len(self.audio)
        if len(data) > room:
            self.kept_all = False
            data = data[: max(0, room)]
        self.audio += data


# -- the virtual client ------------------------------------------------------------------


class _PlaybackReport(msgspec.Struct, frozen=True, tag_field="type", tag="voiceactors.playback"):
    """The runtime's extension event, written from the contract rather than imported from
    ``voiceactors.runtime.client``, so the runner checks the wire format independently."""

    item_id: str
    played_ms: float


class _Abort(Exception):
    """The client gave up waiting for something; it closes the session normally."""


@dataclass(slots=True)
class _Response:
    id: str
    turn: int | None
    created_at: float
    first_delta_at: float | None = None
    first_item: str | None = None
    done_at: float | None = None
    status: str | None = None
    cleared_at: float | None = None


@dataclass(slots=True)
class _Turn:
    index: int
    input: ClientInput
    start_chunk: int
    end_chunk: int | None = None
    speech_end_audio_ms: int | None = None
    speech_stopped_at: float | None = None
    first_delta_at: float | None = None  # first audio received after the latest stop
    answer: str | None = None  # the first response created after the latest stop
    responses: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _BargeIn:
    turn: int
    start_at: float
    onset_at: float | None
    playback_started_at: float | None
    playing_at_onset: bool | None = None
    halted_at: float | None = None
    item: ItemPlay | None = None
    played: int | None = None
    received: int | None = None


_MAX_RESPONSES: Final = 256
_MAX_LOG: Final = 16


class VirtualClient:
    """A person at a device, talking to the runtime over ``port`` (see the module doc).

    :meth:`run` goes from ``session.created`` to the close and returns when the session is
    over. It waits at most ``setup_timeout_s`` for each setup answer and ``turn_timeout_s``
    for each turn to play out; on a timeout it notes the problem in ``problems`` and
    closes with 1000. If the server closes first, :meth:`run` returns at once (what it
    sent before closing is still processed). Cancelling :meth:`run` leaves the port open.
    """

    def __init__(
        self,
        port: MemoryPort,
        inputs: Sequence[ClientInput],
        fmt: Format,
        *,
        barge_in_at_ms: float | None = None,
        barge_in_onset_ms: float | None = None,
        setup_timeout_s: float = 15.0,
        turn_timeout_s: float = 60.0,
        settle_s: float = 0.2,
    ) -> None:
        if not inputs:
            raise ValueError("at least one input")
        self.port = port
        self.inputs = list(inputs)
        self.fmt = fmt
        self._barge_in_at = None if barge_in_at_ms is None else barge_in_at_ms / 1000
        self._barge_onset = None if barge_in_onset_ms is None else barge_in_onset_ms / 1000
        self._setup_timeout = setup_timeout_s
        self._turn_timeout = turn_timeout_s
        self._settle = settle_s
        self._enc = msgspec.json.Encoder()
        self._silence_text = self._append_text(silence(fmt, fmt.bytes_for_ms(CHUNK_MS)))
        self._changed = trio.Event()
        self._report_now = trio.Event()
        self.playout = Playout(fmt)
        self.opened_at = trio.current_time()
        self.created_at: float | None = None
        self.update_sent_at: float | None = None
        self.updated_at: float | None = None
        self.stream_t0: float | None = None
        self.chunks_sent = 0
        self.max_send_lag = 0.0
        self.turns: list[_Turn] = []
        self.responses: OrderedDict[str, _Response] = OrderedDict()
        self.server_speaking = False
        self._speech_turn: int | None = None
        self.barge: _BargeIn | None = None
        self.truncated: OrderedDict[str, int] = OrderedDict()
        self.clears = 0
        self.late_audio = 0
        self.errors = 0
        self.error_log: deque[str] = deque(maxlen=_MAX_LOG)
        self.problems: list[str] = []

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the session from the client's side to its end (see the class doc)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reporter)
            nursery.start_soon(self._read_then_stop, nursery.cancel_scope)
            try:
                await self._script()
            except ConnectionClosed:
                pass  # the server closed first; the reader drains what it sent, then stops
            except _Abort as exc:
                self._problem(str(exc))
                await self.port.aclose(1000)
            else:
                await self.port.aclose(1000)

    async def _read_then_stop(self, scope: trio.CancelScope) -> None:
        decoder = codec.ServerEventDecoder()
        while True:
            try:
                frame = await self.port.get_message()
            except ConnectionClosed:
                break
            try:
                event = decoder.decode(frame)
            except codec.ProtocolError as exc:
                self._problem(f"undecodable server event: {exc.message}")
                continue
            self._on_event(event, trio.current_time())
            self._changed.set()
            self._changed = trio.Event()
        scope.cancel()

    async def _send(self, event: Any) -> None:
        await self.port.send_message(self._enc.encode(event).decode("utf-8"))

    def _append_text(self, chunk: bytes) -> str:
        event = ev.InputAudioBufferAppend(audio=codec.b64encode(chunk))
        return self._enc.encode(event).decode("utf-8")

    def _problem(self, text: str) -> None:
        if len(self.problems) < _MAX_LOG:
            self.problems.append(text)

    # -- the microphone -----------------------------------------------------------------

    async def _script(self) -> None:
        await self._wait_for(lambda: self.created_at is not None, "session.created")
        api = ev.AudioFormat(**self.fmt.to_api())
        audio = ev.AudioConfig(input=ev.AudioInput(format=api), output=ev.AudioOutput(format=api))
        self.update_sent_at = trio.current_time()
        await self._send(ev.SessionUpdate(session=ev.Session(audio=audio)))
        await self._wait_for(lambda: self.updated_at is not None, "session.updated")
        self.stream_t0 = trio.current_time()
        last = len(self.inputs) - 1
        for i, item in enumerate(self.inputs):
            if i and i == last and self._barge_in_at is not None:
                await self._silence_until(
                    partial(self._barge_in_due, i - 1), f"agent audio of turn {i} to play", 0.0
                )
            elif i:
                await self._silence_until(
                    partial(self._turn_done, i - 1), f"the answer to turn {i} to play out"
                )
            turn = _Turn(i, item, start_chunk=self.chunks_sent)
            self.turns.append(turn)
            if i == last and self._barge_in_at is not None:
                self._start_barge_in(turn)
            for chunk in item.chunks():
                await self._send_chunk(self._append_text(chunk))
            turn.end_chunk = self.chunks_sent
        await self._silence_until(
            lambda: self._turn_done(last), f"the answer to turn {last + 1} to play out"
        )

    def capture_time(self, audio_ms: float) -> float:
        """When the audio at ``audio_ms`` of the input timeline was captured: the stream
        is gapless from ``stream_t0``, chunk ``k`` covering ``[20k, 20k + 20)`` ms."""
        assert self.stream_t0 is not None
        return self.stream_t0 + audio_ms / 1000

    async def _send_chunk(self, text: str) -> None:
        assert self.stream_t0 is not None
        due = self.stream_t0 + (self.chunks_sent + 1) * _CHUNK_S  # when its capture ends
        await trio.sleep_until(due)
        self.playout.advance(trio.current_time())
        await self.port.send_message(text)
        self.chunks_sent += 1
        self.max_send_lag = max(self.max_send_lag, trio.current_time() - due)
        barge = self.barge
        if barge is not None and barge.onset_at is not None and barge.playing_at_onset is None:
            if self.capture_time(self.chunks_sent * CHUNK_MS) > barge.onset_at:
                barge.playing_at_onset = self.playout.busy_until() > barge.onset_at

    async def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        with trio.move_on_after(self._setup_timeout):
            while not ready():
                await self._changed.wait()
            return
        raise _Abort(f"gave up after {self._setup_timeout:g} s waiting for {what}")

    async def _silence_until(
        self, ready: Callable[[], bool], what: str, settle: float | None = None
    ) -> None:
        """Send silence until ``ready()`` has held for ``settle`` seconds (checked once per
        chunk, so at most 20 ms late); raise :class:`_Abort` after ``turn_timeout_s``."""
        settle = self._settle if settle is None else settle
        deadline = trio.current_time() + self._turn_timeout
        since: float | None = None
        while True:
            now = trio.current_time()
            self.playout.advance(now)
            if not ready():
                since = None
            elif since is None:
                since = now
            if since is not None and now - since >= settle - 1e-9:
                return
            if now >= deadline:
                raise _Abort(f"gave up after {self._turn_timeout:g} s waiting for {what}")
            await self._send_chunk(self._silence_text)

    def _turn_done(self, index: int) -> bool:
        turn = self.turns[index]
        if turn.speech_end_audio_ms is None or self.server_speaking or not turn.responses:
            return False
        if turn.answer is None:
            return False  # the answer to the latest speech has not been created yet
        done = all(
            r is None or r.done_at is not None for r in map(self.responses.get, turn.responses)
        )
        return done and self.playout.idle

    def _barge_in_due(self, index: int) -> bool:
        started = self._first_played(self.turns[index])
        if started is None or self._barge_in_at is None:
            return False
        next_capture = self.capture_time(self.chunks_sent * CHUNK_MS)
        return next_capture >= started + self._barge_in_at - 1e-9

    def _first_played(self, turn: _Turn) -> float | None:
        times = []
        for rid in turn.responses:
            resp = self.responses.get(rid)
            item = self.playout.items.get(resp.first_item) if resp and resp.first_item else None
            if item is not None and item.started_at is not None:
                times.append(item.started_at)
        return min(times, default=None)

    def _start_barge_in(self, turn: _Turn) -> None:
        start = self.capture_time(turn.start_chunk * CHUNK_MS)
        onset = None if self._barge_onset is None else start + self._barge_onset
        previous = self._first_played(self.turns[turn.index - 1])
        self.barge = _BargeIn(turn.index, start, onset, previous)

    # -- the loudspeaker and the reports ------------------------------------------------

    async def _reporter(self) -> None:
        """Report played positions every 100 ms and at once after a flush."""
        next_at = trio.current_time() + REPORT_EVERY_S
        while True:
            with trio.move_on_at(next_at):
                await self._report_now.wait()
            now = trio.current_time()
            if self._report_now.is_set():
                self._report_now = trio.Event()
            while next_at <= now:
                next_at += REPORT_EVERY_S
            self.playout.advance(now)
            for item in self.playout.take_progress():
                played = round(self.playout.ms(item.played), 3)
                try:
                    await self._send(_PlaybackReport(item.item_id, played))
                except ConnectionClosed:
                    return

    def _on_event(self, event: Any, now: float) -> None:
        match event:
            case ev.SessionCreated():
                if self.created_at is None:
                    self.created_at = now
            case ev.SessionUpdated():
                if self.updated_at is None and self.update_sent_at is not None:
                    self.updated_at = now
            case ev.InputAudioBufferSpeechStarted():
                self.server_speaking = True
            case ev.InputAudioBufferSpeechStopped(audio_end_ms=end):
                self.server_speaking = False
                self._speech_stopped(end, now)
            case ev.ResponseCreated(response=r) if r.id is not None:
                self._response_created(r.id, now)
            case ev.ResponseOutputAudioDelta():
                self._audio(event, now)
            case ev.ResponseDone(response=r) if r.id is not None:
                resp = self.responses.get(r.id)
                if resp is not None and resp.done_at is None:
                    resp.done_at, resp.status = now, r.status
            case ev.OutputAudioBufferCleared(response_id=rid):
                self._cleared(rid, now)
            case ev.ConversationItemTruncated(item_id=item_id, audio_end_ms=end):
                self.truncated[item_id] = end
                while len(self.truncated) > _MAX_RESPONSES:
                    self.truncated.popitem(last=False)
            case ev.ErrorEvent(error=e):
                self.errors += 1
                self.error_log.append(f"{e.code or e.type}: {e.message}")

    def _speech_stopped(self, audio_end_ms: int, now: float) -> None:
        # The turn is the latest input that started at or before that audio position.
        for turn in reversed(self.turns):
            if turn.start_chunk * CHUNK_MS <= audio_end_ms:
                turn.speech_end_audio_ms = audio_end_ms
                turn.speech_stopped_at = now
                turn.first_delta_at = None
                turn.answer = None
                self._speech_turn = turn.index
                return

    def _response_created(self, rid: str, now: float) -> None:
        index = self._speech_turn
        self.responses[rid] = _Response(rid, index, now)
        while len(self.responses) > _MAX_RESPONSES:
            self.responses.popitem(last=False)
        if index is not None:
            turn = self.turns[index]
            if turn.answer is None:
                turn.answer = rid
            if len(turn.responses) < _MAX_LOG:
                turn.responses.append(rid)

    def _audio(self, event: ev.ResponseOutputAudioDelta, now: float) -> None:
        try:
            data = codec.b64decode_strict(event.delta, param="delta")
        except codec.ProtocolError as exc:
            self._problem(f"bad audio delta: {exc.message}")
            return
        resp = self.responses.get(event.response_id)
        if resp is not None and resp.cleared_at is not None:
            # The server said to drop this response's audio; later deltas are stale.
            self.late_audio += len(data)
            return
        if resp is not None:
            if resp.first_delta_at is None:
                resp.first_delta_at, resp.first_item = now, event.item_id
            if resp.turn is not None:
                turn = self.turns[resp.turn]
                if turn.first_delta_at is None:
                    turn.first_delta_at = now
        self.playout.push(now, event.response_id, event.item_id, data)

    def _cleared(self, rid: str, now: float) -> None:
        self.clears += 1
        hit = self.playout.flush(now)
        resp = self.responses.get(rid)
        if resp is not None and resp.cleared_at is None:
            resp.cleared_at = now
        barge = self.barge
        if barge is not None and barge.halted_at is None and now >= barge.start_at:
            item = hit[0] if hit else self.playout.last_item()
            barge.halted_at, barge.item = now, item
            if item is not None:
                barge.played, barge.received = item.played, item.received
        self._report_now.set()


# -- the report --------------------------------------------------------------------------


class ResponseReport(msgspec.Struct, frozen=True):
    """One agent response: its final status and the audio the device got of it (ms)."""

    id: str
    status: str | None
    received_ms: float
    played_ms: float
    flushed_ms: float


class TurnReport(msgspec.Struct, frozen=True):
    """One input. Times are ms since the client port opened; latencies are ms from the
    user's speech end (the capture time of the server's ``audio_end_ms``)."""

    input: str
    started_ms: float
    input_ms: float
    speech_end_audio_ms: int | None
    speech_end_ms: float | None
    first_audio_ms: float | None
    first_played_ms: float | None
    responses: list[ResponseReport]


class BargeInReport(msgspec.Struct, frozen=True):
    """The last input spoken over the agent. ``onset_ms``/``halted_ms`` are ms since the
    port opened: the capture time of the speech onset local VAD finds in the input, and
    when ``output_audio_buffer.cleared`` arrived; ``played_ms``/``received_ms`` are what
    the device had played/received of ``item_id`` then; ``truncated_ms`` is the
    ``audio_end_ms`` the upstream confirmed for that item."""

    input: str
    started_after_playback_ms: float | None
    playing_at_onset: bool | None
    onset_ms: float | None
    halted_ms: float | None
    latency_ms: float | None
    item_id: str | None
    played_ms: float | None
    received_ms: float | None
    truncated_ms: int | None


class FramesReport(msgspec.Struct, frozen=True):
    """User audio: 20 ms frames the client sent, and what reached the upstream.

    ``source`` is ``"simulator"`` when ``upstream_ms`` is the audio the embedded simulator
    recorded; otherwise ``"runtime counters"``: ``lost`` is then the runtime's own count
    of dropped frames, since nothing else saw the upstream's side.
    """

    sent: int
    sent_ms: float
    runtime_in: int | None
    upstream_ms: float | None
    lost: int | None
    source: str
    runtime_dropped: int | None


class RunReport(msgspec.Struct, frozen=True):
    """Everything ``run`` measured about one session (``--json`` writes this)."""

    ok: bool
    problems: list[str]
    upstream: str
    format: str
    speed: float | None
    created_ms: float | None
    updated_ms: float | None
    turns: list[TurnReport]
    barge_in: BargeInReport | None
    frames: FramesReport
    reconnects: int | None
    tasks_left: int | None
    closed_by: str | None
    close_code: int | None
    close_reason: str | None
    played_ms: float
    flushed_ms: float
    overflow_ms: float
    late_audio_ms: float
    underruns: int
    clears: int
    max_send_lag_ms: float
    errors: list[str]
    output: str | None
    output_ms: float | None
    session: dict[str, Any] | None


def _ms(t: float | None, since: float | None) -> float | None:
    if t is None or since is None:
        return None
    return round((t - since) * 1000, 3)


def _turn_report(client: VirtualClient, turn: _Turn) -> TurnReport:
    t0 = client.opened_at
    end = turn.speech_end_audio_ms
    end_at = client.capture_time(end) if end is not None else None
    answer = client.responses.get(turn.answer) if turn.answer else None
    first_played = None
    if answer is not None and answer.first_item is not None:
        item = client.playout.items.get(answer.first_item)
        first_played = item.started_at if item is not None else None
    responses = []
    for rid in turn.responses:
        items = [i for i in client.playout.items.values() if i.response_id == rid]
        resp = client.responses.get(rid)
        responses.append(
            ResponseReport(
                id=rid,
                status=resp.status if resp is not None else None,
                received_ms=sum(client.playout.ms(i.received) for i in items),
                played_ms=sum(client.playout.ms(i.played) for i in items),
                flushed_ms=sum(client.playout.ms(i.flushed) for i in items),
            )
        )
    return TurnReport(
        input=turn.input.name,
        started_ms=round(client.capture_time(turn.start_chunk * CHUNK_MS) * 1000 - t0 * 1000, 3),
        input_ms=turn.input.duration_ms,
        speech_end_audio_ms=end,
        speech_end_ms=_ms(end_at, t0),
        first_audio_ms=_ms(turn.first_delta_at, end_at),
        first_played_ms=_ms(first_played, end_at),
        responses=responses,
    )


def _barge_report(client: VirtualClient) -> BargeInReport | None:
    b = client.barge
    if b is None:
        return None
    t0 = client.opened_at
    item = b.item
    ms = client.playout.ms
    return BargeInReport(
        input=client.turns[b.turn].input.name,
        started_after_playback_ms=_ms(b.start_at, b.playback_started_at),
        playing_at_onset=b.playing_at_onset,
        onset_ms=_ms(b.onset_at, t0),
        halted_ms=_ms(b.halted_at, t0),
        latency_ms=_ms(b.halted_at, b.onset_at),
        item_id=item.item_id if item is not None else None,
        played_ms=ms(b.played) if b.played is not None else None,
        received_ms=ms(b.received) if b.received is not None else None,
        truncated_ms=client.truncated.get(item.item_id) if item is not None else None,
    )


def format_report(report: RunReport) -> str:
    """A short human summary of ``report``, one fact per line."""

    def f(v: float | None, unit: str = " ms") -> str:
        return "-" if v is None else f"{v:,.0f}{unit}"

    lines = [
        f"voiceactors run: {report.upstream} upstream, {report.format}, "
        + ("real time" if report.speed is None else f"{report.speed:g}x virtual time"),
        f"  setup        session.created {f(report.created_ms)}, "
        f"session.updated {f(report.updated_ms)}",
        "  turn  input                    speech end   first audio   first played  response",
    ]
    for n, t in enumerate(report.turns, 1):
        status = ", ".join(r.status or "?" for r in t.responses) or "-"
        lines.append(
            f"  {n:<4}  {t.input[:24]:<24} {f(t.speech_end_ms):>11}  {f(t.first_audio_ms, ''):>9} ms"
            f"  {f(t.first_played_ms, ''):>10} ms  {status}"
        )
    b = report.barge_in
    if b is not None:
        lines.append(
            f"  barge-in     onset {f(b.onset_ms)} -> halted {f(b.halted_ms)}: "
            f"{f(b.latency_ms)}; started {f(b.started_after_playback_ms)} into the agent's audio"
        )
        lines.append(
            f"  truncation   upstream confirmed {f(b.truncated_ms)}; client played "
            f"{f(b.played_ms)} of {f(b.received_ms)} received ({b.item_id or 'no item'})"
        )
    fr = report.frames
    upstream = f"{f(fr.upstream_ms)} reached the upstream" if fr.upstream_ms is not None else ""
    lines.append(
        f"  frames       {fr.sent} sent ({f(fr.sent_ms)}), {upstream or 'upstream unseen'}; "
        f"lost {fr.lost if fr.lost is not None else '-'} ({fr.source})"
    )
    lines.append(
        f"  agent audio  played {f(report.played_ms)}, flushed {f(report.flushed_ms)}, "
        f"underruns {report.underruns}"
    )
    lines.append(
        f"  reconnects   {report.reconnects if report.reconnects is not None else '-'}; "
        f"tasks left {report.tasks_left if report.tasks_left is not None else '-'}; "
        f"server errors {len(report.errors)}"
    )
    lines.append(
        f"  closed       by {report.closed_by or '-'} with {report.close_code or '-'}"
        + (f" ({report.session.get('reason')})" if report.session else "")
    )
    if report.output is not None:
        lines.append(f"  output       {report.output}: {f(report.output_ms)} of agent audio")
    lines.extend(f"  PROBLEM      {p}" for p in report.problems)
    lines.append(f"  result       {'ok' if report.ok else 'FAILED'}")
    return "\n".join(lines)


# -- one session -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOptions:
    """A checked ``run`` request (see :func:`options_from_args`)."""

    inputs: tuple[ClientInput, ...]
    fmt: Format = PCM16_24K
    upstream: str = "sim"
    barge_in_at_ms: float | None = None
    speed: float | None = None
    output: Path | None = None
    json_path: Path | None = None
    script: Script | None = None  # the embedded simulator's replies
    setup_timeout_s: float = 15.0
    turn_timeout_s: float = 60.0
    close_timeout_s: float = 10.0


def _runtime_config(opts: RunOptions) -> RuntimeConfig:
    from .runtime import RuntimeConfig
    from .sim import SimConfig

    if opts.upstream == "sim":
        return RuntimeConfig(upstream="sim", sim=SimConfig(script=opts.script))
    return RuntimeConfig(upstream=opts.upstream)


async def run_session(opts: RunOptions, config: RuntimeConfig | None = None) -> RunReport:
    """Run one session of ``opts.inputs`` through a runtime opened from ``config`` (a
    ``RuntimeConfig``; by default the one ``opts`` describes) and measure it.

    Never raises for what the session does: failures become ``problems`` and ``ok=False``
    in the report. Raises ``voiceactors.runtime.RuntimeError_`` if the runtime cannot
    start (no API key). Writes ``opts.output`` (the played agent audio, 24 kHz PCM16) when
    set. Cancellation propagates after the runtime has closed.
    """
    from .gateway import ClientInfo
    from .runtime import open_runtime_from_config
    from .testing.leaks import live_tasks

    config = config if config is not None else _runtime_config(opts)
    onset = None
    if opts.barge_in_at_ms is not None and len(opts.inputs) > 1:
        onset = opts.inputs[-1].onset_ms(config.vad_profile)
    info = ClientInfo(
        session_id="run",
        remote="memory",
        path="/v1/realtime",
        query={"model": config.model},
        headers={},
        subprotocol=None,
        model=config.model,
    )
    problems: list[str] = []
    session: SessionReport | None = None
    baseline = set(live_tasks())
    async with open_runtime_from_config(config) as rt:
        server_port, client_port = memory_client_pair()
        client = VirtualClient(
            client_port,
            opts.inputs,
            opts.fmt,
            barge_in_at_ms=opts.barge_in_at_ms,
            barge_in_onset_ms=onset,
            setup_timeout_s=opts.setup_timeout_s,
            turn_timeout_s=opts.turn_timeout_s,
        )
        served = trio.Event()

        async def serve() -> None:
            nonlocal session
            try:
                session = await rt.run_client(server_port, info)
            except Exception as exc:  # a runtime bug: report it, do not hide the session
                problems.append(f"the runtime raised {exc!r}")
                await server_port.aclose(1011, "internal error")
            finally:
                served.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.run()
            with trio.move_on_after(opts.close_timeout_s):
                await served.wait()
            if not served.is_set():
                problems.append(
                    f"the runtime did not end the session within {opts.close_timeout_s:g} s "
                    "of the close"
                )
                nursery.cancel_scope.cancel()
        sim = rt.sim
    tasks_left = sum(1 for t in live_tasks() if t not in baseline and not _trio_internal(t))
    frames = _frames(client, session, sim)
    output_ms = None
    if opts.output is not None:
        pcm = convert_offline(bytes(client.playout.audio), opts.fmt, PCM16_24K)
        try:
            await trio.to_thread.run_sync(write_wav, opts.output, PCM16_24K, pcm)
            output_ms = PCM16_24K.duration_ms(len(pcm))
        except (OSError, AudioError) as exc:
            problems.append(f"cannot write {opts.output}: {exc}")
        if not client.playout.kept_all:
            problems.append("the played audio was longer than --output keeps (30 min)")
    return _report(client, opts, session, problems, frames, tasks_left, output_ms)


def _trio_internal(task: trio.lowlevel.Task) -> bool:
    # Trio's own system tasks and MockClock's autojump helper are not ours.
    return task.name.startswith("trio.") or "autojump" in task.name


def _frames(
    client: VirtualClient, session: SessionReport | None, sim: RunningSimulator | None
) -> FramesReport:
    sent_ms = client.chunks_sent * float(CHUNK_MS)
    runtime_in = session.frames_in if session is not None else None
    dropped = session.frames_dropped if session is not None else None
    if sim is None:
        return FramesReport(
            client.chunks_sent, sent_ms, runtime_in, None, dropped, "runtime counters", dropped
        )
    upstream_ms = sum(_received_ms(rec) for rec in sim.sim.connections)
    lost = max(0, round((sent_ms - upstream_ms) / CHUNK_MS))
    return FramesReport(
        client.chunks_sent, sent_ms, runtime_in, round(upstream_ms, 3), lost, "simulator", dropped
    )


def _received_ms(rec: Any) -> float:
    """Audio the simulator recorded on one connection, in ms of the input format that
    connection's ``session.update`` events set (the simulator's default is PCM16 24 kHz)."""
    fmt = PCM16_24K
    for event in rec.received_events:
        if isinstance(event, ev.SessionUpdate):
            audio = event.session.audio
            if isinstance(audio, ev.AudioConfig) and isinstance(audio.input, ev.AudioInput):
                if isinstance(audio.input.format, ev.AudioFormat):
                    fmt = Format.from_api(msgspec.to_builtins(audio.input.format))
    return fmt.duration_ms(rec.received_audio_bytes)


def _report(
    client: VirtualClient,
    opts: RunOptions,
    session: SessionReport | None,
    problems: list[str],
    frames: FramesReport,
    tasks_left: int,
    output_ms: float | None,
) -> RunReport:
    problems = [*client.problems, *problems]
    closed, closed_by = client.port.closed, client.port.closed_by
    barge = _barge_report(client)
    if session is not None and session.code != 1000:
        problems.append(f"the runtime ended the session: {session.reason} ({session.code})")
    if closed_by != "client" or closed is None or closed.code != 1000:
        problems.append(
            f"the session was closed by the {closed_by or 'nobody'}"
            + (f" with {closed.code}" if closed is not None else "")
        )
    if barge is not None:
        if barge.onset_ms is None:
            problems.append(f"no speech found in {barge.input} to time the barge-in from")
        elif barge.halted_ms is None and barge.playing_at_onset:
            problems.append("the agent was speaking at the barge-in but its audio never halted")
    if frames.lost:
        problems.append(f"{frames.lost} user audio frames lost")
    if tasks_left:
        problems.append(f"{tasks_left} tasks left after the runtime closed")
    ms = client.playout.ms
    return RunReport(
        ok=not problems,
        problems=problems,
        upstream=opts.upstream,
        format=str(opts.fmt),
        speed=opts.speed,
        created_ms=_ms(client.created_at, client.opened_at),
        updated_ms=_ms(client.updated_at, client.opened_at),
        turns=[_turn_report(client, t) for t in client.turns],
        barge_in=barge,
        frames=frames,
        reconnects=session.reconnects if session is not None else None,
        tasks_left=tasks_left,
        closed_by=closed_by,
        close_code=closed.code if closed is not None else None,
        close_reason=closed.reason if closed is not None else None,
        played_ms=ms(client.playout.played),
        flushed_ms=ms(client.playout.flushed),
        overflow_ms=ms(client.playout.overflow),
        late_audio_ms=ms(client.late_audio),
        underruns=client.playout.underruns,
        clears=client.clears,
        max_send_lag_ms=round(client.max_send_lag * 1000, 3),
        errors=list(client.error_log),
        output=str(opts.output) if opts.output is not None else None,
        output_ms=output_ms,
        session=msgspec.to_builtins(session) if session is not None else None,
    )


# -- the command line --------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``run``'s options to ``parser``."""
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="WAV",
        help="user audio, one turn per file, in order (repeat; any rate, PCM16 or G.711)",
    )
    parser.add_argument(
        "--barge-in-at",
        type=float,
        metavar="MS",
        help="start the last input MS after the agent's previous answer starts playing",
    )
    parser.add_argument(
        "--upstream", default="sim", help="sim (default), openai, or a ws(s):// Realtime URL"
    )
    parser.add_argument(
        "--speed", type=float, metavar="X", help="run X times faster on a virtual clock (0-100]"
    )
    parser.add_argument("--output", type=Path, metavar="WAV", help="write what the client played")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--format", choices=list(FORMATS), default="pcm24k", help="client audio format (pcm24k)"
    )
    parser.add_argument("--script", metavar="FILE", help="reply script for the simulator")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Check ``args`` and read the inputs; raise :class:`UsageError` saying what is wrong."""
    fmt = FORMATS[args.format]
    speed = args.speed
    if speed is not None and not (math.isfinite(speed) and 0 < speed <= 100):
        raise UsageError(f"--speed must be in (0, 100], got {speed:g}")
    barge = args.barge_in_at
    if barge is not None:
        if not (math.isfinite(barge) and barge >= 0):
            raise UsageError(f"--barge-in-at must be a number of ms >= 0, got {barge:g}")
        if len(args.input) < 2:
            raise UsageError("--barge-in-at needs at least two --input files")
    upstream = args.upstream
    if upstream not in ("sim", "openai") and not upstream.startswith(("ws://", "wss://")):
        raise UsageError(f"--upstream must be sim, openai or a ws(s):// URL, got {upstream!r}")
    if upstream == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise UsageError("--upstream openai needs OPENAI_API_KEY in the environment")
    script = None
    if args.script is not None:
        if upstream != "sim":
            raise UsageError("--script only applies to the embedded simulator (--upstream sim)")
        from .sim import ScriptError, load_script

        try:
            script = load_script(args.script)
        except (ScriptError, OSError) as e:
            raise UsageError(str(e)) from None
    for path in (args.output, args.json):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{path}: no such directory {str(path.parent)!r}")
    inputs = tuple(load_input(p, fmt) for p in args.input)
    return RunOptions(
        inputs=inputs,
        fmt=fmt,
        upstream=upstream,
        barge_in_at_ms=barge,
        speed=speed,
        output=args.output,
        json_path=args.json,
        script=script,
    )


def run(args: argparse.Namespace) -> int:
    """Run per ``args``; print the report. Exit code: 0 the session ended normally and
    every check passed, 1 otherwise (the report is still printed), 2 bad arguments/files."""
    from .runtime import RuntimeError_

    try:
        opts = options_from_args(args)
    except UsageError as e:
        print(f"voiceactors run: {e}", file=sys.stderr, flush=True)
        return 2
    clock = trio.testing.MockClock(rate=opts.speed) if opts.speed is not None else None
    try:
        report = trio.run(run_session, opts, clock=clock)
    except RuntimeError_ as e:
        print(f"voiceactors run: {e}", file=sys.stderr, flush=True)
        return 2
    print(format_report(report), flush=True)
    if opts.json_path is not None:
        try:
            opts.json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        except OSError as e:
            print(f"voiceactors run: cannot write {opts.json_path}: {e}", file=sys.stderr)
            return 1
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voiceactors run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
