"""The user's side of a ``run``: input WAV files read and converted to the client format,
cut into the 20 ms chunks the microphone sends, and the silence sent between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..audio.codecs import PCM16_24K, AudioError, Format
from ..audio.resample import convert_offline
from ..audio.vad import LocalVAD, SpeechStart
from ..audio.wav import read_wav

__all__ = ["CHUNK_MS", "ClientInput", "UsageError", "load_input", "silence"]

#: The microphone's chunk: one ``input_audio_buffer.append`` per 20 ms of audio.
CHUNK_MS: Final = 20


class UsageError(ValueError):
    """Bad arguments or input files: the CLI prints the message and exits with 2."""


@dataclass(frozen=True, slots=True)
class ClientInput:
    """One input WAV as the client sends it: ``audio`` in the client format ``fmt``,
    converted offline (soxr, time-aligned) and padded with silence to whole 20 ms chunks."""

    name: str
    fmt: Format
    audio: bytes

    @property
    def duration_ms(self) -> float:
        return self.fmt.duration_ms(len(self.audio))

    def chunks(self) -> list[bytes]:
        size = self.fmt.bytes_for_ms(CHUNK_MS)
        return [self.audio[i : i + size] for i in range(0, len(self.audio), size)]

    def onset_ms(self, vad_profile: str) -> float | None:
        """Where :class:`~voiceactors.audio.LocalVAD` with ``vad_profile`` first finds
        speech in this input (ms from its start, run offline over the audio as sent), or
        None if it finds none."""
        pcm = convert_offline(self.audio, self.fmt, PCM16_24K)
        vad = LocalVAD(vad_profile, 24000)
        step = PCM16_24K.bytes_for_ms(CHUNK_MS)
        for i in range(0, len(pcm), step):
            for event in vad.process(pcm[i : i + step], PCM16_24K.duration_ms(i)):
                if isinstance(event, SpeechStart):
                    return max(0.0, event.at_ms)
        return None


def load_input(path: str | os.PathLike[str], fmt: Format) -> ClientInput:
    """Read a WAV file (PCM16 at any rate, G.711; mono or stereo) as a :class:`ClientInput`.

    Raises :class:`UsageError` naming the file when it is missing, unreadable, not a WAV
    the audio layer reads, or empty.
    """
    name = os.fspath(path)
    try:
        src, data = read_wav(path)
        audio = convert_offline(data, src, fmt)
    except (OSError, AudioError) as e:
        text = str(e) if name in str(e) else f"{name}: {e}"
        raise UsageError(text) from None
    if not audio:
        raise UsageError(f"{name}: the file holds no audio")
    size = fmt.bytes_for_ms(CHUNK_MS)
    if len(audio) % size:
        audio += silence(fmt, size - len(audio) % size)
    return ClientInput(Path(name).name, fmt, audio)


def silence(fmt: Format, nbytes: int) -> bytes:
    """``nbytes`` (whole samples) of digital silence in ``fmt``: zero bytes for PCM16, the
    codes of zero for G.711 (which are not zero bytes)."""
    zeros = bytes(2 * (nbytes // fmt.sample_width))
    return convert_offline(zeros, Format("pcm16", fmt.rate), fmt)
