"""``python -m voiceactors sim``: serve the simulator until SIGINT/SIGTERM.

Prints ``voiceactors sim listening on ws://HOST:PORT/v1/realtime`` once listening (so a
parent process can wait for that line and read the port). Bad script or fault files, or
bad options: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from .config import SimConfig
from .faults import FaultPlan, load_fault_plan
from .script import ScriptError, load_script
from .server import Simulator

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port, 0 = any free (8765)")
    parser.add_argument("--script", metavar="FILE", help="reply script (TOML/JSON)")
    parser.add_argument("--faults", metavar="FILE", help="fault plan (TOML/JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seed for ids and faults (0)")
    parser.add_argument(
        "--first-byte-ms", type=float, default=300.0, help="delay before a response's output"
    )
    parser.add_argument(
        "--speed", type=float, default=4.0, help="audio pacing, x real time (inf = none)"
    )
    parser.add_argument(
        "--max-session-s", type=float, default=3600.0, help="session_expired after (3600)"
    )
    parser.add_argument("--api-key", help="require this key (default: accept any)")
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="benchmark reflector, not Realtime behaviour: answer every audio append at once "
        "with an output audio delta of the same bytes (tools/bench_relay.py)",
    )


def _config(args: argparse.Namespace) -> SimConfig:
    script = load_script(args.script) if args.script else None
    faults = load_fault_plan(args.faults) if args.faults else FaultPlan()
    try:
        config = SimConfig(
            script=script,
            faults=faults,
            seed=args.seed,
            first_byte_ms=args.first_byte_ms,
            speed=args.speed,
            max_session_s=args.max_session_s,
            api_key=args.api_key,
            mirror=args.mirror,
        )
    except ValueError as e:
        raise ScriptError(str(e)) from None
    # Nobody reads a served simulator's records; they would only grow.
    return config.unrecorded()


async def _serve(sim: Simulator, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(sim.serve, host, port)
            print(f"voiceactors sim listening on ws://{host}:{bound}/v1/realtime", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def run(args: argparse.Namespace) -> int:
    """Serve per ``args`` (from :func:`add_arguments`); returns the exit code."""
    try:
        sim = Simulator(_config(args))
    except ScriptError as e:
        print(f"voiceactors sim: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        trio.run(_serve, sim, args.host, args.port)
    except OSError as e:
        print(f"voiceactors sim: cannot listen on {args.host}:{args.port} ({e})", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voiceactors sim", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
