"""The tool-runner actor: the model's function calls, run server-side, answered exactly once.

Theory of operation
-------------------
A :class:`ToolRunner` receives :class:`~voiceactors.messages.ToolCall` messages (one per
``response.function_call_arguments.done``) and :class:`~voiceactors.messages.ResponseDone`
messages (one per ``response.done``) on its inbox, and sends Realtime client events to the
upstream edge ``up``. For each call it decides, synchronously, one of:

* **duplicate** (the ``call_id`` is running or was answered recently; an upstream replay
  after a reconnect can repeat one): ignored and counted, no output;
* **answer now**: an ``unknown_tool`` or ``bad_arguments`` error, or a read-only tool's
  cached result;
* **run**: the tool's function runs in a task of the runner's nursery inside its own
  cancel scope, whose deadline is the tool's ``timeout`` and which ``cancel_interruptible``
  / ``cancel_all`` cancel on barge-in.

Every call that is not a duplicate gets exactly one ``conversation.item.create`` with a
``function_call_output`` item, whatever happens to it (success, error, timeout,
cancellation), except when ``run`` itself is cancelled: the session is ending and there is
no conversation left to keep consistent.

Outputs are JSON text: the tool's result encoded by msgspec, or
``{"error": "<code>", "message": "..."}`` with code ``unknown_tool``, ``bad_arguments``,
``timeout``, ``cancelled`` or ``tool_error``. Longer than ``max_output_bytes`` UTF-8 bytes,
an output is replaced by ``{"truncated": true, "total_bytes": N, "head": "<prefix>"}``
that fits (still JSON, so the model reads what it got and knows it is partial).

When the model continues: the calls of one response (same ``response_id``) form a group.
Once the group is *sealed* (its ``ResponseDone`` arrived; a call with an empty
``response_id`` is a group of its own, sealed at once) and every call in it is answered,
one ``response.create`` follows its last output, if at least one of its calls was not
cancelled by barge-in. Waiting for ``response.done`` matters: a ``response.create`` while
the response is still active is refused with ``conversation_already_has_active_response``,
and an unknown tool or a cache hit is answered long before the response ends. Cancelled
calls answer ``cancelled`` (the conversation stays consistent) but ask for nothing: the
user is speaking and the server will answer them.

Bounds: at most ``max_concurrent`` calls hold a slot (running or sending their output);
with every slot taken the runner stops receiving, so the inbox's own buffer bounds the
waiting work. Remembered ``call_id``s, finished responses, open groups and cached results
are capped; nothing grows with the length of a session.

Sync tool functions run inline on the event loop, so they must be quick (microseconds: a
lookup, a counter); they cannot be cancelled or timed out. Put blocking work in an async
function that calls ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import trio

from .. import messages
from ..channels import EdgeSender
from ..metrics import CardinalityError, CounterChild, HistogramChild, Registry
from ..realtime.events import (
    ConversationItemCreate,
    FunctionCallOutputItem,
    FunctionTool,
    ResponseCreate,
)

__all__ = [
    "Tool",
    "ToolConfig",
    "ToolMetrics",
    "ToolRegistry",
    "ToolRunner",
    "ToolStats",
    "demo_tools",
]

log = logging.getLogger("voiceactors.tools")

# The Realtime API's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_ANY_OBJECT = msgspec.json.Decoder(dict[str, Any])
_MESSAGE_CHARS = 1000  # error messages quote exceptions and names we do not control
_REMEMBERED_CALLS = 1024  # answered call_ids kept to spot replays
_REMEMBERED_RESPONSES = 64  # finished response_ids, for calls that arrive after their end
_MAX_OPEN_GROUPS = 64  # groups waiting for their response.done

Outcome = Literal[
    "ok", "cached", "tool_error", "timeout", "cancelled", "unknown_tool", "bad_arguments"
]


# -- tools --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call.

    ``fn`` receives the decoded arguments: an instance of ``args`` (any type msgspec can
    decode from a JSON object: a ``msgspec.Struct``, a dataclass, a TypedDict), or a
    ``dict`` when ``args`` is None. It may be async (awaited, cancellable) or sync (run
    inline: keep it quick). Its result must be msgspec-encodable.

    ``timeout`` is per call, in seconds. ``interruptible`` calls are cancelled when the
    user barges in. A ``read_only`` tool's results are cached per session by (name,
    canonical arguments) for ``cache_ttl`` seconds.

    Raises ``ValueError`` for a name the Realtime API would refuse, a timeout that is not
    positive, or an ``args`` type whose JSON schema is not an object or is recursive (the
    schema is sent inline, without ``$ref``).
    """

    name: str
    fn: Callable[[Any], Any]
    description: str = ""
    args: type | None = None
    timeout: float = 10.0
    interruptible: bool = True
    read_only: bool = False
    cache_ttl: float = math.inf
    _decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)
    _parameters: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tool name must match [A-Za-z0-9_-]{{1,64}}: {self.name!r}")
        if not self.timeout > 0:
            raise ValueError(f"tool {self.name}: timeout must be > 0, got {self.timeout!r}")
        if not self.cache_ttl > 0:
            raise ValueError(f"tool {self.name}: cache_ttl must be > 0, got {self.cache_ttl!r}")
        if self.args is None:
            decoder, parameters = _ANY_OBJECT, {"type": "object", "properties": {}}
        else:
            decoder = msgspec.json.Decoder(self.args)
            parameters = _inline_refs(msgspec.json.schema(self.args))
            if parameters.get("type") != "object":
                raise ValueError(f"tool {self.name}: arguments must be a JSON object type")
        object.__setattr__(self, "_decoder", decoder)
        object.__setattr__(self, "_parameters", parameters)

    def definition(self) -> FunctionTool:
        """The tool as ``session.update`` declares it (the JSON schema inline)."""
        return FunctionTool(
            name=self.name,
            description=self.description or msgspec.UNSET,
            parameters=self._parameters,
        )

    def decode(self, arguments: str) -> Any:
        """Decode the model's argument text (raises ``msgspec.DecodeError`` and friends)."""
        return self._decoder.decode(arguments)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``$ref`` to its ``$defs`` replaced by the definition."""
    defs: dict[str, Any] = schema.get("$defs", {})

    def node(n: Any, seen: frozenset[str]) -> Any:
        if isinstance(n, list):
            return [node(v, seen) for v in n]
        if not isinstance(n, dict):
            return n
        out: dict[str, Any] = {}
        ref = n.get("$ref")
        if isinstance(ref, str):
            name = ref.removeprefix("#/$defs/")
            if name in seen or name not in defs:
                raise ValueError(f"cannot inline the schema reference {ref!r} (recursive?)")
            out.update(node(defs[name], seen | {name}))
        for key, value in n.items():
            if key in ("$ref", "$defs"):
                continue
            if key in ("properties", "patternProperties") and isinstance(value, dict):
                # Keys here are field names, not keywords: a field may be called "$ref".
                out[key] = {k: node(v, seen) for k, v in value.items()}
            else:
                out[key] = node(value, seen)
        return out

    result: dict[str, Any] = node(schema, frozenset())
    return result


class ToolRegistry:
    """The tools of a session, by name. Duplicate names raise ``ValueError``."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"duplicate tool name {tool.name!r}")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def definitions(self) -> list[FunctionTool]:
        """Every tool's definition, in the order they were added."""
        return [t.definition() for t in self._tools.values()]

    def names(self) -> frozenset[str]:
        return frozenset(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())


# -- configuration, counters, metrics -----------------------------------------------------


@dataclass(frozen=True)
class ToolConfig:
    """Per-session limits of a :class:`ToolRunner` (``ValueError`` when out of range).

    ``max_concurrent`` calls hold a slot at once; ``max_output_bytes`` caps the UTF-8 size
    of each output (at least 256, so the truncation envelope fits); ``cache_size`` read-only
    results are kept (0: no cache); ``max_argument_bytes`` caps the model's argument text.
    """

    max_concurrent: int = 8
    max_output_bytes: int = 16_384
    cache_size: int = 64
    max_argument_bytes: int = 65_536

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if self.max_output_bytes < 256:
            raise ValueError("max_output_bytes must be >= 256")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if self.max_argument_bytes < 2:
            raise ValueError("max_argument_bytes must be >= 2")


@dataclass(slots=True)
class ToolStats:
    """Counters of one runner.

    ``started``: tool functions called; then exactly one of ``completed``, ``failed``
    (raised, or returned something not JSON-encodable), ``timed_out``, ``cancelled``
    (``cancelled`` also counts calls cancelled before their function started).
    ``cache_hits``, ``unknown_tool``, ``bad_arguments``: answered without running.
    ``duplicates``: ignored repeats of a ``call_id``. ``truncated``: outputs cut to size.
    ``responses_created``: ``response.create`` sent. ``undelivered``: events lost because
    ``up`` was closed. ``groups_abandoned``: groups dropped while waiting (too long) for
    their ``response.done``.
    """

    started: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    truncated: int = 0
    cache_hits: int = 0
    unknown_tool: int = 0
    bad_arguments: int = 0
    duplicates: int = 0
    responses_created: int = 0
    undelivered: int = 0
    groups_abandoned: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class ToolMetrics:
    """Prometheus families for tool calls, shared by every runner given the same registry.

    ``voiceactors_tool_calls_total{tool,outcome}`` counts answered calls (and ``duplicate``
    ones); ``tool`` is the name of a registered tool, or ``unknown``, so the model cannot
    grow the label set. ``voiceactors_tool_seconds{tool}`` is how long tool functions ran.
    ``voiceactors_tool_outputs_truncated_total`` counts outputs cut to size.
    """

    def __init__(self, registry: Registry) -> None:
        self.calls = registry.counter(
            "voiceactors_tool_calls_total",
            "Tool calls answered, by tool and outcome.",
            ("tool", "outcome"),
        )
        self.seconds = registry.histogram(
            "voiceactors_tool_seconds",
            "Seconds a tool function ran.",
            ("tool",),
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.truncated = registry.counter(
            "voiceactors_tool_outputs_truncated_total",
            "Tool outputs cut to the output size limit.",
        )
        self._calls: dict[tuple[str, str], CounterChild | None] = {}
        self._seconds: dict[str, HistogramChild | None] = {}

    def count(self, tool: str, outcome: str) -> None:
        key = (tool, outcome)
        if key not in self._calls:
            self._calls[key] = _child(lambda: self.calls.labels(tool, outcome))
        child = self._calls[key]
        if child is not None:
            child.inc()

    def observe(self, tool: str, seconds: float) -> None:
        if tool not in self._seconds:
            self._seconds[tool] = _child(lambda: self.seconds.labels(tool))
        child = self._seconds[tool]
        if child is not None:
            child.observe(seconds)


def _child(make: Callable[[], Any]) -> Any:
    # Past the registry's cardinality cap a series is not exported; the call still runs.
    try:
        return make()
    except CardinalityError:
        log.warning("tool metrics: label cap reached; series not exported")
        return None


# -- the runner ---------------------------------------------------------------------------


class _Call:
    """A call holding a slot: its cancel scope and why it was cancelled, if it was."""

    __slots__ = ("args", "call", "reason", "scope", "tool")

    def __init__(self, call: messages.ToolCall, tool: Tool, args: Any) -> None:
        self.call = call
        self.tool = tool
        self.args = args
        self.scope = trio.CancelScope(deadline=trio.current_time() + tool.timeout)
        self.reason: str | None = None  # "cancelled" once barge-in cancelled it


class _Group:
    __slots__ = ("answered", "pending", "sealed")

    def __init__(self, sealed: bool) -> None:
        self.pending = 0  # calls accepted and not yet answered
        self.answered = 0  # outputs sent that were not "cancelled"
        self.sealed = sealed  # no more calls will join (response.done seen)


class ToolRunner:
    """Run one session's tool calls (see the module docstring).

    ``up`` receives ``ConversationItemCreate`` and ``ResponseCreate`` events; make it a
    ``Full.BLOCK`` edge (an output must not be dropped). The runner keeps ``stats`` and,
    with ``metrics``, updates the shared families.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        up: EdgeSender[Any],
        *,
        config: ToolConfig | None = None,
        metrics: ToolMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.up = up
        self.config = config or ToolConfig()
        self.metrics = metrics
        self.stats = ToolStats()
        self._slots = trio.Semaphore(self.config.max_concurrent)
        self._running: dict[str, _Call] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()  # recent call_ids
        self._done: OrderedDict[str, None] = OrderedDict()  # recent finished responses
        self._groups: OrderedDict[object, _Group] = OrderedDict()
        self._cache: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()
        self._ran = False

    @property
    def running(self) -> int:
        """Calls accepted whose function has not finished yet."""
        return len(self._running)

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        """Answer ``ToolCall``s (and take ``ResponseDone``s) from ``inbox`` until it closes.

        Returns once the inbox is closed (or its sender is) and every accepted call has
        been answered. When cancelled, running calls are cancelled with it, nothing more is
        sent, and ``trio.Cancelled`` propagates. A message of another type is a wiring bug:
        ``TypeError``. A tool's failure never escapes. If ``up`` is closed, outputs are
        counted as ``undelivered`` and the runner carries on. Runs once (``RuntimeError``).
        """
        if self._ran:
            raise RuntimeError("a ToolRunner runs once")
        self._ran = True
        async with trio.open_nursery() as nursery:
            while True:
                # A slot first, then a message: with every slot taken we stop receiving,
                # and the inbox's buffer (then its sender) absorbs the backpressure.
                await self._slots.acquire()
                try:
                    message = await inbox.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    self._slots.release()
                    break
                except BaseException:
                    self._slots.release()
                    raise
                match message:
                    case messages.ToolCall():
                        call = self._accept(message)
                        if isinstance(call, _Call):
                            nursery.start_soon(self._execute, call, name=f"tool/{message.name}")
                            continue
                        try:
                            if call is not None:
                                await self._answer(message, *call)
                        finally:
                            self._slots.release()
                    case messages.ResponseDone(response_id=rid):
                        try:
                            await self._seal(rid)
                        finally:
                            self._slots.release()
                    case _:
                        self._slots.release()
                        raise TypeError(f"ToolRunner: unexpected message {message!r}")

    def cancel_interruptible(self) -> int:
        """Cancel every running interruptible call (barge-in); return how many.

        Sync and safe from any task of the run. Each cancelled call answers ``cancelled``
        and does not ask the model to continue. Calls whose deadline already passed answer
        ``timeout`` and are not counted; calls whose function already returned keep their
        result.
        """
        return self._cancel(interruptible_only=True)

    def cancel_all(self) -> int:
        """Like ``cancel_interruptible`` for every running call, interruptible or not."""
        return self._cancel(interruptible_only=False)

    def cancel(self, interruptible_only: bool) -> int:
        """``cancel_interruptible()`` or ``cancel_all()`` (the turn machine's ``CancelTools``)."""
        return self._cancel(interruptible_only=interruptible_only)

    def _cancel(self, *, interruptible_only: bool) -> int:
        n = 0
        for c in self._running.values():
            if interruptible_only and not c.tool.interruptible:
                continue
            if not c.scope.cancel_called:  # (also true once the deadline has passed)
                c.reason = "cancelled"
                c.scope.cancel()
                n += 1
        return n

    # -- deciding -------------------------------------------------------------------------

    def _accept(self, call: messages.ToolCall) -> _Call | tuple[str, str, str] | None:
        """Decide what ``call`` gets: a ``_Call`` to run, ``(output, outcome, tool label)``
        to send now, or None (a duplicate: nothing)."""
        cid = call.call_id
        if cid in self._running or cid in self._seen:
            self.stats.duplicates += 1
            self._count(call.name if call.name in self.registry else "unknown", "duplicate")
            return None
        self._remember(cid)
        self._join_group(call)
        tool = self.registry.get(call.name)
        if tool is None:
            self.stats.unknown_tool += 1
            names = sorted(self.registry.names())
            return (
                _error(
                    "unknown_tool",
                    f"no tool named {call.name[:64]!r}; available: {', '.join(names[:32])}",
                ),
                "unknown_tool",
                "unknown",
            )
        try:
            args = self._decode(tool, call.arguments)
        except _BadArguments as exc:
            self.stats.bad_arguments += 1
            return _error("bad_arguments", str(exc)), "bad_arguments", tool.name
        if tool.read_only:
            hit = self._cached(tool, args)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit, "cached", tool.name
        running = _Call(call, tool, args)
        self._running[cid] = running
        return running

    def _decode(self, tool: Tool, arguments: str) -> Any:
        limit = self.config.max_argument_bytes
        size = len(arguments)
        if size <= limit:  # (bytes >= chars: count bytes only when it could matter)
            size = len(arguments.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise _BadArguments(f"arguments are {size} bytes; the limit is {limit}")
        if not arguments.strip():
            arguments = "{}"  # models send "" for a function without parameters
        try:
            return tool.decode(arguments)
        except msgspec.DecodeError as exc:  # (ValidationError too: it carries the path)
            raise _BadArguments(str(exc)) from None
        except UnicodeEncodeError:
            raise _BadArguments("arguments are not valid UTF-8 (lone surrogate)") from None
        except RecursionError:
            raise _BadArguments("arguments are nested too deeply") from None

    def _join_group(self, call: messages.ToolCall) -> None:
        rid = call.response_id
        key = _group_key(call)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(sealed=not rid or rid in self._done)
            if len(self._groups) > _MAX_OPEN_GROUPS:
                self._abandon_one()
        group.pending += 1

    def _abandon_one(self) -> None:
        # The oldest group with nothing pending has waited longest for a response.done
        # that is not coming (its connection died mid-response): let it go.
        for key, group in self._groups.items():
            if group.pending == 0:
                del self._groups[key]
                self.stats.groups_abandoned += 1
                return

    def _remember(self, call_id: str) -> None:
        self._seen[call_id] = None
        self._seen.move_to_end(call_id)
        if len(self._seen) > _REMEMBERED_CALLS:
            self._seen.popitem(last=False)

    def _cached(self, tool: Tool, args: Any) -> str | None:
        key = _cache_key(tool, args)
        entry = self._cache.get(key) if key is not None else None
        if entry is None:
            return None
        output, expires = entry
        if trio.current_time() >= expires:
            del self._cache[key]  # type: ignore[arg-type]
            return None
        self._cache.move_to_end(key)  # type: ignore[arg-type]
        return output

    def _store(self, tool: Tool, args: Any, output: str) -> None:
        key = _cache_key(tool, args)
        if key is None or self.config.cache_size == 0:
            return
        self._cache[key] = (output, trio.current_time() + tool.cache_ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    # -- acting ---------------------------------------------------------------------------

    async def _execute(self, c: _Call) -> None:
        try:
            output, outcome = await self._invoke(c)
            await self._answer(c.call, output, outcome, c.tool.name)
        finally:
            self._running.pop(c.call.call_id, None)
            self._slots.release()

    async def _invoke(self, c: _Call) -> tuple[str, Outcome]:
        tool, stats = c.tool, self.stats
        started = trio.current_time()
        result: Any = None
        failure: BaseException | None = None
        ran = False
        with c.scope:
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before it began
            ran = True
            stats.started += 1
            try:
                result = tool.fn(c.args)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:  # a tool's bug is the model's error output, not ours
                failure = exc
        # From here on the call is answered, not running: barge-in no longer touches it.
        self._running.pop(c.call.call_id, None)
        if ran and self.metrics is not None:
            self.metrics.observe(tool.name, trio.current_time() - started)
        if c.scope.cancelled_caught:
            if c.reason == "cancelled":
                stats.cancelled += 1
                return _error("cancelled", "cancelled: the user interrupted"), "cancelled"
            stats.timed_out += 1
            return _error("timeout", f"no result within {tool.timeout:g} s"), "timeout"
        if failure is None:
            try:
                output = msgspec.json.encode(result).decode()
            except Exception as exc:  # (TypeError, UnicodeEncodeError, RecursionError, ...)
                failure = exc
                detail = "result is not JSON-encodable: "
            else:
                stats.completed += 1
                if tool.read_only:
                    self._store(tool, c.args, output)
                return output, "ok"
        else:
            detail = ""
        stats.failed += 1
        log.warning("tool %s failed", tool.name, exc_info=failure)
        return _error("tool_error", detail + _describe(failure)), "tool_error"

    async def _answer(self, call: messages.ToolCall, output: str, outcome: str, label: str) -> None:
        """Send the one output of ``call``, then settle its group (maybe continuing)."""
        limit = self.config.max_output_bytes
        if len(output) * 4 > limit and len(output.encode()) > limit:
            output = _truncate(output, limit)
            self.stats.truncated += 1
            if self.metrics is not None:
                self.metrics.truncated.inc()
        self._count(label, outcome)
        item = FunctionCallOutputItem(call_id=call.call_id, output=output)
        await self._send(ConversationItemCreate(item=item))
        self._remember(call.call_id)
        # Decide synchronously (the group leaves the table), then act.
        key = _group_key(call)
        group = self._groups.get(key)
        if group is None:  # abandoned meanwhile
            return
        group.pending -= 1
        if outcome != "cancelled":
            group.answered += 1
        await self._maybe_continue(key, group)

    async def _seal(self, response_id: str) -> None:
        if not response_id:
            return
        self._done[response_id] = None
        if len(self._done) > _REMEMBERED_RESPONSES:
            self._done.popitem(last=False)
        group = self._groups.get(response_id)
        if group is not None:
            group.sealed = True
            await self._maybe_continue(response_id, group)

    async def _maybe_continue(self, key: object, group: _Group) -> None:
        if not group.sealed or group.pending:
            return
        del self._groups[key]
        if group.answered:
            self.stats.responses_created += 1
            await self._send(ResponseCreate())

    async def _send(self, event: Any) -> None:
        try:
            await self.up.send(event)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The session is going away; there is no one left to answer.
            self.stats.undelivered += 1

    def _count(self, label: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count(label, outcome)


class _BadArguments(Exception):
    pass


def _group_key(call: messages.ToolCall) -> object:
    # A call without a response id is a group of its own.
    return call.response_id if call.response_id else ("", call.call_id)


def _cache_key(tool: Tool, args: Any) -> tuple[str, bytes] | None:
    try:
        return tool.name, msgspec.json.encode(args, order="sorted")
    except Exception:  # not canonically encodable (e.g. too deep): just do not cache
        return None


def _describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ raises
        text = type(exc).__name__
    return text


def _error(code: str, message: str) -> str:
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + "..."
    # Messages quote text we do not control: keep them encodable (no lone surrogates).
    message = message.encode("utf-8", "backslashreplace").decode()
    return msgspec.json.encode({"error": code, "message": message}).decode()


def _truncate(output: str, limit: int) -> str:
    """``output`` as ``{"truncated": true, "total_bytes": N, "head": ...}`` in ``limit``
    UTF-8 bytes: the head is the longest prefix (on a character boundary) that fits once
    JSON-escaped."""
    raw = output.encode()

    def envelope(cut: int) -> bytes:
        head = raw[:cut].decode("utf-8", "ignore")  # drops a split last character
        return msgspec.json.encode({"truncated": True, "total_bytes": len(raw), "head": head})

    # The encoded size grows with the prefix, and escaping makes it anything from 1 to 6
    # times the raw size: binary search for the longest prefix that fits (a dozen or so
    # encodes, and only for outputs that are too long anyway).
    lo, hi = 0, min(len(raw), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(envelope(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return envelope(lo).decode()


# -- a demo tool set (the simulator's order script calls place_order) -------------------


class OrderLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of an order."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=80, description="Menu item")]
    qty: Annotated[int, msgspec.Meta(ge=1, le=20)] = 1
    size: Annotated[str, msgspec.Meta(max_length=20)] | None = None


class PlaceOrderArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The items the customer confirmed."""

    items: Annotated[list[OrderLine], msgspec.Meta(min_length=1, max_length=20)]


def demo_tools() -> ToolRegistry:
    """``place_order`` and ``get_time``, for the simulator's order script and the demo.

    ``place_order`` numbers orders ``order-1``, ``order-2``, ... per registry, and answers
    ``{"order_id", "items": <total quantity>, "ready_in_minutes": 10}``. ``get_time`` is
    read-only (cached for a second) and answers ``{"utc": <ISO 8601 time>}``.
    """
    numbers = itertools.count(1)

    def place_order(args: PlaceOrderArgs) -> dict[str, Any]:
        return {
            "order_id": f"order-{next(numbers)}",
            "items": sum(line.qty for line in args.items),
            "ready_in_minutes": 10,
        }

    def get_time(_args: dict[str, Any]) -> dict[str, str]:
        # The wall clock on purpose: a time of day for the user, not a duration.
        return {"utc": datetime.now(UTC).isoformat(timespec="seconds")}

    return ToolRegistry(
        [
            Tool(
                "place_order",
                place_order,
                "Place the customer's order once they confirmed it.",
                args=PlaceOrderArgs,
                timeout=5.0,
                interruptible=False,  # an order half-placed is worse than one placed
            ),
            Tool(
                "get_time",
                get_time,
                "The current time (UTC).",
                timeout=1.0,
                read_only=True,
                cache_ttl=1.0,
            ),
        ]
    )
