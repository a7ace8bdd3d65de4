"""Every fault class of a fault plan triggers as specified (loopback, virtual time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from voiceactors.realtime import ProtocolError, ServerEventDecoder, UnknownServerEvent
from voiceactors.sim import (
    Fault,
    FaultPlan,
    ScriptError,
    load_fault_plan,
    parse_fault_plan,
    parse_script,
)
from voiceactors.sim.audio import read_wav, silence
from voiceactors.sim.cli import main as cli_main
from voiceactors.testing.sim import connect_client, open_simulator

AUDIO = Path(__file__).parent / "fixtures" / "audio"
EXAMPLES = Path(__file__).parent.parent / "specs" / "sim-examples"


def plan(*faults: Fault, seed: int = 0) -> FaultPlan:
    return FaultPlan(tuple(faults), seed)


async def closed_code(c) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await c.recv()
    return closed.value.reason.code


async def test_drop_closes_tcp_without_a_close_frame():
    for reset in (False, True):
        with trio.fail_after(10):
            async with open_simulator(faults=plan(Fault("drop", after_sent=1, reset=reset))) as rt:
                async with connect_client(rt.url) as c:
                    assert (await c.recv())["type"] == "session.created"
                    assert await closed_code(c) == 1006  # abnormal: no close frame
                assert rt.sim.connections[0].closed_by == "drop"


async def test_drop_at_connect_is_a_quick_failure():
    with trio.fail_after(10):
        async with open_simulator(faults=plan(Fault("drop", connection=0))) as rt:
            async with connect_client(rt.url) as c:
                assert await closed_code(c) == 1006
            async with connect_client(rt.url) as c:  # only connection 0
                assert (await c.recv())["type"] == "session.created"
    assert c.seen[0]["type"] == "session.created"


async def test_close_with_a_code_after_n_received():
    with trio.fail_after(10):
        async with open_simulator(
            faults=plan(Fault("close", after_received=2, code=1011, reason="boom"))
        ) as rt:
            async with connect_client(rt.url) as c:
                await c.recv()
                await c.send({"type": "input_audio_buffer.clear"})
                assert (await c.recv())["type"] == "input_audio_buffer.cleared"
                await c.send({"type": "input_audio_buffer.clear"})
                with pytest.raises(ConnectionClosed) as closed:
                    await c.recv()
                assert (closed.value.reason.code, closed.value.reason.reason) == (1011, "boom")
    # Fired before handling the 2nd event: it was received, never answered.
    assert rt.sim.connections[0].received_types() == ["input_audio_buffer.clear"] * 2


async def test_stall_holds_events_and_writes_them_when_it_ends(autojump_clock):
    with trio.fail_after(30):
        faults = plan(Fault("stall", after_sent=1, duration_ms=2000))
        async with open_simulator(faults=faults) as rt, connect_client(rt.url) as c:
            await c.recv()
            t0 = trio.current_time()
            await c.send({"type": "input_audio_buffer.clear"})
            await c.append_audio(silence(300))
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"
            assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.05)
    assert rt.sim.connections[0].received_audio_bytes == 300 * 48


async def test_stall_forever_sends_nothing_but_keeps_reading(autojump_clock):
    faults = plan(
        Fault("stall", after_sent=1),
        Fault("close", on_received="response.cancel", code=4002),
    )
    with trio.fail_after(30):
        async with open_simulator(faults=faults) as rt, connect_client(rt.url) as c:
            await c.recv()
            t0 = trio.current_time()
            await c.send({"type": "input_audio_buffer.clear"})
            with trio.move_on_after(20) as scope:
                await c.recv()
            assert scope.cancelled_caught  # the answer is held
            # The stalled server still reads: the next event fires the close at once.
            await c.send({"type": "response.cancel"})
            assert await closed_code(c) == 4002
            assert trio.current_time() - t0 == pytest.approx(20, abs=0.05)
    assert rt.sim.connections[0].received_types() == ["input_audio_buffer.clear", "response.cancel"]


async def test_slow_events_are_delayed_each(autojump_clock):
    with trio.fail_after(30):
        faults = plan(Fault("slow", after_sent=1, delay_ms=100, jitter_ms=20), seed=3)
        async with open_simulator(faults=faults) as rt, connect_client(rt.url) as c:
            await c.recv()
            times = []
            for _ in range(4):
                t0 = trio.current_time()
                await c.send({"type": "input_audio_buffer.clear"})
                await c.recv()
                times.append(trio.current_time() - t0)
    assert all(0.08 - 1e-6 <= t <= 0.12 + 1e-6 for t in times), times
    assert len({round(t, 6) for t in times}) > 1  # jitter, seeded


async def test_malformed_frame_and_unknown_event_reach_the_client():
    faults = plan(
        Fault("unknown_event", after_sent=1, event_type="response.future_event"),
        Fault("malformed", after_sent=2),  # injected frames count as sent
    )
    decoder = ServerEventDecoder()
    with trio.fail_after(10):
        async with open_simulator(faults=faults) as rt, connect_client(rt.url) as c:
            frames = [await c.ws.get_message() for _ in range(3)]
    assert isinstance(decoder.decode(frames[0]), object)
    unknown = decoder.decode(frames[1])
    assert isinstance(unknown, UnknownServerEvent) and unknown.type == "response.future_event"
    assert decoder.unknown_count == 1
    with pytest.raises(ProtocolError) as err:
        decoder.decode(frames[2])
    assert err.value.code == "invalid_json"
    assert rt.sim.connections[0].faults_fired == [
        "unknown_event after_sent=1",
        "malformed after_sent=2",
    ]


@pytest.mark.parametrize("close_code", [None, 1011])
async def test_error_event_on_a_received_type(close_code):
    faults = plan(
        Fault(
            "error",
            on_received="response.create",
            error_code="rate_limit_exceeded",
            error_type="rate_limit_error",
            close_code=close_code,
        )
    )
    with trio.fail_after(10):
        async with open_simulator(faults=faults) as rt, connect_client(rt.url) as c:
            await c.recv()
            await c.send({"type": "response.create"})
            err = await c.recv()
            assert (err["type"], err["error"]["code"]) == ("error", "rate_limit_exceeded")
            if close_code is None:
                assert (await c.recv())["type"] == "response.created"
            else:
                assert await closed_code(c) == close_code


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
async def test_handshake_refused_with_status(status):
    with trio.fail_after(10):
        async with open_simulator(faults=plan(Fault("reject", connection=0, status=status))) as rt:
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(rt.url + "?model=gpt-realtime"):
                    pass  # pragma: no cover
            assert rejected.value.status_code == status
            assert json.loads(rejected.value.body)["error"]["message"]
            if status == 429:
                assert (b"retry-after", b"1") in rejected.value.headers
            async with connect_client(rt.url) as c:
                assert (await c.recv())["type"] == "session.created"
    assert rt.sim.connections[0].rejected_status == status


async def test_expire_fault_after_ms(autojump_clock):
    with trio.fail_after(30):
        async with (
            open_simulator(faults=plan(Fault("expire", after_ms=1500))) as rt,
            connect_client(rt.url) as c,
        ):
            t0 = trio.current_time()
            await c.recv()
            err = await c.recv()
            assert err["error"]["code"] == "session_expired"
            assert trio.current_time() - t0 == pytest.approx(1.5, abs=0.05)
            assert await closed_code(c) == 1001


async def test_disconnect_in_the_middle_of_a_response(autojump_clock):
    faults = plan(Fault("drop", on_sent="response.output_audio.delta", nth=3))
    pcm = read_wav(AUDIO / "order_24k.wav") + silence(1000)
    with trio.fail_after(30):
        async with (
            open_simulator(faults=faults, first_byte_ms=100) as rt,
            connect_client(rt.url) as c,
        ):
            await c.append_audio(pcm)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await c.recv()
            assert closed.value.reason.code == 1006
    got = [e["type"] for e in c.seen]
    assert (
        got.count("response.output_audio.delta") == 3 and got[-1] == "response.output_audio.delta"
    )
    assert "response.done" not in got
    # Everything the client sent before the drop was received.
    assert rt.sim.connections[0].received_audio == pcm


async def test_duplicate_reorder_and_beta_names(autojump_clock):
    script = parse_script({"turn": [{"audio": {"tone_hz": 300, "ms": 300}}]}, base=Path("."))
    faults = plan(
        Fault("duplicate", on_sent="session.created"),
        Fault("reorder", on_received="conversation.item.create"),
        Fault("beta_name", on_sent="response.content_part.added", count=2),
    )
    with trio.fail_after(30):
        async with (
            open_simulator(script=script, faults=faults, first_byte_ms=10) as rt,
            connect_client(rt.url) as c,
        ):
            a, b = await c.recv(), await c.recv()
            assert a == b and a["type"] == "session.created"  # same event_id twice
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hi"}],
                    },
                }
            )
            assert [(await c.recv())["type"] for _ in range(2)] == [
                "conversation.item.done",
                "conversation.item.added",
            ]
            await c.send({"type": "response.create"})
            got = [e["type"] for e in await c.recv_until("response.done")]
    assert got.count("response.audio.delta") == 2
    assert got.count("response.output_audio.delta") == 1  # 300 ms = 3 deltas, 2 renamed


async def test_probability_is_seeded_per_connection():
    async def fired(seed: int) -> list[bool]:
        faults = plan(Fault("close", after_sent=1, code=4001, probability=0.5), seed=seed)
        out = []
        async with open_simulator(faults=faults) as rt:
            for _ in range(12):
                async with connect_client(rt.url) as c:
                    await c.recv()
                    await c.send({"type": "input_audio_buffer.clear"})
                    try:
                        await c.recv()
                        out.append(False)
                    except ConnectionClosed:
                        out.append(True)
        return out

    with trio.fail_after(20):
        first, again, other = await fired(1), await fired(1), await fired(2)
    assert first == again
    assert 0 < sum(first) < 12
    assert first != other


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"fault": [{"kind": "explode"}]}, "kind 'explode'"),
        ({"fault": [{"kind": "drop", "after_sent": 1, "after_ms": 5}]}, "at most one trigger"),
        ({"fault": [{"kind": "reject", "after_sent": 1}]}, "takes no trigger"),
        ({"fault": [{"kind": "reject", "status": 200}]}, "status must be one of"),
        ({"fault": [{"kind": "close", "code": 1006}]}, "cannot be sent"),
        ({"fault": [{"kind": "drop", "when": 1}]}, "unknown key 'when'"),
        ({"fault": [{"kind": "drop", "after_sent": "5"}]}, "fault[0].after_sent: wrong type"),
        ({"fault": [{"kind": "slow", "delay_ms": 10, "jitter_ms": 20}]}, "jitter_ms"),
        ({"faults": []}, "unknown key 'faults'"),
    ],
)
def test_bad_fault_plans_name_the_problem(data, message):
    with pytest.raises(ScriptError, match=None) as err:
        parse_fault_plan(data, "plan.toml")
    assert message in str(err.value) and str(err.value).startswith("plan.toml")


def test_example_files_load():
    plan_ = load_fault_plan(EXAMPLES / "faults.toml")
    assert {f.kind for f in plan_.faults} == {"reject", "drop", "stall", "unknown_event", "error"}


def test_cli_bad_files_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[fault]]\nkind = 'nope'\n")
    assert cli_main(["--faults", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kind 'nope'" in err
    script = tmp_path / "s.toml"
    script.write_text("[[turn]]\naudio = 'missing.wav'\n")
    assert cli_main(["--script", str(script)]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert cli_main(["--script", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
