"""Energy-based server VAD on the audio timeline (sans-IO, pure).

The detector sees the session's input audio as int16 samples and reports speech start
and stop in milliseconds of that audio (from the session's first appended sample), never
wall-clock time, so a client sending faster than real time gets the same numbers.

Threshold mapping: the API's ``threshold`` (0..1, a model probability upstream) maps
linearly to a frame energy level ``level_dbfs = -60 + 40 * threshold`` (RMS relative to
full scale): 0 -> -60 dBFS (anything but digital silence), 0.5 -> -40 dBFS (default;
above a quiet room's -50, below soft speech at -35), 1 -> -20 dBFS (shouting only).

Frames are 20 ms. Speech starts after ``min_speech_ms`` (default 40 ms) of consecutive
loud frames; ``audio_start_ms`` is the first loud frame minus ``prefix_padding_ms``
(clamped at 0 and at the end of the previous turn). Speech stops once
``silence_duration_ms`` of consecutive quiet frames followed it; ``audio_end_ms`` is that
moment (last loud frame's end + silence), as upstream reports it. Accuracy is one frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EnergyVad", "SpeechStart", "SpeechStop", "threshold_to_dbfs"]

FRAME_MS = 20


def threshold_to_dbfs(threshold: float) -> float:
    """The frame energy (dBFS) a VAD ``threshold`` in [0, 1] stands for."""
    return -60.0 + 40.0 * threshold


@dataclass(frozen=True, slots=True)
class SpeechStart:
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStop:
    audio_end_ms: int


class EnergyVad:
    """Feed int16 samples with :meth:`feed`; get start/stop events in order.

    ``rate`` is the sample rate of what is fed. Changing settings mid-stream is done by
    building a new detector with ``position_ms`` carried over (:meth:`reconfigure`).
    """

    def __init__(
        self,
        rate: int,
        *,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 500,
        min_speech_ms: int = FRAME_MS * 2,
        position_ms: int = 0,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.rate = rate
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.min_speech_ms = max(FRAME_MS, min_speech_ms)
        self._frame = rate * FRAME_MS // 1000
        # Compare mean squares, not dB, per frame: cheaper and monotonic.
        self._level = (32768.0 * 10 ** (threshold_to_dbfs(threshold) / 20)) ** 2
        self._carry = np.zeros(0, dtype=np.int16)
        self.position_ms = position_ms  # end of the last whole frame seen
        self.speaking = False
        self._run_start = -1  # first loud frame of the current loud run, or -1
        self._last_loud_end = 0
        self._floor_ms = position_ms  # speech may not start before this (previous turn end)

    def reconfigure(self, **settings: float) -> EnergyVad:
        """A fresh detector with new settings that continues this one's timeline."""
        params = {
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "min_speech_ms": self.min_speech_ms,
        }
        params.update(settings)
        return EnergyVad(self.rate, position_ms=self.position_ms, **params)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forget any speech in progress (the buffer was cleared or committed by hand)."""
        self.speaking = False
        self._run_start = -1
        self._floor_ms = self.position_ms

    def feed(self, samples: np.ndarray) -> list[SpeechStart | SpeechStop]:
        """Consume samples; return the events whose moment lies within them."""
        if self._carry.size:
            samples = np.concatenate([self._carry, samples])
        n = samples.size // self._frame
        self._carry = samples[n * self._frame :].copy()
        if n == 0:
            return []
        frames = samples[: n * self._frame].astype(np.float64).reshape(n, self._frame)
        loud = (frames * frames).mean(axis=1) >= self._level
        out: list[SpeechStart | SpeechStop] = []
        for is_loud in loud.tolist():
            start = self.position_ms
            self.position_ms = end = start + FRAME_MS
            if is_loud:
                self._last_loud_end = end
                if self._run_start < 0:
                    self._run_start = start
                if not self.speaking and end - self._run_start >= self.min_speech_ms:
                    self.speaking = True
                    begin = max(self._floor_ms, self._run_start - self.prefix_padding_ms, 0)
                    out.append(SpeechStart(begin))
            else:
                self._run_start = -1
                if self.speaking and end - self._last_loud_end >= self.silence_duration_ms:
                    self.speaking = False
                    self._floor_ms = end
                    out.append(SpeechStop(end))
        return out
