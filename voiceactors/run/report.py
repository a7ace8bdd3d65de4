"""The report of one ``run`` session: :class:`RunReport` and its parts (what ``--json``
writes), built from what the :class:`~.client.VirtualClient` measured, and
:func:`format_report`, the human summary the CLI prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from .inputs import CHUNK_MS

if TYPE_CHECKING:
    from .client import VirtualClient, _Turn

__all__ = [
    "BargeInReport",
    "FramesReport",
    "ResponseReport",
    "RunReport",
    "TurnReport",
    "format_report",
]


class ResponseReport(msgspec.Struct, frozen=True):
    """One agent response: its final status and the audio the device got of it (ms)."""

    id: str
    status: str | None
    received_ms: float
    played_ms: float
    flushed_ms: float


class TurnReport(msgspec.Struct, frozen=True):
    """One input. Times are ms since the client port opened; latencies are ms from the
    user's speech end (the capture time of the server's ``audio_end_ms``)."""

    input: str
    started_ms: float
    input_ms: float
    speech_end_audio_ms: int | None
    speech_end_ms: float | None
    first_audio_ms: float | None
    first_played_ms: float | None
    responses: list[ResponseReport]


class BargeInReport(msgspec.Struct, frozen=True):
    """The last input spoken over the agent. ``onset_ms``/``halted_ms`` are ms since the
    port opened: the capture time of the speech onset local VAD finds in the input, and
    when ``output_audio_buffer.cleared`` arrived; ``played_ms``/``received_ms`` are what
    the device had played/received of ``item_id`` then; ``truncated_ms`` is the
    ``audio_end_ms`` the upstream confirmed for that item."""

    input: str
    started_after_playback_ms: float | None
    playing_at_onset: bool | None
    onset_ms: float | None
    halted_ms: float | None
    latency_ms: float | None
    item_id: str | None
    played_ms: float | None
    received_ms: float | None
    truncated_ms: int | None


class FramesReport(msgspec.Struct, frozen=True):
    """User audio: 20 ms frames the client sent, and what reached the upstream.

    ``source`` is ``"simulator"`` when ``upstream_ms`` is the audio the embedded simulator
    recorded; otherwise ``"runtime counters"``: ``lost`` is then the runtime's own count
    of dropped frames, since nothing else saw the upstream's side.
    """

    sent: int
    sent_ms: float
    runtime_in: int | None
    upstream_ms: float | None
    lost: int | None
    source: str
    runtime_dropped: int | None


class RunReport(msgspec.Struct, frozen=True):
    """Everything ``run`` measured about one session (``--json`` writes this)."""

    ok: bool
    problems: list[str]
    upstream: str
    format: str
    speed: float | None
    created_ms: float | None
    updated_ms: float | None
    turns: list[TurnReport]
    barge_in: BargeInReport | None
    frames: FramesReport
    reconnects: int | None
    tasks_left: int | None
    closed_by: str | None
    close_code: int | None
    close_reason: str | None
    played_ms: float
    flushed_ms: float
    overflow_ms: float
    late_audio_ms: float
    underruns: int
    clears: int
    max_send_lag_ms: float
    errors: list[str]
    output: str | None
    output_ms: float | None
    session: dict[str, Any] | None


def _ms(t: float | None, since: float | None) -> float | None:
    if t is None or since is None:
        return None
    return round((t - since) * 1000, 3)


def _turn_report(client: VirtualClient, turn: _Turn) -> TurnReport:
    t0 = client.opened_at
    end = turn.speech_end_audio_ms
    end_at = client.capture_time(end) if end is not None else None
    answer = client.responses.get(turn.answer) if turn.answer else None
    first_played = None
    if answer is not None and answer.first_item is not None:
        item = client.playout.items.get(answer.first_item)
        first_played = item.started_at if item is not None else None
    responses = []
    for rid in turn.responses:
        items = [i for i in client.playout.items.values() if i.response_id == rid]
        resp = client.responses.get(rid)
        responses.append(
            ResponseReport(
                id=rid,
                status=resp.status if resp is not None else None,
                received_ms=sum(client.playout.ms(i.received) for i in items),
                played_ms=sum(client.playout.ms(i.played) for i in items),
                flushed_ms=sum(client.playout.ms(i.flushed) for i in items),
            )
        )
    return TurnReport(
        input=turn.input.name,
        started_ms=round(client.capture_time(turn.start_chunk * CHUNK_MS) * 1000 - t0 * 1000, 3),
        input_ms=turn.input.duration_ms,
        speech_end_audio_ms=end,
        speech_end_ms=_ms(end_at, t0),
        first_audio_ms=_ms(turn.first_delta_at, end_at),
        first_played_ms=_ms(first_played, end_at),
        responses=responses,
    )


def _barge_report(client: VirtualClient) -> BargeInReport | None:
    b = client.barge
    if b is None:
        return None
    t0 = client.opened_at
    item = b.item
    ms = client.playout.ms
    return BargeInReport(
        input=client.turns[b.turn].input.name,
        started_after_playback_ms=_ms(b.start_at, b.playback_started_at),
        playing_at_onset=b.playing_at_onset,
        onset_ms=_ms(b.onset_at, t0),
        halted_ms=_ms(b.halted_at, t0),
        latency_ms=_ms(b.halted_at, b.onset_at),
        item_id=item.item_id if item is not None else None,
        played_ms=ms(b.played) if b.played is not None else None,
        received_ms=ms(b.received) if b.received is not None else None,
        truncated_ms=client.truncated.get(item.item_id) if item is not None else None,
    )


def format_report(report: RunReport) -> str:
    """A short human summary of ``report``, one fact per line."""

    def f(v: float | None, unit: str = " ms") -> str:
        return "-" if v is None else f"{v:,.0f}{unit}"

    lines = [
        f"voiceactors run: {report.upstream} upstream, {report.format}, "
        + ("real time" if report.speed is None else f"{report.speed:g}x virtual time"),
        f"  setup        session.created {f(report.created_ms)}, "
        f"session.updated {f(report.updated_ms)}",
        "  turn  input                    speech end   first audio   first played  response",
    ]
    for n, t in enumerate(report.turns, 1):
        status = ", ".join(r.status or "?" for r in t.responses) or "-"
        lines.append(
            f"  {n:<4}  {t.input[:24]:<24} {f(t.speech_end_ms):>11}  {f(t.first_audio_ms, ''):>9} ms"
            f"  {f(t.first_played_ms, ''):>10} ms  {status}"
        )
    b = report.barge_in
    if b is not None:
        lines.append(
            f"  barge-in     onset {f(b.onset_ms)} -> halted {f(b.halted_ms)}: "
            f"{f(b.latency_ms)}; started {f(b.started_after_playback_ms)} into the agent's audio"
        )
        lines.append(
            f"  truncation   upstream confirmed {f(b.truncated_ms)}; client played "
            f"{f(b.played_ms)} of {f(b.received_ms)} received ({b.item_id or 'no item'})"
        )
    fr = report.frames
    upstream = f"{f(fr.upstream_ms)} reached the upstream" if fr.upstream_ms is not None else ""
    lines.append(
        f"  frames       {fr.sent} sent ({f(fr.sent_ms)}), {upstream or 'upstream unseen'}; "
        f"lost {fr.lost if fr.lost is not None else '-'} ({fr.source})"
    )
    lines.append(
        f"  agent audio  played {f(report.played_ms)}, flushed {f(report.flushed_ms)}, "
        f"underruns {report.underruns}"
    )
    lines.append(
        f"  reconnects   {report.reconnects if report.reconnects is not None else '-'}; "
        f"tasks left {report.tasks_left if report.tasks_left is not None else '-'}; "
        f"server errors {len(report.errors)}"
    )
    lines.append(
        f"  closed       by {report.closed_by or '-'} with {report.close_code or '-'}"
        + (f" ({report.session.get('reason')})" if report.session else "")
    )
    if report.output is not None:
        lines.append(f"  output       {report.output}: {f(report.output_ms)} of agent audio")
    lines.extend(f"  PROBLEM      {p}" for p in report.problems)
    lines.append(f"  result       {'ok' if report.ok else 'FAILED'}")
    return "\n".join(lines)
