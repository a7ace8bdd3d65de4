"""The audio DSP layer: formats and G.711, streaming resampling, local VAD, WAV files.

Pure, synchronous building blocks that the capture, resampler and playback actors call once
per 20-40 ms frame. Nothing here awaits, reads a clock or keeps more than a frame or a
filter's length of audio.
"""

from .codecs import LIVE_RATES as LIVE_RATES
from .codecs import PCM16_16K as PCM16_16K
from .codecs import PCM16_24K as PCM16_24K
from .codecs import PCM16_48K as PCM16_48K
from .codecs import PCMA_8K as PCMA_8K
from .codecs import PCMU_8K as PCMU_8K
from .codecs import AudioError as AudioError
from .codecs import Encoding as Encoding
from .codecs import Format as Format
from .codecs import alaw_to_pcm16 as alaw_to_pcm16
from .codecs import check_pcm16 as check_pcm16
from .codecs import from_pcm16 as from_pcm16
from .codecs import pcm16_to_alaw as pcm16_to_alaw
from .codecs import pcm16_to_ulaw as pcm16_to_ulaw
from .codecs import to_pcm16 as to_pcm16
from .codecs import ulaw_to_pcm16 as ulaw_to_pcm16
from .resample import Converter as Converter
from .resample import PolyphaseResampler as PolyphaseResampler
from .resample import SoxrConverter as SoxrConverter
from .resample import convert_offline as convert_offline
from .vad import PROFILES as PROFILES
from .vad import LocalVAD as LocalVAD
from .vad import SpeechEnd as SpeechEnd
from .vad import SpeechStart as SpeechStart
from .vad import VadEvent as VadEvent
from .vad import VadProfile as VadProfile
from .wav import parse_wav as parse_wav
from .wav import read_wav as read_wav
from .wav import wav_bytes as wav_bytes
from .wav import write_wav as write_wav
