"""A TCP fault proxy on 127.0.0.1 for socket-level faults (Toxiproxy's vocabulary, in Trio).

    async with open_simulator() as sim, open_proxy(sim.port) as proxy:
        endpoint = Endpoint(proxy.url_for("/v1/realtime"))
        proxy.set("downstream", latency_ms=200, jitter_ms=50)
        proxy.set(blackhole=True)   # both directions
        proxy.reset()               # abort every connection now (the peer sees an RST)
        proxy.down(); proxy.up()    # refuse new connections (ECONNREFUSED), then accept again
        proxy.clear()

Theory of operation
-------------------
Each accepted connection is a *link*: a client socket, a socket to the target, and one
*pipe* per direction (``upstream`` is client to target, ``downstream`` target to client).
A pipe is a reader and a writer joined by a small memory channel (``QUEUE_CHUNKS`` reads of
at most ``READ_BYTES``): when the writer is held back (latency, bandwidth, blackhole) the
channel fills, the reader stops reading, and TCP pushes back on the sender, so no fault
makes the proxy buffer without bound. The reader stamps each chunk with the time it is due
(now + latency +/- jitter, never before the previous chunk: TCP keeps order), so latency
delays data without cutting throughput. The writer applies the rest when it writes: the
blackhole (hold everything, close nothing), limit_data, the slicer, the bandwidth cap, and
slow_close when the source's EOF comes through.

Toxics are read at the moment they apply, so ``set``/``clear`` act on live connections. A
link's tasks live in its own nursery inside the proxy's nursery; leaving ``open_proxy``
cancels them all and closes every socket. A peer that resets or vanishes aborts the link
(both sockets reset), as a real network path would; it never escapes as an exception.
"""

from __future__ import annotations

import math
import random
import socket as stdsocket
import struct
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Literal

import trio

__all__ = ["Direction", "FaultProxy", "ProxyCounters", "Toxics", "open_proxy"]

Direction = Literal["upstream", "downstream"]
DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream")

READ_BYTES = 16 * 1024
QUEUE_CHUNKS = 64  # per direction: at most 1 MiB held by the proxy per pipe

_EOF = b""


@dataclass(frozen=True, slots=True)
class Toxics:
    """The faults applied to one direction. The default (all off) forwards as is.

    ``latency_ms`` +/- ``jitter_ms`` (uniform, seeded) delays each chunk; ``bandwidth``
    caps bytes per second (``None``: no cap); ``slice_bytes`` splits each write into pieces
    of about that size (+/- ``slice_variation``), ``slice_delay_ms`` apart; ``blackhole``
    holds all data and the EOF (nothing is dropped or closed: the stream resumes intact on
    ``clear``); ``limit_bytes`` closes the link once that many bytes went this way;
    ``slow_close_ms`` delays passing on the source's EOF. A negative or non-finite value
    raises ``ValueError``.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth: float | None = None
    slice_bytes: int | None = None
    slice_variation: int = 0
    slice_delay_ms: float = 0.0
    blackhole: bool = False
    limit_bytes: int | None = None
    slow_close_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Toxics.{f.name} must be finite and >= 0, got {value!r}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"Toxics.bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        if self.slice_bytes is not None and self.slice_bytes < 1:
            raise ValueError(f"Toxics.slice_bytes must be >= 1, got {self.slice_bytes!r}")
        if self.jitter_ms > self.latency_ms:
            raise ValueError("Toxics.jitter_ms must not exceed latency_ms")


@dataclass(slots=True)
class ProxyCounters:
    """What went through: links accepted and refused, bytes forwarded each way, resets."""

    connections: int = 0
    active: int = 0
    refused: int = 0  # accepted while the target was unreachable (reset at once)
    resets: int = 0  # links aborted (by ``reset``/``down`` or a peer's reset)
    bytes_upstream: int = 0
    bytes_downstream: int = 0


class _Link:
    __slots__ = ("aborted", "client", "sent", "scope", "server")

    def __init__(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        self.client = client
        self.server = server
        self.scope = trio.CancelScope()
        self.aborted = False
        self.sent = {"upstream": 0, "downstream": 0}

    def abort(self) -> None:
        """End the link now; its sockets are closed with an RST, not a FIN."""
        self.aborted = True
        self.scope.cancel()


def _set_rst_on_close(stream: trio.SocketStream) -> None:
    # SO_LINGER on with a zero timeout: close() sends an RST and discards unsent data.
    try:
        stream.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # already closed by the peer: nothing left to reset
        pass


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` to ``target_host``:``target_port``.

    Build it with ``open_proxy``. The control methods (``set``, ``clear``, ``reset``,
    ``down``, ``up``) are synchronous and take effect at once, also on live connections.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, seed: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.counters = ProxyCounters()
        self._toxics: dict[Direction, Toxics] = {d: Toxics() for d in DIRECTIONS}
        self._rng = random.Random(seed)
        self._links: set[_Link] = set()
        self._changed = trio.Event()
        self._listen_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- control ----------------------------------------------------------------------------

    def url_for(self, path: str = "/", scheme: str = "ws") -> str:
        """``ws://127.0.0.1:PORT{path}``: the target's URL as seen through the proxy."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def toxics(self, direction: Direction) -> Toxics:
        return self._toxics[direction]

    def set(self, direction: Direction | None = None, **toxics: object) -> None:
        """Change the named toxics of ``direction`` (``None``: both), keeping the others.

        An unknown name raises ``TypeError``, a bad value ``ValueError``; either way nothing
        changes.
        """
        chosen = DIRECTIONS if direction is None else (direction,)
        updated = {d: replace(self._toxics[d], **toxics) for d in chosen}  # type: ignore[arg-type]
        self._toxics.update(updated)
        self._wake()

    def clear(self) -> None:
        """Remove every toxic in both directions; held (blackholed) data flows again."""
        self._toxics = {d: Toxics() for d in DIRECTIONS}
        self._wake()

    def reset(self) -> int:
        """Abort every live connection now (both peers see a reset); return how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        return len(links)

    @property
    def is_down(self) -> bool:
        return self._listen_scope is None

    def down(self) -> None:
        """Stop listening (new connections are refused) and reset every live connection."""
        if self._listen_scope is not None:
            self._listen_scope.cancel()
            self._listen_scope = None
        self.reset()

    def up(self) -> None:
        """Listen again on the same port. Raises ``OSError`` if the port was taken meanwhile."""
        if self._listen_scope is not None:
            return
        assert self._nursery is not None, "use open_proxy()"
        listener = self._bind(self.port)
        self._listen_scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_loop, listener, self._listen_scope)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- serving ----------------------------------------------------------------------------

    def _bind(self, port: int) -> trio.SocketListener:
        sock = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
        try:
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def _accept_loop(self, listener: trio.SocketListener, scope: trio.CancelScope) -> None:
        async with listener:
            with scope:
                while True:
                    stream = await listener.accept()
                    assert self._nursery is not None
                    self._nursery.start_soon(self._serve, stream)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.counters.connections += 1
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            self.counters.refused += 1
            _set_rst_on_close(client)
            await client.aclose()
            return
        link = _Link(client, server)
        self._links.add(link)
        self.counters.active += 1
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, link, client, server, "upstream")
                    nursery.start_soon(self._pipe, link, server, client, "downstream")
        finally:
            self._links.discard(link)
            self.counters.active -= 1
            if link.aborted:
                self.counters.resets += 1
                _set_rst_on_close(client)
                _set_rst_on_close(server)
            with trio.CancelScope(shield=True):
                await client.aclose()
                await server.aclose()

    async def _pipe(
        self,
        link: _Link,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        direction: Direction,
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, link, self._read(src, send, direction))
            await self._guard(link, self._write(link, receive, dst, direction))

    @staticmethod
    async def _guard(link: _Link, io: Coroutine[object, object, None]) -> None:
        try:
            await io
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            link.abort()  # a peer reset or vanished: so does the whole path

    async def _read(
        self,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes]],
        direction: Direction,
    ) -> None:
        due = -math.inf
        async with send:
            while True:
                data = await src.receive_some(READ_BYTES)
                t = self._toxics[direction]
                delay = t.latency_ms
                if t.jitter_ms:
                    delay += self._rng.uniform(-t.jitter_ms, t.jitter_ms)
                due = max(due, trio.current_time() + delay / 1000.0)
                await send.send((due, data))
                if data == _EOF:
                    return

    async def _write(
        self,
        link: _Link,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        dst: trio.SocketStream,
        direction: Direction,
    ) -> None:
        async with receive:
            async for due, data in receive:
                await self._while_blackholed(direction)
                await trio.sleep_until(due)
                await self._while_blackholed(direction)
                if data == _EOF:
                    await trio.sleep(self._toxics[direction].slow_close_ms / 1000.0)
                    await dst.send_eof()
                    return
                limit = self._toxics[direction].limit_bytes
                if limit is not None:
                    data = data[: max(0, limit - link.sent[direction])]
                await self._send(dst, data, direction, link)
                if limit is not None and link.sent[direction] >= limit:
                    await trio.sleep(self._toxics[direction].slow_close_ms / 1000.0)
                    link.scope.cancel()  # a graceful close of both sockets (FIN)
                    return

    async def _while_blackholed(self, direction: Direction) -> None:
        while self._toxics[direction].blackhole:
            await self._changed.wait()

    async def _send(
        self, dst: trio.SocketStream, data: bytes, direction: Direction, link: _Link
    ) -> None:
        view = memoryview(data)
        while view:
            t = self._toxics[direction]
            size = len(view)
            if t.slice_bytes is not None:
                spread = self._rng.randint(-t.slice_variation, t.slice_variation)
                size = max(1, t.slice_bytes + spread)
            if t.bandwidth is not None:
                # Pieces of at most 1/20 s worth keep the pacing smooth.
                size = min(size, max(1, int(t.bandwidth / 20)))
            piece, view = view[:size], view[size:]
            await dst.send_all(piece)
            link.sent[direction] += len(piece)
            if direction == "upstream":
                self.counters.bytes_upstream += len(piece)
            else:
                self.counters.bytes_downstream += len(piece)
            pause = len(piece) / t.bandwidth if t.bandwidth is not None else 0.0
            if t.slice_bytes is not None:
                pause += t.slice_delay_ms / 1000.0
            if pause:
                await trio.sleep(pause)


@asynccontextmanager
async def open_proxy(
    target_port: int, target_host: str = "127.0.0.1", *, seed: int = 0
) -> AsyncIterator[FaultProxy]:
    """Serve a ``FaultProxy`` on 127.0.0.1 (a free port) for the body of the ``async with``.

    ``seed`` drives jitter and slice sizes. A target that refuses is not an error here:
    each client is accepted and then reset (counted in ``counters.refused``). Leaving the
    block (normally, by exception or cancellation) cancels every link and closes every
    socket.
    """
    proxy = FaultProxy(target_port, target_host, seed=seed)
    async with trio.open_nursery() as nursery:
        proxy._nursery = nursery
        proxy.up()
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
