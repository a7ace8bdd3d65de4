"""Prove that no user audio was lost across reconnects, with inaudible sequence stamps.

Each 20 ms frame sent upstream carries its sequence number in its first two samples;
what each upstream connection received is then a run of frames that says where it starts.
The runs must reproduce what was sent and leave no gap (a run may start before the
previous one ended: the uncommitted tail is replayed after a reconnect).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["assert_no_audio_lost", "seq_of", "stamp"]


def stamp(chunk: bytes, seq: int) -> bytes:
    """Mark a frame with its sequence number in its first two samples (inaudible)."""
    return (seq % 1024).to_bytes(2, "little") + (seq // 1024).to_bytes(2, "little") + chunk[4:]


def seq_of(frame: bytes) -> int:
    """The sequence number :func:`stamp` put at the start of ``frame``."""
    return int.from_bytes(frame[0:2], "little") + 1024 * int.from_bytes(frame[2:4], "little")


def assert_no_audio_lost(
    sent: bytes, received: Iterable[bytes], frame_bytes: int, *, tail_frames: int = 20
) -> None:
    """Each run in ``received`` (one per connection, in order) is unaltered and the runs
    cover everything ``sent`` except the last ``tail_frames`` (still queued when the
    client hung up). Raises ``AssertionError`` saying what went wrong."""
    covered = 0
    for audio in received:
        if not audio:
            continue
        start = seq_of(audio) * frame_bytes
        assert sent[start : start + len(audio)] == audio, "audio arrived altered"
        assert start <= covered, f"{start - covered} bytes of user audio never reached upstream"
        covered = max(covered, start + len(audio))
    assert covered >= len(sent) - tail_frames * frame_bytes
