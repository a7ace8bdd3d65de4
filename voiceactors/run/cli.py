"""``python -m voiceactors run``: one session from WAV files, through the runtime's actors.

The command line of :mod:`voiceactors.run`: ``add_arguments``/``run`` for
``voiceactors.cli``, :func:`options_from_args` checking the arguments and reading the
inputs, and :func:`main` for running it on its own.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec
import trio
import trio.testing

from ..audio.codecs import PCM16_16K, PCM16_24K, PCM16_48K, PCMA_8K, PCMU_8K, Format
from .inputs import UsageError, load_input
from .report import format_report
from .session import RunOptions, run_session

__all__ = ["FORMATS", "add_arguments", "main", "options_from_args", "run"]

#: ``--format`` names and the client format each stands for.
FORMATS: Final[dict[str, Format]] = {
    "pcm24k": PCM16_24K,
    "pcm16k": PCM16_16K,
    "pcm48k": PCM16_48K,
    "pcmu": PCMU_8K,
    "pcma": PCMA_8K,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``run``'s options to ``parser``."""
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="WAV",
        help="user audio, one turn per file, in order (repeat; any rate, PCM16 or G.711)",
    )
    parser.add_argument(
        "--barge-in-at",
        type=float,
        metavar="MS",
        help="start the last input MS after the agent's previous answer starts playing",
    )
    parser.add_argument(
        "--upstream", default="sim", help="sim (default), openai, or a ws(s):// Realtime URL"
    )
    parser.add_argument(
        "--speed", type=float, metavar="X", help="run X times faster on a virtual clock (0-100]"
    )
    parser.add_argument("--output", type=Path, metavar="WAV", help="write what the client played")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--format", choices=list(FORMATS), default="pcm24k", help="client audio format (pcm24k)"
    )
    parser.add_argument("--script", metavar="FILE", help="reply script for the simulator")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Check ``args`` and read the inputs; raise :class:`UsageError` saying what is wrong."""
    fmt = FORMATS[args.format]
    speed = args.speed
    if speed is not None and not (math.isfinite(speed) and 0 < speed <= 100):
        raise UsageError(f"--speed must be in (0, 100], got {speed:g}")
    barge = args.barge_in_at
    if barge is not None:
        if not (math.isfinite(barge) and barge >= 0):
            raise UsageError(f"--barge-in-at must be a number of ms >= 0, got {barge:g}")
        if len(args.input) < 2:
            raise UsageError("--barge-in-at needs at least two --input files")
    upstream = args.upstream
    if upstream not in ("sim", "openai") and not upstream.startswith(("ws://", "wss://")):
        raise UsageError(f"--upstream must be sim, openai or a ws(s):// URL, got {upstream!r}")
    if upstream == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise UsageError("--upstream openai needs OPENAI_API_KEY in the environment")
    script = None
    if args.script is not None:
        if upstream != "sim":
            raise UsageError("--script only applies to the embedded simulator (--upstream sim)")
        from ..sim import ScriptError, load_script

        try:
            script = load_script(args.script)
        except (ScriptError, OSError) as e:
            raise UsageError(str(e)) from None
    for path in (args.output, args.json):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{path}: no such directory {str(path.parent)!r}")
    inputs = tuple(load_input(p, fmt) for p in args.input)
    return RunOptions(
        inputs=inputs,
        fmt=fmt,
        upstream=upstream,
        barge_in_at_ms=barge,
        speed=speed,
        output=args.output,
        json_path=args.json,
        script=script,
    )


def run(args: argparse.Namespace) -> int:
    """Run per ``args``; print the report. Exit code: 0 the session ended normally and
    every check passed, 1 otherwise (the report is still printed), 2 bad arguments/files."""
    from ..runtime import RuntimeError_

    try:
        opts = options_from_args(args)
    except UsageError as e:
        print(f"voiceactors run: {e}", file=sys.stderr, flush=True)
        return 2
    clock = trio.testing.MockClock(rate=opts.speed) if opts.speed is not None else None
    try:
        report = trio.run(run_session, opts, clock=clock)
    except RuntimeError_ as e:
        print(f"voiceactors run: {e}", file=sys.stderr, flush=True)
        return 2
    print(format_report(report), flush=True)
    if opts.json_path is not None:
        try:
            opts.json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        except OSError as e:
            print(f"voiceactors run: cannot write {opts.json_path}: {e}", file=sys.stderr)
            return 1
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voiceactors run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
