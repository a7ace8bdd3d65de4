"""The device's loudspeaker: :class:`Playout` plays agent audio at real time, sans-IO (the
caller passes the Trio time in), and knows to the sample what it played of each item.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from ..audio.codecs import Format

__all__ = ["ItemPlay", "Playout"]


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
