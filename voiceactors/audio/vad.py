"""Local voice activity detection, so barge-in does not wait for the server's VAD.

Theory of operation
-------------------
Audio of any chunk size goes in; it is cut into 10 ms frames at a rate webrtcvad accepts
(8 and 16 kHz natively; 24 and 48 kHz go through a short classification-only low-pass
to 16 kHz, :class:`_Decimator`, whose 1 ms delay is taken off every reported time). Each frame is *voiced* when
webrtcvad says speech **and** its level is above the profile's energy gate (webrtcvad alone
fires on faint noise and on the first frames of a stream while it adapts).

- **Start**: ``start_ms`` of consecutive voiced frames. The event's ``at_ms`` is back-dated to
  the first of them, when speech actually began; ``decided_ms`` is when the run was long
  enough. Their difference is the detector's decision latency (``start_ms``).
- **End**: ``hangover_ms`` without a voiced frame. webrtcvad itself keeps flagging speech for
  a while after it stops (its "overhang": 90 ms at modes 2-3 and 140 ms at modes 0-1 after a
  long run, for 10 ms frames), so the reported end is the end of the last voiced frame less
  that overhang, but never later than the last frame above the energy gate. Measured on the
  fixtures: within 10 ms of the labelled end instead of ~95 ms late.

Times are audio time in ms, counted from the ``at_ms`` the caller gives with each chunk (the
stream position of its first sample). The detector is sans-IO and synchronous; it never
reads a clock. Memory is one frame; nothing grows with the stream.

Cost per 20 ms of audio (``tools/bench_vad.py``, before/after in one run, loaded 2-core
box): ~7 us at 8/16 kHz, ~14.5 us at 24 kHz (was ~18), ~20 us at 48 kHz (was ~22).
"""

from __future__ import annotations

import math
from typing import Final, Literal

import msgspec
import numpy as np
import webrtcvad

from .codecs import AudioError, check_pcm16

__all__ = ["PROFILES", "LocalVAD", "SpeechEnd", "SpeechStart", "VadEvent", "VadProfile"]

_FRAME_MS: Final = 10
# webrtcvad's overhang after a run of more than 6 speech frames, in 10 ms frames, by mode
# (kOverHangMax2* in vad_core.c); after shorter runs, kOverHangMax1*.
_OVERHANG_LONG: Final = (14, 14, 9, 9)
_OVERHANG_SHORT: Final = (8, 8, 6, 6)
_LONG_RUN: Final = 6


class VadProfile(msgspec.Struct, frozen=True):
    """Tuning for one acoustic situation.

    ``aggressiveness`` is webrtcvad's mode (0-3, higher rejects more non-speech);
    ``start_ms`` the voiced run that declares speech; ``hangover_ms`` the silence that ends
    it; ``gate_dbfs`` the frame level (RMS, dB full scale) below which a frame is never voice.
    """

    aggressiveness: Literal[0, 1, 2, 3]
    start_ms: int
    hangover_ms: int
    gate_dbfs: float


PROFILES: Final[dict[str, VadProfile]] = {
    "quiet": VadProfile(aggressiveness=1, start_ms=40, hangover_ms=300, gate_dbfs=-55.0),
    "normal": VadProfile(aggressiveness=2, start_ms=60, hangover_ms=400, gate_dbfs=-50.0),
    "noisy": VadProfile(aggressiveness=3, start_ms=100, hangover_ms=400, gate_dbfs=-45.0),
}


class SpeechStart(msgspec.Struct, frozen=True, gc=False, tag="speech_start"):
    """Speech began at ``at_ms``; the detector was sure at ``decided_ms`` (both audio ms)."""

    at_ms: float
    decided_ms: float

    @property
    def latency_ms(self) -> float:
        return self.decided_ms - self.at_ms


class SpeechEnd(msgspec.Struct, frozen=True, gc=False, tag="speech_end"):
    """Speech ended at ``at_ms``; the detector was sure at ``decided_ms`` (both audio ms)."""

    at_ms: float
    decided_ms: float

    @property
    def latency_ms(self) -> float:
        return self.decided_ms - self.at_ms


VadEvent = SpeechStart | SpeechEnd

# webrtcvad's own 32/48 kHz paths cost ~10-20 us per 10 ms frame, so 24 and 48 kHz are
# converted to 16 kHz here. Not to 8 kHz, though webrtcvad classifies 8 kHz in the end: its
# own 16 -> 8 kHz half-band filter is part of what its model (and our profiles) were tuned
# on, and a sharper 4 kHz cutoff measurably changes decisions (it split "confirm" in two).
_VAD_RATE: Final = {8000: 8000, 16000: 16000, 24000: 16000, 48000: 16000}

# The converter's anti-alias filter: a Kaiser-windowed sinc, -6 dB at 7 kHz, 2 ms long.
# Its output is only classified, never heard, so it needs the live path's flat passband only
# where webrtcvad looks (to 4 kHz after its own halving) and only enough rejection that
# 8-12 kHz content folding onto 4-8 kHz stays small there; not the live path's 60 dB.
_FIR_MS: Final = 2.0
_FIR_CUTOFF_HZ: Final = 7000.0
_FIR_BETA: Final = 5.0
# Taps are multiples of 2**-15 and each output's taps sum to exactly 1: every product with
# an int16 sample and every partial sum of a window (< 2**36 units of 2**-15) is exact in
# float64, so an output does not depend on how BLAS orders its sum, nor therefore on how the
# stream was chunked.
_FIR_BITS: Final = 15
_I16: Final = np.dtype("<i2")
_I16_MIN: Final = np.float64(-32768)
_I16_MAX: Final = np.float64(32767)


def _sum_squares(frames: np.ndarray) -> np.ndarray:
    """Sum of squares of each row of a float64 matrix."""
    if _vecdot is not None:
        return _vecdot(frames, frames)
    return np.einsum("ij,ij->i", frames, frames)


_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0; twice as fast as einsum here


def _design(src_rate: int, dst_rate: int) -> tuple[int, int, np.ndarray, float]:
    """Return ``(L, M, kernel, delay_ms)`` for converting ``src_rate`` down to ``dst_rate``.

    The prototype low-pass runs at ``L * src_rate``. Outputs come in blocks of ``L``; block
    ``b`` reads the input window that starts ``M * b`` samples into the buffer (history of
    ``H`` samples, then the stream) and is ``H + M`` wide, and its output ``r`` is that
    window dotted with ``kernel[:, r]``. Output ``j`` thus sits at input position
    ``j * M / L`` and carries the content of ``delay_ms`` earlier.
    """
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    fs_up = src_rate * up
    # Odd, so the delay is a whole number of prototype samples: 1 ms at 48 kHz (exact
    # in binary, so shifted times stay as exact as the caller's).
    n = round(fs_up * _FIR_MS / 1000) | 1
    t = np.arange(n) - (n - 1) / 2
    c = _FIR_CUTOFF_HZ / fs_up
    proto = 2 * c * np.sinc(2 * c * t) * np.kaiser(n, _FIR_BETA)
    hist = -(-n // up)
    kernel = np.zeros((hist + down, up))
    for r in range(up):
        for w in range(hist + down):
            k = up * (hist - w) + down * r  # prototype tap that meets window sample w
            if 0 <= k < n:
                kernel[w, r] = proto[k]
    units = np.rint(kernel / kernel.sum(axis=0) * 2**_FIR_BITS)
    peak = np.abs(units).argmax(axis=0)
    units[peak, range(up)] += 2**_FIR_BITS - units.sum(axis=0)  # unity DC gain, exactly
    kernel = units / 2**_FIR_BITS
    kernel.flags.writeable = False
    return up, down, kernel, (n - 1) / 2 / fs_up * 1000


class _Decimator:
    """Streaming low-pass and rate reduction of int16 samples, for classification only.

    Output ``j`` is on the output rate's grid aligned with the input (silence before the
    last :meth:`reset`) and carries the content of :attr:`delay_ms` earlier. Values are
    floats in int16 range, not rounded. Each call returns every output whose window has
    fully arrived (at most ``M - 1`` input samples, 0.13 ms, are held back).
    """

    __slots__ = ("_down", "_history", "_kernel", "_up", "delay_ms")

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self._up, self._down, self._kernel, self.delay_ms = _design(src_rate, dst_rate)
        self.reset()

    def reset(self) -> None:
        self._history = np.zeros(len(self._kernel) - self._down)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Take int16 ``samples`` (any length); return the float64 outputs now due."""
        kernel, down = self._kernel, self._down
        ext = np.concatenate((self._history, samples))
        blocks = max(0, (len(ext) - len(kernel)) // down + 1)
        self._history = ext[blocks * down :]
        step = ext.strides[0]
        # Overlapping windows as a view; np.dot makes the one contiguous copy BLAS needs.
        windows = np.ndarray((blocks, len(kernel)), ext.dtype, ext, strides=(down * step, step))
        out = np.dot(windows, kernel).ravel()
        # The filter overshoots full-scale input by up to sum(|taps|) - 1 (~60 %).
        np.minimum(out, _I16_MAX, out=out)
        np.maximum(out, _I16_MIN, out=out)
        return out


class LocalVAD:
    """Streaming speech start/end detector for PCM16 mono at 8, 16, 24 or 48 kHz.

    ``profile`` is a name in :data:`PROFILES` or a :class:`VadProfile`. Unknown profiles
    and rates raise :class:`AudioError`.
    """

    __slots__ = (
        "_buf",
        "_buf_start_ms",
        "_fill",
        "_flag_end_ms",
        "_flag_run",
        "_gate",
        "_last_flag_run",
        "_decimator",
        "_next_ms",
        "_run",
        "_run_start_ms",
        "_shift_ms",
        "_speech_start_ms",
        "_vad",
        "_vad_rate",
        "_voiced_end_ms",
        "profile",
        "rate",
        "speaking",
    )

    def __init__(self, profile: str | VadProfile = "normal", rate: int = 24000) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise AudioError(
                    f"unknown VAD profile {profile!r}; expected one of {list(PROFILES)}"
                )
            profile = PROFILES[profile]
        if rate not in _VAD_RATE:
            raise AudioError(f"LocalVAD takes 8000, 16000, 24000 or 48000 Hz; got {rate!r}")
        self.profile = profile
        self.rate = rate
        vad_rate = self._vad_rate = _VAD_RATE[rate]
        self._vad = webrtcvad.Vad(profile.aggressiveness)
        self._decimator = _Decimator(rate, vad_rate) if vad_rate != rate else None
        # Content leaves the decimator this late; every reported time is moved back by it.
        self._shift_ms = self._decimator.delay_ms if self._decimator is not None else 0.0
        frame = vad_rate * _FRAME_MS // 1000
        self._buf = np.zeros(frame)
        # Compare sums of squares, not dB: one multiply per frame instead of a log.
        self._gate = frame * (32768.0 * 10 ** (profile.gate_dbfs / 20)) ** 2
        self._next_ms: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the stream and any speech in progress (no event is emitted)."""
        self.speaking = False
        self._fill = 0
        self._buf_start_ms = 0.0
        self._next_ms = None
        self._run = 0  # consecutive voiced frames
        self._run_start_ms = 0.0
        self._flag_run = 0  # consecutive frames webrtcvad flagged, gate or not
        self._last_flag_run = 0  # length of the latest such run, kept after it ends
        self._flag_end_ms = -math.inf
        self._voiced_end_ms = -math.inf
        self._speech_start_ms = 0.0
        if self._decimator is not None:
            self._decimator.reset()

    def process(self, pcm16: bytes, at_ms: float) -> list[VadEvent]:
        """Feed the next chunk, whose first sample is at stream time ``at_ms``; return the
        events decided within it, in order.

        Chunks may be any length (empty is a no-op). If ``at_ms`` is not where the previous
        chunk ended (more than 1 ms off: a gap or an overlap), the partial frame is dropped
        and the clock re-anchored; speech in progress stays in progress. An odd byte length
        raises :class:`AudioError` and changes nothing.
        """
        check_pcm16(pcm16)
        if not pcm16:
            return []
        if self._next_ms is None or abs(at_ms - self._next_ms) > 1.0:
            self._fill = 0
            self._buf_start_ms = at_ms
            if self._decimator is not None:
                self._decimator.reset()
        samples: np.ndarray = np.frombuffer(pcm16, _I16)
        self._next_ms = at_ms + len(samples) * 1000 / self.rate
        if self._decimator is not None:
            samples = self._decimator.process(samples)  # float64 from here on
        if self._fill:
            samples = np.concatenate((self._buf[: self._fill], samples))
        frame = len(self._buf)
        whole = len(samples) // frame
        self._fill = len(samples) - whole * frame
        self._buf[: self._fill] = samples[whole * frame :]
        events: list[VadEvent] = []
        if whole == 0:
            return events
        # Levels of all the chunk's frames in one vectorised pass; webrtcvad then reads
        # each frame straight out of one bytes object.
        frames = samples[: whole * frame].reshape(whole, frame)
        if frames.dtype == _I16:
            pcm, frames = frames, frames.astype(np.float64)
        else:
            pcm = frames.astype(_I16)  # truncates; within int16 range already
        levels = _sum_squares(frames)
        raw = pcm.tobytes()
        size = frame * 2
        vad, vad_rate, gate = self._vad, self._vad_rate, self._gate
        for k in range(whole):
            start = self._buf_start_ms - self._shift_ms
            self._buf_start_ms += _FRAME_MS
            flagged = vad.is_speech(raw[k * size : (k + 1) * size], vad_rate)
            self._frame(flagged, levels[k] >= gate, start, events)
        return events

    def finish(self) -> list[VadEvent]:
        """End of stream: if speech is in progress, end it now; then :meth:`reset`."""
        events: list[VadEvent] = []
        if self.speaking:
            end = self._buf_start_ms - self._shift_ms
            events.append(SpeechEnd(at_ms=self._offset_ms(), decided_ms=end))
        self.reset()
        return events

    def _frame(self, flagged: bool, loud: bool, start_ms: float, events: list[VadEvent]) -> None:
        end_ms = start_ms + _FRAME_MS
        if flagged:
            self._flag_run += 1
            self._last_flag_run = self._flag_run
            self._flag_end_ms = end_ms
        else:
            self._flag_run = 0
        if not (flagged and loud):
            self._run = 0
            if self.speaking and end_ms - self._voiced_end_ms >= self.profile.hangover_ms:
                self.speaking = False
                events.append(SpeechEnd(at_ms=self._offset_ms(), decided_ms=end_ms))
            return
        if self._run == 0:
            self._run_start_ms = start_ms
        self._run += 1
        self._voiced_end_ms = end_ms
        if not self.speaking and self._run * _FRAME_MS >= self.profile.start_ms:
            self.speaking = True
            self._speech_start_ms = self._run_start_ms
            events.append(SpeechStart(at_ms=self._run_start_ms, decided_ms=end_ms))

    def _offset_ms(self) -> float:
        mode = self.profile.aggressiveness
        # webrtcvad applies the long overhang after more than 6 speech frames; a flagged run
        # longer than 6 frames plus the short overhang can only have come from such a run.
        long_run = self._last_flag_run > _LONG_RUN + _OVERHANG_SHORT[mode]
        overhang = (_OVERHANG_LONG if long_run else _OVERHANG_SHORT)[mode] * _FRAME_MS
        end = min(self._voiced_end_ms, self._flag_end_ms - overhang)
        return max(end, self._speech_start_ms)
