"""Test rules (as trio-websocket's): loopback only; ``autojump_clock`` (MockClock with
``autojump_threshold=0``) whenever a timeout or backoff is involved; every real-socket test
under ``trio.fail_after``; no sleeping to wait for something. The leak check of
``voiceactors.testing.plugin`` runs after every Trio test."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio.testing

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def audio_dir() -> Path:
    return FIXTURES / "audio"

pytest_plugins = ["pytester"]
