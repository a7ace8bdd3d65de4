"""Audio helpers for the simulator: formats, G.711, WAV files, generated tones.

Everything here is pure (no I/O except ``read_wav``) and works on ``bytes`` of the wire
format or on numpy int16 arrays.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

__all__ = [
    "PCM24K",
    "WireFormat",
    "read_wav",
    "silence",
    "tone",
    "to_pcm16_24k",
    "from_pcm16_24k",
]


@dataclass(frozen=True, slots=True)
class WireFormat:
    """An audio format on the wire: ``audio/pcm`` (24 kHz, 2 bytes a sample) or G.711
    ``audio/pcmu``/``audio/pcma`` (8 kHz, 1 byte a sample)."""

    type: str
    rate: int
    width: int

    @classmethod
    def of(cls, type_: str) -> WireFormat:
        if type_ == "audio/pcm":
            return PCM24K
        if type_ in ("audio/pcmu", "audio/pcma"):
            return cls(type_, 8000, 1)
        raise ValueError(f"unknown audio format {type_!r}")

    def bytes_per_ms(self) -> float:
        return self.rate * self.width / 1000

    def ms(self, nbytes: int) -> float:
        """Duration of ``nbytes`` of this format, in milliseconds."""
        return nbytes / self.bytes_per_ms()

    def nbytes(self, ms: float) -> int:
        """Whole samples covering ``ms`` milliseconds, in bytes."""
        return int(ms * self.rate / 1000) * self.width

    def to_linear(self, data: bytes) -> np.ndarray:
        """int16 samples at ``self.rate`` (G.711 expanded)."""
        if self.type == "audio/pcm":
            return np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")
        table = _ULAW_DECODE if self.type == "audio/pcmu" else _ALAW_DECODE
        return table[np.frombuffer(data, dtype=np.uint8)]


PCM24K = WireFormat("audio/pcm", 24000, 2)


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exp = (u >> 4) & 0x07
    mant = u & 0x0F
    mag = ((mant << 3) + 0x84) << exp
    return np.where(sign, 0x84 - mag, mag - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exp = (a >> 4) & 0x07
    mant = a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    return np.where(sign, mag, -mag).astype(np.int16)


_ULAW_DECODE = _ulaw_table()
_ALAW_DECODE = _alaw_table()
# Encoding by nearest decoded value: exact inverse on the table, good enough for a test
# server (it only re-encodes its own replies).
_ULAW_ORDER = np.argsort(_ULAW_DECODE, kind="stable")
_ALAW_ORDER = np.argsort(_ALAW_DECODE, kind="stable")


def _g711_encode(samples: np.ndarray, decode: np.ndarray, order: np.ndarray) -> bytes:
    sorted_vals = decode[order].astype(np.int32)
    idx = np.searchsorted(sorted_vals, samples.astype(np.int32))
    idx = np.clip(idx, 1, len(sorted_vals) - 1)
    left = sorted_vals[idx - 1]
    right = sorted_vals[idx]
    pick = np.where(samples - left <= right - samples, idx - 1, idx)
    return order[pick].astype(np.uint8).tobytes()


def to_pcm16_24k(data: bytes, fmt: WireFormat) -> bytes:
    """Wire audio -> PCM16 LE 24 kHz bytes."""
    if fmt == PCM24K:
        return data[: len(data) - len(data) % 2]
    lin = fmt.to_linear(data)
    out = soxr.resample(lin, fmt.rate, 24000, quality="HQ")
    return np.asarray(out, dtype="<i2").tobytes()


def from_pcm16_24k(data: bytes, fmt: WireFormat) -> bytes:
    """PCM16 LE 24 kHz bytes -> wire audio in ``fmt``."""
    if fmt == PCM24K:
        return data
    lin = np.frombuffer(data, dtype="<i2")
    down = np.asarray(soxr.resample(lin, 24000, fmt.rate, quality="HQ"), dtype=np.int16)
    if fmt.type == "audio/pcmu":
        return _g711_encode(down, _ULAW_DECODE, _ULAW_ORDER)
    return _g711_encode(down, _ALAW_DECODE, _ALAW_ORDER)


def tone(ms: float, hz: float = 440.0, level_dbfs: float = -12.0) -> bytes:
    """A sine tone as PCM16 24 kHz, ``ms`` long (10 ms fades against clicks)."""
    n = int(ms * 24)
    t = np.arange(n) / 24000.0
    amp = 32767 * 10 ** (level_dbfs / 20)
    x = amp * np.sin(2 * np.pi * hz * t)
    fade = min(240, n // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]
    return x.astype("<i2").tobytes()


def silence(ms: float) -> bytes:
    """``ms`` of digital silence as PCM16 24 kHz."""
    return bytes(int(ms * 24) * 2)


def read_wav(path: Path) -> bytes:
    """A PCM16 mono WAV file as PCM16 24 kHz bytes (resampled if needed).

    Raises ValueError for anything else (stereo, 8/24/32-bit, compressed), naming the file.
    """
    try:
        with wave.open(str(path), "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(
                    f"{path}: need 16-bit mono PCM, got {w.getnchannels()} channel(s) of "
                    f"{8 * w.getsampwidth()} bits"
                )
            rate = w.getframerate()
            data = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None
    if rate == 24000:
        return data
    lin = np.frombuffer(data, dtype="<i2")
    return np.asarray(soxr.resample(lin, rate, 24000, quality="HQ"), dtype="<i2").tobytes()
