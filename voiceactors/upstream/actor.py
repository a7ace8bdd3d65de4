"""The upstream actor: one session's connection to the Realtime API, kept alive.

Theory of operation
-------------------
The actor is a thin driver around the ``reconnect`` machine (when to open, close, swap,
configure, replay, give up) and the endpoint's shared ``breaker`` (whether to try at all).
It runs three kinds of task in its own nursery:

* the **driver** owns the machine: it receives lifecycle facts on a small internal edge
  (connected, connect failed, closed, response started/done, fatal error), feeds them with
  ``trio.current_time()``, performs the actions, and sleeps until the next deadline (the
  machine's, the stall deadline while a response is active, or the next heartbeat);
* one **reader** per live connection decodes server events, keeps the replay log up to date
  and forwards every event to the session's ``out`` edge (the hot path: no extra hop);
* the **pump** takes the session's messages (user audio, client events, barge-in commands)
  from ``inbox``, records them in the replay log and sends them upstream when a connection
  is ready; during an outage audio is only recorded (bounded by duration), so after the
  replay nothing the user said is lost.

What crosses a reconnect: the effective session config, conversation items under their
original ids, function calls and outputs, uncommitted input audio, and an unanswered turn
(a response that was cut off is reported as ``response.done`` with status ``incomplete``
and asked for again). Fatal upstream errors end the session (``EndSession``) with the
upstream's code; a breaker that is open when the session starts ends it at once with 1013.
"""

from __future__ import annotations

import base64
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
import trio_websocket

from ..channels import EdgeSender, Full, open_edge
from ..machines import reconnect as rc
from ..machines._core import IllegalTransition
from ..machines.breaker import CircuitOpen
from ..messages import AudioFrame, UpstreamStatus
from ..realtime import (
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemTruncate,
    ErrorEvent,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    InputAudioBufferCommitted,
    InputAudioBufferSpeechStopped,
    InputAudioTranscriptionCompleted,
    ProtocolError,
    Response,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseFunctionCallArgumentsDone,
    ResponseOutputAudioDelta,
    ResponseOutputAudioTranscriptDone,
    Session,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    StatusDetails,
)
from ..session import EndSession
from .connection import ConnectError, Endpoint, UpstreamConnection, open_upstream
from .pool import BreakerRegistry, WarmPool
from .replay import ReplayLog

__all__ = ["Drain", "UpstreamActor", "UpstreamConfig"]

log = logging.getLogger("voiceactors.upstream")


@dataclass(frozen=True)
class UpstreamConfig:
    """Timings in seconds; see the module doc for what each guards."""

    reconnect: rc.Config = field(default_factory=rc.Config)
    stall_timeout: float = 8.0  # no event while a response is active
    heartbeat_interval: float = 15.0  # ping an idle connection this often
    heartbeat_timeout: float = 5.0
    max_pending_audio_ms: float = 30_000.0
    max_items: int = 64


class Drain:
    """Put on the inbox to learn when everything queued before it was taken.

    ``reached`` is set once the pump has recorded (and, when connected, sent) every
    message ahead of it: a client that hangs up right after its last frame still has that
    frame delivered before the session ends.
    """

    __slots__ = ("reached",)

    def __init__(self) -> None:
        self.reached = trio.Event()


class _Conn:
    """A live connection and the cancel scope of its reader/heartbeat tasks."""

    __slots__ = ("audio_origin_ms", "conn", "scope", "speech_end_ms", "stalled")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.scope = trio.CancelScope()
        self.audio_origin_ms = 0.0  # session input ms of this connection's first audio
        self.speech_end_ms: float | None = None
        self.stalled = False


class UpstreamActor:
    """Drive one session's upstream connection. Use ``await actor.run(inbox, out)``.

    ``inbox`` carries ``AudioFrame`` (PCM16 24 kHz) and Realtime client events; ``out``
    receives every server event (typed, or ``UnknownServerEvent``) and ``UpstreamStatus``
    updates. ``run`` returns only by raising ``EndSession`` (fatal error, retries spent,
    breaker open) or by cancellation; either way every connection is closed first.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        breakers: BreakerRegistry,
        session: Session | None = None,
        pool: WarmPool | None = None,
        config: UpstreamConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.config = config or UpstreamConfig()
        self.breaker = breakers.get(endpoint)
        self.pool = pool
        self.machine = rc.ReconnectMachine(self.config.reconnect, rng=rng or random.Random())
        self.log = ReplayLog(
            max_items=self.config.max_items, max_pending_ms=self.config.max_pending_audio_ms
        )
        if session is not None:
            self.log.update_session(session)
        self.slots: dict[str, _Conn | None] = {"current": None, "next": None}
        self.ready = False  # current is configured and may be sent to
        self.response_id: str | None = None
        self.last_event_at = 0.0
        self.connected_once = False
        self.reconnects = 0
        self.protocol_errors = 0
        self.unanswered = False  # a response was cut off by a reconnect
        self._pending_response = False
        self._pending_commit = False
        self._first_session_event_sent = False
        # session.updates sent on this connection, unanswered: was each the client's?
        self._updates: deque[bool] = deque(maxlen=64)
        self._client_update_waiting = False  # a client update to be answered by the next replay
        self._expiring = False
        self._failure: EndSession | None = None
        self._opening: dict[str, trio.CancelScope] = {}
        self._send_lock = trio.Lock()

    def input_origin_ms(self) -> float:
        """Session input ms at which the current connection's audio timeline starts.

        The upstream's ``audio_start_ms``/``audio_end_ms`` count from its own first audio;
        adding this maps them onto the session's input timeline (0 before any reconnect).
        """
        cur = self.slots["current"]
        return cur.audio_origin_ms if cur is not None else self.log.audio.start_ms

    # -- the driver -----------------------------------------------------------------------

    async def run(self, inbox: trio.MemoryReceiveChannel[Any], out: EdgeSender[Any]) -> None:
        ctl = open_edge("upstream/control", 32, Full.BLOCK)
        self._ctl = ctl.sender
        self._out = out
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump, inbox)
                await self._drive(ctl.receiver)
        finally:
            ctl.close()
            self.ready = False
            hurry = trio.current_effective_deadline() == -math.inf
            with trio.CancelScope(shield=True):
                for slot in ("next", "current"):
                    await self._close_slot(slot, 1000, "session over", hurry=hurry)

    async def _drive(self, ctl: trio.MemoryReceiveChannel[Any]) -> None:
        await self._feed(rc.Start())
        while True:
            if self._failure is not None:
                raise self._failure
            deadline = min(self.machine.next_deadline(), self._stall_deadline())
            item = None
            with trio.move_on_at(deadline):
                item = await ctl.receive()
            now = trio.current_time()
            if item is None:
                if now >= self._stall_deadline():
                    await self._on_stall()
                if now >= self.machine.next_deadline():
                    await self._feed(rc.Timer())
                continue
            source, event = item
            if source is not None and not self._is_live(source):
                continue  # a fact about a connection we already let go
            await self._feed(event, source)

    def _stall_deadline(self) -> float:
        cur = self.slots["current"]
        if self.response_id is None or cur is None or not self.ready:
            return math.inf
        return self.last_event_at + self.config.stall_timeout

    async def _on_stall(self) -> None:
        cur = self.slots["current"]
        if cur is None:
            return
        log.warning("upstream stalled for %.1f s during a response", self.config.stall_timeout)
        cur.stalled = True
        self.last_event_at = trio.current_time()
        # Abort: the reader sees the close and reports it as an unplanned failure.
        self._nursery.start_soon(cur.conn.aclose, 1011, "stalled")

    def _is_live(self, source: object) -> bool:
        return any(c is not None and c is source for c in self.slots.values()) or (
            source in self._opening.values()
        )

    async def _feed(self, event: msgspec.Struct, source: object = None) -> None:
        if isinstance(event, rc.Closed) and source is self.slots["current"]:
            self.ready = False
            self.slots["current"] = None  # already closed by the peer
        elif isinstance(event, rc.ConnectFailed) and source is self.slots["next"]:
            self.slots["next"] = None
        try:
            actions = self.machine.handle(event, trio.current_time())
        except IllegalTransition:  # pragma: no cover - a stale fact raced a transition
            log.debug("ignored %r in %s", event, self.machine.state)
            return
        for action in actions:
            await self._perform(action)

    async def _perform(self, action: msgspec.Struct) -> None:
        match action:
            case rc.OpenConnection(which=which, attempt=attempt, timeout=timeout):
                scope = trio.CancelScope()
                old = self._opening.pop(which, None)
                if old is not None:
                    old.cancel()
                self._opening[which] = scope
                self._nursery.start_soon(self._open, which, attempt, timeout, scope)
            case rc.CloseConnection(which=which, code=code, reason=reason):
                if which == "current":
                    self.ready = False
                scope = self._opening.pop(which, None)
                if scope is not None:
                    scope.cancel()
                await self._close_slot(which, code, reason)
            case rc.Swap(code=code, reason=reason):
                old = self.slots["current"]
                self.slots["current"], self.slots["next"] = self.slots["next"], None
                self.ready = False
                if old is not None:
                    old.scope.cancel()
                    self._nursery.start_soon(old.conn.aclose, code, reason)
            case rc.Configure():
                await self._replay(first=True)
            case rc.Replay():
                self.reconnects += 1
                await self._replay(first=False)
            case rc.Notify(status=status, attempt=attempt, retry_in=retry_in):
                await self._out.send(
                    UpstreamStatus(state=status, attempt=attempt, retry_in=retry_in)
                )
            case rc.Fail(reason=reason, code=code):
                self._failure = EndSession("upstream_failed", 1011, f"{reason} ({code})".strip())
        if self.machine.state in (rc.State.BACKOFF, rc.State.FAILED, rc.State.IDLE):
            for scope in self._opening.values():
                scope.cancel()
            self._opening.clear()

    async def _close_slot(self, which: str, code: int, reason: str, *, hurry: bool = False) -> None:
        c = self.slots[which]
        self.slots[which] = None
        if c is not None:
            c.scope.cancel()
            await c.conn.aclose(code, reason, hurry=hurry)

    # -- opening ------------------------------------------------------------------------

    async def _open(
        self, which: str, attempt: int, timeout: float, scope: trio.CancelScope
    ) -> None:
        with scope:
            started = trio.current_time()
            try:
                self.breaker.try_acquire(started)
            except CircuitOpen as exc:
                if not self.connected_once:
                    self._failure = EndSession(
                        "upstream_unavailable",
                        1013,
                        f"circuit open for {self.endpoint.url}; retry in {exc.retry_after:.1f} s",
                    )
                    await self._ctl.send((None, rc.Stop()))
                    return
                await self._ctl.send((scope, rc.ConnectFailed(code="circuit_open")))
                return
            pooled = self.pool.take() if (self.pool is not None and which == "current") else None
            if pooled is not None:
                self.breaker.release(trio.current_time())  # no connect was made for this permit
                await self._hold(which, pooled)
                return
            recorded = False
            try:
                # The machine's own deadline governs; this bound only keeps the task finite.
                async with open_upstream(self.endpoint, timeout=timeout + 1.0) as conn:
                    self.breaker.record(True, trio.current_time() - started, trio.current_time())
                    recorded = True
                    await self._hold(which, conn)
            except ConnectError as exc:
                if exc.status in (401, 403) or exc.code in rc.FATAL_CODES:
                    # A bad key or quota is not an outage: no verdict for the breaker.
                    self.breaker.release(trio.current_time())
                else:
                    self.breaker.record(False, trio.current_time() - started, trio.current_time())
                log.info("upstream connect failed: %s", exc)
                await self._ctl.send((scope, rc.ConnectFailed(code=exc.code, status=exc.status)))
            except BaseException:
                if not recorded:  # cancelled mid-connect: no verdict, give the permit back
                    self.breaker.release(trio.current_time())
                raise

    async def _hold(self, which: str, conn: UpstreamConnection) -> None:
        """Serve an accepted connection in slot ``which`` until it is let go or dies."""
        c = _Conn(conn)
        self.slots[which] = c
        self._opening.pop(which, None)
        self.connected_once = True
        try:
            await self._ctl.send((c, rc.Connected()))
            await self._serve_conn(c)
        finally:
            hurry = trio.current_effective_deadline() == -math.inf  # we are being cancelled
            with trio.CancelScope(shield=True):
                await conn.aclose(1000, "released", hurry=hurry)

    async def _replay(self, *, first: bool) -> None:
        """Bring ``current`` up to date, then let the pump send to it."""
        c = self.slots["current"]
        if c is None:
            return
        async with self._send_lock:
            try:
                events = (
                    self.log.replay_events()
                    if not first
                    else ([self.log.session_update()] if self.log.session else [])
                )
                # Updates the client made while we were not connected (or that this new
                # connection never answered) are merged into the replayed one: the client
                # gets one session.updated for all of them.
                waiting = self._client_update_waiting or any(self._updates)
                self._client_update_waiting = False
                self._updates.clear()
                for event in events:
                    if isinstance(event, SessionUpdate):
                        self._updates.append(waiting)
                        waiting = False
                    await c.conn.send(event)
                c.audio_origin_ms = self.log.audio.start_ms
                # A copy: the new connection's reader may commit (pop) part of the log
                # while these sends wait.
                for b64 in list(self.log.audio):
                    await c.conn.send(InputAudioBufferAppend(audio=b64))
                if self._pending_commit:
                    await c.conn.send(InputAudioBufferCommit())
                    self._pending_commit = False
                if self.unanswered or self._pending_response:
                    await c.conn.send(ResponseCreate())
                    self.unanswered = self._pending_response = False
            except trio_websocket.ConnectionClosed:
                return  # the reader reports the close
            self.ready = True
            self.last_event_at = trio.current_time()


    # -- the reader (hot path) ---------------------------------------------------------------

    async def _serve_conn(self, c: _Conn) -> None:
        """The reader and the heartbeat of one connection, cancelled together."""
        with c.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, c)
                await self._read(c)
                nursery.cancel_scope.cancel()

    async def _read(self, c: _Conn) -> None:
        if True:
            try:
                while True:
                    try:
                        event = await c.conn.receive()
                    except ProtocolError as exc:
                        self.protocol_errors += 1
                        log.warning("bad upstream frame ignored: %s", exc)
                        continue
                    self.last_event_at = trio.current_time()
                    # Audio deltas, most of the traffic, change no state here: dispatch on
                    # their type before walking the match in _observe.
                    if type(event) is ResponseOutputAudioDelta or await self._observe(c, event):
                        try:
                            await self._out.send(event)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            raise EndSession("downstream_closed") from None
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                code = reason.code if reason is not None else 1006
                text = (reason.reason or "") if reason is not None else ""
                planned = self._expiring and not c.stalled
                self._expiring = False
                if self.slots["next"] is c:
                    await self._ctl.send((c, rc.ConnectFailed(code=f"closed_{code}")))
                    return
                await self._lost_response()
                await self._ctl.send((c, rc.Closed(code=code, reason=text, planned=planned)))

    async def _observe(self, c: _Conn, event: Any) -> bool:
        """Update state from one server event; return whether to forward it to ``out``."""
        match event:
            case ResponseCreated(response=Response(id=rid)):
                self.response_id = rid
                await self._ctl.send((c, rc.ResponseStarted()))
            case ResponseDone(response=Response(id=rid)):
                if rid == self.response_id:
                    self.response_id = None
                await self._ctl.send((c, rc.ResponseDone()))
            case InputAudioBufferSpeechStopped(audio_end_ms=end):
                c.speech_end_ms = float(end)
            case InputAudioBufferCommitted(item_id=item_id):
                if c.speech_end_ms is not None:
                    chunks = self.log.audio.commit_until(c.audio_origin_ms + c.speech_end_ms)
                    c.speech_end_ms = None
                else:
                    chunks = self.log.audio.commit_all()
                self.log.add_user_audio(item_id, b"".join(base64.b64decode(b) for b in chunks))
            case InputAudioTranscriptionCompleted(item_id=item_id, transcript=text):
                self.log.set_transcript(item_id, "user", text)
            case ResponseOutputAudioTranscriptDone(item_id=item_id, transcript=text):
                self.log.set_transcript(item_id, "assistant", text)
            case ResponseFunctionCallArgumentsDone(
                call_id=call_id, name=name, arguments=args, item_id=item_id
            ):
                self.log.add_function_call(call_id, name, args, item_id)
            case ErrorEvent(error=err):
                if err.code in rc.FATAL_CODES:
                    self._failure = EndSession(
                        "upstream_failed", 1011, f"fatal upstream error ({err.code})"
                    )
                    await self._ctl.send((c, rc.FatalError(code=err.code or "")))
                elif err.code == "session_expired":
                    self._expiring = True
                    return False  # we reconnect; the client need not know
            case SessionCreated() | SessionUpdated():
                # The first one tells the client its session exists; after that only the
                # answers to its own updates (not to our configure and replays) reach it.
                first = not self._first_session_event_sent
                self._first_session_event_sent = True
                # session.updated answers the session.updates sent on this connection in
                # order; the client hears the answers to its own, not to our configure.
                answers = False
                if isinstance(event, SessionUpdated) and self._updates:
                    answers = self._updates.popleft()
                if answers and first:  # the client's update went out with our configure
                    await self._out.send(SessionCreated(session=event.session))
                return first or answers
        return True

    async def _lost_response(self) -> None:
        """The connection died mid-response: close it for the client, ask again later."""
        if self.response_id is None:
            return
        rid, self.response_id = self.response_id, None
        self.unanswered = True
        done = ResponseDone(
            response=Response(
                id=rid,
                status="incomplete",
                status_details=StatusDetails(type="incomplete", reason="upstream_reconnected"),
            )
        )
        await self._out.send(done)

    async def _heartbeat(self, c: _Conn) -> None:
        if True:
            while True:
                await trio.sleep(self.config.heartbeat_interval)
                with trio.move_on_after(self.config.heartbeat_timeout) as ping:
                    try:
                        await c.conn.ping()
                    except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                        return
                if ping.cancelled_caught:
                    log.warning("upstream missed a heartbeat; dropping the connection")
                    c.stalled = True
                    await c.conn.aclose(1011, "heartbeat timeout")
                    return

    # -- the pump (session -> upstream) ------------------------------------------------------

    async def _pump(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        lock = self._send_lock
        async with inbox:
            async for msg in inbox:
                # Receiving just checkpointed and the send below checkpoints again, so the
                # lock is taken without its own schedule point unless a replay holds it.
                try:
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    await lock.acquire()
                try:
                    event = self._record(msg)
                    if event is None:
                        continue
                    c = self.slots["current"]
                    if self.ready and c is not None:
                        try:
                            await c.conn.send(event)
                        except trio_websocket.ConnectionClosed:
                            self.ready = False  # recorded above; replayed after reconnect
                finally:
                    lock.release()

    def _record(self, msg: Any) -> Any:
        """Record ``msg`` in the replay log; return the client event to send (or None)."""
        if type(msg) is AudioFrame:  # the hot path, ahead of the match below
            pcm, b64 = msg.pcm, msg.b64
            text = b64 if b64 is not None else base64.b64encode(pcm).decode("ascii")
            self.log.audio.append(text, len(pcm))
            return InputAudioBufferAppend(audio=text)
        match msg:
            case Drain(reached=reached):
                reached.set()
                return None
            case InputAudioBufferAppend(audio=text):
                self.log.audio.append(text, len(text) * 3 // 4 - text[-2:].count("="))
                return msg
            case SessionUpdate(session=session):
                self.log.update_session(session)
                if self.ready and self.slots["current"] is not None:
                    self._updates.append(True)
                else:  # merged into the update the next replay sends
                    self._client_update_waiting = True
                return msg
            case ConversationItemCreate(item=item):
                recorded = self.log.add_item(item)
                return msgspec.structs.replace(msg, item=recorded)
            case ConversationItemTruncate(item_id=item_id):
                return msg
            case ConversationItemDelete(item_id=item_id):
                self.log.delete(item_id)
                return msg
            case InputAudioBufferClear():
                self.log.audio.commit_all()
                return msg
            case InputAudioBufferCommit():
                if not self.ready:
                    self._pending_commit = True
                return msg
            case ResponseCreate():
                if not self.ready:
                    self._pending_response = True
                return msg
        return msg
