"""A small Prometheus registry: counters, gauges and histograms, rendered as text 0.0.4.

Theory of operation
-------------------
A :class:`Registry` holds metric *families* in registration order. A family has a name,
a help text and a fixed tuple of label names; each distinct tuple of label values is a
*child* holding the numbers. Hot paths bind their children once (``c = fam.labels("x")``)
and then pay one attribute add per update (``c.inc()``); an unlabelled family is its own
child's front door (``fam.inc()``). :meth:`Registry.render` writes every family in the
text exposition format, version 0.0.4 (``# HELP``/``# TYPE`` lines, escaped label
values, cumulative histogram buckets ending at ``+Inf``).

Two rules keep it bounded and honest:

* A family refuses a new child beyond ``max_children`` (:class:`CardinalityError`), so a
  label fed from untrusted input cannot grow memory without limit. Children are never
  removed: a label set, once seen, is exported until the process ends.
* Everything is single-threaded, as in Trio: updates are plain attribute operations with
  no locks. Do not update metrics from worker threads.

Registering the same name twice returns the existing family when the definition (kind,
help, label names, buckets) is identical, and raises ``ValueError`` otherwise, so that
two components (or two gateways in one test) can share a registry.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar, Generic, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "CardinalityError",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "Registry",
]

#: The Content-Type of :meth:`Registry.render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds (Prometheus client defaults).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Suffixes a histogram writes: a family of its own with one of these names would collide.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class CardinalityError(ValueError):
    """A family already has ``max_children`` label sets and was asked for a new one."""


# -- children: the numbers --------------------------------------------------------------


class CounterChild:
    """One counter series. ``value`` only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (default 1). Raises ``ValueError`` if it is negative (or NaN)."""
        if not amount >= 0:
            raise ValueError(f"a counter only goes up: inc({amount!r})")
        self.value += amount


class GaugeChild:
    """One gauge series: a value that goes up and down."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class HistogramChild:
    """One histogram series: a count per bucket (not cumulative until rendered), sum, count.

    ``counts[i]`` counts observations ``v`` with ``bounds[i-1] < v <= bounds[i]``; the last
    bound is ``+Inf``, so every observation lands in a bucket.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum: float = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record ``value``. Raises ``ValueError`` for NaN (it has no bucket)."""
        if value != value:
            raise ValueError("cannot observe NaN")
        # bisect_left: the first bound >= value, because Prometheus buckets are "<= le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


# -- families -----------------------------------------------------------------------------


class _Family(Generic[C]):
    kind: ClassVar[str]

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_children: int = 1000,
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {labelnames!r}")
        if max_children < 1:
            raise ValueError("max_children must be at least 1")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = labelnames
        self.max_children = max_children
        self._children: dict[tuple[str, ...], C] = {}
        # The unlabelled family has exactly one child, made now so it is always exported.
        self._only: C | None = None if labelnames else self._child(())

    def labels(self, *values: str, **by_name: str) -> C:
        """The child for these label values (positional, or all by name), made on first use.

        Label values must be ``str`` (so that ``200`` and ``"200"`` cannot become two
        series). Raises ``ValueError`` for a wrong number or set of labels, ``TypeError``
        for a non-str value, and :class:`CardinalityError` when this would be child number
        ``max_children + 1``. Bind the result once on hot paths.
        """
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            values = tuple(by_name[n] for n in self.labelnames)
        child = self._children.get(values)
        if child is not None:
            return child
        if len(values) != len(self.labelnames) or not self.labelnames:
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
        for v in values:
            if type(v) is not str:
                raise TypeError(f"{self.name}: label values must be str, got {v!r}")
        if len(self._children) >= self.max_children:
            raise CardinalityError(
                f"{self.name}: more than {self.max_children} label sets; refusing {values!r}"
            )
        return self._child(values)

    def _child(self, values: tuple[str, ...]) -> C:
        child = self._new_child()
        self._children[values] = child
        return child

    def _unlabelled(self) -> C:
        if self._only is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._only

    def _new_child(self) -> C:
        raise NotImplementedError

    def _same_definition(self, other: _Family[C]) -> bool:
        return (
            type(self) is type(other)
            and self.help == other.help
            and self.labelnames == other.labelnames
        )

    def _series_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")
        for values, child in self._children.items():
            self._render_child(out, _label_text(self.labelnames, values), child)

    def _render_child(self, out: list[str], labels: str, child: C) -> None:
        out.append(f"{self.name}{_braced(labels)} {_number(child.value)}\n")  # type: ignore[union-attr]


class Counter(_Family[CounterChild]):
    """A family of counters. Name it ``..._total`` by convention."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        """Increment the unlabelled counter (``ValueError`` if the family has labels)."""
        self._unlabelled().inc(amount)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Gauge(_Family[GaugeChild]):
    """A family of gauges."""

    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._unlabelled().dec(amount)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Histogram(_Family[HistogramChild]):
    """A family of histograms with fixed bucket upper bounds (``+Inf`` is added)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
        max_children: int = 1000,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if any(b != b for b in bounds) or bounds != sorted(set(bounds)) or not bounds:
            raise ValueError(f"buckets must be distinct, sorted and not NaN: {bounds!r}")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds: tuple[float, ...] = tuple(bounds)
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, help, labelnames, max_children=max_children)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _same_definition(self, other: _Family[HistogramChild]) -> bool:
        return super()._same_definition(other) and self.bounds == other.bounds  # type: ignore[attr-defined]

    def _series_names(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in _HISTOGRAM_SUFFIXES)

    def _render_child(self, out: list[str], labels: str, child: HistogramChild) -> None:
        sep = "," if labels else ""
        cumulative = 0
        for bound, n in zip(child.bounds, child.counts, strict=True):
            cumulative += n
            out.append(f'{self.name}_bucket{{{labels}{sep}le="{_number(bound)}"}} {cumulative}\n')
        out.append(f"{self.name}_sum{_braced(labels)} {_number(child.sum)}\n")
        out.append(f"{self.name}_count{_braced(labels)} {child.count}\n")


# -- registry -----------------------------------------------------------------------------

F = TypeVar("F", Counter, Gauge, Histogram)


class Registry:
    """Metric families in registration order, rendered together by :meth:`render`.

    ``max_children`` is the default per-family cap on label sets.
    """

    def __init__(self, *, max_children: int = 1000) -> None:
        self.max_children = max_children
        self._families: dict[str, _Family] = {}  # type: ignore[type-arg]
        self._series: dict[str, str] = {}  # every sample name -> its family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Register (or get the identical existing) counter family."""
        return self._register(Counter(name, help, labelnames, max_children=self.max_children))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Register (or get the identical existing) gauge family."""
        return self._register(Gauge(name, help, labelnames, max_children=self.max_children))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Register (or get the identical existing) histogram family."""
        fam = Histogram(name, help, labelnames, buckets=buckets, max_children=self.max_children)
        return self._register(fam)

    def _register(self, family: F) -> F:
        existing = self._families.get(family.name)
        if existing is not None:
            if not existing._same_definition(family):
                raise ValueError(f"metric {family.name!r} is already registered differently")
            return existing  # type: ignore[return-value]
        names = family._series_names()
        for n in names:
            if n in self._series:
                raise ValueError(f"sample name {n!r} collides with metric {self._series[n]!r}")
        for n in names:
            self._series[n] = family.name
        self._families[family.name] = family
        return family

    def __iter__(self) -> Iterator[_Family]:  # type: ignore[type-arg]
        return iter(self._families.values())

    def render(self) -> str:
        """Every family in the text exposition format 0.0.4 (see :data:`CONTENT_TYPE`)."""
        out: list[str] = []
        for family in self._families.values():
            family._render(out)
        return "".join(out)


# -- text format --------------------------------------------------------------------------


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape_value(v)}"' for n, v in zip(names, values, strict=True))


def _braced(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def _number(value: float) -> str:
    """Go-compatible float text: ``+Inf``, ``-Inf``, ``NaN``; integers without ``.0``."""
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))
