"""Read and write WAV files: PCM16 at any rate, G.711 mu-law/A-law (format 7/6), mono.

The stdlib ``wave`` module reads PCM only, so the RIFF chunks are parsed here, bounded: the
whole file is read once (up to ``max_bytes``), no declared length is trusted before it is
checked against the bytes actually present, and at most ``_MAX_CHUNKS`` chunks are walked.
Stereo is mixed down to mono (the mean of the two channels, rounded); G.711 stereo is
decoded to PCM16 first. Everything else (8/24/32-bit PCM, float, ADPCM, more than two
channels, a missing or malformed ``fmt `` or ``data`` chunk) raises :class:`AudioError`
saying what the file contains.
"""

from __future__ import annotations

import os
import struct
from typing import Final

import numpy as np

from .codecs import AudioError, Encoding, Format, to_pcm16

__all__ = ["parse_wav", "read_wav", "wav_bytes", "write_wav"]

_MAX_CHUNKS: Final = 64
_DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024  # about 90 minutes of 24 kHz PCM16

_PCM: Final = 1
_ALAW: Final = 6
_ULAW: Final = 7
_EXTENSIBLE: Final = 0xFFFE
_FORMAT_NAMES: Final = {
    1: "PCM",
    3: "IEEE float",
    2: "MS ADPCM",
    6: "A-law",
    7: "mu-law",
    17: "IMA ADPCM",
}
_ENCODINGS: Final[dict[int, Encoding]] = {_PCM: "pcm16", _ALAW: "pcma", _ULAW: "pcmu"}


def read_wav(
    path: str | os.PathLike[str], *, max_bytes: int = _DEFAULT_MAX_BYTES
) -> tuple[Format, bytes]:
    """Read a WAV file; see :func:`parse_wav`. A file over ``max_bytes`` raises
    :class:`AudioError` without being read; ``OSError`` propagates."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AudioError(f"{os.fspath(path)}: {size} bytes is over the {max_bytes}-byte limit")
        data = f.read(max_bytes + 1)
    try:
        return parse_wav(data)
    except AudioError as e:
        raise AudioError(f"{os.fspath(path)}: {e}") from None


def parse_wav(data: bytes) -> tuple[Format, bytes]:
    """Parse a whole WAV file held in memory into ``(format, audio bytes)``.

    Mono PCM16 and mono G.711 come back as stored (``pcm16@rate``, ``pcmu@rate``,
    ``pcma@rate``); stereo comes back as mono PCM16. A trailing partial sample frame is an
    error, not silently dropped. Raises :class:`AudioError` for anything unsupported or
    malformed.
    """
    view = memoryview(data)
    if len(view) < 12 or view[:4] != b"RIFF" or view[8:12] != b"WAVE":
        raise AudioError("not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int, int] | None = None
    audio: memoryview | None = None
    offset = 12
    for _ in range(_MAX_CHUNKS):
        if offset + 8 > len(view):
            break
        cid = bytes(view[offset : offset + 4])
        (size,) = struct.unpack_from("<I", view, offset + 4)
        body = offset + 8
        available = len(view) - body
        if cid == b"data":
            if size > available:
                raise AudioError(f"data chunk declares {size} bytes but only {available} follow")
            audio = view[body : body + size]
        elif size > available:
            raise AudioError(f"{cid!r} chunk declares {size} bytes but only {available} follow")
        elif cid == b"fmt ":
            fmt = _parse_fmt(view[body : body + size])
        if fmt is not None and audio is not None:
            break
        offset = body + size + (size & 1)  # chunks are padded to even length
    else:
        raise AudioError(f"more than {_MAX_CHUNKS} chunks before fmt and data")
    if fmt is None:
        raise AudioError("no fmt chunk")
    if audio is None:
        raise AudioError("no data chunk")
    tag, channels, rate, width, align = fmt
    if len(audio) % align:
        raise AudioError(
            f"data is {len(audio)} bytes, not a whole number of {align}-byte sample frames"
        )
    encoding = _ENCODINGS[tag]
    out_format = Format(encoding, rate).validate()
    if channels == 1:
        return out_format, bytes(audio)
    pcm = np.frombuffer(to_pcm16(bytes(audio), encoding), "<i2").reshape(-1, 2)
    # Mean of the two channels, rounded half away from zero like a careful mixer would;
    # the sum of two int16 fits int32.
    mixed = pcm.astype(np.int32).sum(axis=1)
    mono = (np.sign(mixed) * ((np.abs(mixed) + 1) // 2)).astype("<i2")
    return Format("pcm16", rate), mono.tobytes()


def _parse_fmt(body: memoryview) -> tuple[int, int, int, int, int]:
    if len(body) < 16:
        raise AudioError(f"fmt chunk is {len(body)} bytes; at least 16 needed")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _EXTENSIBLE:
        # WAVE_FORMAT_EXTENSIBLE: the real format is the first two bytes of the sub-format GUID.
        if len(body) < 40:
            raise AudioError("WAVE_FORMAT_EXTENSIBLE fmt chunk is too short")
        (tag,) = struct.unpack_from("<H", body, 24)
    if tag not in _ENCODINGS:
        name = _FORMAT_NAMES.get(tag, "unknown")
        raise AudioError(
            f"unsupported WAV format {tag} ({name}); expected PCM (1), A-law (6) or mu-law (7)"
        )
    want_bits = 16 if tag == _PCM else 8
    if bits != want_bits:
        raise AudioError(f"unsupported {bits}-bit {_FORMAT_NAMES[tag]}; expected {want_bits}-bit")
    if channels not in (1, 2):
        raise AudioError(f"unsupported channel count {channels}; expected 1 or 2")
    if align != channels * bits // 8:
        raise AudioError(f"block align {align} does not match {channels} x {bits}-bit samples")
    if not 1000 <= rate <= 384000:
        raise AudioError(f"unsupported sample rate {rate} Hz")
    return tag, channels, rate, bits, align


def wav_bytes(fmt: Format, data: bytes) -> bytes:
    """Return a mono PCM16 WAV file holding ``data`` of ``fmt`` (G.711 is decoded to PCM16).

    Raises :class:`AudioError` on a PCM16 odd length or audio too long for a WAV (4 GiB).
    """
    fmt.validate()
    pcm = to_pcm16(data, fmt.encoding)
    if len(pcm) > 0xFFFFFFFF - 36:
        raise AudioError("audio too long for a WAV file")
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        _PCM,
        1,
        fmt.rate,
        fmt.rate * 2,
        2,
        16,
        b"data",
        len(pcm),
    )
    return header + pcm


def write_wav(path: str | os.PathLike[str], fmt: Format, data: bytes) -> None:
    """Write :func:`wav_bytes` to ``path`` (replacing it). ``OSError`` propagates; a bad
    input raises :class:`AudioError` before the file is touched."""
    blob = wav_bytes(fmt, data)
    with open(path, "wb") as f:
        f.write(blob)
