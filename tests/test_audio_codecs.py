"""G.711 against a per-sample transcription of the ITU-T G.191 reference, PCM16 checks, Format.

The reference functions below are written the way ``g711.c`` in the ITU-T Software Tool
Library is: one sample at a time, with its loops and branches. The module under test builds
vectorised tables instead, so agreement over every input is a real cross-check.
"""

from __future__ import annotations

import numpy as np
import pytest

from voiceactors.audio import (
    PCM16_16K,
    PCM16_24K,
    PCMA_8K,
    PCMU_8K,
    AudioError,
    Format,
    alaw_to_pcm16,
    check_pcm16,
    from_pcm16,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    to_pcm16,
    ulaw_to_pcm16,
)


def ref_ulaw_compress(lin: int) -> int:
    absno = ((~lin) >> 2) + 33 if lin < 0 else (lin >> 2) + 33
    if absno > 0x1FFF:
        absno = 0x1FFF
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = 0x000F - ((absno >> segno) & 0x000F)
    out = (high_nibble << 4) | low_nibble
    if lin >= 0:
        out |= 0x0080
    return out


def ref_ulaw_expand(code: int) -> int:
    sign = -1 if code < 0x80 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x7
    segment = exponent + 1
    mantissa &= 0xF
    step = 4 << segment
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)


def ref_alaw_compress(lin: int) -> int:
    ix = (~lin) >> 4 if lin < 0 else lin >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if lin >= 0:
        ix |= 0x0080
    return ix ^ 0x0055


def ref_alaw_expand(code: int) -> int:
    ix = (code ^ 0x55) & 0x7F
    iexp = ix >> 4
    mant = ix & 0xF
    if iexp > 0:
        mant += 16
    mant = (mant << 4) + 0x8
    if iexp > 1:
        mant <<= iexp - 1
    return mant if code > 127 else -mant


ALL_CODES = bytes(range(256))
ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()


def test_ulaw_decode_all_codes_match_reference() -> None:
    got = np.frombuffer(ulaw_to_pcm16(ALL_CODES), "<i2").tolist()
    assert got == [ref_ulaw_expand(c) for c in range(256)]


def test_alaw_decode_all_codes_match_reference() -> None:
    got = np.frombuffer(alaw_to_pcm16(ALL_CODES), "<i2").tolist()
    assert got == [ref_alaw_expand(c) for c in range(256)]


def test_ulaw_encode_all_samples_match_reference() -> None:
    got = list(pcm16_to_ulaw(ALL_PCM))
    assert got == [ref_ulaw_compress(x) for x in range(-32768, 32768)]


def test_alaw_encode_all_samples_match_reference() -> None:
    got = list(pcm16_to_alaw(ALL_PCM))
    assert got == [ref_alaw_compress(x) for x in range(-32768, 32768)]


def test_known_g711_anchor_values() -> None:
    # Independent of both implementations: the classic table ends and silence codes.
    assert np.frombuffer(ulaw_to_pcm16(b"\x00\x7f\x80\xff"), "<i2").tolist() == [
        -32124,
        0,
        32124,
        0,
    ]
    assert np.frombuffer(alaw_to_pcm16(b"\x55\xd5\x2a\xaa"), "<i2").tolist() == [
        -8,
        8,
        -32256,
        32256,
    ]
    assert pcm16_to_ulaw(np.array([0], "<i2").tobytes()) == b"\xff"
    assert pcm16_to_alaw(np.array([0], "<i2").tobytes()) == b"\xd5"


def test_encode_of_decode_is_identity_except_ulaw_negative_zero() -> None:
    # Every A-law code survives a round trip; mu-law's 0x7f (negative zero) decodes to 0,
    # which encodes as 0xff (positive zero), the only code that does not.
    assert pcm16_to_alaw(alaw_to_pcm16(ALL_CODES)) == ALL_CODES
    back = pcm16_to_ulaw(ulaw_to_pcm16(ALL_CODES))
    diff = [c for c in range(256) if back[c] != c]
    assert diff == [0x7F] and back[0x7F] == 0xFF


def test_encoders_reject_odd_length_and_accept_buffers() -> None:
    with pytest.raises(AudioError, match="3 bytes"):
        pcm16_to_ulaw(b"\x00\x01\x02")
    with pytest.raises(AudioError, match="whole number of 2-byte samples"):
        pcm16_to_alaw(bytearray(5))
    assert pcm16_to_ulaw(memoryview(bytes(4))) == b"\xff\xff"
    assert pcm16_to_ulaw(b"") == b"" and ulaw_to_pcm16(b"") == b""


def test_check_pcm16() -> None:
    check_pcm16(b"")
    check_pcm16(b"\x00\x00")
    with pytest.raises(AudioError, match="got 1 bytes"):
        check_pcm16(b"\x00")
    with pytest.raises(AudioError, match="empty"):
        check_pcm16(b"", allow_empty=False)


def test_to_and_from_pcm16_dispatch() -> None:
    pcm = np.array([0, 1000, -1000], "<i2").tobytes()
    assert to_pcm16(pcm, "pcm16") is pcm
    assert from_pcm16(pcm, "pcmu") == pcm16_to_ulaw(pcm)
    assert to_pcm16(b"\xff", "pcmu") == b"\x00\x00"
    assert to_pcm16(b"\xd5", "pcma") == b"\x08\x00"
    with pytest.raises(AudioError):
        to_pcm16(b"\x00", "pcm16")


@pytest.mark.parametrize(
    ("obj", "fmt"),
    [
        ({"type": "audio/pcm", "rate": 24000}, PCM16_24K),
        ({"type": "audio/pcm", "rate": 16000}, PCM16_16K),
        ({"type": "audio/pcmu"}, PCMU_8K),
        ({"type": "audio/pcma"}, PCMA_8K),
        ({"type": "audio/pcma", "rate": 8000}, PCMA_8K),
    ],
)
def test_format_from_api(obj: dict[str, object], fmt: Format) -> None:
    assert Format.from_api(obj) == fmt
    assert Format.from_api(fmt.to_api()) == fmt


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("audio/pcm", "must be an object"),
        ({"type": "audio/pcm"}, "needs a rate"),
        ({"type": "audio/pcm", "rate": 22050}, "rate must be one of"),
        ({"type": "audio/pcm", "rate": 24000.0}, "rate must be one of"),
        ({"type": "audio/pcm", "rate": True}, "rate must be one of"),
        ({"type": "audio/pcmu", "rate": 16000}, "8000 Hz only"),
        ({"type": "audio/opus"}, "unknown audio format type"),
        ({"type": "audio/pcm", "rate": 24000, "channels": 2}, "unknown audio format field"),
    ],
)
def test_format_from_api_rejects(obj: object, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        Format.from_api(obj)


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("pcm16@24000", PCM16_24K),
        ("pcm16", PCM16_24K),
        ("PCM16@16k", PCM16_16K),
        (" 16000 ", PCM16_16K),
        ("48k", Format("pcm16", 48000)),
        ("22.05k", Format("pcm16", 22050)),
        ("pcmu", PCMU_8K),
        ("ulaw", PCMU_8K),
        ("pcma@8000", PCMA_8K),
        ("alaw@8k", PCMA_8K),
    ],
)
def test_format_parse(text: str, fmt: Format) -> None:
    assert Format.parse(text) == fmt
    assert Format.parse(str(fmt)) == fmt


@pytest.mark.parametrize("text", ["", "pcm16@", "pcmu@16000", "opus", "24", "pcm16@999999k", "@8k"])
def test_format_parse_rejects(text: str) -> None:
    with pytest.raises(AudioError):
        Format.parse(text)


def test_format_sizes_and_durations() -> None:
    assert PCM16_24K.bytes_per_ms == 48.0
    assert PCMU_8K.bytes_per_ms == 8.0
    assert PCM16_24K.bytes_for_ms(20) == 960
    assert PCM16_16K.bytes_for_ms(0.1) == 2  # rounded down to whole samples
    assert PCMU_8K.bytes_for_ms(20) == 160
    assert PCM16_24K.duration_ms(960) == 20.0
    assert PCM16_24K.duration_ms(961) == 20.0
    assert PCMA_8K.duration_ms(8) == 1.0
    with pytest.raises(AudioError):
        PCM16_24K.check(b"\x00")
    with pytest.raises(AudioError, match="pcmu audio is empty"):
        PCMU_8K.check(b"", allow_empty=False)
    PCMU_8K.check(b"\x00")
