"""One simulated Realtime session: config, input buffer + VAD, conversation, responses.

The session never touches the socket. It is driven by :meth:`RealtimeSession.handle`
(one decoded client event at a time, from the connection's reader task) and sends
server events through ``emit`` (a bounded channel to the connection's writer task), so
a response streaming in its own task and the reader never interleave inside a frame.
A running response lives in a task of the connection's nursery under its own cancel
scope; cancelling it (``response.cancel``, barge-in) is synchronous bookkeeping here
plus a ``response.done`` that reflects exactly what was emitted before.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from ..realtime import codec
from ..realtime import events as ev
from .audio import PCM24K, WireFormat, from_pcm16_24k, silence, to_pcm16_24k
from .config import SimConfig, is_known_model
from .script import Reply
from .vad import EnergyVad, SpeechStart, SpeechStop

__all__ = ["ConnectionRecord", "RealtimeSession"]

Emit = Callable[[Any], Awaitable[None]]

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class ConnectionRecord:
    """What one connection did, for tests: every accepted client event (bounded by
    ``max_recorded_events``; ``dropped_events`` counts the rest), all audio received as
    sent by the client (``received_audio``, exact length in ``received_audio_bytes``), the
    audio of each committed user item, types of events written, errors, faults fired and
    how it ended."""

    index: int
    path: str = ""
    model: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    received_events: list[Any] = field(default_factory=list)
    dropped_events: int = 0
    received_audio_buffer: bytearray = field(default_factory=bytearray)
    received_audio_bytes: int = 0
    committed_audio: dict[str, bytes] = field(default_factory=dict)
    sent_types: list[str] = field(default_factory=list)
    protocol_errors: list[codec.ProtocolError] = field(default_factory=list)
    errors_sent: list[str] = field(default_factory=list)
    faults_fired: list[str] = field(default_factory=list)
    rejected_status: int | None = None
    close_code: int | None = None
    closed_by: str | None = None  # "server", "client", "drop"
    held_dropped: int = 0
    buffer_dropped_bytes: int = 0
    items_evicted: int = 0

    @property
    def received_audio(self) -> bytes:
        return bytes(self.received_audio_buffer)

    def received_types(self) -> list[str]:
        return [type(e).__struct_config__.tag for e in self.received_events]


@dataclass
class _ConvItem:
    item: ev.Item
    audio: bytes | None = None  # committed user audio, wire format
    audio_ms: float = 0.0  # assistant audio emitted so far (for truncate)


@dataclass
class _Running:
    id: str
    scope: trio.CancelScope
    modalities: list[str]
    in_conversation: bool
    output: list[ev.Item] = field(default_factory=list)
    # The item being streamed: (item, output_index) and what has been emitted of it.
    current: ev.Item | None = None
    current_index: int = 0
    said: str = ""
    audio_ms: float = 0.0
    input_tokens: int = 0


class RealtimeSession:
    """The Realtime GA semantics for one connection (see module docstring)."""

    def __init__(
        self,
        cfg: SimConfig,
        record: ConnectionRecord,
        emit: Emit,
        nursery: trio.Nursery,
        rng: random.Random,
        model: str,
    ) -> None:
        self.cfg = cfg
        self.rec = record
        self._emit = emit
        self._nursery = nursery
        self._rng = rng
        self._fmt_in = PCM24K
        self._fmt_out = PCM24K
        self._audio_ms = 0.0  # the session's audio timeline (all input so far)
        self.session = self._initial_session(model)
        self._vad: EnergyVad | None = self._make_vad()
        self._buf = bytearray()
        self._buf_start_ms = 0.0
        self._speech_item: str | None = None
        self._speech_start_ms = 0.0
        self._order: list[str] = []
        self._items: dict[str, _ConvItem] = {}
        self._active: _Running | None = None
        self._turn = 0
        self._pending_after: Reply | None = None
        self._outputs_since_call = False
        self._last_user_audio: bytes | None = None  # PCM16 24 kHz, for the echo brain
        self._audio_out_started = False
        self._requests_left = 5000
        self._tokens_left = 400_000
        # SimConfig.mirror: the standing response and the fields of its audio deltas.
        self._mirror_run: _Running | None = None
        self._mirror_fields: dict[str, Any] = {}

    # ------------------------------------------------------------------ ids & config

    def new_id(self, prefix: str) -> str:
        return prefix + "_" + "".join(self._rng.choice(_ALNUM) for _ in range(20))

    def _initial_session(self, model: str) -> ev.Session:
        epoch = self.cfg.epoch if self.cfg.epoch is not None else 1_750_000_000.0
        return ev.Session(
            id=self.new_id("sess"),
            object="realtime.session",
            model=model,
            instructions="",
            output_modalities=["audio"],
            audio=ev.AudioConfig(
                input=ev.AudioInput(
                    format=ev.AudioFormat(type="audio/pcm", rate=24000),
                    transcription=None,
                    noise_reduction=None,
                    turn_detection=None if self.cfg.mirror else self.cfg.turn_detection,
                ),
                output=ev.AudioOutput(
                    format=ev.AudioFormat(type="audio/pcm", rate=24000),
                    voice=self.cfg.voice,
                    speed=1.0,
                ),
            ),
            tools=[],
            tool_choice="auto",
            max_output_tokens="inf",
            truncation="auto",
            tracing=None,
            prompt=None,
            include=None,
            expires_at=int(epoch + self.cfg.max_session_s),
        )

    @property
    def _turn_detection(self) -> ev.TurnDetection | None:
        a = self.session.audio
        assert isinstance(a, ev.AudioConfig) and isinstance(a.input, ev.AudioInput)
        td = a.input.turn_detection
        return td if isinstance(td, ev.TurnDetection) else None

    def _make_vad(self) -> EnergyVad | None:
        td = self._turn_detection
        if td is None:
            return None
        if td.type == "semantic_vad":
            # Documented approximation: eagerness picks the silence that ends a turn.
            silence_ms = {"low": 1000, "medium": 600, "high": 250, "auto": 600}[
                td.eagerness if isinstance(td.eagerness, str) else "auto"
            ]
            settings = {
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": silence_ms,
            }
        else:
            settings = {
                "threshold": td.threshold,
                "prefix_padding_ms": td.prefix_padding_ms,
                "silence_duration_ms": td.silence_duration_ms,
            }
        position = int(self._audio_ms // 20 * 20)
        return EnergyVad(self._fmt_in.rate, position_ms=position, **settings)  # type: ignore[arg-type]

    async def start(self) -> None:
        await self._emit(ev.SessionCreated(session=self.session))

    async def error(
        self,
        code: str | None,
        message: str,
        param: str | None = None,
        event_id: Any = None,
        *,
        type: str = "invalid_request_error",
    ) -> None:
        self.rec.errors_sent.append(code or type)
        await self._emit(
            ev.ErrorEvent(
                error=ev.ErrorDetail(
                    type=type,
                    code=code,
                    message=message,
                    param=param,
                    event_id=event_id if isinstance(event_id, str) else None,
                )
            )
        )

    # ---------------------------------------------------------------------- dispatch

    async def handle(self, e: ev.ClientEvent) -> None:
        """Answer one decoded client event (errors become ``error`` events)."""
        match e:
            case ev.InputAudioBufferAppend():
                await self._append(e)
            case ev.SessionUpdate():
                await self._session_update(e)
            case ev.InputAudioBufferCommit():
                await self._commit_manual(e)
            case ev.InputAudioBufferClear():
                self._buf.clear()
                self._buf_start_ms = self._audio_ms
                self._speech_item = None
                if self._vad is not None:
                    self._vad.reset()
                await self._emit(ev.InputAudioBufferCleared())
            case ev.ConversationItemCreate():
                await self._item_create(e)
            case ev.ConversationItemRetrieve():
                await self._item_retrieve(e)
            case ev.ConversationItemDelete():
                await self._item_delete(e)
            case ev.ConversationItemTruncate():
                await self._item_truncate(e)
            case ev.ResponseCreate():
                await self._response_create(e)
            case ev.ResponseCancel():
                await self._response_cancel(e)
            case ev.OutputAudioBufferClear():
                await self.error(
                    "invalid_value",
                    "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
                    "type",
                    e.event_id,
                )

    # ----------------------------------------------------------------- session.update

    async def _session_update(self, e: ev.SessionUpdate) -> None:
        update = msgspec.to_builtins(e.session)
        current = msgspec.to_builtins(self.session)
        problem = _validate_update(update, self._audio_out_started, current)
        if problem:
            code, message, param = problem
            await self.error(code, message, param, e.event_id)
            return
        merged = _merge(current, update)
        td = merged["audio"]["input"].get("turn_detection")
        if isinstance(td, dict):
            merged["audio"]["input"]["turn_detection"] = _fill_turn_detection(td)
        self.session = msgspec.convert(merged, ev.Session)
        fmt_in = WireFormat.of(merged["audio"]["input"]["format"]["type"])
        self._fmt_out = WireFormat.of(merged["audio"]["output"]["format"]["type"])
        if fmt_in != self._fmt_in:
            # A format change starts a fresh buffer: old bytes mean nothing in the new one.
            self._fmt_in = fmt_in
            self._buf.clear()
            self._buf_start_ms = self._audio_ms
        self._vad = self._make_vad()
        self._speech_item = None if self._vad is None else self._speech_item
        await self._emit(ev.SessionUpdated(session=self.session))

    # ------------------------------------------------------------------ input audio

    async def _append(self, e: ev.InputAudioBufferAppend) -> None:
        if self.cfg.mirror:
            await self._mirror(e)
            return
        try:
            data = codec.b64decode_strict(e.audio)
        except codec.ProtocolError as err:
            await self.error(err.code, err.message, err.param, e.event_id)
            return
        if self._fmt_in.width == 2 and len(data) % 2:
            await self.error(
                "invalid_value",
                f"Invalid 'audio': {len(data)} bytes is not a whole number of 16-bit samples.",
                "audio",
                e.event_id,
            )
            return
        self._record_audio(data)
        self._buf += data
        self._audio_ms += self._fmt_in.ms(len(data))
        if self._vad is None:
            self._bound_buffer()
            return
        for vad_event in self._vad.feed(self._fmt_in.to_linear(data)):
            if isinstance(vad_event, SpeechStart):
                await self._speech_started(vad_event.audio_start_ms)
            elif isinstance(vad_event, SpeechStop):
                await self._speech_stopped(vad_event.audio_end_ms)
        if self._speech_item is None:
            # Idle under server VAD: keep only what a future speech start could claim.
            keep = self._fmt_in.nbytes(self._vad.prefix_padding_ms + 200)
            if len(self._buf) > keep:
                cut = len(self._buf) - keep
                del self._buf[:cut]
                self._buf_start_ms += self._fmt_in.ms(cut)
        self._bound_buffer()

    async def _mirror(self, e: ev.InputAudioBufferAppend) -> None:
        """Benchmark reflector (``SimConfig.mirror``): answer the append at once with an
        audio delta carrying the same base64 text, in one standing response.

        The text is neither decoded nor checked: the benchmark times the path, not this.
        The first append (and the first after a ``response.cancel``) opens the response;
        while a response the client created is streaming, appends are not answered.
        """
        if self._active is None:
            await self._open_mirror()
        run = self._active
        if run is None or run is not self._mirror_run:
            return
        await self._emit(ev.ResponseOutputAudioDelta(delta=e.audio, **self._mirror_fields))
        # Duration from the text length (padding ignored): truncate and usage stay meaningful.
        ms = self._fmt_in.ms(len(e.audio) // 4 * 3)
        run.audio_ms += ms
        if (ci := self._items.get(self._mirror_fields["item_id"])) is not None:
            ci.audio_ms += ms

    async def _open_mirror(self) -> None:
        run = _Running(
            id=self.new_id("resp"),
            scope=trio.CancelScope(),
            modalities=["audio"],
            in_conversation=True,
        )
        self._active = self._mirror_run = run
        await self._emit(ev.ResponseCreated(response=self._response_obj(run, "in_progress")))
        item_id = self.new_id("item")
        item = ev.MessageItem(
            id=item_id, object="realtime.item", status="in_progress", role="assistant", content=[]
        )
        await self._item_added(run, item)
        self._mirror_fields = {
            "response_id": run.id,
            "item_id": item_id,
            "output_index": run.current_index,
            "content_index": 0,
        }
        await self._emit(
            ev.ResponseContentPartAdded(
                part=ev.ResponsePart(type="audio", transcript=""), **self._mirror_fields
            )
        )
        self._audio_out_started = True

    def _record_audio(self, data: bytes) -> None:
        self.rec.received_audio_bytes += len(data)
        room = self.cfg.max_recorded_audio_bytes - len(self.rec.received_audio_buffer)
        if room > 0:
            self.rec.received_audio_buffer += data[:room]

    def _bound_buffer(self) -> None:
        limit = self._fmt_in.nbytes(self.cfg.max_buffer_ms)
        if len(self._buf) > limit:
            cut = len(self._buf) - limit
            del self._buf[:cut]
            self._buf_start_ms += self._fmt_in.ms(cut)
            self.rec.buffer_dropped_bytes += cut

    async def _speech_started(self, start_ms: int) -> None:
        self._speech_item = self.new_id("item")
        self._speech_start_ms = max(float(start_ms), self._buf_start_ms)
        cut = self._fmt_in.nbytes(self._speech_start_ms - self._buf_start_ms)
        del self._buf[:cut]
        self._buf_start_ms = self._speech_start_ms
        await self._emit(
            ev.InputAudioBufferSpeechStarted(audio_start_ms=start_ms, item_id=self._speech_item)
        )
        td = self._turn_detection
        if self._active is not None and td is not None and td.interrupt_response is not False:
            await self._cancel_active("turn_detected")

    async def _speech_stopped(self, end_ms: int) -> None:
        item_id = self._speech_item or self.new_id("item")
        self._speech_item = None
        await self._emit(ev.InputAudioBufferSpeechStopped(audio_end_ms=end_ms, item_id=item_id))
        n = min(len(self._buf), self._fmt_in.nbytes(end_ms - self._buf_start_ms))
        audio = bytes(self._buf[:n])
        del self._buf[:n]
        self._buf_start_ms += self._fmt_in.ms(n)
        await self._commit(item_id, audio)
        td = self._turn_detection
        if td is not None and td.create_response is not False:
            if self._active is None:
                await self._start_response(None, None)

    async def _commit_manual(self, e: ev.InputAudioBufferCommit) -> None:
        ms = self._fmt_in.ms(len(self._buf))
        if ms < 100:
            await self.error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {ms:.2f}ms of audio.",
                None,
                e.event_id,
            )
            return
        item_id = self._speech_item or self.new_id("item")
        self._speech_item = None
        if self._vad is not None:
            self._vad.reset()
        audio = bytes(self._buf)
        self._buf.clear()
        self._buf_start_ms = self._audio_ms
        await self._commit(item_id, audio)

    async def _commit(self, item_id: str, audio: bytes) -> None:
        previous = self._order[-1] if self._order else None
        await self._emit(ev.InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        item = ev.MessageItem(
            id=item_id,
            object="realtime.item",
            status="completed",
            role="user",
            content=[ev.ContentPart(type="input_audio", transcript=None)],
        )
        self._add_item(_ConvItem(item, audio=audio))
        self.rec.committed_audio[item_id] = audio
        self._last_user_audio = to_pcm16_24k(audio, self._fmt_in)
        await self._emit(ev.ConversationItemAdded(item=item, previous_item_id=previous))
        await self._emit(ev.ConversationItemDone(item=item, previous_item_id=previous))
        a = self.session.audio
        if isinstance(a, ev.AudioConfig) and isinstance(a.input, ev.AudioInput):
            if isinstance(a.input.transcription, ev.Transcription):
                turns = self.cfg.script.turns if self.cfg.script else ()
                heard = turns[self._turn].user_transcript if self._turn < len(turns) else None
                await self._emit(
                    ev.InputAudioTranscriptionCompleted(
                        item_id=item_id,
                        content_index=0,
                        transcript=heard or "",
                        usage={
                            "type": "duration",
                            "seconds": round(self._fmt_in.ms(len(audio)) / 1000, 3),
                        },
                    )
                )

    # ------------------------------------------------------------------ conversation

    def _add_item(self, ci: _ConvItem, after: str | None = None) -> None:
        item_id = ci.item.id
        assert isinstance(item_id, str)
        if after is not None and after in self._items:
            self._order.insert(self._order.index(after) + 1, item_id)
        else:
            self._order.append(item_id)
        self._items[item_id] = ci
        while len(self._order) > self.cfg.max_items:
            old = self._order.pop(0)
            del self._items[old]
            self.rec.items_evicted += 1

    async def _no_item(self, item_id: str, event_id: Any, param: str = "item_id") -> None:
        await self.error(
            "invalid_value",
            f"Item with item_id '{item_id}' not found in the conversation.",
            param,
            event_id,
        )

    async def _item_create(self, e: ev.ConversationItemCreate) -> None:
        item = e.item
        prev = e.previous_item_id if isinstance(e.previous_item_id, str) else None
        if prev is not None and prev != "root" and prev not in self._items:
            await self._no_item(prev, e.event_id, "previous_item_id")
            return
        if isinstance(item.id, str) and item.id in self._items:
            await self.error(
                "invalid_value",
                f"Item with id '{item.id}' already exists in the conversation.",
                "item.id",
                e.event_id,
            )
            return
        audio: bytes | None = None
        if isinstance(item, ev.FunctionCallOutputItem):
            if not any(
                isinstance(c.item, ev.FunctionCallItem) and c.item.call_id == item.call_id
                for c in self._items.values()
            ):
                await self.error(
                    "invalid_value",
                    f"Tool call ID '{item.call_id}' not found in conversation.",
                    "item.call_id",
                    e.event_id,
                )
                return
            self._outputs_since_call = True
        elif isinstance(item, ev.MessageItem):
            for i, part in enumerate(item.content):
                allowed = {
                    "user": {"input_text", "input_audio", "input_image"},
                    "system": {"input_text"},
                    "assistant": {"output_text", "output_audio"},
                }[item.role]
                if part.type not in allowed:
                    await self.error(
                        "invalid_value",
                        f"Invalid value: '{part.type}'. A {item.role} message's content "
                        f"must be one of {', '.join(sorted(allowed))}.",
                        f"item.content[{i}].type",
                        e.event_id,
                    )
                    return
                if part.type == "input_audio" and isinstance(part.audio, str):
                    try:
                        audio = codec.b64decode_strict(part.audio, param=f"item.content[{i}].audio")
                    except codec.ProtocolError as err:
                        await self.error(err.code, err.message, err.param, e.event_id)
                        return
        stored = msgspec.structs.replace(
            item,
            id=item.id if isinstance(item.id, str) else self.new_id("item"),
            object="realtime.item",
            status="completed",
        )
        previous = prev if prev is not None else (self._order[-1] if self._order else None)
        self._add_item(_ConvItem(stored, audio=audio), after=prev)
        if audio and isinstance(stored, ev.MessageItem) and stored.role == "user":
            self._last_user_audio = to_pcm16_24k(audio, self._fmt_in)
        await self._emit(ev.ConversationItemAdded(item=stored, previous_item_id=previous))
        await self._emit(ev.ConversationItemDone(item=stored, previous_item_id=previous))

    async def _item_retrieve(self, e: ev.ConversationItemRetrieve) -> None:
        ci = self._items.get(e.item_id)
        if ci is None:
            await self._no_item(e.item_id, e.event_id)
            return
        item = ci.item
        if ci.audio is not None and isinstance(item, ev.MessageItem) and item.role == "user":
            content = [
                msgspec.structs.replace(p, audio=codec.b64encode(ci.audio))
                if p.type == "input_audio"
                else p
                for p in item.content
            ]
            item = msgspec.structs.replace(item, content=content)
        await self._emit(ev.ConversationItemRetrieved(item=item))

    async def _item_delete(self, e: ev.ConversationItemDelete) -> None:
        if e.item_id not in self._items:
            await self._no_item(e.item_id, e.event_id)
            return
        del self._items[e.item_id]
        self._order.remove(e.item_id)
        await self._emit(ev.ConversationItemDeleted(item_id=e.item_id))

    async def _item_truncate(self, e: ev.ConversationItemTruncate) -> None:
        ci = self._items.get(e.item_id)
        if ci is None:
            await self._no_item(e.item_id, e.event_id)
            return
        item = ci.item
        if not (isinstance(item, ev.MessageItem) and item.role == "assistant"):
            await self.error(
                "invalid_value",
                "Only assistant messages can be truncated.",
                "item_id",
                e.event_id,
            )
            return
        audio_parts = [i for i, p in enumerate(item.content) if p.type == "output_audio"]
        if e.content_index not in audio_parts:
            await self.error(
                "invalid_value",
                f"Invalid 'content_index': {e.content_index} is not an audio content part.",
                "content_index",
                e.event_id,
            )
            return
        if e.audio_end_ms < 0 or e.audio_end_ms > ci.audio_ms:
            await self.error(
                "invalid_value",
                f"Audio content of {math.floor(ci.audio_ms)}ms is already shorter than "
                f"{e.audio_end_ms}ms",
                "audio_end_ms",
                e.event_id,
            )
            return
        # Truncation drops the server-side transcript, as upstream does.
        content = list(item.content)
        content[e.content_index] = msgspec.structs.replace(content[e.content_index], transcript="")
        ci.item = msgspec.structs.replace(item, content=content)
        ci.audio_ms = float(e.audio_end_ms)
        await self._emit(
            ev.ConversationItemTruncated(
                item_id=e.item_id, content_index=e.content_index, audio_end_ms=e.audio_end_ms
            )
        )

    # --------------------------------------------------------------------- responses

    async def _response_create(self, e: ev.ResponseCreate) -> None:
        if self._active is not None:
            await self.error(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self._active.id}. Wait until the response is finished before creating "
                "a new one.",
                None,
                e.event_id,
            )
            return
        params = e.response if isinstance(e.response, ev.ResponseCreateParams) else None
        if params is not None and isinstance(params.output_modalities, list):
            if len(params.output_modalities) != 1:
                await self.error(
                    "invalid_value",
                    "Invalid 'response.output_modalities': give exactly one of 'audio', 'text'.",
                    "response.output_modalities",
                    e.event_id,
                )
                return
        await self._start_response(params, e.event_id)

    async def _response_cancel(self, e: ev.ResponseCancel) -> None:
        active = self._active
        if active is None or (isinstance(e.response_id, str) and e.response_id != active.id):
            await self.error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
                None,
                e.event_id,
            )
            return
        await self._cancel_active("client_cancelled")

    def _next_reply(self) -> Reply:
        if self._pending_after is not None and self._outputs_since_call:
            reply, self._pending_after = self._pending_after, None
            self._outputs_since_call = False
            return reply
        turns = self.cfg.script.turns if self.cfg.script else ()
        reply = turns[self._turn] if self._turn < len(turns) else Reply()
        self._turn += 1
        return reply

    async def _start_response(self, params: ev.ResponseCreateParams | None, _event_id: Any) -> None:
        modalities = list(self.session.output_modalities or ["audio"])  # type: ignore[arg-type]
        in_conversation = True
        if params is not None:
            if isinstance(params.output_modalities, list):
                modalities = list(params.output_modalities)
            if params.conversation == "none":
                in_conversation = False
        run = _Running(
            id=self.new_id("resp"),
            scope=trio.CancelScope(),
            modalities=modalities,
            in_conversation=in_conversation,
        )
        run.input_tokens = 40 + len(self._order) * 25
        self._active = run
        reply = self._next_reply()
        await self._emit(ev.ResponseCreated(response=self._response_obj(run, "in_progress")))
        self._nursery.start_soon(self._run_response, run, reply)

    def _response_obj(
        self, run: _Running, status: str, details: ev.StatusDetails | None = None
    ) -> ev.Response:
        usage = None
        if status != "in_progress":
            out_audio = int(run.audio_ms / 50)
            out_text = sum(len(_text_of(i)) for i in run.output) // 4 + 1
            usage = ev.Usage(
                total_tokens=run.input_tokens + out_audio + out_text,
                input_tokens=run.input_tokens,
                output_tokens=out_audio + out_text,
                input_token_details={
                    "text_tokens": run.input_tokens,
                    "audio_tokens": 0,
                    "cached_tokens": 0,
                },
                output_token_details={"text_tokens": out_text, "audio_tokens": out_audio},
            )
        return ev.Response(
            id=run.id,
            status=status,  # type: ignore[arg-type]
            status_details=details,
            output=list(run.output),
            usage=usage,
            conversation_id="conv_" + (self.session.id or "")[5:] if run.in_conversation else None,
            output_modalities=run.modalities,
            max_output_tokens=self.session.max_output_tokens
            if isinstance(self.session.max_output_tokens, int | str)
            else "inf",
            audio={
                "output": {
                    "format": {
                        "type": self._fmt_out.type,
                        **({"rate": 24000} if self._fmt_out == PCM24K else {}),
                    },
                    "voice": self._voice(),
                }
            },
        )

    def _voice(self) -> str:
        a = self.session.audio
        if isinstance(a, ev.AudioConfig) and isinstance(a.output, ev.AudioOutput):
            v = a.output.voice
            return v if isinstance(v, str) else v.id if isinstance(v, ev.VoiceId) else "marin"
        return "marin"

    async def _run_response(self, run: _Running, reply: Reply) -> None:
        with run.scope:
            await trio.sleep(self.cfg.first_byte_ms / 1000)
            if reply.function_calls:
                for call in reply.function_calls:
                    await self._stream_call(run, call.name, call.arguments)
                self._pending_after = reply.after_output or Reply()
                self._outputs_since_call = False
            else:
                await self._stream_message(run, reply)
            self._active = None
            await self._emit(ev.ResponseDone(response=self._response_obj(run, "completed")))
            await self._rate_limits(run)

    async def _rate_limits(self, run: _Running) -> None:
        self._requests_left = max(0, self._requests_left - 1)
        self._tokens_left = max(0, self._tokens_left - run.input_tokens - int(run.audio_ms / 50))
        await self._emit(
            ev.RateLimitsUpdated(
                rate_limits=[
                    ev.RateLimit(
                        name="requests",
                        limit=5000,
                        remaining=self._requests_left,
                        reset_seconds=0.012,
                    ),
                    ev.RateLimit(
                        name="tokens", limit=400_000, remaining=self._tokens_left, reset_seconds=0.6
                    ),
                ]
            )
        )

    async def _item_added(self, run: _Running, item: ev.Item) -> None:
        run.current = item
        run.current_index = len(run.output)
        run.said = ""
        await self._emit(
            ev.ResponseOutputItemAdded(
                response_id=run.id, output_index=run.current_index, item=item
            )
        )
        if run.in_conversation:
            previous = self._order[-1] if self._order else None
            self._add_item(_ConvItem(item))
            await self._emit(ev.ConversationItemAdded(item=item, previous_item_id=previous))

    async def _item_done(self, run: _Running, item: ev.Item) -> None:
        run.current = None
        run.output.append(item)
        assert isinstance(item.id, str)
        if item.id in self._items:
            self._items[item.id].item = item
        await self._emit(
            ev.ResponseOutputItemDone(
                response_id=run.id, output_index=len(run.output) - 1, item=item
            )
        )
        if run.in_conversation:
            await self._emit(
                ev.ConversationItemDone(item=item, previous_item_id=self._previous(item.id))
            )

    def _previous(self, item_id: str) -> str | None:
        try:
            i = self._order.index(item_id)
        except ValueError:
            return None
        return self._order[i - 1] if i > 0 else None

    async def _stream_call(self, run: _Running, name: str, arguments: str) -> None:
        item_id, call_id = self.new_id("item"), self.new_id("call")
        item = ev.FunctionCallItem(
            id=item_id,
            object="realtime.item",
            status="in_progress",
            call_id=call_id,
            name=name,
            arguments="",
        )
        await self._item_added(run, item)
        idx = run.current_index
        for i in range(0, len(arguments), 24):
            await self._emit(
                ev.ResponseFunctionCallArgumentsDelta(
                    response_id=run.id,
                    item_id=item_id,
                    output_index=idx,
                    call_id=call_id,
                    delta=arguments[i : i + 24],
                )
            )
            run.said += arguments[i : i + 24]
        await self._emit(
            ev.ResponseFunctionCallArgumentsDone(
                response_id=run.id,
                item_id=item_id,
                output_index=idx,
                call_id=call_id,
                name=name,
                arguments=arguments,
            )
        )
        done = msgspec.structs.replace(item, status="completed", arguments=arguments)
        await self._item_done(run, done)

    def _reply_audio(self, reply: Reply) -> bytes:
        if reply.audio is not None:
            return reply.audio
        return self._last_user_audio if self._last_user_audio else silence(300)

    async def _stream_message(self, run: _Running, reply: Reply) -> None:
        audio_mode = "audio" in run.modalities
        item_id = self.new_id("item")
        item = ev.MessageItem(
            id=item_id, object="realtime.item", status="in_progress", role="assistant", content=[]
        )
        await self._item_added(run, item)
        idx = run.current_index
        common = {
            "response_id": run.id,
            "item_id": item_id,
            "output_index": idx,
            "content_index": 0,
        }
        if audio_mode:
            pcm = self._reply_audio(reply)
            wire = from_pcm16_24k(pcm, self._fmt_out)
            transcript = (
                reply.transcript
                if reply.transcript is not None
                else (f"(echo of {len(pcm) // 48} ms)" if reply.audio is None else "")
            )
            await self._emit(
                ev.ResponseContentPartAdded(
                    part=ev.ResponsePart(type="audio", transcript=""), **common
                )
            )
            self._audio_out_started = True
            chunk = self._fmt_out.nbytes(self.cfg.chunk_ms)
            pieces = max(1, math.ceil(len(wire) / chunk))
            words = _split_words(transcript, pieces)
            pause = self.cfg.chunk_ms / 1000 / self.cfg.speed
            for n in range(pieces):
                if n:
                    await trio.sleep(pause)
                part = wire[n * chunk : (n + 1) * chunk]
                if words[n]:
                    await self._emit(
                        ev.ResponseOutputAudioTranscriptDelta(delta=words[n], **common)
                    )
                    run.said += words[n]
                await self._emit(ev.ResponseOutputAudioDelta(delta=codec.b64encode(part), **common))
                ms = self._fmt_out.ms(len(part))
                run.audio_ms += ms
                if item_id in self._items:
                    self._items[item_id].audio_ms += ms
            await self._emit(ev.ResponseOutputAudioDone(**common))
            await self._emit(ev.ResponseOutputAudioTranscriptDone(transcript=transcript, **common))
            await self._emit(
                ev.ResponseContentPartDone(
                    part=ev.ResponsePart(type="audio", transcript=transcript), **common
                )
            )
            content = [ev.ContentPart(type="output_audio", transcript=transcript)]
        else:
            text = reply.text if reply.text is not None else (reply.transcript or "")
            await self._emit(
                ev.ResponseContentPartAdded(part=ev.ResponsePart(type="text", text=""), **common)
            )
            for word in _split_words(text, max(1, len(text.split()))):
                if word:
                    await self._emit(ev.ResponseOutputTextDelta(delta=word, **common))
                    run.said += word
            await self._emit(ev.ResponseOutputTextDone(text=text, **common))
            await self._emit(
                ev.ResponseContentPartDone(part=ev.ResponsePart(type="text", text=text), **common)
            )
            content = [ev.ContentPart(type="output_text", text=text)]
        await self._item_done(
            run, msgspec.structs.replace(item, status="completed", content=content)
        )

    async def _cancel_active(self, reason: str) -> None:
        """Stop the running response now and report exactly what it had emitted."""
        run = self._active
        assert run is not None
        self._active = None
        run.scope.cancel()
        if run.current is not None:
            item = run.current
            if isinstance(item, ev.MessageItem):
                part = (
                    ev.ContentPart(type="output_audio", transcript=run.said)
                    if "audio" in run.modalities
                    else ev.ContentPart(type="output_text", text=run.said)
                )
                item = msgspec.structs.replace(item, status="incomplete", content=[part])
            elif isinstance(item, ev.FunctionCallItem):
                item = msgspec.structs.replace(item, status="incomplete", arguments=run.said)
            await self._item_done(run, item)
        await self._emit(
            ev.ResponseDone(
                response=self._response_obj(
                    run, "cancelled", ev.StatusDetails(type="cancelled", reason=reason)
                )
            )
        )
        await self._rate_limits(run)


def _text_of(item: ev.Item) -> str:
    if isinstance(item, ev.MessageItem):
        return "".join(
            (p.transcript if isinstance(p.transcript, str) else "")
            + (p.text if isinstance(p.text, str) else "")
            for p in item.content
        )
    if isinstance(item, ev.FunctionCallItem):
        return item.arguments
    return ""


def _split_words(text: str, pieces: int) -> list[str]:
    """Spread ``text`` over ``pieces`` deltas, word by word, joining back exactly."""
    words = text.split(" ")
    tokens = [w + " " for w in words[:-1]] + [words[-1]] if text else []
    out = [""] * pieces
    for i, t in enumerate(tokens):
        out[min(pieces - 1, i * pieces // max(1, len(tokens)))] += t
    return out


# ----------------------------------------------------------------- update validation

_TD_DEFAULTS = {
    "server_vad": {
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    },
    "semantic_vad": {"eagerness": "auto", "create_response": True, "interrupt_response": True},
}


def _fill_turn_detection(td: dict[str, Any]) -> dict[str, Any]:
    return {**_TD_DEFAULTS[td["type"]], **td}


def _merge(current: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Only present fields change; objects merge key by key, except an audio ``format``,
    a ``turn_detection`` whose type changed, and lists: those are replaced whole."""
    out = dict(current)
    for k, v in update.items():
        cur = out.get(k)
        if (
            isinstance(v, dict)
            and isinstance(cur, dict)
            and not (k == "format" or (k == "turn_detection" and v.get("type") != cur.get("type")))
        ):
            out[k] = _merge(cur, v)
        else:
            out[k] = v
    return out


def _validate_update(
    u: dict[str, Any], audio_out_started: bool, current: dict[str, Any]
) -> tuple[str, str, str] | None:
    """(code, message, param) for the first invalid value in a session update, or None."""

    def bad(param: str, message: str, code: str = "invalid_value") -> tuple[str, str, str]:
        return code, message, param

    model = u.get("model")
    if model is not None and not is_known_model(model):
        return bad("session.model", f"Invalid value: '{model}'. Not a realtime model.")
    mods = u.get("output_modalities")
    if mods is not None and (len(mods) != 1):
        return bad(
            "session.output_modalities",
            "Invalid 'session.output_modalities': give exactly one of 'audio', 'text'.",
        )
    mot = u.get("max_output_tokens")
    if mot is not None and not (mot == "inf" or (isinstance(mot, int) and 1 <= mot <= 4096)):
        return bad(
            "session.max_output_tokens",
            "Invalid 'session.max_output_tokens': an integer in [1, 4096] or 'inf'.",
        )
    tc = u.get("tool_choice")
    if isinstance(tc, str) and tc not in ("auto", "none", "required"):
        return bad(
            "session.tool_choice",
            f"Invalid value: '{tc}'. Supported values are: 'auto', 'none', 'required'.",
        )
    tr = u.get("truncation")
    if isinstance(tr, str) and tr not in ("auto", "disabled"):
        return bad(
            "session.truncation",
            f"Invalid value: '{tr}'. Supported values are: 'auto', 'disabled'.",
        )
    audio = u.get("audio") or {}
    for side in ("input", "output"):
        fmt = (audio.get(side) or {}).get("format")
        if fmt and fmt.get("type") == "audio/pcm" and fmt.get("rate", 24000) != 24000:
            return bad(
                f"session.audio.{side}.format.rate",
                f"Invalid value: {fmt['rate']}. Supported values are: 24000.",
            )
    inp = audio.get("input") or {}
    td = inp.get("turn_detection")
    if isinstance(td, dict):
        p = "session.audio.input.turn_detection"
        only = {
            "server_vad": {"eagerness"},
            "semantic_vad": {
                "threshold",
                "prefix_padding_ms",
                "silence_duration_ms",
                "idle_timeout_ms",
            },
        }
        for k in only[td["type"]] & set(td):
            return bad(f"{p}.{k}", f"Unknown parameter: '{p}.{k}'.", "unknown_parameter")
        t = td.get("threshold")
        if t is not None and not 0.0 <= t <= 1.0:
            return bad(f"{p}.threshold", f"Invalid 'threshold': {t}. Expected a value in [0, 1].")
        for k, hi in (
            ("prefix_padding_ms", 10_000),
            ("silence_duration_ms", 10_000),
            ("idle_timeout_ms", 30 * 60_000),
        ):
            v = td.get(k)
            if v is not None and not 0 <= v <= hi:
                return bad(f"{p}.{k}", f"Invalid '{k}': {v}. Expected a value in [0, {hi}].")
    out = audio.get("output") or {}
    speed = out.get("speed")
    if speed is not None and not 0.25 <= speed <= 1.5:
        return bad(
            "session.audio.output.speed",
            f"Invalid 'speed': {speed}. Expected a value in [0.25, 1.5].",
        )
    voice = out.get("voice")
    if voice is not None and audio_out_started:
        cur_voice = (current.get("audio") or {}).get("output", {}).get("voice")
        if voice != cur_voice:
            return bad(
                "session.audio.output.voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "cannot_update_voice",
            )
    for i, tool in enumerate(u.get("tools") or []):
        if not tool.get("name"):
            return bad(
                f"session.tools[{i}].name",
                f"Missing required parameter: 'session.tools[{i}].name'.",
                "missing_required_parameter",
            )
    return None
