"""Bounded channels between actors, each with a stated policy for when it is full.

Every edge of a session is an ``Edge``: a trio memory channel with a small fixed buffer
and one of two full-policies, chosen per edge and written where the edge is made:

``Full.BLOCK``
    The sender waits (backpressure). For edges where losing a message is wrong and the
    consumer is expected to keep up (user audio toward the upstream: nothing lost).
``Full.DROP_OLDEST``
    The sender never waits; when the buffer is full the oldest queued message is dropped
    and counted. For edges where fresh beats complete (status updates, meters).

Channels are made through ``open_edge`` only (never ``trio.open_memory_channel`` with an
infinite buffer): it keeps the counters and lets the test plugin prove that every channel
a test made was closed.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

__all__ = ["Edge", "EdgeSender", "EdgeStats", "Full", "open_edge"]

T = TypeVar("T")

#: Set by the test plugin while a test runs: every edge opened is appended here.
_tracker: list[Edge[object]] | None = None


class Full(enum.StrEnum):
    """What a full edge does to its sender."""

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"


class EdgeStats:
    """Counters of one edge; cheap to update on the hot path."""

    __slots__ = ("dropped", "high_water", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0
        self.high_water = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "high_water": self.high_water}


class EdgeSender(Generic[T]):
    """The sending end of an ``Edge``; applies the edge's full-policy.

    ``send`` is atomic with respect to cancellation, like trio's: when it raises
    ``Cancelled`` the message was not queued. After ``close``, ``send`` raises
    ``trio.ClosedResourceError``; when every receiver is closed it raises
    ``trio.BrokenResourceError``.
    """

    __slots__ = ("_edge", "_send", "send")

    def __init__(self, edge: Edge[T], send: trio.MemorySendChannel[T]) -> None:
        self._edge = edge
        self._send = send
        # Bind the policy once so the hot path is a single call.
        self.send: Callable[[T], Awaitable[None]] = (
            self._send_block if edge.policy is Full.BLOCK else self._send_drop_oldest
        )

    async def _send_block(self, message: T) -> None:
        await self._send.send(message)
        self._count()

    async def _send_drop_oldest(self, message: T) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(message)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, message: T) -> None:
        """Queue ``message`` without waiting.

        On a ``BLOCK`` edge a full buffer raises ``trio.WouldBlock``; on a ``DROP_OLDEST``
        edge the oldest queued message is dropped (and counted) to make room.
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            if self._edge.policy is Full.BLOCK:
                raise
            if self._edge.receiver._closed:  # only our eviction clone is left
                raise trio.BrokenResourceError(f"edge {self._edge.name!r}: receiver closed") from None
            try:
                self._edge._spill.receive_nowait()
                self._edge.stats.dropped += 1
            except trio.WouldBlock:  # pragma: no cover - a consumer emptied it meanwhile
                pass
            self._send.send_nowait(message)
        self._count()

    def _count(self) -> None:
        stats = self._edge.stats
        stats.sent += 1
        used = self._send.statistics().current_buffer_used
        if used > stats.high_water:
            stats.high_water = used

    def close(self) -> None:
        """Close this end (idempotent); the receiver sees ``EndOfChannel`` once drained."""
        self._send.close()

    async def aclose(self) -> None:
        self._send.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> EdgeSender[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> EdgeSender[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Edge(Generic[T]):
    """A bounded, one-way channel between two actors. Make it with ``open_edge``."""

    def __init__(self, name: str, capacity: int, policy: Full) -> None:
        if capacity < 1:
            raise ValueError(f"edge {name!r}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.policy = Full(policy)
        self.stats = EdgeStats()
        send, self.receiver = trio.open_memory_channel[T](capacity)
        # A drop-oldest edge keeps a receive clone of its own to evict from.
        self._spill: trio.MemoryReceiveChannel[T] = self.receiver.clone()
        if self.policy is Full.BLOCK:
            self._spill.close()
        self.sender: EdgeSender[T] = EdgeSender(self, send)
        self._raw_send = send

    def close(self) -> None:
        """Close both ends and the eviction clone (idempotent)."""
        self._raw_send.close()
        self.receiver.close()
        self._spill.close()

    @property
    def closed(self) -> bool:
        """True when no end of the channel is open any more."""
        st = self._raw_send.statistics()
        return st.open_send_channels == 0 and st.open_receive_channels == 0

    @property
    def depth(self) -> int:
        return self._raw_send.statistics().current_buffer_used

    def __repr__(self) -> str:
        return f"<Edge {self.name} {self.policy} {self.depth}/{self.capacity}>"


def open_edge(name: str, capacity: int, policy: Full = Full.BLOCK) -> Edge[T]:
    """Make a bounded edge named ``name`` holding at most ``capacity`` messages."""
    edge: Edge[T] = Edge(name, capacity, policy)
    if _tracker is not None:
        _tracker.append(edge)  # type: ignore[arg-type]
    return edge
