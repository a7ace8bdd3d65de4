"""Benchmark the live resampler against soxr's streaming qualities, at 20 ms chunks.

For each rate pair and each implementation (soxr QQ/LQ/MQ/HQ, our polyphase filter) it
measures, in this one run:

- added latency: mean hold-back + phase delay (and the worst case, max hold-back + phase),
  with ``voiceactors.audio.measure`` (the same instrument the tests use);
- alias rejection (downsampling) or image rejection (upsampling): worst case over a tone
  sweep, dB;
- passband ripple to 0.4 x the lower rate, dB;
- cost: best-of-5 mean time of one ``process()`` call on a 20 ms chunk, microseconds.

Ratios are against soxr HQ measured in the same run. Usage::

    python tools/bench_resampler.py [--json out.json] [--chunk-ms 20] [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr

from voiceactors.audio import Converter, Format, SoxrConverter
from voiceactors.audio.measure import (
    ConverterLike,
    added_latency_ms,
    alias_rejection_db,
    passband_ripple_db,
)

PAIRS = [
    (16000, 24000),
    (24000, 16000),
    (48000, 24000),
    (24000, 48000),
    (8000, 24000),
    (24000, 8000),
]
IMPLS = ["soxr-QQ", "soxr-LQ", "soxr-MQ", "soxr-HQ", "polyphase"]


def factory(impl: str, src: int, dst: int) -> Callable[[], ConverterLike]:
    a, b = Format("pcm16", src), Format("pcm16", dst)
    if impl == "polyphase":
        return lambda: Converter(a, b)
    quality = impl.split("-")[1]
    return lambda: SoxrConverter(a, b, quality)  # type: ignore[arg-type]


def cost_us(make: Callable[[], ConverterLike], src: int, chunk_ms: float, calls: int) -> float:
    conv = make()
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(int(src * chunk_ms / 1000)) * 3000).astype("<i2").tobytes()
    for _ in range(50):  # past any start-up path
        conv.process(chunk)
    best = min(timeit.repeat(lambda: conv.process(chunk), number=calls, repeat=5))
    return best / calls * 1e6


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} {label:<24}")
    sys.stderr.flush()


def run(chunk_ms: float, calls: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    total = len(PAIRS) * len(IMPLS)
    for src, dst in PAIRS:
        for impl in IMPLS:
            progress(len(rows), total, f"{src}->{dst} {impl}")
            make = factory(impl, src, dst)
            lat = added_latency_ms(make, src, dst, chunk_ms=chunk_ms)
            alias, alias_at = alias_rejection_db(make, src, dst, chunk_ms=chunk_ms)
            rows.append(
                {
                    "pair": f"{src}->{dst}",
                    "impl": impl,
                    "latency_ms": round(lat.added_ms, 3),
                    "latency_worst_ms": round(lat.worst_ms, 3),
                    "hold_back_mean_ms": round(lat.hold_back_mean_ms, 3),
                    "hold_back_max_ms": round(lat.hold_back_max_ms, 3),
                    "phase_delay_ms": round(lat.phase_ms, 3),
                    "alias_rejection_db": round(alias, 1),
                    "alias_worst_at_hz": round(alias_at),
                    "passband_ripple_db": round(
                        passband_ripple_db(make, src, dst, chunk_ms=chunk_ms), 3
                    ),
                    "cost_us": round(cost_us(make, src, chunk_ms, calls), 2),
                }
            )
    progress(total, total, "done")
    sys.stderr.write("\n")
    for row in rows:
        hq = next(r for r in rows if r["pair"] == row["pair"] and r["impl"] == "soxr-HQ")
        row["latency_vs_hq"] = round(row["latency_ms"] / hq["latency_ms"], 3)
        row["cost_vs_hq"] = round(row["cost_us"] / hq["cost_us"], 2)
    return rows


def print_table(rows: list[dict[str, Any]], chunk_ms: float) -> None:
    print(f"\nresampler, {chunk_ms:g} ms chunks (ratios vs soxr HQ in this run)\n")
    head = (
        f"{'pair':<14}{'impl':<11}{'latency ms':>11}{'worst ms':>10}{'alias dB':>10}"
        f"{'ripple dB':>10}{'cost us':>9}{'lat/HQ':>8}{'cost/HQ':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['pair']:<14}{r['impl']:<11}{r['latency_ms']:>11.2f}{r['latency_worst_ms']:>10.2f}"
            f"{r['alias_rejection_db']:>10.1f}{r['passband_ripple_db']:>10.3f}{r['cost_us']:>9.1f}"
            f"{r['latency_vs_hq']:>8.3f}{r['cost_vs_hq']:>8.2f}"
        )
    live = [r for r in rows if r["impl"] == "polyphase"]
    ok = all(r["latency_worst_ms"] <= 3 and r["alias_rejection_db"] >= 60 for r in live)
    print(
        f"\npolyphase: worst latency {max(r['latency_worst_ms'] for r in live):.2f} ms, "
        f"worst alias/image rejection {min(r['alias_rejection_db'] for r in live):.1f} dB, "
        f"cost {min(r['cost_us'] for r in live):.1f}-{max(r['cost_us'] for r in live):.1f} us; "
        f"budget (<= 3 ms, >= 60 dB) {'met' if ok else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    parser.add_argument("--calls", type=int, default=2000, help="process() calls per timing")
    args = parser.parse_args(argv)
    rows = run(args.chunk_ms, args.calls)
    print_table(rows, args.chunk_ms)
    if args.json:
        report = {
            "chunk_ms": args.chunk_ms,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "soxr": soxr.__version__,
            "machine": platform.machine(),
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
