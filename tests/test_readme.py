"""The README's first two commands are the ones that work: CI runs the second verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None and text.index("```sh") < 200, "the commands must open the README"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands() -> None:
    run, test = _commands()[:2]
    assert "python -m voiceactors" in run and "pip install" in run
    assert "pytest" in test and "[test]" in test


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _commands()[1] in ci.splitlines()
