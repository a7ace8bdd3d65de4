"""The tool runner: one output per call_id, deadlines, barge-in, bounds, the model continuing.

Virtual time throughout (``autojump_clock``); each Trio test also runs under the plugin's
leak check (no task, deadline or open edge left). "Settle" means
``wait_all_tasks_blocked``: every task has done what it can without time passing.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceactors.channels import EdgeSender, open_edge
from voiceactors.messages import ResponseDone, ToolCall
from voiceactors.metrics import Registry
from voiceactors.realtime.events import (
    ConversationItemCreate,
    FunctionCallOutputItem,
    ResponseCreate,
)
from voiceactors.runtime.tools import (
    Tool,
    ToolConfig,
    ToolMetrics,
    ToolRegistry,
    ToolRunner,
    demo_tools,
)
from voiceactors.testing.leaks import leak_checked_run

ORDER_ARGS = '{"items": [{"name": "cheeseburger", "qty": 2}, {"name": "fries", "size": "large"}]}'


class Harness:
    """A running ``ToolRunner`` with its inbox sender and what it sent upstream."""

    def __init__(self, runner: ToolRunner, calls: EdgeSender[Any], up: Any) -> None:
        self.runner = runner
        self.calls = calls
        self._up = up
        self.sent: list[Any] = []  # everything sent upstream so far, in order

    async def call(
        self, call_id: str, name: str, arguments: str = "{}", response_id: str = ""
    ) -> None:
        await self.calls.send(
            ToolCall(call_id=call_id, name=name, arguments=arguments, response_id=response_id)
        )

    async def done(self, response_id: str) -> None:
        await self.calls.send(ResponseDone(response_id=response_id, status="completed"))

    async def settle(self) -> list[Any]:
        """Let every task run, then return (and keep) what was sent upstream meanwhile."""
        await trio.testing.wait_all_tasks_blocked()
        new = []
        while True:
            try:
                new.append(self._up.receive_nowait())
            except (trio.WouldBlock, trio.ClosedResourceError):
                break
        self.sent.extend(new)
        return new


@asynccontextmanager
async def running(
    registry: ToolRegistry,
    *,
    config: ToolConfig | None = None,
    metrics: ToolMetrics | None = None,
    inbox: int = 8,
) -> AsyncIterator[Harness]:
    """Run a ToolRunner; on exit close its inbox and wait for ``run`` to return."""
    calls = open_edge("tools", inbox)
    up = open_edge("up", 64)
    runner = ToolRunner(registry, up.sender, config=config, metrics=metrics)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, calls.receiver)
            h = Harness(runner, calls.sender, up.receiver)
            yield h
            calls.sender.close()
        await h.settle()
    finally:
        calls.close()
        up.close()


def outputs(events: list[Any]) -> dict[str, Any]:
    """call_id -> decoded output, asserting each call_id appears once."""
    out: dict[str, Any] = {}
    for e in events:
        if isinstance(e, ConversationItemCreate):
            assert isinstance(e.item, FunctionCallOutputItem)
            assert e.item.call_id not in out, f"two outputs for {e.item.call_id}"
            out[e.item.call_id] = json.loads(e.item.output)
    return out


def code(output: Any) -> str:
    return output["error"] if isinstance(output, dict) and "error" in output else "ok"


def creates(events: list[Any]) -> int:
    return sum(isinstance(e, ResponseCreate) for e in events)


class Gate:
    """Tools that wait until the test lets them finish, and record what happened to them."""

    def __init__(self) -> None:
        self.events: dict[Any, trio.Event] = {}
        self.running = 0
        self.most = 0
        self.cancelled: list[Any] = []

    def open(self, key: Any) -> None:
        self.events.setdefault(key, trio.Event()).set()

    async def hold(self, args: dict[str, Any]) -> dict[str, Any]:
        key = args.get("k")
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.events.setdefault(key, trio.Event()).wait()
        except trio.Cancelled:
            self.cancelled.append(key)
            raise
        finally:
            self.running -= 1
        return {"k": key}


# -- answers --------------------------------------------------------------------------------


async def test_success_output_then_continue_after_response_done(autojump_clock) -> None:
    async with running(demo_tools()) as h:
        await h.call("c1", "place_order", ORDER_ARGS, response_id="r1")
        sent = await h.settle()
        # Answered at once, but the response is still active: no response.create yet.
        assert sent == [
            ConversationItemCreate(
                item=FunctionCallOutputItem(
                    call_id="c1",
                    output='{"order_id":"order-1","items":3,"ready_in_minutes":10}',
                )
            )
        ]
        await h.done("r1")
        assert await h.settle() == [ResponseCreate()]
    assert h.runner.stats.completed == h.runner.stats.started == 1
    assert h.runner.stats.responses_created == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('{"items": [{"name": "fries", "qty": 0}]}', "Expected `int` >= 1 - at `$.items[0].qty`"),
        ('{"items": [{"name": "fries", "qty": 21}]}', "Expected `int` <= 20 - at `$.items[0].qty`"),
        ('{"items": [{"name": "fries", "color": 1}]}', "unknown field `color` - at `$.items[0]`"),
        ('{"items": [{"qty": 1}]}', "missing required field `name` - at `$.items[0]`"),
        ('{"items": []}', "Expected `array` of length >= 1 - at `$.items`"),
        ('{"items": [', "truncated"),
        ("[1, 2]", "Expected `object`, got `array`"),
        ('{"items": "\ud800"}', "lone surrogate"),
        ('{"items": ' + "[" * 5000 + "]" * 5000 + "}", "Expected `object`"),
        ('{"items": [{"name": "x", "qty": ' + "9" * 5000 + "}]}", "at `$.items[0].qty`"),
    ],
)
async def test_bad_arguments_carry_msgspecs_message_and_path(
    autojump_clock, arguments: str, message: str
) -> None:
    async with running(demo_tools()) as h:
        await h.call("c1", "place_order", arguments)
        out = outputs(await h.settle())["c1"]
    assert out["error"] == "bad_arguments"
    assert message in out["message"]
    assert h.runner.stats.bad_arguments == 1
    assert h.runner.stats.started == 0


async def test_untyped_arguments_must_be_an_object_within_the_size_limit(autojump_clock) -> None:
    seen: list[Any] = []
    registry = ToolRegistry([Tool("note", seen.append)])
    config = ToolConfig(max_argument_bytes=100)
    wide = '{"x": "' + "é" * 50 + '"}'  # 59 characters, 109 bytes
    long = '{"x": "' + "x" * 200 + '"}'
    async with running(registry, config=config) as h:
        await h.call("a", "note", '"text"')
        await h.call("b", "note", wide)
        await h.call("c", "note", long)
        await h.call("d", "note", " ")  # a function without parameters: "" means {}
        out = outputs(await h.settle())
    assert out["a"] == {"error": "bad_arguments", "message": "Expected `object`, got `str`"}
    assert out["b"]["message"] == "arguments are 109 bytes; the limit is 100"
    assert out["c"]["message"] == "arguments are 209 bytes; the limit is 100"
    assert out["d"] is None
    assert seen == [{}]


async def test_deep_nesting_is_a_bad_argument_not_a_crash(autojump_clock) -> None:
    registry = ToolRegistry([Tool("note", lambda a: "ok")])
    async with running(registry) as h:
        await h.call("c", "note", '{"x": ' + "[" * 20_000 + "]" * 20_000 + "}")
        out = outputs(await h.settle())["c"]
    assert out == {"error": "bad_arguments", "message": "arguments are nested too deeply"}


async def test_unknown_tool_is_answered_and_the_model_continues(autojump_clock) -> None:
    async with running(demo_tools()) as h:
        await h.call("c1", "launch_rocket", "{}", response_id="r1")
        await h.done("r1")
        sent = await h.settle()
    assert outputs(sent)["c1"] == {
        "error": "unknown_tool",
        "message": "no tool named 'launch_rocket'; available: get_time, place_order",
    }
    assert isinstance(sent[-1], ResponseCreate) and creates(sent) == 1
    assert h.runner.stats.unknown_tool == 1


async def test_timeout_in_virtual_time(autojump_clock) -> None:
    async def hang(_: Any) -> None:
        await trio.sleep_forever()

    registry = ToolRegistry([Tool("hang", hang, timeout=2.5)])
    async with running(registry) as h:
        start = trio.current_time()
        await h.call("c1", "hang", response_id="r1")
        await h.done("r1")
        assert await h.settle() == []
        await trio.sleep(2.5)
        sent = await h.settle()
        assert trio.current_time() - start == 2.5
    assert outputs(sent)["c1"] == {"error": "timeout", "message": "no result within 2.5 s"}
    assert creates(sent) == 1  # a timeout is an answer: the model continues
    assert h.runner.stats.timed_out == 1


async def test_tool_exception_is_an_error_output_never_a_crash(autojump_clock) -> None:
    def boom(_: Any) -> None:
        raise ValueError("no such burger")

    async def aboom(_: Any) -> None:
        await trio.sleep(1)
        raise KeyError("fries")

    registry = ToolRegistry([Tool("boom", boom), Tool("aboom", aboom), Tool("ok", lambda a: 1)])
    async with running(registry) as h:
        await h.call("a", "boom")
        await h.call("b", "aboom")
        await trio.sleep(1)
        await h.call("c", "ok")
        out = outputs(await h.settle())
    assert out["a"] == {"error": "tool_error", "message": "ValueError: no such burger"}
    assert out["b"] == {"error": "tool_error", "message": "KeyError: 'fries'"}
    assert out["c"] == 1
    assert h.runner.stats.failed == 2 and h.runner.stats.completed == 1


def _loop() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("result", "cause"),
    [
        (object(), "TypeError"),
        ("\ud800", "UnicodeEncodeError"),
        ({(1, 2): "x"}, "TypeError"),
        (_loop(), "RecursionError"),
    ],
)
async def test_non_encodable_result_is_a_tool_error(autojump_clock, result, cause) -> None:
    registry = ToolRegistry([Tool("bad", lambda a: result)])
    async with running(registry) as h:
        await h.call("c1", "bad")
        out = outputs(await h.settle())["c1"]
    assert out["error"] == "tool_error"
    assert out["message"].startswith(f"result is not JSON-encodable: {cause}")


async def test_sync_async_and_awaitable_returning_functions(autojump_clock) -> None:
    async def twice(args: dict[str, Any]) -> int:
        await trio.sleep(0.5)
        return args["n"] * 2

    registry = ToolRegistry(
        [
            Tool("sync", lambda a: a["n"] + 1),
            Tool("async", twice),
            Tool("partial", functools.partial(lambda extra, a: twice({"n": a["n"] + extra}), 1)),
        ]
    )
    async with running(registry) as h:
        for name in ("sync", "async", "partial"):
            await h.call(name, name, '{"n": 5}')
        await trio.sleep(0.5)
        out = outputs(await h.settle())
    assert out == {"sync": 6, "async": 10, "partial": 12}


# -- output size ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["x" * 100_000, "é" * 50_000, "\x01" * 50_000, '"' * 50_000])
async def test_long_output_is_truncated_to_valid_json_within_the_limit(
    autojump_clock, text: str
) -> None:
    registry = ToolRegistry([Tool("big", lambda a: text)])
    async with running(registry, config=ToolConfig(max_output_bytes=1024)) as h:
        await h.call("c1", "big", response_id="r1")
        (event,) = await h.settle()
    full = msgspec.json.encode(text).decode()
    assert len(event.item.output.encode()) <= 1024
    out = json.loads(event.item.output)
    assert out["truncated"] is True and out["total_bytes"] == len(full.encode())
    assert full.startswith(out["head"])
    # The head is as long as the limit allows: one more character would not fit.
    longer = dict(out, head=full[: len(out["head"]) + 1])
    assert len(msgspec.json.encode(longer)) > 1024
    assert h.runner.stats.truncated == 1


async def test_output_at_the_limit_is_untouched(autojump_clock) -> None:
    text = "é" * 511  # 1022 bytes + 2 quotes = 1024
    registry = ToolRegistry([Tool("fits", lambda a: text)])
    async with running(registry, config=ToolConfig(max_output_bytes=1024)) as h:
        await h.call("c1", "fits", response_id="r1")
        (event,) = await h.settle()
    assert json.loads(event.item.output) == text
    assert h.runner.stats.truncated == 0


# -- cache -------------------------------------------------------------------------------------


async def test_read_only_results_are_cached_by_canonical_arguments(autojump_clock) -> None:
    calls: list[Any] = []

    def lookup(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(args)
        return {"n": len(calls)}

    registry = ToolRegistry(
        [
            Tool("lookup", lookup, read_only=True, cache_ttl=10.0),
            Tool("write", lookup),  # not read-only: never cached
        ]
    )
    async with running(registry) as h:
        for call_id, name, arguments in [
            ("a", "lookup", '{"x": 1, "y": {"p": 1, "q": 2}}'),
            ("b", "lookup", '{"y": {"q": 2, "p": 1}, "x": 1}'),  # the same, reordered
            ("c", "lookup", '{"x": 2}'),
            ("d", "write", '{"x": 1}'),
            ("e", "write", '{"x": 1}'),
        ]:
            await h.call(call_id, name, arguments)
            await h.settle()  # (identical calls at the same time both run: no coalescing)
        await trio.sleep(10)  # the entry for x=1 expires
        await h.call("f", "lookup", '{"x": 1, "y": {"p": 1, "q": 2}}')
        await h.settle()
    out = outputs(h.sent)
    assert out == {
        "a": {"n": 1},
        "b": {"n": 1},
        "c": {"n": 2},
        "d": {"n": 3},
        "e": {"n": 4},
        "f": {"n": 5},
    }
    assert h.runner.stats.cache_hits == 1


async def test_cache_is_a_bounded_lru(autojump_clock) -> None:
    runs: list[int] = []
    registry = ToolRegistry(
        [Tool("sq", lambda a: runs.append(a["n"]) or a["n"] ** 2, read_only=True)]
    )
    async with running(registry, config=ToolConfig(cache_size=2)) as h:
        for i, n in enumerate([1, 2, 1, 3, 1, 2]):  # 1 hit; 3 evicts 2; 2 runs again
            await h.call(f"c{i}", "sq", json.dumps({"n": n}))
            await h.settle()
        out = outputs(h.sent)
    assert [out[f"c{i}"] for i in range(6)] == [1, 4, 1, 9, 1, 4]
    assert runs == [1, 2, 3, 2]
    assert h.runner.stats.cache_hits == 2


# -- exactly once ---------------------------------------------------------------------------------


async def test_duplicate_call_id_is_ignored_while_running_and_after(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("hold", gate.hold)])
    async with running(registry) as h:
        await h.call("c1", "hold", '{"k": 1}', response_id="r1")
        await h.call("c1", "hold", '{"k": 1}', response_id="r1")  # replayed while running
        assert await h.settle() == []
        gate.open(1)
        await h.settle()
        await h.call("c1", "hold", '{"k": 1}', response_id="r1")  # replayed after the answer
        await h.call("c2", "nope", response_id="r2")
        await h.call("c2", "nope", response_id="r2")  # an immediate answer, replayed
        await h.done("r1")
        await h.settle()
    assert list(outputs(h.sent)) == ["c1", "c2"]
    assert creates(h.sent) == 1  # r1 only: r2 never finished
    assert h.runner.stats.duplicates == 3
    assert h.runner.stats.started == 1


async def test_several_calls_of_one_response_continue_once_after_all(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("hold", gate.hold)])
    async with running(registry) as h:
        await h.call("a", "hold", '{"k": "a"}', response_id="r1")
        await h.call("b", "hold", '{"k": "b"}', response_id="r1")
        await h.call("c", "nope", response_id="r1")
        await h.done("r1")
        gate.open("a")
        await h.settle()
        assert creates(h.sent) == 0
        gate.open("b")
        await h.settle()
    assert [type(e).__name__ for e in h.sent] == [
        "ConversationItemCreate",
        "ConversationItemCreate",
        "ConversationItemCreate",
        "ResponseCreate",
    ]


async def test_call_with_empty_response_id_is_its_own_group(autojump_clock) -> None:
    async with running(demo_tools()) as h:
        await h.call("a", "place_order", ORDER_ARGS)
        await h.settle()
        await h.call("b", "nope")
        await h.settle()
    assert [type(e).__name__ for e in h.sent] == [
        "ConversationItemCreate",
        "ResponseCreate",
        "ConversationItemCreate",
        "ResponseCreate",
    ]


async def test_call_arriving_after_its_response_done_still_continues(autojump_clock) -> None:
    async with running(demo_tools()) as h:
        await h.done("r1")
        await h.call("a", "place_order", ORDER_ARGS, response_id="r1")
        sent = await h.settle()
    assert creates(sent) == 1 and isinstance(sent[-1], ResponseCreate)


# -- barge-in --------------------------------------------------------------------------------------


async def test_cancel_interruptible_spares_non_interruptible_calls(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("soft", gate.hold), Tool("firm", gate.hold, interruptible=False)])
    async with running(registry) as h:
        await h.call("s", "soft", '{"k": "s"}', response_id="r1")
        await h.call("f", "firm", '{"k": "f"}', response_id="r1")
        await h.done("r1")
        await h.settle()
        assert h.runner.cancel_interruptible() == 1
        assert h.runner.cancel_interruptible() == 0  # already cancelled
        sent = await h.settle()
        assert outputs(sent) == {
            "s": {"error": "cancelled", "message": "cancelled: the user interrupted"}
        }
        assert gate.cancelled == ["s"]
        gate.open("f")
        sent = await h.settle()
    assert outputs(sent) == {"f": {"k": "f"}}
    assert creates(sent) == 1  # the firm call was answered: the model continues
    assert h.runner.stats.cancelled == 1 and h.runner.stats.completed == 1


async def test_cancel_all_cancels_non_interruptible_too(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("firm", gate.hold, interruptible=False)])
    async with running(registry) as h:
        await h.call("f", "firm", '{"k": "f"}', response_id="r1")
        await h.settle()
        assert h.runner.cancel_interruptible() == 0
        assert h.runner.cancel(interruptible_only=False) == 1
        await h.done("r1")
        sent = await h.settle()
    assert code(outputs(sent)["f"]) == "cancelled"
    assert creates(sent) == 0  # only cancelled calls: the user has the floor


async def test_a_call_that_timed_out_is_not_counted_as_cancelled(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("hold", gate.hold, timeout=1.0)])
    async with running(registry) as h:
        await h.call("c", "hold", '{"k": 1}')
        await trio.sleep(1.0)
        assert h.runner.cancel_interruptible() == 0
        out = outputs(await h.settle())
    assert code(out["c"]) == "timeout"


# -- bounds and lifetime -----------------------------------------------------------------------


async def test_max_concurrent_is_respected_and_receiving_stops(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("hold", gate.hold)])
    config = ToolConfig(max_concurrent=2)
    async with running(registry, config=config, inbox=1) as h:
        sent_all = trio.Event()

        async def send_five() -> None:
            for i in range(5):
                await h.call(f"c{i}", "hold", json.dumps({"k": i}))
            sent_all.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_five)
            await h.settle()
            # Two run, one waits in the inbox's buffer, the sender is held back.
            assert (gate.running, h.runner.running) == (2, 2)
            assert not sent_all.is_set()
            for i in range(5):
                gate.open(i)
                await h.settle()
                assert gate.running <= 2
        assert sent_all.is_set()
    assert gate.most == 2
    assert sorted(outputs(h.sent)) == [f"c{i}" for i in range(5)]


async def test_closing_the_inbox_waits_for_running_calls(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("hold", gate.hold)])
    calls = open_edge("tools", 4)
    up = open_edge("up", 4)
    runner = ToolRunner(registry, up.sender)
    returned = trio.Event()

    async def run() -> None:
        await runner.run(calls.receiver)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await calls.sender.send(ToolCall(call_id="c", name="hold", arguments='{"k": 1}'))
        calls.sender.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        gate.open(1)
    assert returned.is_set()
    assert outputs([up.receiver.receive_nowait(), up.receiver.receive_nowait()]) == {"c": {"k": 1}}
    calls.close()
    up.close()


async def test_cancelling_run_cancels_calls_and_sends_nothing(autojump_clock) -> None:
    gate = Gate()
    registry = ToolRegistry([Tool("firm", gate.hold, interruptible=False, timeout=60)])
    calls = open_edge("tools", 4)
    up = open_edge("up", 4)
    runner = ToolRunner(registry, up.sender)
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, calls.receiver)
            await calls.sender.send(ToolCall(call_id="a", name="firm", arguments='{"k": 1}'))
            await calls.sender.send(ToolCall(call_id="b", name="firm", arguments='{"k": 2}'))
    assert scope.cancelled_caught
    assert sorted(gate.cancelled) == [1, 2]
    assert runner.running == 0
    with pytest.raises(trio.WouldBlock):
        up.receiver.receive_nowait()
    calls.close()
    up.close()


async def test_closed_upstream_edge_does_not_stop_the_runner(autojump_clock) -> None:
    async with running(demo_tools()) as h:
        h._up.close()
        await h.call("a", "place_order", ORDER_ARGS)
        await h.call("b", "nope")
        await trio.testing.wait_all_tasks_blocked()
    assert h.runner.stats.undelivered == 4  # two outputs, two response.create
    assert h.runner.stats.completed == 1


async def test_run_refuses_strangers_and_a_second_run(autojump_clock) -> None:
    calls = open_edge("tools", 2)
    up = open_edge("up", 2)
    runner = ToolRunner(ToolRegistry(), up.sender)
    await calls.sender.send("not a tool call")
    with pytest.RaisesGroup(pytest.RaisesExc(TypeError, match="unexpected message")):
        await runner.run(calls.receiver)
    with pytest.raises(RuntimeError, match="runs once"):
        await runner.run(calls.receiver)
    calls.close()
    up.close()


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_label_registered_tools_only(autojump_clock) -> None:
    async def slow(_: Any) -> None:
        await trio.sleep_forever()

    registry = Registry()
    metrics = ToolMetrics(registry)
    tools = ToolRegistry([Tool("slow", slow, timeout=1.0), Tool("big", lambda a: "x" * 1000)])
    async with running(tools, metrics=metrics, config=ToolConfig(max_output_bytes=256)) as h:
        for i in range(3):
            await h.call(f"u{i}", f"made_up_{i}")  # untrusted names never become labels
        await h.call("s", "slow")
        await h.call("b", "big")
        await h.call("b", "big")
        await trio.sleep(1.0)
        await h.settle()
    text = registry.render()
    assert 'voiceactors_tool_calls_total{tool="unknown",outcome="unknown_tool"} 3' in text
    assert 'voiceactors_tool_calls_total{tool="slow",outcome="timeout"} 1' in text
    assert 'voiceactors_tool_calls_total{tool="big",outcome="ok"} 1' in text
    assert 'voiceactors_tool_calls_total{tool="big",outcome="duplicate"} 1' in text
    assert 'voiceactors_tool_seconds_bucket{tool="slow",le="1"} 1' in text
    assert 'voiceactors_tool_seconds_count{tool="big"} 1' in text
    assert "voiceactors_tool_outputs_truncated_total 1" in text
    assert "made_up" not in text
    ToolMetrics(registry)  # a second runner's metrics share the families


# -- tools and the registry -------------------------------------------------------------------


class Leaf(msgspec.Struct):
    name: str


class Tree(msgspec.Struct):
    """A tree."""

    leaves: list[Leaf]
    best: Leaf | None = None


class Loop(msgspec.Struct):
    next: Loop | None = None


class Pair(msgspec.Struct, array_like=True):
    a: int
    b: int


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [k for k in node if k in ("$ref", "$defs")] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_definition_inlines_the_schema() -> None:
    d = Tool("grow", lambda a: None, "Grow a tree.", args=Tree).definition()
    assert (d.name, d.description) == ("grow", "Grow a tree.")
    params = d.parameters
    assert isinstance(params, dict) and _refs(params) == []
    assert params["type"] == "object" and params["required"] == ["leaves"]
    leaf = params["properties"]["leaves"]["items"]
    assert leaf["properties"] == {"name": {"type": "string"}}
    assert params["properties"]["best"]["anyOf"][0] == leaf
    untyped = Tool("t", lambda a: None).definition()
    assert untyped.parameters == {"type": "object", "properties": {}}
    assert untyped.description is msgspec.UNSET


def test_order_script_arguments_decode_into_the_demo_schema() -> None:
    tool = demo_tools().get("place_order")
    assert tool is not None
    args = tool.decode(ORDER_ARGS)
    assert [(i.name, i.qty, i.size) for i in args.items] == [
        ("cheeseburger", 2, None),
        ("fries", 1, "large"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "has space"}, "tool name"),
        ({"name": "x" * 65}, "tool name"),
        ({"name": ""}, "tool name"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"cache_ttl": 0}, "cache_ttl"),
        ({"args": Loop}, "recursive"),
        ({"args": Pair}, "JSON object"),
        ({"args": int}, "JSON object"),
    ],
)
def test_bad_tools_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tool(**{"name": "ok", "fn": print, **kwargs})


def test_registry() -> None:
    a, b = Tool("a", print), Tool("b", print)
    registry = ToolRegistry([a])
    registry.add(b)
    assert len(registry) == 2 and "a" in registry and "c" not in registry
    assert registry.get("b") is b and registry.get("c") is None
    assert [d.name for d in registry.definitions()] == ["a", "b"]
    with pytest.raises(ValueError, match="duplicate"):
        registry.add(Tool("a", len))
    with pytest.raises(ValueError, match="duplicate"):
        ToolRegistry([a, a])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrent": 0},
        {"max_output_bytes": 255},
        {"cache_size": -1},
        {"max_argument_bytes": 1},
    ],
)
def test_config_bounds(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ToolConfig(**kwargs)


async def test_demo_tools(autojump_clock) -> None:
    registry = demo_tools()
    async with running(registry) as h:
        await h.call("a", "place_order", ORDER_ARGS)
        await h.call("b", "place_order", '{"items": [{"name": "shake"}]}')
        await h.call("t1", "get_time", "")
        await h.settle()
        await h.call("t2", "get_time", "{}")
        await trio.sleep(1.0)  # get_time is cached for a second only
        await h.call("t3", "get_time", "{}")
        await h.settle()
    out = outputs(h.sent)
    assert out["a"] == {"order_id": "order-1", "items": 3, "ready_in_minutes": 10}
    assert out["b"] == {"order_id": "order-2", "items": 1, "ready_in_minutes": 10}
    now = datetime.fromisoformat(out["t1"]["utc"])
    assert now.tzinfo is not None and now.utcoffset() == UTC.utcoffset(None)
    assert out["t2"] == out["t1"]
    assert h.runner.stats.cache_hits == 1 and h.runner.stats.started == 4
    # Another registry numbers its own orders.
    order = demo_tools().get("place_order")
    assert order is not None
    assert order.fn(order.decode(ORDER_ARGS))["order_id"] == "order-1"


# -- exactly once under every interleaving (hypothesis) ----------------------------------------

TIMEOUT = 5.0
KINDS = ("hold", "hold_ni", "echo", "boom", "unknown", "bad")
OPS = st.one_of(
    st.tuples(st.just("call"), st.sampled_from([0, 1, 2, None]), st.sampled_from(KINDS)),
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.just(("cancel_interruptible",)),
    st.just(("cancel_all",)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 2.0, 3.0])),
    st.tuples(st.just("seal"), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("dup"), st.integers(0, 50)),
)


class Model:
    """What the runner must have sent after each step, computed independently.

    * every accepted call gets exactly one output: ``hold``/``hold_ni`` answer ``ok`` when
      released, ``timeout`` once ``TIMEOUT`` passed since they arrived, ``cancelled`` when a
      cancel reached them first (``cancel_interruptible`` spares ``hold_ni``); the others
      answer at once (``echo`` ok, ``boom`` tool_error, ``unknown`` unknown_tool, ``bad``
      bad_arguments); a repeated call_id gets nothing;
    * a group is the calls of one response id (slot, generation), or a single call without
      one; ``seal`` ends a slot's current response (``response.done``). The number of
      ``response.create`` sent equals the number of groups that are sealed, fully
      answered, and have at least one answer other than ``cancelled``.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.generation = [0, 0, 0]
        self.sealed: set[Any] = set()
        self.duplicates = 0

    def running(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["code"] is None]

    def expected_creates(self) -> int:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for c in self.calls:
            groups.setdefault(c["group"], []).append(c)
        return sum(
            1
            for key, members in groups.items()
            if (key in self.sealed or key[0] == "")
            and all(c["code"] is not None for c in members)
            and any(c["code"] != "cancelled" for c in members)
        )


def _kind_call(kind: str, n: int) -> tuple[str, str]:
    args = json.dumps({"k": n})
    return {
        "hold": ("hold", args),
        "hold_ni": ("hold_ni", args),
        "echo": ("echo", args),
        "boom": ("boom", args),
        "unknown": ("nope", args),
        "bad": ("hold", "[1]"),
    }[kind]


IMMEDIATE = {"echo": "ok", "boom": "tool_error", "unknown": "unknown_tool", "bad": "bad_arguments"}


async def _exactly_once(ops: list[tuple[Any, ...]]) -> None:
    gate = Gate()

    def boom(_: Any) -> None:
        raise RuntimeError("boom")

    registry = ToolRegistry(
        [
            Tool("hold", gate.hold, timeout=TIMEOUT),
            Tool("hold_ni", gate.hold, timeout=TIMEOUT, interruptible=False),
            Tool("echo", lambda a: a),
            Tool("boom", boom),
        ]
    )
    model = Model()
    sent_calls: list[ToolCall] = []
    async with running(registry, config=ToolConfig(max_concurrent=8), inbox=4) as h:
        for op in ops:
            match op:
                case ("call", slot, kind):
                    if len(model.running()) >= 6:  # keep a slot for control messages
                        continue
                    n = len(model.calls)
                    rid = "" if slot is None else f"r{slot}-{model.generation[slot]}"
                    name, arguments = _kind_call(kind, n)
                    call = ToolCall(
                        call_id=f"c{n}", name=name, arguments=arguments, response_id=rid
                    )
                    sent_calls.append(call)
                    model.calls.append(
                        {
                            "id": call.call_id,
                            "kind": kind,
                            "group": (rid, "") if rid else ("", call.call_id),
                            "k": n,
                            "at": trio.current_time(),
                            "code": IMMEDIATE.get(kind),
                        }
                    )
                    await h.calls.send(call)
                case ("finish", i):
                    if live := model.running():
                        c = live[i % len(live)]
                        gate.open(c["k"])
                        c["code"] = "ok"
                case ("cancel_interruptible",):
                    hit = [c for c in model.running() if c["kind"] == "hold"]
                    assert h.runner.cancel_interruptible() == len(hit)
                    for c in hit:
                        c["code"] = "cancelled"
                case ("cancel_all",):
                    hit = model.running()
                    assert h.runner.cancel_all() == len(hit)
                    for c in hit:
                        c["code"] = "cancelled"
                case ("advance", dt):
                    await trio.sleep(dt)
                    for c in model.running():
                        if c["at"] + TIMEOUT <= trio.current_time():
                            c["code"] = "timeout"
                case ("seal", slot):
                    rid = f"r{slot}-{model.generation[slot]}"
                    model.generation[slot] += 1
                    model.sealed.add((rid, ""))
                    await h.done(rid)
                case ("dup", i):
                    if sent_calls:
                        model.duplicates += 1
                        await h.calls.send(sent_calls[i % len(sent_calls)])
            await h.settle()
            answered = {cid: code(o) for cid, o in outputs(h.sent).items()}
            assert answered == {c["id"]: c["code"] for c in model.calls if c["code"]}
            assert creates(h.sent) == model.expected_creates()
        for c in model.running():  # let the rest finish; closing the inbox waits for them
            gate.open(c["k"])
            c["code"] = "ok"
    assert {cid: code(o) for cid, o in outputs(h.sent).items()} == {
        c["id"]: c["code"] for c in model.calls
    }
    assert creates(h.sent) == model.expected_creates()
    # No response.create before the outputs of a group that could have asked for it.
    members: dict[Any, set[str]] = {}
    for c in model.calls:
        members.setdefault(c["group"], set()).add(c["id"])
    seen: dict[str, str] = {}
    made = 0
    for e in h.sent:
        if isinstance(e, ConversationItemCreate):
            seen[e.item.call_id] = code(json.loads(e.item.output))
        else:
            made += 1
            complete = [
                g
                for g, ids in members.items()
                if ids <= seen.keys() and any(seen[i] != "cancelled" for i in ids)
            ]
            assert made <= len(complete)
    stats = h.runner.stats
    codes = [c["code"] for c in model.calls]
    assert stats.duplicates == model.duplicates
    assert stats.cancelled == codes.count("cancelled")
    assert stats.timed_out == codes.count("timeout")
    assert stats.responses_created == made


@settings(max_examples=200, deadline=None)
@given(st.lists(OPS, max_size=40))
def test_every_call_is_answered_exactly_once(ops: list[tuple[Any, ...]]) -> None:
    leak_checked_run(
        functools.partial(_exactly_once, ops),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
