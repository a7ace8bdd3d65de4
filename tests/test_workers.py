"""``serve --workers N``: a supervisor and N processes sharing one port with SO_REUSEPORT.

The end-to-end tests run the real command in child processes on 127.0.0.1, each under
``trio.fail_after``. Workers are told apart by ``voiceactors_worker_info{pid=...}``, which
each one serves on its own ``/metrics``; the kernel spreads connections among the
workers, so a test that needs both keeps asking (bounded) until it has seen both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket

from voiceactors.gateway import cli
from voiceactors.gateway.server import Gateway, GatewayConfig
from voiceactors.testing.gateway import http_get

RESOURCE = "/v1/realtime?model=gpt-realtime"
_WORKER = re.compile(r'^voiceactors_worker_info\{pid="(\d+)"\} 1$', re.M)
_SESSIONS = re.compile(r"^voiceactors_gateway_sessions_active (\d+)", re.M)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


# -- arguments --------------------------------------------------------------------------


def test_workers_default_to_one_process() -> None:
    args = parse()
    assert (args.workers, args.worker) == (1, False)
    assert cli.config_from_args(args).reuse_port is False
    assert cli.config_from_args(parse("--worker")).reuse_port is True


@pytest.mark.parametrize("bad", ["0", "65", "-1", "two", ""])
def test_workers_out_of_range_is_a_usage_error(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--workers", bad)
    assert exited.value.code == 2
    assert "--workers" in capsys.readouterr().err
    assert parse("--workers", "64").workers == 64


def test_worker_argv_carries_every_option_but_token_and_workers() -> None:
    args = parse(
        "--host=127.0.0.1",
        "--upstream=ws://127.0.0.1:9/v1/realtime",
        "--token=secret",
        "--allow-origin=https://a.example",
        "--allow-origin=https://b.example",
        "--max-sessions=7",
        "--model=m1",
        "--instructions=-be brief-",
        "--voice=marin",
        "--vad-profile=noisy",
        "--lead-ms=60.5,200",
        "--allow-client-session",
        "--insecure-public",
        "--workers=3",
    )
    argv = cli.worker_argv(args, 4321)
    assert argv[:5] == [sys.executable, "-m", "voiceactors", "serve", "--worker"]
    assert not any("secret" in a for a in argv)  # the token travels in the environment
    child = parse(*argv[4:])
    expected = {**vars(args), "port": 4321, "workers": 1, "worker": True, "token": child.token}
    assert vars(child) == expected


def test_without_so_reuseport_workers_refuse_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    assert cli.run(parse("--workers", "2", "--port", "0")) == 2
    assert "SO_REUSEPORT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="SO_REUSEPORT"):
        GatewayConfig(reuse_port=True)


# -- the gateway side: two gateways, one port ------------------------------------------------


async def test_reuse_port_gateways_share_a_port() -> None:
    """Two gateways bound with reuse_port on one port both receive connections."""
    from voiceactors import metrics as m

    def gateway(port: int, name: str) -> Gateway:
        registry = m.Registry()
        registry.gauge("which", "which gateway", ["name"]).labels(name).set(1)
        config = GatewayConfig(port=port, reuse_port=True)

        async def handler(ws: WebSocketConnection, info: object) -> None:
            raise AssertionError("no sessions here")

        return Gateway(config, handler, readiness=lambda: (True, {}), metrics=registry)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first = gateway(0, "a")
            port = await nursery.start(first.serve)
            second = gateway(port, "b")
            assert await nursery.start(second.serve) == port
            seen: set[str] = set()
            for _ in range(200):
                status, raw = await http_get(port, "/metrics")
                body = raw.decode()
                assert status == 200
                seen.update(re.findall(r'^which\{name="(\w)"\} 1', body, re.M))
                if len(seen) == 2:
                    break
            assert seen == {"a", "b"}
            await first.drain()
            await second.drain()


# -- the supervisor, in process, with stand-in workers ------------------------------------


def _fake_worker(exit_code: int, *, listen: bool = True) -> list[str]:
    line = "voiceactors listening on http://127.0.0.1:1/ (upstream: sim)" if listen else "oops"
    code = f"import sys; print({line!r}, flush=True); sys.exit({exit_code})"
    return [sys.executable, "-c", code]


async def test_a_worker_that_keeps_dying_is_restarted_then_given_up_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    supervisor = cli._Supervisor(_fake_worker(3), dict(os.environ), 1, first_delay=0.001)
    with trio.fail_after(20):
        failure = await supervisor.run()
    assert failure is not None and "6th unexpected exit in a minute" in failure
    out, err = capsys.readouterr()
    assert out == "voiceactors listening on http://127.0.0.1:1/ (upstream: sim, 1 workers)\n"
    assert err.count("exited unexpectedly (exit code 3); restarting it") == cli.RESTARTS_PER_MINUTE
    assert err.count("worker restarted as") == cli.RESTARTS_PER_MINUTE


async def test_a_worker_that_never_listens_fails_the_start_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    supervisor = cli._Supervisor(_fake_worker(1, listen=False), dict(os.environ), 2)
    with trio.fail_after(20):
        failure = await supervisor.run()
    assert failure is not None and "exited before it was listening (exit code 1)" in failure
    assert not supervisor.ready
    assert "restarting" not in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------------------


class _Output:
    """Everything a pipe has said so far, and a way to wait for a piece of it."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.text += chunk.decode()
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        while (match := re.search(pattern, self.text, re.M)) is None:
            await self._changed.wait()
        return match


async def _supervisor(
    nursery: trio.Nursery, *args: str
) -> tuple[trio.Process, int, _Output, _Output]:
    argv = [sys.executable, "-m", "voiceactors", "serve", "--port", "0", *args]
    env = {k: v for k, v in os.environ.items() if k not in (cli.TOKEN_ENV, cli.PORT_ENV)}
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
            env=env,
        )
    )
    out, err = _Output(), _Output()
    assert proc.stdout is not None and proc.stderr is not None
    nursery.start_soon(out.collect, proc.stdout)
    nursery.start_soon(err.collect, proc.stderr)
    line = await out.wait_for(r"^voiceactors listening on http://127\.0\.0\.1:(\d+)/ \((.*)\)$")
    assert line.group(2) == "upstream: sim, 2 workers"
    return proc, int(line.group(1)), out, err


async def _workers(port: int, want: int) -> dict[int, int]:
    """Sessions active per worker pid, asking /metrics until ``want`` pids have answered."""
    sessions: dict[int, int] = {}
    for _ in range(500):
        status, raw = await http_get(port, "/metrics")
        body = raw.decode()
        assert status == 200
        (pid,) = _WORKER.findall(body)
        (active,) = _SESSIONS.findall(body)
        sessions[int(pid)] = int(active)
        if len(sessions) == want:
            return sessions
    raise AssertionError(f"only saw workers {sessions} in 500 requests")


async def _session(nursery: trio.Nursery, port: int) -> WebSocketConnection:
    ws = await connect_websocket(nursery, "127.0.0.1", port, RESOURCE, use_ssl=False)
    assert json.loads(await ws.get_message())["type"] == "session.created"
    return ws


async def _close_code(ws: WebSocketConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return None if closed.value.reason is None else closed.value.reason.code


async def test_two_workers_share_sessions_and_drain_on_sigterm() -> None:
    """One line for both workers; sessions land on both; SIGTERM closes every session with
    1001 and the supervisor exits 0."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc, port, out, err = await _supervisor(nursery, "--workers", "2")
            async with trio.open_nursery() as sessions_nursery:
                sockets = [await _session(sessions_nursery, port) for _ in range(20)]
                by_worker = await _workers(port, 2)
                # The kernel hashes each connection to a worker: with 20, both get some.
                while min(by_worker.values()) == 0 and len(sockets) < 60:
                    sockets.append(await _session(sessions_nursery, port))
                    by_worker = await _workers(port, 2)
                assert sum(by_worker.values()) == len(sockets)
                assert min(by_worker.values()) > 0, by_worker

                proc.send_signal(signal.SIGTERM)
                codes: list[int | None] = []

                async def closed(ws: WebSocketConnection) -> None:
                    codes.append(await _close_code(ws))

                async with trio.open_nursery() as waiting:
                    for ws in sockets:
                        waiting.start_soon(closed, ws)
                assert codes == [1001] * len(sockets)
            assert await proc.wait() == 0
    assert out.text.count("\n") == 1  # the supervisor's line; the workers' are not echoed
    assert "2 workers stopped, exit codes [0, 0]" in err.text


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc, port, _, err = await _supervisor(nursery, "--workers", "2")
            before = set(await _workers(port, 2))
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            restarted = await err.wait_for(r"worker restarted as (\d+)")
            assert f"worker {victim} exited unexpectedly (killed by SIGKILL)" in err.text
            new_pid = int(restarted.group(1))
            after = set(await _workers(port, 2))
            assert after == before - {victim} | {new_pid}
            async with trio.open_nursery() as sessions_nursery:
                ws = await _session(sessions_nursery, port)
                proc.send_signal(signal.SIGTERM)
                assert await _close_code(ws) == 1001
            assert await proc.wait() == 0
