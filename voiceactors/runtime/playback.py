"""The playback actor: agent audio toward the client, paced, and the turn machine's driver.

Theory of operation
-------------------
Everything the upstream says arrives here (one hop from the upstream reader), together
with the capture actor's local VAD events and the client's playback reports. The actor
owns three things:

* **A queue** of what the client has yet to receive, in upstream order: agent audio and
  the response's other events (transcripts, ``response.done``, ...) behind it, so a client
  never sees a response end before its audio. Events about the user's side (speech,
  commits, session, errors) skip the queue. The queue is bounded by audio duration
  (``max_buffer_ms``; beyond it audio is dropped and counted).
* **A playout clock** (:class:`PlayoutClock`): where the client's playback is, from what
  was sent when, re-anchored by the client's ``voiceactors.playback`` reports when it
  sends them. Audio is released while the lead (sent minus played) is under a target that
  follows the client's measured jitter, so a barge-in has little to stop.
* **The turn machine** (:mod:`voiceactors.machines.turn`): fed speech from both detectors,
  the response lifecycle, audio received, played positions and idleness; its actions
  pause, resume and flush the queue, cancel the response, truncate at the played position
  and cancel interruptible tools.

A flush drops the queued audio (the response's other events still go out, in order) and
sends the GA ``output_audio_buffer.cleared`` so the client drops what it buffered.
"""

from __future__ import annotations

import base64
import logging
import math
from collections import deque
from typing import Any

import msgspec
import trio

from .. import messages as msg
from ..audio.codecs import Format, from_pcm16
from ..audio.resample import Converter
from ..channels import EdgeSender
from ..machines import turn
from ..realtime import events as ev
from ..upstream.actor import UpstreamActor
from .client import ClientLink, PlaybackReport
from .config import PlaybackConfig, RuntimeConfig
from .context import PCM24K, SessionContext, SetOutputFormat, Truncation, TurnTiming

__all__ = ["Playback", "PlayoutClock"]

log = logging.getLogger("voiceactors.playback")

# Events that belong to the user's side or the session: never held behind agent audio.
_IMMEDIATE = (
    ev.InputAudioBufferSpeechStarted,
    ev.InputAudioBufferSpeechStopped,
    ev.InputAudioBufferCommitted,
    ev.InputAudioBufferCleared,
    ev.InputAudioBufferTimeoutTriggered,
    ev.InputAudioTranscriptionDelta,
    ev.InputAudioTranscriptionCompleted,
    ev.InputAudioTranscriptionFailed,
    ev.SessionCreated,
    ev.SessionUpdated,
    ev.ErrorEvent,
    ev.RateLimitsUpdated,
    ev.ConversationItemTruncated,
    ev.ConversationItemDeleted,
    ev.ConversationItemRetrieved,
)


_NOTHING: Any = object()  # no message arrived before the deadline

# Slack for float rounding between the pacing deadline and the lead it was computed from;
# without it a deadline could wake the loop to find the lead a hair too large, forever.
_EPS_MS = 0.01


def b64_len(text: str) -> int:
    """Decoded length of padded base64 ``text`` without decoding it."""
    n = len(text)
    return n * 3 // 4 - (text.endswith("=") + text.endswith("=="))


class PlayoutClock:
    """Where the client's playback stands, in ms of the agent audio sent to it (pure).

    The timeline counts every ms sent since the client last ran dry. ``anchor`` is the
    time timeline position 0 played (so ``played(now) = now - anchor``, never past what
    was sent). Sending into a dry client re-anchors at ``now``: its playout resumes then.
    A report (the client's own count for an item) re-anchors to the truth. ``spans``
    maps timeline ranges back to item positions, for the turn machine and truncation.
    """

    __slots__ = ("anchor", "sent_ms", "spans")

    MAX_SPANS = 64

    def __init__(self) -> None:
        self.anchor: float | None = None
        self.sent_ms = 0.0
        # [item_id, timeline start, timeline end, item offset at start]
        self.spans: deque[list[Any]] = deque()

    def played(self, now: float) -> float:
        if self.anchor is None:
            return 0.0
        return min(self.sent_ms, max(0.0, (now - self.anchor) * 1000.0))

    def lead(self, now: float) -> float:
        return self.sent_ms - self.played(now)

    def dry_at(self) -> float:
        """When the client will have played everything sent (inf before anything)."""
        return math.inf if self.anchor is None else self.anchor + self.sent_ms / 1000.0

    def sent(self, now: float, item_id: str, item_offset_ms: float, ms: float) -> None:
        """Record ``ms`` of ``item_id`` (from ``item_offset_ms``) sent at ``now``."""
        if self.anchor is None or now > self.dry_at():
            self.anchor = now - self.sent_ms / 1000.0
        last = self.spans[-1] if self.spans else None
        if (
            last is not None
            and last[0] == item_id
            and last[3] + (last[2] - last[1]) == item_offset_ms
        ):
            last[2] += ms
        else:
            self.spans.append([item_id, self.sent_ms, self.sent_ms + ms, item_offset_ms])
            if len(self.spans) > self.MAX_SPANS:
                self.spans.popleft()
        self.sent_ms += ms

    def item_played(self, now: float, item_id: str) -> float | None:
        """ms of ``item_id`` played by ``now`` (None if the clock does not know it)."""
        p = self.played(now)
        found = None
        for span_item, start, end, offset in self.spans:
            if span_item == item_id:
                if p <= start:
                    found = offset if found is None else found
                    break
                found = offset + min(p, end) - start
        return found

    def report(self, now: float, item_id: str, played_ms: float) -> bool:
        """The client says it has played ``played_ms`` of ``item_id``: re-anchor on it."""
        for span_item, start, end, offset in reversed(self.spans):
            if span_item == item_id and offset <= played_ms:
                pos = min(start + (played_ms - offset), end, self.sent_ms)
                self.anchor = now - pos / 1000.0
                return True
        return False

    def flush(self, now: float) -> None:
        """The client dropped what it had not played: the timeline ends where it is."""
        self.sent_ms = self.played(now)
        while self.spans and self.spans[-1][1] >= self.sent_ms:
            self.spans.pop()
        if self.spans:
            self.spans[-1][2] = min(self.spans[-1][2], self.sent_ms)

    def reset(self) -> None:
        """The agent's turn is over and everything was played: start a new timeline."""
        self.anchor = None
        self.sent_ms = 0.0
        self.spans.clear()


class Playback:
    """Drive one session's playback and turn machine (see the module docstring)."""

    def __init__(
        self,
        ctx: SessionContext,
        config: RuntimeConfig,
        link: ClientLink,
        up: EdgeSender[Any],
        tools: EdgeSender[Any],
        upstream: UpstreamActor,
        *,
        tool_names: frozenset[str] = frozenset(),
        cancel_tools: Any = None,
    ) -> None:
        self.ctx = ctx
        self.cfg: PlaybackConfig = config.playback
        self.link = link
        self.up = up
        self.tools = tools
        self.upstream = upstream
        self.tool_names = tool_names
        self.cancel_tools = cancel_tools  # (interruptible_only: bool) -> int
        self.machine = turn.TurnMachine(config.turn)
        self.clock = PlayoutClock()
        self.queue: deque[tuple[Any, float, float]] = deque()  # (event, ms, item offset)
        self.queued_ms = 0.0
        self.paused = False
        self.idle_sent = True  # PlaybackIdle already told for the current timeline
        self.received: dict[str, float] = {}  # item -> ms received (current agent turn)
        self.first_audio: set[str] = set()  # responses whose first audio went out
        self.response_id: str | None = None
        self.response_active = False
        self.overflowed: deque[str] = deque(maxlen=8)  # responses whose audio overflowed
        self.tool_responses: set[str] = set()  # responses with calls the runner answers
        self.out_format: Format = PCM24K
        self.converter: Converter | None = None
        self.session_seen = False
        self.prefix_padding_ms = 300.0
        self._own_ids: deque[str] = deque(maxlen=64)  # our commands: their errors stay here

    # -- the loop -----------------------------------------------------------------------

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        machine = self.machine
        while True:
            deadline = min(machine.next_deadline(), self._pace_deadline())
            item: Any = _NOTHING
            try:
                if deadline == math.inf:
                    # Only a message can change anything: wait without a cancel scope (one
                    # costs ~5 us, and this wait happens for most messages).
                    item = await inbox.receive()
                else:
                    # Only the wait is bounded: handling a message must never be cut short
                    # by the next deadline (a half-sent response event would be lost).
                    with trio.move_on_at(deadline):
                        item = await inbox.receive()
            except trio.EndOfChannel:
                return
            if item is not _NOTHING:
                await self._on(item, trio.current_time())
            now = trio.current_time()
            if now >= machine.next_deadline():
                await self._feed(turn.Timer(), now)
            await self._pump(now)

    def _target_lead(self) -> float:
        c = self.cfg
        return min(c.max_lead_ms, c.min_lead_ms + c.jitter_factor * self.ctx.jitter_ms)

    def _pace_deadline(self) -> float:
        """When ``_pump`` has something to do next (inf: only a new message can change it)."""
        clock = self.clock
        if self.queue:
            if self.paused:
                return math.inf  # the turn machine's deadline resumes or flushes
            if self.queue[0][1] == 0.0 or clock.anchor is None:
                return -math.inf  # an event, or the first audio: out now
            return clock.anchor + (clock.sent_ms - self._target_lead()) / 1000.0
        if not self.idle_sent:
            return clock.dry_at()
        return math.inf

    # -- inputs ---------------------------------------------------------------------------

    async def _on(self, item: Any, now: float) -> None:
        match item:
            case ev.ResponseOutputAudioDelta():
                await self._audio(item, now)
            case ev.ResponseCreated(response=ev.Response(id=rid)):
                self.response_id = rid
                self.response_active = True
                await self._feed(turn.ResponseCreated(response_id=rid or ""), now)
                await self._forward(item)
            case ev.ResponseDone(response=ev.Response(id=rid, status=status)):
                if rid == self.response_id:
                    self.response_active = False
                await self._forward(item)
                await self._feed(turn.ResponseDone(response_id=rid or "", status=status or ""), now)
                if rid in self.tool_responses:
                    # The runner asks for the follow-up only once this response is over
                    # (earlier: conversation_already_has_active_response).
                    self.tool_responses.discard(rid)
                    await self.tools.send(msg.ResponseDone(response_id=rid, status=status or ""))
            case ev.InputAudioBufferSpeechStarted(audio_start_ms=start):
                origin = self.upstream.input_origin_ms()
                onset_ms = origin + start + self.prefix_padding_ms
                lag = max(0.0, self.ctx.input_ms - onset_ms)
                await self._feed(turn.SpeechStarted(source="server", at_ms=lag), now)
                if origin:  # after a reconnect: back onto the client's own timeline
                    item = msgspec.structs.replace(item, audio_start_ms=int(origin + start))
                await self._forward(item)
            case ev.InputAudioBufferSpeechStopped(audio_end_ms=end):
                # The server hears the end a silence window late; the local VAD's time is
                # better, unless it missed this utterance (then its time is a turn old).
                origin = self.upstream.input_origin_ms()
                at = now - max(0.0, self.ctx.input_ms - origin - end) / 1e3
                known = self.ctx.user_stopped_at
                if known is None or at - known > 1.0:
                    self.ctx.user_stopped_at = at
                await self._feed(turn.SpeechStopped(source="server"), now)
                if origin:  # after a reconnect: back onto the client's own timeline
                    item = msgspec.structs.replace(item, audio_end_ms=int(origin + end))
                await self._forward(item)
            case ev.ResponseFunctionCallArgumentsDone() if item.name in self.tool_names:
                self.ctx.tool_calls += 1
                if len(self.tool_responses) < 64:
                    self.tool_responses.add(item.response_id)
                await self.tools.send(
                    msg.ToolCall(
                        call_id=item.call_id,
                        name=item.name,
                        arguments=item.arguments,
                        item_id=item.item_id,
                        response_id=item.response_id,
                    )
                )
                await self._forward(item)
            case ev.SessionCreated() | ev.SessionUpdated():
                await self._session_event(item)
            case ev.ErrorEvent(error=err) if (
                err.event_id is not None and err.event_id in self._own_ids
            ):
                # The upstream refused one of our own commands (a cancel racing the end
                # of the response): the client did not send it and need not hear of it.
                self.ctx.upstream_errors_hidden += 1
                log.info("upstream refused our %s: %s", err.event_id, err.message)
            case msg.SpeechStarted(at=at):
                await self._feed(
                    turn.SpeechStarted(source="local", at_ms=max(0.0, (now - at) * 1000.0)), now
                )
            case msg.SpeechStopped():
                await self._feed(turn.SpeechStopped(source="local"), now)
            case PlaybackReport(item_id=item_id, played_ms=played):
                if self.clock.report(now, item_id, played):
                    await self._feed(turn.Played(item_id=item_id, played_ms=played), now)
            case msg.FlushPlayback():
                await self._flush(now)
            case SetOutputFormat(format=fmt):
                self.out_format = fmt
                self.converter = None
            case msg.UpstreamStatus(state=state):
                if state != "reconnected":
                    # That connection will never finish the utterance it was hearing.
                    await self._feed(turn.SpeechStopped(source="server"), now)
            case _:
                await self._forward(item)

    async def _audio(self, delta: ev.ResponseOutputAudioDelta, now: float) -> None:
        ms = b64_len(delta.delta) / PCM24K.bytes_per_ms
        offset = self.received.get(delta.item_id, 0.0)
        actions = self.machine.handle(turn.AudioReceived(item_id=delta.item_id, ms=ms), now)
        if any(type(a) is turn.DiscardAudio for a in actions):
            self.ctx.audio_ms_dropped += ms
            return
        if self.queued_ms + ms > self.cfg.max_buffer_ms:
            self.ctx.audio_ms_dropped += ms
            if delta.response_id not in self.overflowed:  # say so once per response
                self.overflowed.append(delta.response_id)
                log.warning("agent audio over %.0f ms buffered; dropped", self.cfg.max_buffer_ms)
                await self.link.error(
                    "agent_audio_dropped",
                    f"More than {self.cfg.max_buffer_ms:g} ms of agent audio was waiting to "
                    "be played; the rest of this response's audio is dropped.",
                    type="server_error",
                )
            return
        self.received[delta.item_id] = offset + ms
        self.queue.append((delta, ms, offset))
        self.queued_ms += ms
        await self._act(actions, now)

    async def _forward(self, event: Any) -> None:
        if self.queue and not isinstance(event, _IMMEDIATE):
            self.queue.append((event, 0.0, 0.0))
        else:
            await self.link.send(event)

    async def _session_event(self, event: ev.SessionCreated | ev.SessionUpdated) -> None:
        s = event.session
        audio = s.audio
        if audio is not msgspec.UNSET:
            inp, out = audio.input, audio.output
            if inp is not msgspec.UNSET:
                td = inp.turn_detection
                if td is not msgspec.UNSET and td is not None:
                    pad = td.prefix_padding_ms
                    self.prefix_padding_ms = float(pad) if pad is not msgspec.UNSET else 300.0
                if inp.format is not msgspec.UNSET:
                    inp = msgspec.structs.replace(inp, format=_api(self.ctx.input_format))
            if out is not msgspec.UNSET and out.format is not msgspec.UNSET:
                out = msgspec.structs.replace(out, format=_api(self.out_format))
            s = msgspec.structs.replace(s, audio=ev.AudioConfig(input=inp, output=out))
        if not self.session_seen:
            # Whatever the upstream said first (a pooled connection was configured before
            # this client came), the client's session starts with session.created.
            self.session_seen = True
            self.ctx.ready_at = trio.current_time()
            await self.link.send(ev.SessionCreated(event_id=event.event_id, session=s))
        else:
            await self.link.send(msgspec.structs.replace(event, session=s))

    # -- the machine ---------------------------------------------------------------------

    async def _feed(self, event: msgspec.Struct, now: float) -> None:
        if isinstance(event, turn.SpeechStarted | turn.Timer):
            self._positions(now)  # truncation must see where playback really is
        before = self.machine.state
        actions = self.machine.handle(event, now)
        after = self.machine.state
        if after is turn.State.FALSE_INTERRUPTION and before is not after:
            self.ctx.false_interruptions += 1
        await self._act(actions, now)

    def _positions(self, now: float) -> None:
        for item_id in {span[0] for span in self.clock.spans}:
            played = self.clock.item_played(now, item_id)
            if played is not None:
                self.machine.handle(turn.Played(item_id=item_id, played_ms=played), now)

    async def _act(self, actions: list[msgspec.Struct], now: float) -> None:
        for action in actions:
            match action:
                case turn.PausePlayback():
                    self.paused = True
                case turn.ResumePlayback():
                    self.paused = False
                case turn.FlushPlayback():
                    await self._flush(now)
                    onset = self.ctx.local_onset_at
                    if onset is not None:
                        self.ctx.record(self.ctx.barge_ins, (now - onset) * 1000.0)
                case turn.CancelResponse(response_id=rid):
                    await self.up.send(ev.ResponseCancel(event_id=self._own_id(), response_id=rid))
                case turn.Truncate(item_id=item_id, content_index=index, audio_end_ms=end):
                    await self.up.send(
                        ev.ConversationItemTruncate(
                            event_id=self._own_id(),
                            item_id=item_id,
                            content_index=index,
                            audio_end_ms=end,
                        )
                    )
                    received = self.received.get(item_id, 0.0)
                    self.ctx.record(self.ctx.truncations, Truncation(item_id, end, received, now))
                case turn.CancelTools(interruptible_only=only):
                    if self.cancel_tools is not None:
                        self.cancel_tools(only)
                case turn.DiscardAudio():
                    pass  # handled where the audio arrived

    def _own_id(self) -> str:
        event_id = self.link.event_id()
        self._own_ids.append(event_id)
        return event_id

    # -- output -------------------------------------------------------------------------

    async def _pump(self, now: float) -> None:
        """Send what the pacing allows; tell the machine when the client has played it all."""
        clock = self.clock
        target = self._target_lead()
        while self.queue and not self.paused:
            event, ms, offset = self.queue[0]
            if ms and clock.anchor is not None and clock.lead(now) > target + _EPS_MS:
                break
            self.queue.popleft()
            if not ms:
                await self.link.send(event)
                continue
            self.queued_ms -= ms
            clock.sent(now, event.item_id, offset, ms)
            self.idle_sent = False
            await self._send_audio(event, ms, now)
        if not self.queue and not self.idle_sent and now >= clock.dry_at():
            self.idle_sent = True
            if self.response_active:
                self.ctx.underruns += 1  # the client ran dry while the answer streams on
            await self._feed(turn.PlaybackIdle(), now)
            clock.reset()  # (the machine's actions never queue audio)
            if self.machine.state is turn.State.LISTENING:
                self.received.clear()

    async def _send_audio(self, delta: ev.ResponseOutputAudioDelta, ms: float, now: float) -> None:
        ctx = self.ctx
        ctx.audio_ms_out += ms
        if delta.response_id not in self.first_audio:
            if len(self.first_audio) > 64:
                self.first_audio.clear()
            self.first_audio.add(delta.response_id)
            ctx.record(ctx.turns, TurnTiming(delta.response_id, ctx.user_stopped_at, now))
        if self.out_format == PCM24K:
            await self.link.send(delta)  # the upstream's base64, untouched
            return
        if self.converter is None:
            self.converter = Converter(PCM24K, Format("pcm16", self.out_format.rate))
        pcm = self.converter.process(base64.b64decode(delta.delta))
        data = (
            from_pcm16(pcm, self.out_format.encoding)
            if self.out_format.encoding != "pcm16"
            else pcm
        )
        text = base64.b64encode(data).decode("ascii")
        await self.link.send(msgspec.structs.replace(delta, delta=text))

    async def _flush(self, now: float) -> None:
        # The response's other events stay (in order); only its audio goes.
        self.queue = deque(entry for entry in self.queue if not entry[1])
        self.ctx.audio_ms_dropped += self.queued_ms
        self.queued_ms = 0.0
        self.paused = False
        self.clock.flush(now)
        if self.converter is not None:
            self.converter.reset()
        await self.link.send(
            ev.OutputAudioBufferCleared(
                event_id=self.link.event_id(), response_id=self.response_id or ""
            )
        )


def _api(fmt: Format) -> ev.AudioFormat:
    return msgspec.convert(fmt.to_api(), ev.AudioFormat)
