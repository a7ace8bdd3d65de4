"""The virtual client: :class:`VirtualClient` plays a person at a device over one
:class:`~.pair.MemoryPort`: the microphone streaming the inputs in turns (or barging in),
the loudspeaker (:class:`~.device.Playout`) and its ``voiceactors.playback`` reports, and
every server event it receives, timed on the Trio clock for the report.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import msgspec
import trio
from trio_websocket import ConnectionClosed

from ..audio.codecs import Format
from ..realtime import codec
from ..realtime import events as ev
from .device import ItemPlay, Playout
from .inputs import CHUNK_MS, ClientInput, silence
from .pair import MemoryPort

__all__ = ["REPORT_EVERY_S", "VirtualClient"]

_CHUNK_S: Final = CHUNK_MS / 1000
REPORT_EVERY_S: Final = 0.1


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
