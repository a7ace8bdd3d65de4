"""Test helpers for voiceactors and for users' own tests (leak checks, the simulator)."""
