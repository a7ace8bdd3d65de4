"""What a new upstream connection must be told so the conversation continues.

The Realtime API keeps nothing across connections: a new one is a new, empty session. The
``ReplayLog`` keeps, bounded, what is needed to rebuild it:

* the effective session config (every ``session.update`` merged, tools included),
* the conversation items (user and assistant messages, function calls and their outputs),
  each under its original id so ids the client holds stay valid; the oldest items go first
  once ``max_items`` is reached (the count of evicted items is kept),
* the input audio not yet committed by the upstream, by duration (``max_pending_ms``;
  oldest dropped first and counted) so that no user audio is lost across a reconnect.

It is pure (no I/O, no clock) and owned by the upstream actor.
"""

from __future__ import annotations

from base64 import b64encode
from collections import deque
from typing import Any

import msgspec

from ..realtime import (
    ContentPart,
    ConversationItemCreate,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    Session,
    SessionUpdate,
)
from ..realtime.events import Item

__all__ = ["PendingAudio", "ReplayLog"]

_BYTES_PER_MS = 48  # PCM16 mono at 24 kHz


class PendingAudio:
    """Input audio sent upstream but not yet committed, kept by duration.

    Chunks are kept as the base64 text they were sent as (encode once) with their byte
    length; positions are in ms on the session's input timeline.
    """

    __slots__ = ("chunks", "dropped_ms", "end_ms", "max_ms", "start_ms")

    def __init__(self, max_ms: float) -> None:
        self.max_ms = max_ms
        self.chunks: deque[tuple[float, float, str]] = deque()  # (start_ms, dur_ms, b64)
        self.start_ms = 0.0
        self.end_ms = 0.0
        self.dropped_ms = 0.0

    def append(self, b64: str, nbytes: int) -> None:
        dur = nbytes / _BYTES_PER_MS
        self.chunks.append((self.end_ms, dur, b64))
        self.end_ms += dur
        while self.chunks and self.end_ms - self.chunks[0][0] > self.max_ms:
            _, d, _ = self.chunks.popleft()
            self.dropped_ms += d
        self.start_ms = self.chunks[0][0] if self.chunks else self.end_ms

    def commit_until(self, ms: float) -> list[str]:
        """The upstream committed the audio before ``ms``: take the whole chunks before it."""
        taken = []
        while self.chunks and self.chunks[0][0] + self.chunks[0][1] <= ms + 1e-6:
            taken.append(self.chunks.popleft()[2])
        self.start_ms = self.chunks[0][0] if self.chunks else self.end_ms
        return taken

    def commit_all(self) -> list[str]:
        taken = [b64 for _, _, b64 in self.chunks]
        self.chunks.clear()
        self.start_ms = self.end_ms
        return taken

    @property
    def pending_ms(self) -> float:
        return self.end_ms - self.start_ms

    def __iter__(self) -> Any:
        return (b64 for _, _, b64 in self.chunks)


class ReplayLog:
    """Bounded memory of the conversation for replay after a reconnect (see module doc)."""

    def __init__(
        self,
        *,
        max_items: int = 64,
        max_pending_ms: float = 30_000.0,
        max_item_audio_ms: float = 120_000.0,
    ) -> None:
        self.session: dict[str, Any] = {}
        self.max_item_audio_ms = max_item_audio_ms
        self._audio_items: dict[str, float] = {}  # user items kept as audio: id -> ms
        self.items: dict[str, Item] = {}  # insertion-ordered; id -> item
        self.max_items = max_items
        self.evicted_items = 0
        self.audio = PendingAudio(max_pending_ms)
        self._next_id = 0

    # -- recording ------------------------------------------------------------------

    def update_session(self, session: Session) -> None:
        """Merge a ``session.update``'s fields into the effective config."""
        fields = msgspec.to_builtins(session)
        fields.pop("type", None)
        for key in ("id", "object", "expires_at"):
            fields.pop(key, None)
        for key, value in fields.items():
            if key == "audio" and isinstance(value, dict):
                self.session["audio"] = _merge(self.session.get("audio", {}), value)
            else:
                self.session[key] = value

    def session_update(self) -> SessionUpdate:
        """The one ``session.update`` that rebuilds the effective config."""
        return msgspec.convert(
            {"type": "session.update", "session": {"type": "realtime", **self.session}},
            SessionUpdate,
        )

    def new_item_id(self) -> str:
        self._next_id += 1
        return f"item_va{self._next_id:06d}"

    def add_item(self, item: Item) -> Item:
        """Record an item (giving it an id if it has none); returns the item as recorded."""
        item_id = getattr(item, "id", msgspec.UNSET)
        if not isinstance(item_id, str):
            item = msgspec.structs.replace(item, id=self.new_item_id())
            item_id = item.id  # type: ignore[assignment]
        self.items.pop(item_id, None)
        self.items[item_id] = item
        while len(self.items) > self.max_items:
            oldest = next(iter(self.items))
            del self.items[oldest]
            self._audio_items.pop(oldest, None)
            self.evicted_items += 1
        return item

    def add_user_audio(self, item_id: str, pcm: bytes) -> None:
        """A committed user turn, kept as audio until its transcript arrives (bounded)."""
        if not pcm:
            return
        part = ContentPart(type="input_audio", audio=b64encode(pcm).decode("ascii"))
        self.add_item(MessageItem(id=item_id, role="user", content=[part]))
        self._audio_items[item_id] = len(pcm) / _BYTES_PER_MS
        while sum(self._audio_items.values()) > self.max_item_audio_ms:
            oldest = next(iter(self._audio_items))
            del self._audio_items[oldest]
            self.items.pop(oldest, None)
            self.evicted_items += 1

    def set_transcript(self, item_id: str, role: str, text: str) -> None:
        """Remember a message's text (what replay sends instead of its audio)."""
        self._audio_items.pop(item_id, None)
        part = ContentPart(type="input_text" if role == "user" else "output_text", text=text)
        self.add_item(MessageItem(id=item_id, role=role, content=[part]))  # type: ignore[arg-type]

    def truncate(self, item_id: str, text: str | None) -> None:
        """An assistant item was cut at the played position: keep only what was heard."""
        if item_id in self.items and text is not None:
            self.set_transcript(item_id, "assistant", text)

    def delete(self, item_id: str) -> None:
        self.items.pop(item_id, None)
        self._audio_items.pop(item_id, None)

    def add_function_call(self, call_id: str, name: str, arguments: str, item_id: str) -> None:
        self.add_item(FunctionCallItem(id=item_id, call_id=call_id, name=name, arguments=arguments))

    def add_function_output(self, call_id: str, output: str, item_id: str | None = None) -> Item:
        item = FunctionCallOutputItem(call_id=call_id, output=output)
        if item_id:
            item = msgspec.structs.replace(item, id=item_id)
        return self.add_item(item)

    # -- replaying --------------------------------------------------------------------

    def replay_events(self) -> list[Any]:
        """Config first, then each item in order (each after the previous)."""
        out: list[Any] = [self.session_update()] if self.session else []
        previous: str | None = None
        for item_id, item in self.items.items():
            if isinstance(item, MessageItem) and not _replayable(item):
                continue
            out.append(ConversationItemCreate(item=item, previous_item_id=previous))
            previous = item_id
        return out


def _replayable(item: MessageItem) -> bool:
    """Message items are replayed as text; one whose text we never learned is skipped."""
    return all(
        p.type in ("input_text", "output_text", "input_audio") for p in item.content
    ) and bool(item.content)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
