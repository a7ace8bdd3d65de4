"""``voiceactors.gateway.cli``: arguments, refusals, and one real run in a child process.

The session runtime (``voiceactors.runtime``) belongs to another part of the tree; the
end-to-end test injects a small echo runtime with the same interface into the child.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import textwrap
from functools import partial

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket

from voiceactors.gateway import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    args = parse()
    assert (args.host, args.port, args.upstream, args.token) == ("127.0.0.1", 8080, "sim", None)
    assert (args.allow_origin, args.max_sessions, args.insecure_public) == ([], 200, False)


def test_token_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    assert parse().token == "from-env"
    assert parse("--token", "flag").token == "flag"
    args = parse(
        "--allow-origin",
        "https://a.example",
        "--allow-origin",
        "https://b.example",
        "--max-sessions",
        "7",
        "--port",
        "0",
    )
    config = cli.config_from_args(args)
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert (config.max_sessions, config.port, config.token) == (7, 0, "from-env")


@pytest.mark.parametrize(
    "value", ["sim", "openai", "ws://127.0.0.1:9000/v1/realtime", "wss://x.io"]
)
def test_upstream_choices(value: str) -> None:
    assert parse("--upstream", value).upstream == value


@pytest.mark.parametrize("value", ["http://x.io", "ws://", "simulator", ""])
def test_bad_upstream_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--upstream", value)
    assert exit_info.value.code == 2


def test_public_host_without_token_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.run(parse("--host", "0.0.0.0")) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0'" in err and "--insecure-public" in err


def test_bad_values_refuse_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parse("--max-sessions", "0")) == 2
    assert "max_sessions" in capsys.readouterr().err


CHILD = textwrap.dedent(
    """
    import argparse, contextlib, sys, types
    from voiceactors.metrics import Registry

    class Runtime:
        def __init__(self):
            self.metrics = Registry()

        async def handle_client(self, ws, info):
            while True:
                await ws.send_message(await ws.get_message())

        def readiness(self):
            return True, {"upstream": "fake"}

    @contextlib.asynccontextmanager
    async def open_runtime(args):
        yield Runtime()
        print("runtime closed", flush=True)

    fake = types.ModuleType("voiceactors.runtime")
    fake.open_runtime = open_runtime
    sys.modules["voiceactors.runtime"] = fake

    from voiceactors.gateway import cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(sys.argv[1:])))
    """
)


async def _get(port: int, target: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        req = h11.Request(method="GET", target=target, headers=[("host", "127.0.0.1")])
        await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body


async def test_serve_prints_address_serves_and_drains_on_sigterm() -> None:
    argv = [sys.executable, "-c", CHILD, "--port", "0", "--token", "t0k", "--upstream", "openai"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            out = b""
            while b"\n" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the child exited before listening"
                out += chunk
            line = out.decode().splitlines()[0]
            prefix = "voiceactors listening on http://127.0.0.1:"
            assert line.startswith(prefix) and line.endswith("/ (upstream: openai)")
            port = int(line[len(prefix) :].split("/")[0])

            assert await _get(port, "/healthz") == (200, b"ok\n")
            status, body = await _get(port, "/readyz")
            assert (status, json.loads(body)["detail"]) == (200, {"upstream": "fake"})
            assert (await _get(port, "/metrics"))[0] == 401

            resource = "/v1/realtime?token=t0k"
            async with open_websocket("127.0.0.1", port, resource, use_ssl=False) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
            assert await proc.wait() == 0
            rest = b""
            while chunk := await proc.stdout.receive_some():
                rest += chunk
            assert b"runtime closed" in rest
