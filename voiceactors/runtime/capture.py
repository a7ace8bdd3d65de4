"""The capture actor: everything a client sends enters the session here.

Per client frame: the connection's rate limit, then the decoder (strict GA events plus the
``voiceactors.playback`` extension). A refused frame is answered with the ``error`` event
the real API would send and the session goes on; nothing the client sent before or after
it is lost.

Audio (``input_audio_buffer.append``, the hot path) is decoded from strict base64,
checked, converted to the upstream's PCM16 24 kHz when the client's format differs (the
resampler runs inline: a pass-through costs nothing, not a hop) and run through the local
VAD at the client's own rate. Speech starts and ends go to playback first (barge-in must
not queue behind audio), then the frame goes upstream, keeping the client's base64 text
when it is already in the upstream's format (encode once). One hop per frame.

Session updates are checked all-or-nothing: a client may not set the operator's fields
(:data:`~.config.SERVER_OWNED_FIELDS`) unless allowed, and audio formats must be ones
the resampler converts. What goes upstream always says PCM16 24 kHz, and server VAD with
``interrupt_response: false``: barge-in is decided here (the turn machine), not by the
upstream, so a cough does not cost the user their answer.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import trio
from msgspec import UNSET
from trio_websocket import ConnectionClosed

from ..audio.codecs import AudioError, Format, to_pcm16
from ..audio.resample import Converter
from ..audio.vad import LocalVAD, SpeechStart
from ..channels import EdgeSender
from ..messages import AudioFrame, FlushPlayback, SpeechStarted, SpeechStopped
from ..realtime import codec
from ..realtime import events as ev
from ..session import EndSession
from ..upstream.actor import Drain
from .client import ClientDecoder, ClientLink, ClientPort, PlaybackReport
from .config import SERVER_OWNED_FIELDS, RuntimeConfig
from .context import PCM24K, SessionContext, SetOutputFormat

__all__ = ["Capture", "upstream_session"]

log = logging.getLogger("voiceactors.capture")

_UPSTREAM_FORMAT = ev.AudioFormat(type="audio/pcm", rate=24000)


class Capture:
    """Read one client's socket until it closes (see the module docstring).

    ``run`` returns when the client closes (the session ends with ``client_closed``) and
    raises ``EndSession`` for a client over its rate limit (1008).
    """

    def __init__(
        self,
        ctx: SessionContext,
        config: RuntimeConfig,
        link: ClientLink,
        up: EdgeSender[Any],
        play: EdgeSender[Any],
        limiter: Any,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.link = link
        self.up = up
        self.play = play
        self.limiter = limiter
        self.decoder = ClientDecoder()
        self.seq = 0
        self._last_arrival: float | None = None
        self._last_media = 0.0
        self._set_input(PCM24K)

    def _set_input(self, fmt: Format) -> None:
        self.ctx.input_format = fmt
        self.passthrough = fmt == PCM24K
        self.converter = None if self.passthrough else Converter(Format("pcm16", fmt.rate), PCM24K)
        self.vad = LocalVAD(self.config.vad_profile, rate=fmt.rate)

    # -- the loop -----------------------------------------------------------------------

    async def run(self, port: ClientPort) -> None:
        ctx = self.ctx
        while True:
            try:
                frame = await port.get_message()
            except ConnectionClosed as closed:
                await self._drain()
                reason = closed.reason
                if reason is None or reason.code in (1005, 1006):
                    # Gone without a close frame (network, crash): not a goodbye.
                    raise EndSession("client_lost", 1000) from None
                return
            now = trio.current_time()
            ctx.last_client_at = now
            if not self.limiter.allow(now):
                raise EndSession("rate_limited", 1008, "rate limit")
            if not isinstance(frame, str):
                ctx.client_errors += 1
                await self.link.error(
                    "invalid_value", "Binary frames are not supported; send JSON text events."
                )
                continue
            try:
                event = self.decoder.decode(frame)
                if type(event) is ev.InputAudioBufferAppend:
                    await self._audio(event, now)
                else:
                    await self._control(event)
            except codec.ProtocolError as exc:
                ctx.client_errors += 1
                await self.link.refuse(exc)

    async def _drain(self) -> None:
        """Let the upstream take what the client sent before it hung up (bounded)."""
        drain = Drain()
        with trio.move_on_after(self.config.client_send_timeout_s):
            await self.up.send(drain)
            await drain.reached.wait()

    # -- audio (hot path) -----------------------------------------------------------------

    async def _audio(self, event: ev.InputAudioBufferAppend, now: float) -> None:
        ctx = self.ctx
        fmt = ctx.input_format
        try:
            raw = codec.b64decode_strict(event.audio)
        except codec.ProtocolError as exc:
            exc.event_id = event.event_id or None
            raise
        if not raw:
            raise codec.ProtocolError(
                "invalid_value", "Audio chunk is empty.", "audio", event.event_id or None
            )
        try:
            fmt.check(raw)
        except AudioError as exc:
            raise codec.ProtocolError(
                "invalid_value", str(exc), "audio", event.event_id or None
            ) from None
        start_ms = ctx.input_ms
        dur_ms = fmt.duration_ms(len(raw))
        end_ms = ctx.input_ms = start_ms + dur_ms
        self._jitter(now, start_ms)
        pcm = raw if fmt.encoding == "pcm16" else to_pcm16(raw, fmt.encoding)
        for found in self.vad.process(pcm, start_ms):
            at = now - (end_ms - found.at_ms) / 1000.0  # when the user actually began/ended
            if isinstance(found, SpeechStart):
                ctx.local_onset_at = at
                await self.play.send(SpeechStarted(source="local", audio_ms=found.at_ms, at=at))
            else:
                ctx.user_stopped_at = at
                await self.play.send(SpeechStopped(source="local", audio_ms=found.at_ms, at=at))
        if self.converter is None:
            frame = AudioFrame(pcm=pcm, seq=self.seq, captured_at=now, b64=event.audio)
        else:
            pcm24 = self.converter.process(pcm)
            if not pcm24:
                return
            frame = AudioFrame(pcm=pcm24, seq=self.seq, captured_at=now)
        self.seq += 1
        ctx.frames_in += 1
        await self.up.send(frame)

    def _jitter(self, now: float, media_ms: float) -> None:
        # RFC 3550 section 6.4.1: the smoothed change in transit time between frames.
        if self._last_arrival is not None:
            d = (now - self._last_arrival) * 1000.0 - (media_ms - self._last_media)
            self.ctx.jitter_ms += (abs(d) - self.ctx.jitter_ms) / 16.0
        self._last_arrival = now
        self._last_media = media_ms

    # -- everything else ----------------------------------------------------------------

    async def _control(self, event: Any) -> None:
        match event:
            case PlaybackReport():
                await self.play.send(event)
            case ev.SessionUpdate():
                await self._session_update(event)
            case ev.ResponseCreate(response=params) if params is not UNSET:
                self._check_owned(params, "response", event.event_id)
                await self.up.send(event)
            case ev.OutputAudioBufferClear():
                await self.play.send(FlushPlayback(reason="client"))
            case _:
                await self.up.send(event)

    def _check_owned(self, obj: Any, prefix: str, event_id: str | Any) -> None:
        if self.config.allow_client_session:
            return
        for name in SERVER_OWNED_FIELDS:
            if getattr(obj, name, UNSET) is not UNSET:
                raise codec.ProtocolError(
                    "server_owned_field",
                    f"'{prefix}.{name}' is set by the server operator; clients cannot change it.",
                    f"{prefix}.{name}",
                    event_id or None,
                )

    async def _session_update(self, event: ev.SessionUpdate) -> None:
        s = event.session
        self._check_owned(s, "session", event.event_id)
        new_in = new_out = None
        audio = s.audio
        if audio is not UNSET:
            if audio.input is not UNSET and audio.input.format is not UNSET:
                new_in = _format(audio.input.format, "session.audio.input.format", event)
            if audio.output is not UNSET and audio.output.format is not UNSET:
                new_out = _format(audio.output.format, "session.audio.output.format", event)
        # Valid as a whole: apply it.
        if new_in is not None and new_in != self.ctx.input_format:
            self._set_input(new_in)
        if new_out is not None:
            await self.play.send(SetOutputFormat(format=new_out))
        await self.up.send(msgspec.structs.replace(event, session=upstream_session(s)))


def _format(fmt: ev.AudioFormat, param: str, event: ev.SessionUpdate) -> Format:
    try:
        return Format.from_api(msgspec.to_builtins(fmt))
    except AudioError as exc:
        raise codec.ProtocolError(
            "invalid_value", str(exc), param, event.event_id or None
        ) from None


def upstream_session(s: ev.Session) -> ev.Session:
    """``s`` as the upstream must see it: PCM16 24 kHz both ways, barge-in left to us."""
    audio = s.audio
    if audio is UNSET:
        return s
    inp, out = audio.input, audio.output
    if inp is not UNSET:
        td = inp.turn_detection
        if td is not UNSET and td is not None:
            td = msgspec.structs.replace(td, interrupt_response=False)
        fmt = _UPSTREAM_FORMAT if inp.format is not UNSET else UNSET
        inp = msgspec.structs.replace(inp, format=fmt, turn_detection=td)
    if out is not UNSET and out.format is not UNSET:
        out = msgspec.structs.replace(out, format=_UPSTREAM_FORMAT)
    return msgspec.structs.replace(s, audio=ev.AudioConfig(input=inp, output=out))
