"""``python -m voiceactors serve``: run the gateway in front of the session runtime.

``run`` opens the runtime (``voiceactors.runtime.open_runtime(args)``: an async context
manager yielding an object with ``handle_client(ws, info)``, ``readiness()`` and
``metrics``), serves until SIGINT/SIGTERM, drains, and returns 0. Exit codes: 2 for a
configuration the gateway refuses (public bind without a token, bad values), 1 when the
address cannot be bound.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

import trio

from .security import InsecureBindError, check_bind
from .server import Gateway, GatewayConfig, serve_until_signal

__all__ = ["add_arguments", "config_from_args", "run"]

TOKEN_ENV = "VOICEACTORS_TOKEN"
PORT_ENV = "VOICEACTORS_PORT"


def _env_port(default: int) -> int:
    text = os.environ.get(PORT_ENV)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"voiceactors: {PORT_ENV} must be a port number, got {text!r}") from None


def _upstream(value: str) -> str:
    if value in ("sim", "openai"):
        return value
    url = urlsplit(value)
    if url.scheme in ("ws", "wss") and url.hostname:
        return value
    raise argparse.ArgumentTypeError(f"expected 'sim', 'openai' or a ws(s):// URL, got {value!r}")


def _lead(value: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in ms, got {value!r}") from None
    if not 0 < low <= high <= 5000:
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= MAX <= 5000 ms, got {value!r}")
    return low, high


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GatewayConfig()
    parser.add_argument("--host", default=defaults.host, help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=_env_port(defaults.port),
        help=f"port, 0 for any free one (default: ${PORT_ENV} or %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        type=_upstream,
        default="sim",
        help="'sim' (embedded simulator, the default), 'openai', or a ws(s):// URL",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"token clients must present (default: ${TOKEN_ENV}); required off loopback",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to open sessions, e.g. https://app.example.com "
        "(repeatable; the gateway's own loopback origins are always allowed)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=defaults.max_sessions,
        help="concurrent sessions; more are closed with 1013 (%(default)s)",
    )
    parser.add_argument("--model", default="gpt-realtime", help="upstream model (%(default)s)")
    parser.add_argument(
        "--instructions", default=None, help="the agent's instructions (the operator's prompt)"
    )
    parser.add_argument("--voice", default=None, help="the agent's voice, e.g. marin")
    parser.add_argument(
        "--vad-profile",
        choices=("quiet", "normal", "noisy"),
        default="normal",
        help="local voice detector tuning for barge-in (%(default)s)",
    )
    parser.add_argument(
        "--lead-ms",
        type=_lead,
        default=None,
        metavar="MIN,MAX",
        help="agent audio sent ahead of the client's playout, in ms: at least MIN, growing "
        "with measured client jitter up to MAX (default 80,300)",
    )
    parser.add_argument(
        "--allow-client-session",
        action="store_true",
        help="let clients set instructions, tools and model (off: they get an error)",
    )
    parser.add_argument(
        "--insecure-public",
        action="store_true",
        help="allow a non-loopback --host without a token (anyone can use your API key)",
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The :class:`GatewayConfig` the arguments describe (``ValueError`` if invalid)."""
    return GatewayConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        allowed_origins=tuple(args.allow_origin),
        max_sessions=args.max_sessions,
        allow_insecure_public=args.insecure_public,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; see the module docstring for exit codes."""
    from ..runtime import config_from_args as runtime_config

    try:
        config = config_from_args(args)
        insecure = check_bind(config.host, config.token, config.allow_insecure_public)
        runtime_config(args)
        if args.upstream == "openai" and not os.environ.get("OPENAI_API_KEY"):
            raise ValueError("--upstream openai needs OPENAI_API_KEY in the environment")
    except (InsecureBindError, ValueError) as exc:
        print(f"voiceactors: {exc}", file=sys.stderr)
        return 2
    if insecure:
        print(
            f"voiceactors: WARNING: serving {config.host} WITHOUT A TOKEN: anyone who can "
            "reach this port can use your upstream API key",
            file=sys.stderr,
            flush=True,
        )
    try:
        trio.run(_serve, args, config)
    except OSError as exc:
        print(f"voiceactors: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(args: argparse.Namespace, config: GatewayConfig) -> None:
    from ..runtime import open_runtime  # the session side; imported late (heavy)

    async with open_runtime(args) as runtime:
        gateway = Gateway(
            config,
            runtime.handle_client,
            readiness=runtime.readiness,
            metrics=runtime.metrics,
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_until_signal, gateway)
            host = f"[{config.host}]" if ":" in config.host else config.host
            print(
                f"voiceactors listening on http://{host}:{port}/ (upstream: {args.upstream})",
                flush=True,
            )
