"""Fault campaign: sessions through gateway -> fault proxy -> simulator under random toxics.

Runs ``--sessions`` client sessions (``--concurrency`` at a time) against an in-process
gateway whose upstream is the simulator behind a ``FaultProxy``. An injector applies a
seeded random fault every ``--fault-every`` seconds (latency with jitter, slicer,
blackhole, reset, a short outage) and removes it after a while. Each client streams the
fixture speech in 20 ms frames stamped with (session, seq), then silence, until it gets a
completed response or the gateway closes it.

Report (reliability.md): faults injected, sessions that recovered (completed a turn after
a fault hit their upstream), sessions that ended with a clear reason (a close code and an
``error`` event naming it), audio frames lost (gaps in what the simulator received, for
sessions that completed: 0 expected), tasks left after everything closed, RSS before/after.

    python tools/fault_campaign.py [--sessions 20] [--concurrency 5] [--seed 0]
        [--fault-every 3] [--real-time] [--json PATH]

By default time is virtual (trio's MockClock): minutes of faults run in seconds, on real
loopback sockets. Exit 1 if a frame was lost, a task was left or a session ended unclearly.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import wave
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed

from voiceactors.machines import reconnect as rc
from voiceactors.runtime import RuntimeConfig
from voiceactors.testing.gateway import open_gateway
from voiceactors.testing.leaks import live_tasks
from voiceactors.testing.proxy import FaultProxy, open_proxy
from voiceactors.testing.sim import connect_client, open_simulator
from voiceactors.upstream import PoolConfig, UpstreamConfig

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio" / "confirm_24k.wav"
FRAME = 960  # 20 ms of PCM16 at 24 kHz
STAMP = 6  # bytes: session (2), seq (4)
FAULTS = ("latency", "slicer", "blackhole", "reset", "outage")


@dataclass
class Report:
    sessions: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    sessions_completed: int = 0
    sessions_recovered: int = 0
    sessions_ended_with_reason: dict[str, int] = field(default_factory=dict)
    sessions_ended_unclearly: int = 0
    audio_frames_sent: int = 0
    audio_frames_lost: int = 0
    tasks_left: int = 0
    rss_kb_before: int = 0
    rss_kb_after: int = 0
    virtual_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.audio_frames_lost or self.tasks_left or self.sessions_ended_unclearly)


def rss_kb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def speech() -> bytes:
    with wave.open(str(SPEECH)) as w:
        return w.readframes(w.getnframes())


def stamp(chunk: bytes, session: int, seq: int) -> bytes:
    return session.to_bytes(2, "little") + seq.to_bytes(4, "little") + chunk[STAMP:]


@dataclass(eq=False)  # hashed by identity: kept in the set of live sessions
class _Client:
    index: int
    sent: bytearray = field(default_factory=bytearray)
    faults_seen: int = 0
    completed: bool = False
    close: tuple[int, str] | None = None
    error_codes: list[str] = field(default_factory=list)


async def _client(gw_url: str, c: _Client, audio: bytes, live: set[_Client]) -> None:
    try:
        async with connect_client(gw_url) as client:
            live.add(c)
            done = trio.Event()

            async def listen() -> None:
                while True:
                    event = await client.recv()
                    client.seen.clear()  # bounded: the campaign keeps only what it needs
                    if event["type"] == "error":
                        c.error_codes.append(event["error"].get("code") or "")
                    elif event["type"] == "response.done":
                        if event["response"]["status"] == "completed":
                            c.completed = True
                            done.set()
                            return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                seq = 0
                while seq * FRAME < len(audio) or not done.is_set():
                    chunk = stamp(
                        audio[seq * FRAME : (seq + 1) * FRAME].ljust(FRAME, b"\0"), c.index, seq
                    )
                    b64 = base64.b64encode(chunk).decode("ascii")
                    await client.send({"type": "input_audio_buffer.append", "audio": b64})
                    c.sent += chunk
                    seq += 1
                    await trio.sleep(0.02)
    except* ConnectionClosed as group:
        exc = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        reason = exc.reason if isinstance(exc, ConnectionClosed) else None
        c.close = (reason.code, reason.reason or "") if reason is not None else (1006, "")
    finally:
        live.discard(c)


async def _inject(
    proxy: FaultProxy, rng: random.Random, every: float, report: Report, live: set[_Client]
) -> None:
    counts: Counter[str] = Counter()
    while True:
        await trio.sleep(every * rng.uniform(0.5, 1.5))
        kind = rng.choice(FAULTS)
        counts[kind] += 1
        report.faults_injected = dict(counts)
        for c in live:
            c.faults_seen += 1
        match kind:
            case "latency":
                proxy.set(latency_ms=200, jitter_ms=50)
            case "slicer":
                proxy.set("downstream", slice_bytes=64, slice_variation=60)
            case "blackhole":
                proxy.set(blackhole=True)
            case "reset":
                proxy.reset()
            case "outage":
                proxy.down()
        await trio.sleep(rng.uniform(1.0, 4.0))
        proxy.clear()
        proxy.up()


def _audio_lost(clients: list[_Client], sim: Any) -> int:
    """Frames sent by completed sessions that no simulator connection received."""
    covered: dict[int, int] = {}
    lost = 0
    for conn in sim.connections:
        audio = conn.received_audio
        if len(audio) < STAMP:
            continue
        session = int.from_bytes(audio[0:2], "little")
        start = int.from_bytes(audio[2:6], "little") * FRAME
        if session >= len(clients) or clients[session].sent[start : start + len(audio)] != audio:
            lost += 1  # altered or misaligned: count it rather than trust it
            continue
        got = covered.get(session, 0)
        lost += max(0, start - got) // FRAME
        covered[session] = max(got, start + len(audio))
    for c in clients:
        if c.completed:
            # The last 20 frames may still have been queued when the client hung up.
            lost += max(0, len(c.sent) - covered.get(c.index, 0) - 20 * FRAME) // FRAME
    return lost


async def campaign(sessions: int, concurrency: int, seed: int, fault_every: float) -> Report:
    report = Report(sessions=sessions, rss_kb_before=rss_kb())
    baseline = len(live_tasks())
    started = trio.current_time()
    rng = random.Random(seed)
    audio = speech()
    clients = [_Client(i) for i in range(sessions)]
    live: set[_Client] = set()
    async with open_simulator(seed=seed, first_byte_ms=50) as running:
        async with open_proxy(running.port, seed=seed) as proxy:
            cfg = RuntimeConfig(
                upstream=proxy.url_for("/v1/realtime"),
                pool=PoolConfig(size=0),
                upstream_config=UpstreamConfig(
                    reconnect=rc.Config(cap=1.0, retry_budget=10.0),
                    stall_timeout=2.0,
                    heartbeat_interval=3.0,
                    heartbeat_timeout=1.0,
                ),
            )
            async with open_gateway(cfg) as gw, trio.open_nursery() as nursery:
                nursery.start_soon(_inject, proxy, rng, fault_every, report, live)
                limit = trio.CapacityLimiter(concurrency)

                async def one(c: _Client) -> None:
                    async with limit:
                        await _client(gw.url, c, audio, live)

                async with trio.open_nursery() as sessions_nursery:
                    for c in clients:
                        sessions_nursery.start_soon(one, c)
                nursery.cancel_scope.cancel()
            report.audio_frames_lost = _audio_lost(clients, running.sim)
    report.virtual_seconds = round(trio.current_time() - started, 3)
    for c in clients:
        report.audio_frames_sent += len(c.sent) // FRAME
        if c.completed:
            report.sessions_completed += 1
            report.sessions_recovered += c.faults_seen > 0
        elif c.close is not None and c.close[1] and c.close[1] in c.error_codes:
            key = f"{c.close[0]} {c.close[1]}"
            report.sessions_ended_with_reason[key] = (
                report.sessions_ended_with_reason.get(key, 0) + 1
            )
        else:
            report.sessions_ended_unclearly += 1
    report.tasks_left = len(live_tasks()) - baseline
    report.rss_kb_after = rss_kb()
    return report


def run(
    sessions: int = 20,
    concurrency: int = 5,
    seed: int = 0,
    fault_every: float = 3.0,
    real_time: bool = False,
) -> Report:
    """Run a campaign in a fresh Trio run (virtual time unless ``real_time``)."""
    clock = None if real_time else trio.testing.MockClock(autojump_threshold=0)
    return trio.run(campaign, sessions, concurrency, seed, fault_every, clock=clock)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-every", type=float, default=3.0)
    p.add_argument("--real-time", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.sessions < 1 or a.concurrency < 1 or a.fault_every <= 0:
        p.error("--sessions, --concurrency and --fault-every must be > 0")
    report = run(a.sessions, a.concurrency, a.seed, a.fault_every, a.real_time)
    data = {**asdict(report), "ok": report.ok}
    print(
        f"faults {sum(report.faults_injected.values())} {report.faults_injected}; "
        f"sessions {report.sessions}: {report.sessions_completed} completed "
        f"({report.sessions_recovered} after a fault), ended with a reason "
        f"{report.sessions_ended_with_reason}, unclear {report.sessions_ended_unclearly}; "
        f"frames lost {report.audio_frames_lost}/{report.audio_frames_sent}; "
        f"tasks left {report.tasks_left}; RSS {report.rss_kb_before} -> {report.rss_kb_after} kB; "
        f"{report.virtual_seconds} s {'real' if a.real_time else 'virtual'}",
        file=sys.stderr,
    )
    text = json.dumps(data, indent=2)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
