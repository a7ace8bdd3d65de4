"""``python -m voiceactors``: the command line.

Each subcommand lives with its subsystem and offers ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them. Exit codes: 0 success, 1 the job
failed (a check found a difference, a session ended in error), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

#: subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "voiceactors.gateway.cli",
        "serve the browser page and client sessions (the default command)",
    ),
    "specs": ("voiceactors.cli", "print the state machines and (re)write their Mermaid diagrams"),
    "sim": ("voiceactors.sim.cli", "run the embedded Realtime API simulator"),
    "run": (
        "voiceactors.run.cli",
        "run one session from WAV files through the runtime and print a report",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m voiceactors",
        description="A Trio runtime for real-time voice agents on speech-to-speech models.",
    )
    parser.add_argument("--version", action="version", version=f"voiceactors {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        target = sys.modules[__name__] if module == __name__ else importlib.import_module(module)
        target.add_arguments(p)
        p.set_defaults(_run=target.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no subcommand: serve with every default
        args = parser.parse_args(["serve"])
    result: int = args._run(args)
    return result


# -- specs --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("specs"),
        help="directory for the <machine>.mmd diagrams (default: ./specs)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed diagram differs from its table",
    )


def run(args: argparse.Namespace) -> int:
    from .specs import MACHINE_NAMES, describe, load_machine, mermaid

    out: Path = args.out
    if not args.check:
        out.mkdir(parents=True, exist_ok=True)
    stale = []
    for name in MACHINE_NAMES:
        cls = load_machine(name)
        print(describe(cls), end="\n\n")
        path = out / f"{name}.mmd"
        text = mermaid(cls)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            print(f"{path}: up to date\n")
        elif args.check:
            stale.append(path)
            print(f"{path}: STALE\n")
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: written\n")
    if stale:
        print("stale diagrams: run `python -m voiceactors specs`", file=sys.stderr)
        return 1
    return 0
