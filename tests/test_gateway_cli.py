"""``voiceactors.gateway.cli``: arguments, refusals, and one real run in a child process.

The end-to-end tests run ``python -m voiceactors`` in a child process on the embedded
simulator.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from functools import partial

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket

from voiceactors.gateway import cli
from voiceactors.testing.gateway import http_get


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


async def _serve_child(nursery: trio.Nursery, *args: str) -> tuple[trio.Process, int, str]:
    argv = [sys.executable, "-m", "voiceactors", *args]
    env = {**os.environ, "VOICEACTORS_PORT": "0"}
    env.pop("VOICEACTORS_TOKEN", None)
    proc = await nursery.start(
        partial(
            trio.run_process,
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
            env=env,
        )
    )
    out = b""
    while b"\n" not in out:
        chunk = await proc.stdout.receive_some()
        assert chunk, "the child exited before listening"
        out += chunk
    line = out.decode().splitlines()[0]
    prefix = "voiceactors listening on http://127.0.0.1:"
    assert line.startswith(prefix), line
    return proc, int(line[len(prefix) :].split("/")[0]), line


@pytest.mark.parametrize("argv", [("serve", "--port", "0", "--token", "t0k"), ()])
async def test_serve_prints_address_serves_and_drains_on_sigterm(argv: tuple[str, ...]) -> None:
    """``serve`` (and no command at all) prints the URL, serves a session on the embedded
    simulator, and drains it with 1001 on SIGTERM."""
    default = not argv
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc, port, line = await _serve_child(nursery, *argv)
            assert line.endswith("/ (upstream: sim)")
            assert await http_get(port, "/healthz") == (200, b"ok\n")
            status, body = await http_get(port, "/readyz")
            detail = json.loads(body)["detail"]
            assert (status, detail["upstream"], detail["breaker"]) == (200, "sim", "closed")
            assert (await http_get(port, "/metrics"))[0] == (200 if default else 401)

            resource = "/v1/realtime?model=gpt-realtime" + ("" if default else "&token=t0k")
            async with open_websocket("127.0.0.1", port, resource, use_ssl=False) as ws:
                first = json.loads(await ws.get_message())
                assert first["type"] == "session.created"
                assert first["session"]["audio"]["input"]["format"] == {
                    "type": "audio/pcm",
                    "rate": 24000,
                }
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
            assert await proc.wait() == 0


async def test_serve_refuses_openai_without_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "voiceactors", "serve", "--upstream", "openai", "--port", "0"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert done.returncode == 2
    assert b"OPENAI_API_KEY" in done.stderr


def test_lead_and_runtime_options_reach_the_runtime_config() -> None:
    from voiceactors.runtime import config_from_args as runtime_config

    args = parse("--lead-ms", "60,200", "--vad-profile", "noisy", "--instructions", "Be brief.")
    cfg = runtime_config(args)
    assert (cfg.playback.min_lead_ms, cfg.playback.max_lead_ms) == (60.0, 200.0)
    assert (cfg.vad_profile, cfg.instructions, cfg.upstream) == ("noisy", "Be brief.", "sim")
    assert cfg.sim.max_connections_recorded == 0  # a served simulator keeps no records


@pytest.mark.parametrize("bad", ["300,100", "x", "0,10", "10"])
def test_bad_lead_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--lead-ms", bad)
    assert exited.value.code == 2
    assert "--lead-ms" in capsys.readouterr().err
