"""Session-ready time from the warm pool vs a cold connect, in one run, against the simulator.

For each mode, N sessions start one after another on 127.0.0.1; a session is ready when
the upstream actor forwards its first event (the configured session). Prints p50/p90 and
the ratio cold/pool, and writes JSON.

    python tools/bench_pool.py [--sessions 50] [--json pool.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import trio

from voiceactors.channels import open_edge
from voiceactors.realtime import Session
from voiceactors.testing.sim import open_simulator
from voiceactors.upstream import BreakerRegistry, Endpoint, PoolConfig, UpstreamActor, WarmPool


async def _ready_time(
    endpoint: Endpoint, breakers: BreakerRegistry, pool: WarmPool | None
) -> float:
    actor = UpstreamActor(
        endpoint,
        breakers=breakers,
        session=Session(instructions="bench"),
        pool=pool,
        rng=random.Random(0),
    )
    inbox, out = open_edge("in", 4), open_edge("out", 64)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run, inbox.receiver, out.sender)
        await out.receiver.receive()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    inbox.close()
    out.close()
    return elapsed * 1000


async def main(n: int) -> dict[str, object]:
    results: dict[str, list[float]] = {"cold": [], "pool": []}
    async with open_simulator() as sim:
        endpoint = Endpoint(sim.url, model="gpt-realtime")
        breakers = BreakerRegistry()
        for i in range(n):
            results["cold"].append(await _ready_time(endpoint, breakers, None))
            print(f"\rcold {i + 1}/{n}", end="", file=sys.stderr)
        async with trio.open_nursery() as nursery:
            pool = WarmPool(endpoint, breakers, PoolConfig(size=4))
            await nursery.start(pool.run)
            for i in range(n):
                await pool.wait_filled(1)  # an empty pool would send the session cold
                results["pool"].append(await _ready_time(endpoint, breakers, pool))
                print(f"\rpool {i + 1}/{n}", end="", file=sys.stderr)
            nursery.cancel_scope.cancel()
    print(file=sys.stderr)
    summary: dict[str, object] = {}
    for mode, xs in results.items():
        xs.sort()
        summary[mode] = {
            "p50_ms": statistics.median(xs),
            "p90_ms": xs[int(0.9 * (len(xs) - 1))],
            "n": len(xs),
        }
    summary["ratio_p50_cold_over_pool"] = summary["cold"]["p50_ms"] / summary["pool"]["p50_ms"]  # type: ignore[index]
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = trio.run(main, args.sessions)
    for mode in ("cold", "pool"):
        r = result[mode]
        print(
            f"{mode:>5}: session ready p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms (n={r['n']})"
        )
    print(f"cold / pool (p50): {result['ratio_p50_cold_over_pool']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
