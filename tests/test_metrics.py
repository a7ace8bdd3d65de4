"""The Prometheus registry: exact text where it is short, a tiny parser where it is not."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voiceactors.metrics import CardinalityError, Registry

# -- a tiny parser of the text format 0.0.4 ------------------------------------------------

_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)\Z", re.DOTALL
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Labels = frozenset[tuple[str, str]]


def _labels(text: str | None) -> Labels:
    out: list[tuple[str, str]] = []
    pos = 0
    while text and pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad labels at {text[pos:]!r}"
        value = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group()], match.group(2))
        out.append((match.group(1), value))
        pos = match.end()
    return frozenset(out)


def parse(text: str) -> tuple[dict[str, str], dict[str, str], dict[tuple[str, Labels], float]]:
    """HELP texts, TYPEs and sample values; asserts the text is well formed."""
    assert text == "" or text.endswith("\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: dict[tuple[str, Labels], float] = {}
    for line in text.split("\n")[:-1]:  # only "\n" ends a line ("\r" may be in a value)
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = re.sub(r"\\[\\n]", lambda m: _UNESCAPE[m.group()], help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name in helps, "TYPE after its HELP"
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            key = (match["name"], _labels(match["labels"]))
            assert key not in samples, f"duplicate series {line!r}"
            samples[key] = float(match["value"])
    return helps, types, samples


def L(**kw: str) -> Labels:  # noqa: N802 (reads like a constructor)
    return frozenset(kw.items())


# -- exact output --------------------------------------------------------------------------


def test_counter_gauge_exact_text() -> None:
    r = Registry()
    c = r.counter("jobs_total", "Jobs done.")
    g = r.gauge("queue_depth", "Items waiting.")
    c.inc()
    c.inc(2)
    g.set(7)
    g.dec(2.5)
    assert r.render() == (
        "# HELP jobs_total Jobs done.\n"
        "# TYPE jobs_total counter\n"
        "jobs_total 3\n"
        "# HELP queue_depth Items waiting.\n"
        "# TYPE queue_depth gauge\n"
        "queue_depth 4.5\n"
    )


def test_histogram_exact_text_with_labels() -> None:
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", ["path"], buckets=[0.1, 1])
    child = h.labels("/a")
    for v in (0.1, 0.5, 3.0):  # 0.1 sits on a bound: "le" is inclusive
        child.observe(v)
    assert r.render() == (
        "# HELP lat_seconds Latency.\n"
        "# TYPE lat_seconds histogram\n"
        'lat_seconds_bucket{path="/a",le="0.1"} 1\n'
        'lat_seconds_bucket{path="/a",le="1"} 2\n'
        'lat_seconds_bucket{path="/a",le="+Inf"} 3\n'
        'lat_seconds_sum{path="/a"} 3.6\n'
        'lat_seconds_count{path="/a"} 3\n'
    )


def test_labelled_family_without_children_renders_only_its_header() -> None:
    r = Registry()
    r.counter("x_total", "X.", ["kind"])
    assert r.render() == "# HELP x_total X.\n# TYPE x_total counter\n"


def test_escaping_round_trips() -> None:
    r = Registry()
    c = r.counter("odd_total", 'Help with \\ and\nnewline and "quotes".', ["v"])
    nasty = 'a"b\\c\nd'
    c.labels(nasty).inc()
    text = r.render()
    assert '# HELP odd_total Help with \\\\ and\\nnewline and "quotes".\n' in text
    assert 'odd_total{v="a\\"b\\\\c\\nd"} 1\n' in text
    helps, _, samples = parse(text)
    assert helps["odd_total"] == 'Help with \\ and\nnewline and "quotes".'
    assert samples[("odd_total", L(v=nasty))] == 1


def test_special_values() -> None:
    r = Registry()
    g = r.gauge("g", "G.", ["k"])
    for name, value in {"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "big": 1e20}.items():
        g.labels(name).set(value)
    lines = r.render().splitlines()[2:]
    assert lines == ['g{k="inf"} +Inf', 'g{k="ninf"} -Inf', 'g{k="nan"} NaN', 'g{k="big"} 1e+20']


# -- behaviour -----------------------------------------------------------------------------


def test_labels_by_position_or_name_give_one_child() -> None:
    r = Registry()
    c = r.counter("req_total", "Requests.", ["path", "status"])
    a = c.labels("/x", "200")
    assert c.labels(status="200", path="/x") is a
    a.inc()
    c.labels("/x", "500").inc(3)
    _, types, samples = parse(r.render())
    assert types == {"req_total": "counter"}
    assert samples == {
        ("req_total", L(path="/x", status="200")): 1,
        ("req_total", L(path="/x", status="500")): 3,
    }


def test_label_misuse() -> None:
    r = Registry()
    c = r.counter("req_total", "Requests.", ["path", "status"])
    with pytest.raises(ValueError):
        c.labels("/x")
    with pytest.raises(ValueError):
        c.labels(path="/x")
    with pytest.raises(ValueError):
        c.labels("/x", status="200")
    with pytest.raises(TypeError):
        c.labels("/x", 200)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.inc()  # a labelled family has no value of its own
    plain = r.counter("plain_total", "P.")
    with pytest.raises(ValueError):
        plain.labels("x")
    assert plain.labels() is plain.labels()


def test_counters_only_go_up() -> None:
    c = Registry().counter("c_total", "C.")
    for bad in (-1, math.nan):
        with pytest.raises(ValueError):
            c.inc(bad)
    c.inc(0)
    assert c.value == 0


def test_histogram_rejects_nan_and_bad_buckets() -> None:
    r = Registry()
    h = r.histogram("h", "H.")
    with pytest.raises(ValueError):
        h.observe(math.nan)
    h.observe(math.inf)  # lands in +Inf
    assert parse(r.render())[2][("h_bucket", L(le="+Inf"))] == 1
    for buckets in ([1, 0.5], [1, 1], [], [math.nan]):
        with pytest.raises(ValueError):
            r.histogram("h2", "H.", buckets=buckets)
    with pytest.raises(ValueError):
        r.histogram("h3", "H.", ["le"])


def test_cardinality_is_capped() -> None:
    r = Registry(max_children=3)
    c = r.counter("by_user_total", "Per user.", ["user"])
    children = [c.labels(f"u{i}") for i in range(3)]
    with pytest.raises(CardinalityError):
        c.labels("u3")
    assert c.labels("u0") is children[0]  # existing ones still work
    children[0].inc()
    assert len(parse(r.render())[2]) == 3


def test_registration_is_idempotent_but_checked() -> None:
    r = Registry()
    a = r.counter("a_total", "A.", ["k"])
    assert r.counter("a_total", "A.", ["k"]) is a
    with pytest.raises(ValueError):
        r.counter("a_total", "A.", ["other"])
    with pytest.raises(ValueError):
        r.gauge("a_total", "A.", ["k"])
    h = r.histogram("lat", "L.", buckets=[1, 2])
    assert r.histogram("lat", "L.", buckets=[1, 2]) is h
    with pytest.raises(ValueError):
        r.histogram("lat", "L.", buckets=[1, 3])
    with pytest.raises(ValueError, match="collides"):
        r.counter("lat_count", "Clash with the histogram's _count series.")
    assert [f.name for f in r] == ["a_total", "lat"]


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "ä"])
def test_invalid_metric_names(name: str) -> None:
    with pytest.raises(ValueError):
        Registry().counter(name, "x")


@pytest.mark.parametrize("label", ["", "1a", "a-b", "__reserved"])
def test_invalid_label_names(label: str) -> None:
    with pytest.raises(ValueError):
        Registry().counter("x_total", "x", [label])


def test_duplicate_label_names() -> None:
    with pytest.raises(ValueError):
        Registry().counter("x_total", "x", ["a", "a"])


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=8, unique=True).map(
        sorted
    ),
    values=st.lists(st.floats(-2e6, 2e6, allow_nan=False), max_size=50),
)
def test_histogram_buckets_count_values_at_or_below_each_bound(
    bounds: list[float], values: list[float]
) -> None:
    r = Registry()
    h = r.histogram("h", "H.", buckets=bounds)
    for v in values:
        h.observe(v)
    _, _, samples = parse(r.render())
    for b in [*bounds, math.inf]:
        le = "+Inf" if b == math.inf else _go(b)
        assert samples[("h_bucket", L(le=le))] == sum(v <= b for v in values)
    assert samples[("h_count", L())] == len(values)
    assert samples[("h_sum", L())] == pytest.approx(math.fsum(values), rel=1e-9, abs=1e-6)


def _go(b: float) -> str:
    return str(int(b)) if b.is_integer() else repr(b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), min_size=1, max_size=10, unique=True))
def test_any_label_value_round_trips(values: list[str]) -> None:
    r = Registry()
    c = r.counter("t_total", "T.", ["v"])
    for i, v in enumerate(values):
        c.labels(v).inc(i + 1)
    _, _, samples = parse(r.render())
    assert samples == {("t_total", L(v=v)): i + 1 for i, v in enumerate(values)}
