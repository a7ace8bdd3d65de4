"""Cost of ``LocalVAD.process`` per 20 ms chunk at 8/16/24/48 kHz, this tree against a
baseline revision, in one run.

The baseline is ``voiceactors/audio/vad.py`` as of ``--baseline`` (a git revision, default
``HEAD``), loaded beside the working copy as ``voiceactors.audio._vad_baseline`` so both
run on the same box in the same process. Input is the fixture speech
(tests/fixtures/audio/order_*.wav; 8 kHz is converted from 24 kHz offline), cut in
``--chunk-ms`` chunks; each timing is the best of ``--repeat`` passes over the whole file,
divided by the number of chunks. Also prints each side's speech segments on the file, so a
cost saving that moved an event shows. Usage::

    python tools/bench_vad.py [--baseline REV] [--json out.json] [--repeat 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import voiceactors.audio.vad as current
from voiceactors.audio import Format, convert_offline, read_wav

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "audio"
RATES = (8000, 16000, 24000, 48000)


def load_baseline(rev: str) -> ModuleType:
    text = subprocess.run(
        ["git", "show", f"{rev}:voiceactors/audio/vad.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    name = "voiceactors.audio._vad_baseline"
    spec = importlib.util.spec_from_file_location(name, f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "voiceactors.audio"  # its relative imports resolve to this tree
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def speech(rate: int) -> bytes:
    path = FIXTURES / f"order_{rate // 1000}k.wav"
    if path.exists():
        fmt, data = read_wav(path)
        if fmt.encoding == "pcm16" and fmt.rate == rate:
            return data
    _, data = read_wav(FIXTURES / "order_24k.wav")
    return convert_offline(data, Format("pcm16", 24000), Format("pcm16", rate))


def chunks(data: bytes, rate: int, chunk_ms: float) -> list[bytes]:
    step = int(rate * chunk_ms / 1000) * 2
    return [data[i : i + step] for i in range(0, len(data) - step + 1, step)]


def cost_us(
    module: ModuleType, rate: int, parts: list[bytes], chunk_ms: float, repeat: int
) -> float:
    vad = module.LocalVAD("normal", rate)
    best = float("inf")
    for _ in range(repeat):
        vad.reset()
        t0 = time.perf_counter()
        for k, c in enumerate(parts):
            vad.process(c, k * chunk_ms)
        best = min(best, time.perf_counter() - t0)
    return best / len(parts) * 1e6


def segments(module: ModuleType, rate: int, parts: list[bytes], chunk_ms: float) -> list[Any]:
    vad = module.LocalVAD("normal", rate)
    events = []
    for k, c in enumerate(parts):
        events += vad.process(c, k * chunk_ms)
    events += vad.finish()
    return [round(e.at_ms, 2) for e in events]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of vad.py to compare")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=20, help="passes; the best one counts")
    args = parser.parse_args(argv)
    base = load_baseline(args.baseline)
    rows = []
    for n, rate in enumerate(RATES):
        sys.stderr.write(f"\r[{'#' * n}{'-' * (len(RATES) - n)}] {rate} Hz ")
        sys.stderr.flush()
        parts = chunks(speech(rate), rate, args.chunk_ms)
        # Interleave the two sides so drift on a busy box hits both alike.
        before = after = float("inf")
        for _ in range(3):
            before = min(before, cost_us(base, rate, parts, args.chunk_ms, args.repeat))
            after = min(after, cost_us(current, rate, parts, args.chunk_ms, args.repeat))
        rows.append(
            {
                "rate": rate,
                "before_us": round(before, 2),
                "after_us": round(after, 2),
                "ratio": round(after / before, 3),
                "before_events_ms": segments(base, rate, parts, args.chunk_ms),
                "after_events_ms": segments(current, rate, parts, args.chunk_ms),
            }
        )
    sys.stderr.write("\n")
    print(f"\nLocalVAD.process per {args.chunk_ms:g} ms chunk, {args.baseline} -> working tree\n")
    print(f"{'rate':>6}{'before us':>11}{'after us':>10}{'after/before':>14}  events (ms)")
    for r in rows:
        same = "same" if r["before_events_ms"] == r["after_events_ms"] else "moved"
        print(
            f"{r['rate']:>6}{r['before_us']:>11.1f}{r['after_us']:>10.1f}{r['ratio']:>14.2f}"
            f"  {r['before_events_ms']} -> {r['after_events_ms']} ({same})"
        )
    if args.json:
        report = {
            "baseline": args.baseline,
            "chunk_ms": args.chunk_ms,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
