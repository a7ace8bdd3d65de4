"""Streaming format conversion: rate (8/16/24/48 kHz, both ways) and G.711 in one object.

Why our own filter on the live path
-----------------------------------
soxr is excellent offline, but its streaming mode holds audio back while it fills its
filter. Measured with ``tools/bench_resampler.py`` (20 ms chunks, hold-back averaged over
the steady state, one run on the 2-core box; soxr 1.1, numpy 2.4):

==========  =====================  ===================  =====================
quality     added latency, ms       alias rejection, dB  cost per chunk, us
==========  =====================  ===================  =====================
soxr HQ     20.7-21.4 (43 at 8 k)   86                   8-9
soxr MQ     21.2-21.3 (42 at 8 k)   86                   8-11
soxr LQ     10.0-11.4 (23 at 8 k)   86 (2.2 dB ripple)   5-11
soxr QQ     0.0-0.2                 -0.1 to 6.7          5-13
polyphase   0.83-2.50               67.4-68.5            16-28
==========  =====================  ===================  =====================

(worst-case hold-back is larger still: 37-38 ms at HQ, 20 ms at LQ). The live path may add
at most 3 ms with at least 60 dB of alias rejection; no soxr quality does both.

So the live path uses :class:`PolyphaseResampler`: a rational L/M polyphase FIR, linear
phase, Kaiser-windowed sinc, designed per rate pair for a 65 dB stopband that starts exactly
at the lower Nyquist frequency (so nothing aliases or images anywhere), a passband flat
within 0.01 dB to 0.4 x the lower rate, and a transition band of 0.1 x the lower rate. The
group delay is its only latency (no hold-back: each call returns every output sample whose
time has come): 0.83 ms for 24 <-> 48 k, 1.25 ms for 16 <-> 24 k, 2.5 ms for the 8 k pairs.
It costs about 2-3x soxr per chunk, ~16-28 us on a loaded box (a chunk is one numpy matrix
product over a strided view of the input). :func:`convert_offline` (whole files, e.g.
``run``'s WAV inputs) uses soxr HQ, which is delay-compensated and exact in length when it
sees all the input at once.

Streaming contract: the converter keeps the last few input samples (one filter length) and a
phase counter, so splitting a stream into chunks of any sizes gives the same output as one
call with the whole stream (to within 1 LSB from floating-point summation order). Memory is
constant; nothing grows with the stream.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Final, Literal

import numpy as np
import soxr

from .codecs import LIVE_RATES, AudioError, Format, check_pcm16, from_pcm16, to_pcm16

__all__ = [
    "Converter",
    "PolyphaseResampler",
    "SoxrConverter",
    "convert_offline",
]

# Filter design targets; see the module docstring for what they buy.
_STOPBAND_DB: Final = 65.0
_PASSBAND_FRACTION: Final = 0.4  # of the lower of the two rates

_I16: Final = np.dtype("<i2")

SoxrQuality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]


@lru_cache(maxsize=32)
def _design(src_rate: int, dst_rate: int) -> tuple[int, int, int, tuple[np.ndarray, ...], float]:
    """Return ``(L, M, K, kernels, delay)`` for src -> dst, shared and read-only.

    The prototype is a Kaiser-windowed sinc at ``L * src_rate``; ``K`` is the length of each
    of its ``L`` polyphase branches and ``delay`` its group delay in seconds.

    ``kernels[pos]`` serves a chunk whose first output sits at ``pos`` (0 <= pos < M) on
    the upsampled grid. Outputs come in blocks of ``L`` consecutive samples; block ``b``
    reads the input window starting at ``b * M`` (width ``K + M - 1``), and output ``i`` of
    the block is that window dotted with column ``i``: branch ``(pos + i*M) % L`` reversed
    (so the dot is a convolution), shifted by ``(pos + i*M) // L``. One matrix product per
    chunk then yields the outputs already interleaved.
    """
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    fs_up = src_rate * up
    low = min(src_rate, dst_rate)
    f_pass, f_stop = _PASSBAND_FRACTION * low, low / 2
    # Kaiser's estimates for the length and the window's beta given the attenuation and the
    # transition width (Oppenheim & Schafer, 7.6).
    width = 2 * math.pi * (f_stop - f_pass) / fs_up
    n = math.ceil((_STOPBAND_DB - 7.95) / (2.285 * width)) + 1
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    cutoff = (f_pass + f_stop) / 2 / fs_up
    t = np.arange(n) - (n - 1) / 2
    proto = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, beta)
    proto *= up / proto.sum()  # unity DC gain after zero-stuffing by `up`
    k = -(-n // up)
    padded = np.zeros(k * up)
    padded[:n] = proto
    branches = padded.reshape(k, up).T[:, ::-1]  # branch p, reversed: taps p + j*L
    kernels = []
    for pos in range(down):
        kernel = np.zeros((k + down - 1, up), np.float32)
        for i in range(up):
            shift, phase = divmod(pos + i * down, up)
            kernel[shift : shift + k, i] = branches[phase]
        kernel.flags.writeable = False
        kernels.append(kernel)
    return up, down, k, tuple(kernels), (n - 1) / 2 / fs_up


class PolyphaseResampler:
    """Low-delay streaming PCM16 rate converter between two of :data:`LIVE_RATES`.

    Works on int16 numpy arrays (:class:`Converter` wraps it for bytes and codecs). The
    output is causal: after ``process`` has seen ``n`` input samples it has returned every
    output sample up to the same instant, delayed only by the filter's group delay
    :attr:`delay_ms`. Raises :class:`AudioError` for a rate it was not designed for.
    """

    __slots__ = (
        "_down",
        "_history",
        "_kernels",
        "_pos",
        "_taps_len",
        "_up",
        "delay_ms",
        "dst_rate",
        "src_rate",
    )

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate not in LIVE_RATES or dst_rate not in LIVE_RATES or src_rate == dst_rate:
            raise AudioError(
                f"no live resampler from {src_rate} Hz to {dst_rate} Hz; "
                f"both must differ and be in {list(LIVE_RATES)}"
            )
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._up, self._down, self._taps_len, self._kernels, delay = _design(src_rate, dst_rate)
        self.delay_ms: float = delay * 1000
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next sample is treated as following silence."""
        self._history = np.zeros(self._taps_len - 1, np.float32)
        # Position of the next output sample on the upsampled grid, counted from the first
        # sample of the next input chunk; always in [0, M).
        self._pos = 0

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Convert the next ``samples`` (int16, any length, empty allowed) and return the
        int16 output now due (possibly empty). Values are rounded and clipped to int16."""
        n = len(samples)
        if n == 0:
            return np.empty(0, _I16)
        up, down, keep = self._up, self._down, len(self._history)
        pos = self._pos
        count = -(-(n * up - pos) // down) if pos < n * up else 0
        # History, the chunk, and `down` zeros so the last (partial) block can be read whole.
        ext = np.zeros(keep + n + down, np.float32)
        ext[:keep] = self._history
        ext[keep : keep + n] = samples
        self._history = ext[n : n + keep]
        self._pos = pos + count * down - n * up
        if count == 0:
            return np.empty(0, _I16)
        kernel = self._kernels[pos]
        blocks = -(-count // up)
        step = ext.strides[0]
        windows = np.ndarray(
            (blocks, kernel.shape[0]), np.float32, ext, strides=(down * step, step)
        )
        # Overlapping windows are a view, not a copy; np.dot makes the one copy BLAS needs.
        out = np.dot(windows, kernel).ravel()[:count]
        np.rint(out, out=out)
        np.minimum(out, 32767, out=out)
        np.maximum(out, -32768, out=out)
        return out.astype(_I16)

    def flush(self) -> np.ndarray:
        """Return the filter's tail (the last :attr:`delay_ms` of the stream's content, which
        a causal filter has not yet produced) and :meth:`reset`."""
        pad = math.ceil(self.delay_ms * self.src_rate / 1000)
        tail = self.process(np.zeros(pad, _I16))
        self.reset()
        return tail


class Converter:
    """Convert a stream of audio chunks from ``src`` to ``dst`` (rate and encoding).

    When ``src == dst`` it is a pass-through: :meth:`process` returns the very object it was
    given (no copy), after the length check. Otherwise G.711 is decoded to PCM16, the rate is
    changed with :class:`PolyphaseResampler` (added latency :attr:`latency_ms`, <= 2.5 ms)
    and the result encoded for ``dst``.

    Raises :class:`AudioError` at construction for rates outside :data:`LIVE_RATES`. Not
    thread-safe; one per stream. There is nothing to close.
    """

    __slots__ = ("_resampler", "dst", "passthrough", "src")

    def __init__(self, src: Format, dst: Format) -> None:
        src.validate()
        dst.validate()
        self.src = src
        self.dst = dst
        self.passthrough = src == dst
        self._resampler = PolyphaseResampler(src.rate, dst.rate) if src.rate != dst.rate else None

    @property
    def latency_ms(self) -> float:
        """The delay this converter adds to the audio (0 without a rate change)."""
        return self._resampler.delay_ms if self._resampler is not None else 0.0

    def process(self, chunk: bytes) -> bytes:
        """Convert the next chunk and return the output now due.

        Any length of whole samples is accepted, including empty (returns ``b""``). A PCM16
        source with an odd byte length raises :class:`AudioError` and changes nothing.
        """
        if self.passthrough:
            self.src.check(chunk)
            return chunk
        pcm = to_pcm16(chunk, self.src.encoding)
        if self._resampler is not None:
            pcm = self._resampler.process(np.frombuffer(pcm, _I16)).tobytes()
        return from_pcm16(pcm, self.dst.encoding)

    def flush(self) -> bytes:
        """Return the audio still inside the filter (a few ms) and start a fresh stream.

        Call at the end of a stream or before a discontinuity; the next :meth:`process`
        starts from silence.
        """
        if self._resampler is None:
            return b""
        return from_pcm16(self._resampler.flush().tobytes(), self.dst.encoding)

    def reset(self) -> None:
        """Drop the audio inside the filter without returning it."""
        if self._resampler is not None:
            self._resampler.reset()


class SoxrConverter:
    """soxr's streaming resampler behind the :class:`Converter` interface (PCM16 only).

    Kept for measurement (``tools/bench_resampler.py``) and for callers that can afford its
    hold-back; see the module docstring for why the live path does not use it.
    """

    __slots__ = ("_stream", "dst", "src")

    def __init__(self, src: Format, dst: Format, quality: SoxrQuality = "HQ") -> None:
        if src.encoding != "pcm16" or dst.encoding != "pcm16":
            raise AudioError("SoxrConverter converts PCM16 only")
        self.src = src.validate()
        self.dst = dst.validate()
        self._stream = soxr.ResampleStream(src.rate, dst.rate, 1, dtype="int16", quality=quality)

    def process(self, chunk: bytes) -> bytes:
        """Feed a chunk; return what soxr releases (it holds some back). Odd length raises
        :class:`AudioError`."""
        check_pcm16(chunk)
        return self._stream.resample_chunk(np.frombuffer(chunk, _I16)).tobytes()

    def flush(self) -> bytes:
        """Return everything soxr still holds and start a fresh stream."""
        tail = self._stream.resample_chunk(np.empty(0, _I16), last=True).tobytes()
        self._stream.clear()
        return tail


def convert_offline(data: bytes, src: Format, dst: Format, quality: SoxrQuality = "HQ") -> bytes:
    """Convert a whole recording at once (any rates, any of the encodings) with soxr.

    The output is time-aligned with the input (soxr compensates its delay when it sees the
    end) and ``round(n * dst.rate / src.rate)`` samples long. Bad lengths raise
    :class:`AudioError`.
    """
    src.validate()
    dst.validate()
    pcm = to_pcm16(data, src.encoding)
    if src.rate != dst.rate:
        samples = np.frombuffer(pcm, _I16)
        pcm = soxr.resample(samples, src.rate, dst.rate, quality=quality).astype(_I16).tobytes()
    return from_pcm16(pcm, dst.encoding)
