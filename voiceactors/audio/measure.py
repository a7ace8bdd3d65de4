"""Measure a streaming converter: added latency, alias/image rejection, passband ripple.

Used by ``tools/bench_resampler.py`` and the tests, so the figures the bench prints are the
quantities the tests bound. Everything here is offline and deterministic (seeded signals);
the converter under test is anything with ``process(bytes) -> bytes`` and
``flush() -> bytes`` on PCM16 (a :class:`~voiceactors.audio.Converter`, a
:class:`~voiceactors.audio.SoxrConverter`).

Added latency = hold-back + phase delay:

- **hold-back**: the converter is fed in fixed chunks; after each one, the audio it has
  returned is compared in duration with the audio it was given. soxr's streaming mode
  shows up here, and its deficit saws up and down with its internal block size, so both the
  steady-state mean and the worst case are reported (the worst is how far a player fed by
  it must lag never to run dry).
- **phase delay**: where the content sits in the output stream relative to an ideal
  zero-delay band-limited resampling (FFT) of the same band-limited noise, found by
  cross-correlation with parabolic interpolation of the peak (a causal FIR shows up here).

An ideal converter scores 0 on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec
import numpy as np

__all__ = [
    "ConverterLike",
    "Latency",
    "added_latency_ms",
    "alias_rejection_db",
    "passband_ripple_db",
]


class ConverterLike(Protocol):
    def process(self, chunk: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


Factory = Callable[[], ConverterLike]


def _stream(conv: ConverterLike, x: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    """Feed ``x`` in chunks; return the output (without flush) and its length after each."""
    parts: list[bytes] = []
    lengths: list[int] = []
    total = 0
    for i in range(0, len(x), chunk):
        out = conv.process(x[i : i + chunk].tobytes())
        parts.append(out)
        total += len(out) // 2
        lengths.append(total)
    return np.frombuffer(b"".join(parts), "<i2").astype(np.float64), lengths


def _noise(rate: int, band_hz: float, seconds: float, seed: int) -> np.ndarray:
    """Band-limited white noise (float, -12 dBFS RMS) with 100 ms of silence either side."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[np.fft.rfftfreq(n, 1 / rate) > band_hz] = 0
    body = np.fft.irfft(spec, n)
    body *= 0.25 * 32768 / body.std()
    # Taper the ends so the burst itself stays band-limited.
    ramp = int(0.01 * rate)
    fade = np.hanning(2 * ramp)
    body[:ramp] *= fade[:ramp]
    body[-ramp:] *= fade[ramp:]
    pad = np.zeros(rate // 10)
    return np.concatenate((pad, body, pad))


def _ideal_resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    n_out = len(x) * dst_rate // src_rate
    spec = np.fft.rfft(x)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, complex)
    out[:keep] = spec[:keep]
    return np.fft.irfft(out, n_out) * (n_out / len(x))


def _lag(y: np.ndarray, ref: np.ndarray) -> float:
    """Lag (in samples, fractional) of ``y`` behind ``ref`` by FFT cross-correlation."""
    n = len(y) + len(ref)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(ref, size)), size)
    corr = np.roll(corr, len(ref))[:n]  # index len(ref) is lag 0
    k = int(np.argmax(corr))
    if 0 < k < len(corr) - 1:
        a, b, c = corr[k - 1], corr[k], corr[k + 1]
        denom = a - 2 * b + c
        frac = 0.5 * (a - c) / denom if denom else 0.0
    else:
        frac = 0.0
    return k + frac - len(ref)


class Latency(msgspec.Struct, frozen=True):
    """What a converter adds to the audio's delay, in ms (see the module docstring)."""

    hold_back_mean_ms: float  # mean deficit over the second half of the stream
    hold_back_max_ms: float  # worst deficit at any chunk boundary
    phase_ms: float

    @property
    def added_ms(self) -> float:
        """Typical added latency: mean hold-back + phase delay."""
        return self.hold_back_mean_ms + self.phase_ms

    @property
    def worst_ms(self) -> float:
        """Latency a jitter-free player must allow: worst hold-back + phase delay."""
        return self.hold_back_max_ms + self.phase_ms


def added_latency_ms(
    make: Factory, src_rate: int, dst_rate: int, *, chunk_ms: float = 20, seed: int = 1
) -> Latency:
    """Measure a fresh converter from ``make()`` fed 2 s of band-limited noise (band 0.3 x the
    lower rate, inside every passband) in ``chunk_ms`` chunks."""
    band = 0.3 * min(src_rate, dst_rate)
    x = np.rint(_noise(src_rate, band, 2.0, seed))
    chunk = int(src_rate * chunk_ms / 1000)
    y, lengths = _stream(make(), x.astype("<i2"), chunk)
    fed = np.minimum(np.arange(1, len(lengths) + 1) * chunk, len(x)) / src_rate
    deficit = np.maximum(fed - np.asarray(lengths) / dst_rate, 0.0) * 1000
    ref = _ideal_resample(x, src_rate, dst_rate)
    return Latency(
        hold_back_mean_ms=float(deficit[len(deficit) // 2 :].mean()),
        hold_back_max_ms=float(deficit.max()),
        phase_ms=_lag(y, ref) / dst_rate * 1000,
    )


def _tone(rate: int, freq: float, seconds: float, amplitude: float = 16384.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t))


def _fit_power(y: np.ndarray, rate: int, freq: float) -> tuple[float, float]:
    """Least-squares fit of a sinusoid at ``freq``: (its power, power of the rest)."""
    t = np.arange(len(y)) / rate
    basis = np.stack((np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)))
    coef, *_ = np.linalg.lstsq(basis.T, y, rcond=None)
    fitted = coef[:2] @ basis[:2]
    return float(np.mean(fitted**2)), float(np.mean((y - coef @ basis) ** 2))


def _steady_output(make: Factory, x: np.ndarray, src_rate: int, chunk_ms: float) -> np.ndarray:
    y, _ = _stream(make(), x.astype("<i2"), int(src_rate * chunk_ms / 1000))
    skip = len(y) // 5  # start-up transient and any hold-back
    return y[skip : len(y) - skip]


def alias_rejection_db(
    make: Factory,
    src_rate: int,
    dst_rate: int,
    *,
    freqs: np.ndarray | None = None,
    chunk_ms: float = 20,
) -> tuple[float, float]:
    """Worst-case rejection (dB, positive = attenuation) of aliases or images, and the tone
    frequency where it occurs.

    Downsampling: full-scale/2 tones between the new Nyquist and the old one (by default 24
    of them); none belongs in the output, so the output power is the aliased product's.
    Upsampling: tones across the input band; after fitting out the tone itself, what is
    left is the images (plus the int16 rounding floor, about -92 dB).
    """
    if freqs is None:
        if dst_rate < src_rate:
            freqs = np.linspace(dst_rate / 2 + 20, src_rate / 2 - 20, 24)
        else:
            freqs = np.linspace(100, src_rate / 2 - 20, 24)
    worst, at = np.inf, 0.0
    for f in freqs:
        x = _tone(src_rate, float(f), 0.4)
        p_in = float(np.mean(x**2))
        y = _steady_output(make, x, src_rate, chunk_ms)
        if dst_rate < src_rate:
            p_out = float(np.mean(y**2))
        else:
            _, p_out = _fit_power(y, dst_rate, float(f))
        db = 10 * np.log10(p_in / max(p_out, 1e-12))
        if db < worst:
            worst, at = float(db), float(f)
    return worst, at


def passband_ripple_db(
    make: Factory, src_rate: int, dst_rate: int, *, upto: float = 0.4, chunk_ms: float = 20
) -> float:
    """Largest gain deviation (dB, absolute) for tones from 100 Hz to ``upto`` x the lower
    rate."""
    top = upto * min(src_rate, dst_rate)
    worst = 0.0
    for f in np.linspace(100, top, 16):
        x = _tone(src_rate, float(f), 0.4)
        y = _steady_output(make, x, src_rate, chunk_ms)
        p_tone, _ = _fit_power(y, dst_rate, float(f))
        worst = max(worst, abs(10 * np.log10(p_tone / np.mean(x**2))))
    return worst
