"""Audio formats, PCM16 validation and G.711 (mu-law / A-law) codecs.

Every audio byte string inside voiceactors is one of a handful of formats: 16-bit signed
little-endian mono PCM at some rate, or 8-bit G.711 (``pcmu`` = mu-law, ``pcma`` = A-law),
which the Realtime API only carries at 8 kHz. :class:`Format` names one of them, parses the
API's format objects and the CLI's short strings, and converts between bytes and time.

The G.711 codecs are bit-exact with the ITU-T G.191 reference (``ulaw_compress`` /
``ulaw_expand`` / ``alaw_compress`` / ``alaw_expand`` in the STL's ``g711.c``): the tables
are built once, vectorised, at import, and every call is one numpy ``take`` (a 20 ms frame
costs a few microseconds). Encoding indexes a 65536-entry table by the raw sample, so there
is no per-sample branch at all. ``audioop`` is gone in Python 3.13 and is not used.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec
import numpy as np

__all__ = [
    "LIVE_RATES",
    "PCM16_16K",
    "PCM16_24K",
    "PCM16_48K",
    "PCMA_8K",
    "PCMU_8K",
    "AudioError",
    "Encoding",
    "Format",
    "alaw_to_pcm16",
    "check_pcm16",
    "from_pcm16",
    "pcm16_to_alaw",
    "pcm16_to_ulaw",
    "to_pcm16",
    "ulaw_to_pcm16",
]

Encoding = Literal["pcm16", "pcmu", "pcma"]

#: The rates the live path converts between (the Realtime API's 24 kHz and what clients use).
LIVE_RATES: Final = (8000, 16000, 24000, 48000)

# Rates a Format may carry at all (WAV files come at odd rates; only soxr converts those).
_MIN_RATE: Final = 1000
_MAX_RATE: Final = 384000

_PCM16: Final = np.dtype("<i2")


class AudioError(ValueError):
    """Audio bytes or a format description that cannot be used as given.

    The message says what was wrong (which format, which length, which field) so it can be
    passed to a client as-is. Whatever raised it changed no state.
    """


def check_pcm16(data: bytes | bytearray | memoryview, *, allow_empty: bool = True) -> None:
    """Check that ``data`` can be 16-bit PCM: a whole number of 2-byte samples.

    Raises :class:`AudioError` on an odd byte length (half a sample) and, when
    ``allow_empty`` is false, on empty data (the Realtime API rejects empty appends). The
    values themselves are not judged: clipping and DC offset are legal PCM.
    """
    n = len(data)
    if n & 1:
        raise AudioError(f"PCM16 audio must be a whole number of 2-byte samples; got {n} bytes")
    if n == 0 and not allow_empty:
        raise AudioError("PCM16 audio is empty")


class Format(msgspec.Struct, frozen=True):
    """One audio format: an encoding and a sample rate, always mono.

    Build one with :meth:`parse` (CLI strings such as ``"pcm16@16000"``, ``"16k"``,
    ``"pcmu"``) or :meth:`from_api` (the Realtime API's ``{"type": "audio/pcm", "rate":
    24000}``), or directly; constructing one directly does not validate, :meth:`validate`
    does and the two parsers call it. ``str(fmt)`` gives the canonical ``"pcm16@24000"``
    that :meth:`parse` reads back.
    """

    encoding: Encoding
    rate: int

    def validate(self) -> Format:
        """Return ``self`` if it is usable, else raise :class:`AudioError` saying why."""
        if self.encoding not in ("pcm16", "pcmu", "pcma"):
            raise AudioError(f"unknown audio encoding {self.encoding!r}")
        if type(self.rate) is not int or not _MIN_RATE <= self.rate <= _MAX_RATE:
            raise AudioError(f"sample rate must be an integer in [{_MIN_RATE}, {_MAX_RATE}] Hz")
        return self

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 for PCM16, 1 for G.711."""
        return 2 if self.encoding == "pcm16" else 1

    @property
    def bytes_per_ms(self) -> float:
        """Bytes per millisecond of audio (48.0 for pcm16@24000, 8.0 for pcmu@8000)."""
        return self.rate * self.sample_width / 1000

    def duration_ms(self, nbytes: int) -> float:
        """Duration in ms of ``nbytes`` of this format (whole samples; a trailing odd byte of
        PCM16 counts for nothing)."""
        return (nbytes // self.sample_width) * 1000 / self.rate

    def bytes_for_ms(self, ms: float) -> int:
        """The byte length of ``ms`` of audio, rounded down to whole samples."""
        return int(ms * self.rate / 1000) * self.sample_width

    def check(self, data: bytes | bytearray | memoryview, *, allow_empty: bool = True) -> None:
        """Check that ``data`` is whole samples of this format (see :func:`check_pcm16`)."""
        if self.encoding == "pcm16":
            check_pcm16(data, allow_empty=allow_empty)
        elif not data and not allow_empty:
            raise AudioError(f"{self.encoding} audio is empty")

    def to_api(self) -> dict[str, Any]:
        """The Realtime API format object (inverse of :meth:`from_api`)."""
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}

    @classmethod
    def from_api(cls, obj: Any) -> Format:
        """Parse a Realtime API audio format object.

        ``{"type": "audio/pcm", "rate": R}`` with ``R`` one of :data:`LIVE_RATES` (the API
        itself only takes 24000; the gateway also takes what the resampler can convert),
        ``{"type": "audio/pcmu"}`` and ``{"type": "audio/pcma"}`` (8 kHz; a ``rate`` other
        than 8000 is refused). Anything else (a non-dict, unknown type, missing or
        non-integer rate, unknown keys) raises :class:`AudioError`.
        """
        if not isinstance(obj, dict):
            raise AudioError(f"audio format must be an object; got {type(obj).__name__}")
        extra = set(obj) - {"type", "rate"}
        if extra:
            raise AudioError(f"unknown audio format field(s): {', '.join(sorted(map(str, extra)))}")
        kind = obj.get("type")
        rate = obj.get("rate")
        if kind == "audio/pcm":
            if rate is None:
                raise AudioError("audio/pcm needs a rate")
            if type(rate) is not int or rate not in LIVE_RATES:
                raise AudioError(f"audio/pcm rate must be one of {list(LIVE_RATES)}; got {rate!r}")
            return cls("pcm16", rate)
        if kind in ("audio/pcmu", "audio/pcma"):
            if rate is not None and (type(rate) is not int or rate != 8000):
                raise AudioError(f"{kind} is 8000 Hz only; got rate {rate!r}")
            return cls("pcmu" if kind == "audio/pcmu" else "pcma", 8000)
        raise AudioError(
            f"unknown audio format type {kind!r}; expected audio/pcm, audio/pcmu or audio/pcma"
        )

    @classmethod
    def parse(cls, text: str) -> Format:
        """Parse a short format string, as given on the command line.

        Accepted: ``pcm16@24000``, ``pcm16@24k``, ``pcm16`` (24 kHz), a bare rate ``16000``
        or ``16k`` (PCM16), ``pcmu``/``ulaw``/``mulaw`` and ``pcma``/``alaw`` (optionally
        ``@8000``/``@8k``). Case and surrounding spaces are ignored. Anything else raises
        :class:`AudioError` naming the accepted forms.
        """
        m = _FORMAT_RE.fullmatch(text.strip().lower())
        if m is None:
            raise AudioError(
                f"cannot parse audio format {text!r}; "
                "expected e.g. pcm16@24000, 16k, pcmu, pcma@8000"
            )
        name, rate_text = m.group("enc"), m.group("rate") or m.group("bare")
        encoding: Encoding = _ALIASES[name or "pcm16"]
        if rate_text is None:
            rate = 24000 if encoding == "pcm16" else 8000
        elif rate_text.endswith("k"):
            rate = round(float(rate_text[:-1]) * 1000)
        else:
            rate = int(rate_text)
        if encoding != "pcm16" and rate != 8000:
            raise AudioError(f"{encoding} is 8000 Hz only; got {text!r}")
        return cls(encoding, rate).validate()

    def __str__(self) -> str:
        return f"{self.encoding}@{self.rate}"


_ALIASES: Final[dict[str, Encoding]] = {
    "pcm16": "pcm16",
    "pcm": "pcm16",
    "pcmu": "pcmu",
    "ulaw": "pcmu",
    "mulaw": "pcmu",
    "pcma": "pcma",
    "alaw": "pcma",
}
_RATE_RE: Final = r"\d{4,6}|\d{1,3}(?:\.\d{1,3})?k"
_FORMAT_RE: Final = re.compile(
    rf"(?P<enc>pcm16|pcm|pcmu|ulaw|mulaw|pcma|alaw)(?:@(?P<rate>{_RATE_RE}))?|(?P<bare>{_RATE_RE})"
)

PCM16_24K: Final = Format("pcm16", 24000)
PCM16_16K: Final = Format("pcm16", 16000)
PCM16_48K: Final = Format("pcm16", 48000)
PCMU_8K: Final = Format("pcmu", 8000)
PCMA_8K: Final = Format("pcma", 8000)


# -- G.711 tables ------------------------------------------------------------------------
#
# Built from the G.191 reference formulas, vectorised over every input at once. The encoder
# tables are indexed by the sample's 16-bit pattern (``uint16`` view), so encoding is a
# single gather with no sign handling at run time.


def _ulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    code = np.arange(256, dtype=np.int32)
    inv = ~code
    exponent = (inv >> 4) & 7
    step = 4 << (exponent + 1)
    magnitude = (0x80 << exponent) + step * (inv & 0xF) + step // 2 - 4 * 33
    decode = np.where(code < 0x80, -magnitude, magnitude).astype(_PCM16)

    lin = np.arange(65536, dtype=np.int32)
    lin = np.where(lin >= 32768, lin - 65536, lin)  # table index i is the sample i as uint16
    absno = np.minimum(np.where(lin < 0, (~lin) >> 2, lin >> 2) + 33, 0x1FFF)
    # The G.191 loop counts how many times absno >> 6 can be halved: its bit length.
    segno = 1 + np.searchsorted(1 << np.arange(7), absno >> 6, side="right")
    nibbles = ((8 - segno) << 4) | (0xF - ((absno >> segno) & 0xF))
    encode = np.where(lin >= 0, nibbles | 0x80, nibbles).astype(np.uint8)
    return decode, encode


def _alaw_tables() -> tuple[np.ndarray, np.ndarray]:
    code = np.arange(256, dtype=np.int32)
    ix = (code ^ 0x55) & 0x7F
    iexp = ix >> 4
    mant = np.where(iexp > 0, (ix & 0xF) + 16, ix & 0xF)
    mant = ((mant << 4) + 8) << np.maximum(iexp - 1, 0)
    decode = np.where(code > 127, mant, -mant).astype(_PCM16)

    lin = np.arange(65536, dtype=np.int32)
    lin = np.where(lin >= 32768, lin - 65536, lin)
    mag = np.where(lin < 0, (~lin) >> 4, lin >> 4)  # 0..2047, ones' complement for negatives
    # Segment 0 and 1 share the step 1; above, each segment doubles the magnitude range.
    seg = np.searchsorted(np.array([16, 32, 64, 128, 256, 512, 1024]), mag, side="right")
    shift = np.maximum(seg - 1, 0)
    body = np.where(seg == 0, mag, (seg << 4) + ((mag >> shift) - 16))
    encode = (np.where(lin >= 0, body | 0x80, body) ^ 0x55).astype(np.uint8)
    return decode, encode


_ULAW_DECODE, _ULAW_ENCODE = _ulaw_tables()
_ALAW_DECODE, _ALAW_ENCODE = _alaw_tables()
for _table in (_ULAW_DECODE, _ULAW_ENCODE, _ALAW_DECODE, _ALAW_ENCODE):
    _table.flags.writeable = False


def ulaw_to_pcm16(data: bytes | bytearray | memoryview) -> bytes:
    """Decode G.711 mu-law bytes to PCM16 (twice as long). Every byte is a valid code."""
    return _ULAW_DECODE.take(np.frombuffer(data, np.uint8)).tobytes()


def alaw_to_pcm16(data: bytes | bytearray | memoryview) -> bytes:
    """Decode G.711 A-law bytes to PCM16 (twice as long). Every byte is a valid code."""
    return _ALAW_DECODE.take(np.frombuffer(data, np.uint8)).tobytes()


def pcm16_to_ulaw(pcm16: bytes | bytearray | memoryview) -> bytes:
    """Encode PCM16 to G.711 mu-law (half as long). Raises :class:`AudioError` on an odd
    byte length."""
    check_pcm16(pcm16)
    return _ULAW_ENCODE.take(np.frombuffer(pcm16, "<u2")).tobytes()


def pcm16_to_alaw(pcm16: bytes | bytearray | memoryview) -> bytes:
    """Encode PCM16 to G.711 A-law (half as long). Raises :class:`AudioError` on an odd
    byte length."""
    check_pcm16(pcm16)
    return _ALAW_ENCODE.take(np.frombuffer(pcm16, "<u2")).tobytes()


def to_pcm16(data: bytes | bytearray | memoryview, encoding: Encoding) -> bytes:
    """Decode ``data`` of ``encoding`` to PCM16. PCM16 input is checked and returned as
    ``bytes`` (the same object when it already is one)."""
    if encoding == "pcmu":
        return ulaw_to_pcm16(data)
    if encoding == "pcma":
        return alaw_to_pcm16(data)
    check_pcm16(data)
    return data if isinstance(data, bytes) else bytes(data)


def from_pcm16(pcm16: bytes | bytearray | memoryview, encoding: Encoding) -> bytes:
    """Encode PCM16 as ``encoding`` (the inverse of :func:`to_pcm16`)."""
    if encoding == "pcmu":
        return pcm16_to_ulaw(pcm16)
    if encoding == "pcma":
        return pcm16_to_alaw(pcm16)
    check_pcm16(pcm16)
    return pcm16 if isinstance(pcm16, bytes) else bytes(pcm16)
