"""``python -m voiceactors serve``: run the gateway in front of the session runtime.

``run`` opens the runtime (``voiceactors.runtime.open_runtime(args)``: an async context
manager yielding an object with ``handle_client(ws, info)``, ``readiness()`` and
``metrics``), serves until SIGINT/SIGTERM, drains, and returns 0. Exit codes: 2 for a
configuration the gateway refuses (public bind without a token, bad values), 1 when the
address cannot be bound.

``--workers N`` (N >= 2) makes this process a supervisor: it serves nothing itself, runs N
``serve --worker`` child processes that share the port through SO_REUSEPORT (the kernel
spreads connections among them; a session never needs another session's state), prints
one line once all are listening, forwards SIGINT/SIGTERM to them, restarts one that dies
(at most ``RESTARTS_PER_MINUTE``, then it stops the others and exits 1), and exits 0 if
every worker exited 0. Each worker has its own runtime and answers ``/metrics`` and
``/readyz`` for itself (``voiceactors_worker_info{pid=...}`` tells them apart).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import trio

from .security import InsecureBindError, check_bind
from .server import Gateway, GatewayConfig, serve_until_signal

__all__ = ["add_arguments", "config_from_args", "run"]

TOKEN_ENV = "VOICEACTORS_TOKEN"
PORT_ENV = "VOICEACTORS_PORT"
MAX_WORKERS = 64
#: unexpected worker exits tolerated in any 60 s before the supervisor gives up
RESTARTS_PER_MINUTE = 5
_LISTENING = b"voiceactors listening on "


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


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_WORKERS} processes, got {value!r}")
    return count


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
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes sharing the port (SO_REUSEPORT), each with its own runtime and "
        f"upstream connections; 1..{MAX_WORKERS} (default %(default)s: no supervisor)",
    )
    # Internal: this process is one of a supervisor's workers (reuse_port; stdin is the
    # supervisor's pipe, and its end means the supervisor is gone).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The :class:`GatewayConfig` the arguments describe (``ValueError`` if invalid)."""
    return GatewayConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        allowed_origins=tuple(args.allow_origin),
        max_sessions=args.max_sessions,
        allow_insecure_public=args.insecure_public,
        reuse_port=args.worker,
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
    if args.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        print(
            f"voiceactors: --workers needs SO_REUSEPORT, which {sys.platform} lacks; "
            "run one process per port behind a load balancer instead",
            file=sys.stderr,
        )
        return 2
    if insecure and not args.worker:  # the supervisor has said it once
        print(
            f"voiceactors: WARNING: serving {config.host} WITHOUT A TOKEN: anyone who can "
            "reach this port can use your upstream API key",
            file=sys.stderr,
            flush=True,
        )
    if args.workers > 1 and not args.worker:
        return _supervise(args, config)
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
        if args.worker:
            info = runtime.metrics.gauge(
                "voiceactors_worker_info", "This worker of `serve --workers`, by pid.", ["pid"]
            )
            info.labels(str(os.getpid())).set(1)
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
                await serve_until_signal(gateway, task_status=task_status)
                nursery.cancel_scope.cancel()  # also the orphan watch below

            port = await nursery.start(serve_then_stop)
            print(
                f"voiceactors listening on http://{_host(config.host)}:{port}/ "
                f"(upstream: {args.upstream})",
                flush=True,
            )
            if args.worker:
                nursery.start_soon(_drain_when_orphaned, gateway)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _drain_when_orphaned(gateway: Gateway) -> None:
    """Drain once stdin, the supervisor's never-written pipe, ends.

    The pipe closes when the supervisor exits for any reason, SIGKILL included, so a
    worker never keeps serving the port unsupervised.
    """
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass
    sys.stderr.write(
        "voiceactors: worker: supervisor gone; draining\n"
    )  # one write: no interleaving
    await gateway.drain()


# -- the supervisor of --workers N -------------------------------------------------------


def _supervise(args: argparse.Namespace, config: GatewayConfig) -> int:
    """Reserve the port, run the workers until a signal or a failure, return the exit code.

    The supervisor binds (without listening) a SO_REUSEPORT socket on the address and
    keeps it for its whole life: ``--port 0`` learns its port from it, and as long as it is
    bound no process without SO_REUSEPORT (or of another user) can take the port, even
    while every worker is restarting. A bound socket that is not listening is never given
    connections, so the workers alone share them.
    """
    try:
        family, type_, proto, _, sockaddr = socket.getaddrinfo(
            config.host or None, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reservation = socket.socket(family, type_, proto)
    except OSError as exc:
        print(f"voiceactors: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    with reservation:
        try:
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                reservation.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            reservation.bind(sockaddr)
        except OSError as exc:
            print(
                f"voiceactors: cannot listen on {config.host}:{config.port}: {exc}",
                file=sys.stderr,
            )
            return 1
        port: int = reservation.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, PORT_ENV)}
        if args.token is not None:
            env[TOKEN_ENV] = args.token  # not on the command line, where `ps` shows it
        supervisor = _Supervisor(worker_argv(args, port), env, args.workers)
        failure = trio.run(supervisor.run)
    if failure is not None:
        print(f"voiceactors: {failure}", file=sys.stderr, flush=True)
        return 1
    if not supervisor.ready:
        return 1  # stopped by a signal before every worker was listening
    print(
        f"voiceactors: {args.workers} workers stopped, exit codes {supervisor.exit_codes}",
        file=sys.stderr,
        flush=True,
    )
    return 0 if all(code == 0 for code in supervisor.exit_codes) else 1


def worker_argv(args: argparse.Namespace, port: int) -> list[str]:
    """The command line of one worker serving what ``args`` describe on ``port``.

    Everything but the token (passed in the environment) and ``--workers``. Values use the
    ``--name=value`` form so that one starting with ``-`` stays a value.
    """
    argv = [sys.executable, "-m", "voiceactors", "serve", "--worker"]
    argv += [f"--host={args.host}", f"--port={port}", f"--upstream={args.upstream}"]
    argv += [f"--max-sessions={args.max_sessions}", f"--model={args.model}"]
    argv += [f"--vad-profile={args.vad_profile}"]
    argv += [f"--allow-origin={origin}" for origin in args.allow_origin]
    if args.instructions is not None:
        argv.append(f"--instructions={args.instructions}")
    if args.voice is not None:
        argv.append(f"--voice={args.voice}")
    if args.lead_ms is not None:
        low, high = args.lead_ms
        argv.append(f"--lead-ms={low!r},{high!r}")
    if args.allow_client_session:
        argv.append("--allow-client-session")
    if args.insecure_public:
        argv.append("--insecure-public")
    return argv


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Supervisor:
    """Keeps ``count`` workers running until stopped; see :func:`_supervise`.

    Workers get their own session (process group), so a terminal's Ctrl-C reaches them
    once, through the supervisor, and a second Ctrl-C is their "stop now".
    """

    def __init__(
        self, argv: list[str], env: dict[str, str], count: int, *, first_delay: float = 0.1
    ) -> None:
        self._argv = argv
        self._first_delay = first_delay
        self._env = env
        self._count = count
        self._line = b""  # the first worker's listening line, to report once for all
        self._listening: set[int] = set()  # slots whose first worker has listened
        self._running: dict[int, trio.Process] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._stop = trio.Event()
        self._failure: str | None = None
        self.ready = False
        self.exit_codes: list[int] = []

    async def run(self) -> str | None:
        """Run the workers until they have all exited; the reason to exit 1, if any."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def forward_signals() -> None:
                    async for signum in signals:
                        self._stop_all(signum)

                nursery.start_soon(forward_signals)
                async with trio.open_nursery() as workers:
                    for slot in range(self._count):
                        workers.start_soon(self._keep_running, slot)
                nursery.cancel_scope.cancel()
        return self._failure

    def _stop_all(self, signum: int) -> None:
        self._stop.set()
        for proc in self._running.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    def _fail(self, reason: str) -> None:
        if self._failure is None and not self._stop.is_set():
            self._failure = reason
            self._stop_all(signal.SIGTERM)

    async def _keep_running(self, slot: int) -> None:
        while not self._stop.is_set():
            proc = await trio.lowlevel.open_process(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
            self._running[slot] = proc
            listened = False
            try:
                assert proc.stdout is not None
                if self._stop.is_set():  # a signal came while it was starting
                    proc.send_signal(signal.SIGTERM)
                listened = await self._wait_listening(slot, proc.stdout)
                async for chunk in proc.stdout:  # whatever else it prints, until it exits
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                code = await proc.wait()
            finally:
                del self._running[slot]
                if proc.returncode is None:  # we are being cancelled
                    proc.kill()
                    with trio.CancelScope(shield=True):
                        await proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await trio.aclose_forcefully(pipe)
            if self._stop.is_set():
                # One stopped before its signal handler was installed had nothing to drain.
                if listened or code not in (-signal.SIGINT, -signal.SIGTERM):
                    self.exit_codes.append(code)
                return
            why = _describe(code)
            if not listened and slot not in self._listening:
                self._fail(f"worker {proc.pid} exited before it was listening ({why})")
                return
            now = trio.current_time()
            while self._restarts and self._restarts[0] <= now - 60:
                self._restarts.popleft()
            if len(self._restarts) >= RESTARTS_PER_MINUTE:
                self._fail(
                    f"worker {proc.pid} exited ({why}), the {RESTARTS_PER_MINUTE + 1}th "
                    "unexpected exit in a minute: stopping all workers"
                )
                return
            self._restarts.append(now)
            delay = self._first_delay * 2 ** (len(self._restarts) - 1)  # 0.1 s .. 1.6 s
            print(
                f"voiceactors: worker {proc.pid} exited unexpectedly ({why}); restarting it "
                f"in {delay:.1f} s ({len(self._restarts)}/{RESTARTS_PER_MINUTE} this minute)",
                file=sys.stderr,
                flush=True,
            )
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _wait_listening(self, slot: int, stdout: trio.abc.ReceiveStream) -> bool:
        """Read the worker's first line; True if it says the worker is listening."""
        line = b""
        while b"\n" not in line:
            chunk = await stdout.receive_some()
            if not chunk:
                break
            line += chunk
        first, newline, rest = line.partition(b"\n")
        if not first.startswith(_LISTENING):
            sys.stdout.buffer.write(line)  # not ours to swallow
            sys.stdout.flush()
            return False
        if rest:
            sys.stdout.buffer.write(rest)
            sys.stdout.flush()
        if slot in self._listening:
            pid = self._running[slot].pid
            print(f"voiceactors: worker restarted as {pid}", file=sys.stderr, flush=True)
            return True
        self._listening.add(slot)
        self._line = self._line or first
        if len(self._listening) == self._count:
            self.ready = True
            # "voiceactors listening on http://H:P/ (upstream: X)" -> "(upstream: X, N workers)"
            text = self._line.decode().removesuffix(")")
            print(f"{text}, {self._count} workers)", flush=True)
        return True
