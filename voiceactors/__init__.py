"""voiceactors: a Trio runtime for real-time voice agents on speech-to-speech models."""

__version__ = "0.1.0"
