"""One ``run`` session: :func:`run_session` opens the runtime as the gateway does, gives it
one in-memory client socket with a :class:`~.client.VirtualClient` on the other end, and
turns what happened into a :class:`~.report.RunReport`, problems included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..audio.codecs import PCM16_24K, AudioError, Format
from ..audio.resample import convert_offline
from ..audio.wav import write_wav
from ..realtime import events as ev
from .client import VirtualClient
from .inputs import CHUNK_MS, ClientInput
from .pair import memory_client_pair
from .report import FramesReport, RunReport, _barge_report, _ms, _turn_report

if TYPE_CHECKING:  # the runtime is imported when a session runs, not by the CLI's parser
    from ..runtime import RuntimeConfig, SessionReport
    from ..sim import RunningSimulator, Script

__all__ = ["RunOptions", "run_session"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """A checked ``run`` request (see :func:`options_from_args`)."""

    inputs: tuple[ClientInput, ...]
    fmt: Format = PCM16_24K
    upstream: str = "sim"
    barge_in_at_ms: float | None = None
    speed: float | None = None
    output: Path | None = None
    json_path: Path | None = None
    script: Script | None = None  # the embedded simulator's replies
    setup_timeout_s: float = 15.0
    turn_timeout_s: float = 60.0
    close_timeout_s: float = 10.0


def _runtime_config(opts: RunOptions) -> RuntimeConfig:
    from ..runtime import RuntimeConfig
    from ..sim import SimConfig

    if opts.upstream == "sim":
        return RuntimeConfig(upstream="sim", sim=SimConfig(script=opts.script))
    return RuntimeConfig(upstream=opts.upstream)


async def run_session(opts: RunOptions, config: RuntimeConfig | None = None) -> RunReport:
    """Run one session of ``opts.inputs`` through a runtime opened from ``config`` (a
    ``RuntimeConfig``; by default the one ``opts`` describes) and measure it.

    Never raises for what the session does: failures become ``problems`` and ``ok=False``
    in the report. Raises ``voiceactors.runtime.RuntimeError_`` if the runtime cannot
    start (no API key). Writes ``opts.output`` (the played agent audio, 24 kHz PCM16) when
    set. Cancellation propagates after the runtime has closed.
    """
    from ..gateway import ClientInfo
    from ..runtime import open_runtime_from_config
    from ..testing.leaks import live_tasks

    config = config if config is not None else _runtime_config(opts)
    onset = None
    if opts.barge_in_at_ms is not None and len(opts.inputs) > 1:
        onset = opts.inputs[-1].onset_ms(config.vad_profile)
    info = ClientInfo(
        session_id="run",
        remote="memory",
        path="/v1/realtime",
        query={"model": config.model},
        headers={},
        subprotocol=None,
        model=config.model,
    )
    problems: list[str] = []
    session: SessionReport | None = None
    baseline = set(live_tasks())
    async with open_runtime_from_config(config) as rt:
        server_port, client_port = memory_client_pair()
        client = VirtualClient(
            client_port,
            opts.inputs,
            opts.fmt,
            barge_in_at_ms=opts.barge_in_at_ms,
            barge_in_onset_ms=onset,
            setup_timeout_s=opts.setup_timeout_s,
            turn_timeout_s=opts.turn_timeout_s,
        )
        served = trio.Event()

        async def serve() -> None:
            nonlocal session
            try:
                session = await rt.run_client(server_port, info)
            except Exception as exc:  # a runtime bug: report it, do not hide the session
                problems.append(f"the runtime raised {exc!r}")
                await server_port.aclose(1011, "internal error")
            finally:
                served.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.run()
            with trio.move_on_after(opts.close_timeout_s):
                await served.wait()
            if not served.is_set():
                problems.append(
                    f"the runtime did not end the session within {opts.close_timeout_s:g} s "
                    "of the close"
                )
                nursery.cancel_scope.cancel()
        sim = rt.sim
    tasks_left = sum(1 for t in live_tasks() if t not in baseline and not _trio_internal(t))
    frames = _frames(client, session, sim)
    output_ms = None
    if opts.output is not None:
        pcm = convert_offline(bytes(client.playout.audio), opts.fmt, PCM16_24K)
        try:
            await trio.to_thread.run_sync(write_wav, opts.output, PCM16_24K, pcm)
            output_ms = PCM16_24K.duration_ms(len(pcm))
        except (OSError, AudioError) as exc:
            problems.append(f"cannot write {opts.output}: {exc}")
        if not client.playout.kept_all:
            problems.append("the played audio was longer than --output keeps (30 min)")
    return _report(client, opts, session, problems, frames, tasks_left, output_ms)


def _trio_internal(task: trio.lowlevel.Task) -> bool:
    # Trio's own system tasks and MockClock's autojump helper are not ours.
    return task.name.startswith("trio.") or "autojump" in task.name


def _frames(
    client: VirtualClient, session: SessionReport | None, sim: RunningSimulator | None
) -> FramesReport:
    sent_ms = client.chunks_sent * float(CHUNK_MS)
    runtime_in = session.frames_in if session is not None else None
    dropped = session.frames_dropped if session is not None else None
    if sim is None:
        return FramesReport(
            client.chunks_sent, sent_ms, runtime_in, None, dropped, "runtime counters", dropped
        )
    upstream_ms = sum(_received_ms(rec) for rec in sim.sim.connections)
    lost = max(0, round((sent_ms - upstream_ms) / CHUNK_MS))
    return FramesReport(
        client.chunks_sent, sent_ms, runtime_in, round(upstream_ms, 3), lost, "simulator", dropped
    )


def _received_ms(rec: Any) -> float:
    """Audio the simulator recorded on one connection, in ms of the input format that
    connection's ``session.update`` events set (the simulator's default is PCM16 24 kHz)."""
    fmt = PCM16_24K
    for event in rec.received_events:
        if isinstance(event, ev.SessionUpdate):
            audio = event.session.audio
            if isinstance(audio, ev.AudioConfig) and isinstance(audio.input, ev.AudioInput):
                if isinstance(audio.input.format, ev.AudioFormat):
                    fmt = Format.from_api(msgspec.to_builtins(audio.input.format))
    return fmt.duration_ms(rec.received_audio_bytes)


def _report(
    client: VirtualClient,
    opts: RunOptions,
    session: SessionReport | None,
    problems: list[str],
    frames: FramesReport,
    tasks_left: int,
    output_ms: float | None,
) -> RunReport:
    problems = [*client.problems, *problems]
    closed, closed_by = client.port.closed, client.port.closed_by
    barge = _barge_report(client)
    if session is not None and session.code != 1000:
        problems.append(f"the runtime ended the session: {session.reason} ({session.code})")
    if closed_by != "client" or closed is None or closed.code != 1000:
        problems.append(
            f"the session was closed by the {closed_by or 'nobody'}"
            + (f" with {closed.code}" if closed is not None else "")
        )
    if barge is not None:
        if barge.onset_ms is None:
            problems.append(f"no speech found in {barge.input} to time the barge-in from")
        elif barge.halted_ms is None and barge.playing_at_onset:
            problems.append("the agent was speaking at the barge-in but its audio never halted")
    if frames.lost:
        problems.append(f"{frames.lost} user audio frames lost")
    if tasks_left:
        problems.append(f"{tasks_left} tasks left after the runtime closed")
    ms = client.playout.ms
    return RunReport(
        ok=not problems,
        problems=problems,
        upstream=opts.upstream,
        format=str(opts.fmt),
        speed=opts.speed,
        created_ms=_ms(client.created_at, client.opened_at),
        updated_ms=_ms(client.updated_at, client.opened_at),
        turns=[_turn_report(client, t) for t in client.turns],
        barge_in=barge,
        frames=frames,
        reconnects=session.reconnects if session is not None else None,
        tasks_left=tasks_left,
        closed_by=closed_by,
        close_code=closed.code if closed is not None else None,
        close_reason=closed.reason if closed is not None else None,
        played_ms=ms(client.playout.played),
        flushed_ms=ms(client.playout.flushed),
        overflow_ms=ms(client.playout.overflow),
        late_audio_ms=ms(client.late_audio),
        underruns=client.playout.underruns,
        clears=client.clears,
        max_send_lag_ms=round(client.max_send_lag * 1000, 3),
        errors=list(client.error_log),
        output=str(opts.output) if opts.output is not None else None,
        output_ms=output_ms,
        session=msgspec.to_builtins(session) if session is not None else None,
    )
