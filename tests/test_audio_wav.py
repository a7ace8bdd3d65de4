"""WAV reading (PCM16, stereo, G.711 format 6/7, malformed files) and writing."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from voiceactors.audio import (
    PCM16_24K,
    PCMU_8K,
    AudioError,
    Format,
    parse_wav,
    read_wav,
    ulaw_to_pcm16,
    wav_bytes,
    write_wav,
)

FIXTURES = Path(__file__).parent / "fixtures" / "audio"


def riff(fmt_body: bytes, data: bytes, extra: bytes = b"") -> bytes:
    chunks = extra + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
    chunks += b"data" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def fmt_chunk(tag: int, channels: int, rate: int, bits: int) -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)


def test_fixture_ulaw_format_7_matches_the_pcm_version() -> None:
    fmt, data = read_wav(FIXTURES / "order_8k_ulaw.wav")
    assert fmt == PCMU_8K
    assert len(data) == 54215  # odd, so the file has a pad byte that must not be read
    pcm = np.frombuffer(ulaw_to_pcm16(data), "<i2").astype(float)
    fmt16, ref = read_wav(FIXTURES / "order_16k.wav")
    assert fmt16 == Format("pcm16", 16000)
    ref8 = np.frombuffer(ref, "<i2")[::2].astype(float)  # crude, only for a level check
    assert abs(np.std(pcm) / np.std(ref8) - 1) < 0.1


def test_pcm_fixture_agrees_with_stdlib_wave() -> None:
    path = FIXTURES / "order_24k.wav"
    fmt, data = read_wav(path)
    with wave.open(str(path)) as w:
        assert fmt == Format("pcm16", w.getframerate())
        assert data == w.readframes(w.getnframes())


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    x = (np.random.default_rng(0).standard_normal(999) * 3000).astype("<i2").tobytes()
    write_wav(tmp_path / "a.wav", PCM16_24K, x)
    assert read_wav(tmp_path / "a.wav") == (PCM16_24K, x)
    with wave.open(str(tmp_path / "a.wav")) as w:  # and the stdlib agrees it is a WAV
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.readframes(999) == x


def test_writing_g711_writes_pcm16() -> None:
    fmt, data = parse_wav(wav_bytes(PCMU_8K, b"\x00\xff"))
    assert fmt == Format("pcm16", 8000)
    assert data == ulaw_to_pcm16(b"\x00\xff")


@pytest.mark.parametrize(("tag", "enc"), [(6, "pcma"), (7, "pcmu")])
def test_g711_mono_is_returned_as_stored(tag: int, enc: str) -> None:
    fmt, data = parse_wav(riff(fmt_chunk(tag, 1, 8000, 8) + b"\x00\x00", b"\x01\x02\x03"))
    assert fmt == Format(enc, 8000)  # type: ignore[arg-type]
    assert data == b"\x01\x02\x03"


def test_stereo_pcm_is_mixed_to_mono() -> None:
    frames = np.array([[100, 300], [-100, -301], [32767, 32767], [-32768, -32768]], "<i2")
    fmt, data = parse_wav(riff(fmt_chunk(1, 2, 16000, 16), frames.tobytes()))
    assert fmt == Format("pcm16", 16000)
    assert np.frombuffer(data, "<i2").tolist() == [200, -201, 32767, -32768]


def test_stereo_ulaw_is_decoded_and_mixed() -> None:
    fmt, data = parse_wav(riff(fmt_chunk(7, 2, 8000, 8), b"\x80\xff"))  # 32124 and 0
    assert fmt == Format("pcm16", 8000)
    assert np.frombuffer(data, "<i2").tolist() == [16062]


def test_extensible_pcm_and_unknown_chunks_are_handled() -> None:
    ext = fmt_chunk(0xFFFE, 1, 24000, 16) + struct.pack("<HHI", 22, 16, 4)
    ext += struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    blob = riff(ext, b"\x01\x00\x02\x00", extra=b"LIST" + struct.pack("<I", 3) + b"abc\x00")
    assert parse_wav(blob) == (PCM16_24K, b"\x01\x00\x02\x00")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "not a WAV"),
        (b"RIFX" + bytes(40), "not a WAV"),
        (riff(fmt_chunk(3, 1, 24000, 32), bytes(8)), "format 3 \\(IEEE float\\)"),
        (riff(fmt_chunk(2, 1, 24000, 4), bytes(8)), "MS ADPCM"),
        (riff(fmt_chunk(1, 1, 24000, 24), bytes(6)), "24-bit PCM"),
        (riff(fmt_chunk(1, 1, 24000, 8), bytes(6)), "8-bit PCM"),
        (riff(fmt_chunk(1, 6, 48000, 16), bytes(12)), "channel count 6"),
        (riff(fmt_chunk(1, 1, 24000, 16), bytes(3)), "whole number of 2-byte"),
        (riff(fmt_chunk(1, 1, 24000, 16)[:14], bytes(4)), "at least 16"),
        (riff(fmt_chunk(1, 1, 50, 16), bytes(4)), "sample rate 50"),
        (b"RIFF\x00\x00\x00\x00WAVE" + b"data" + struct.pack("<I", 4) + bytes(4), "no fmt"),
        (
            b"RIFF\x00\x00\x00\x00WAVE"
            + b"fmt "
            + struct.pack("<I", 16)
            + fmt_chunk(1, 1, 8000, 16),
            "no data",
        ),
        (riff(fmt_chunk(1, 1, 24000, 16), bytes(8))[:-4], "declares 8 bytes but only 4"),
        (b"RIFF\x00\x00\x00\x00WAVE" + b"junk" + struct.pack("<I", 2**31), "declares 2147483648"),
        (
            b"RIFF\x00\x00\x00\x00WAVE" + (b"junk" + struct.pack("<I", 0)) * 100,
            "more than 64 chunks",
        ),
    ],
)
def test_unsupported_or_malformed(blob: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        parse_wav(blob)


def test_read_limits_size_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.wav"
    path.write_bytes(wav_bytes(PCM16_24K, bytes(4000)))
    with pytest.raises(AudioError, match="over the 1000-byte limit"):
        read_wav(path, max_bytes=1000)
    path.write_bytes(b"nope")
    with pytest.raises(AudioError, match="big.wav: not a WAV"):
        read_wav(path)


def test_write_rejects_bad_pcm(tmp_path: Path) -> None:
    with pytest.raises(AudioError):
        write_wav(tmp_path / "x.wav", PCM16_24K, b"\x00")
    assert not (tmp_path / "x.wav").exists()
