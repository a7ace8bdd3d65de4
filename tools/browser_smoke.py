"""Open the browser page in Chromium with a WAV file as the microphone; print what it saw.

A manual check of the whole product path: the gateway serves the page at ``/``, the page
talks to the gateway's ``/v1/realtime``, the runtime relays to the upstream. By default
it starts ``python -m voiceactors serve --port 0`` (embedded simulator, which echoes each
turn); ``--url`` uses a gateway that is already running instead. The scripted call:
press Start, let the WAV play to its end, wait until every answer has been played (at
most ``--seconds``), take a screenshot, press Stop, print the page's figures
(``window.voiceactors``) as JSON, a one-line summary and the gateway's session metrics.
Usage::

    python tools/browser_smoke.py [--wav tests/fixtures/audio/order_24k.wav] [--seconds 30]
        [--url http://127.0.0.1:8080] [--token T] [--rate 48000] [--upstream sim]
        [--headed] [--screenshot page.png]

Needs Chromium (``/usr/bin/chromium`` or ``--chromium``) and ``pip install playwright``.
Exit code 1 if no agent audio was played (or the server did not start), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
import wave
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
READY = "voiceactors listening on "


def start_gateway(upstream: str, token: str | None) -> tuple[subprocess.Popen[str], str]:
    """``python -m voiceactors serve --port 0``; returns it and its base URL (from the line
    it prints once listening). Raises SystemExit if it exits before that line."""
    cmd = [sys.executable, "-m", "voiceactors", "serve", "--port", "0", "--upstream", upstream]
    if token:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:  # ends at EOF if the server dies first
        if line.startswith(READY):
            # "voiceactors listening on http://127.0.0.1:PORT/ (upstream: sim)"
            return proc, line[len(READY) :].split()[0].rstrip("/")
    proc.wait(10)
    raise SystemExit(f"the gateway did not start (exit code {proc.returncode})")


def stop_gateway(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the gateway drains and exits), then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def session_metrics(base: str, token: str | None) -> dict[str, str]:
    """The gateway's ``voiceactors_session_*`` samples (empty if /metrics is unreachable)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(base + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            text = reply.read().decode()
    except OSError as exc:
        print(f"/metrics: {exc}", file=sys.stderr)
        return {}
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {
        name: value
        for name, value in samples
        if name.startswith("voiceactors_session_") and "_bucket" not in name
        and value not in ("0", "0.0")
    }  # fmt: skip


def wav_seconds(path: Path) -> float:
    try:
        with wave.open(str(path)) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError):
        return 10.0  # a format the wave module does not read (mu-law): Chromium may


# The call is over (once the microphone file has played) when no response is running,
# nothing is left to play and the user is not speaking.
CALL_OVER = """() => { const v = window.voiceactors;
    return !v.responding && v.bufferMs === 0
           && (v.state === 'listening' || v.state === 'interrupted'); }"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wav", type=Path, default=ROOT / "tests/fixtures/audio/order_24k.wav")
    p.add_argument("--seconds", type=float, default=30.0, help="the call's time limit (30)")
    p.add_argument("--url", help="a running gateway's base URL (default: start one)")
    p.add_argument("--upstream", default="sim", help="serve's --upstream when starting one")
    p.add_argument("--token", help="client token (the page's ?token=, the gateway's --token)")
    p.add_argument("--rate", type=int, help="ask the page for this AudioContext rate")
    p.add_argument("--loop", action="store_true", help="loop the WAV (talk over the agent)")
    p.add_argument("--headed", action="store_true", help="show the browser window")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--screenshot", default="/tmp/voiceactors-page.png")
    args = p.parse_args()
    if not args.wav.is_file():
        p.error(f"no such WAV: {args.wav}")
    if args.seconds <= 0:
        p.error("--seconds must be > 0")
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError:
        p.error("needs Playwright: pip install playwright")

    params = {k: str(v) for k, v in (("token", args.token), ("rate", args.rate)) if v}
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={args.wav.resolve()}{'' if args.loop else '%noloop'}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        proc, base = start_gateway(args.upstream, args.token)
    timed_out = False
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, headless=not args.headed, args=flags
            )
            page = browser.new_page()
            page.goto(f"{base}/?{urlencode(params)}" if params else f"{base}/")
            page.get_by_role("button", name="Start conversation").click()
            page.get_by_role("button", name="Stop conversation").wait_for(timeout=10_000)
            talk_ms = min(wav_seconds(args.wav), args.seconds) * 1000
            page.wait_for_timeout(talk_ms)  # a manual tool: the file plays in real time
            try:
                page.wait_for_function(CALL_OVER, timeout=max(1.0, args.seconds * 1000 - talk_ms))
            except PlaywrightTimeout:
                timed_out = True
            page.screenshot(path=args.screenshot, full_page=True)
            transcript = page.eval_on_selector_all(
                "#transcript li", "els => els.map(e => `${e.className}: ${e.textContent}`)"
            )
            if page.get_by_role("button", name="Stop conversation").count():
                page.get_by_role("button", name="Stop conversation").click()
            stats = page.evaluate("() => JSON.parse(JSON.stringify(window.voiceactors))")
            browser.close()
        metrics = session_metrics(base, args.token)
    finally:
        if proc is not None:
            stop_gateway(proc)

    stats["events"] = dict(Counter(stats["events"]))
    print(json.dumps(stats, indent=2))
    for line in transcript:
        print(line)
    latencies = ", ".join(f"{x:.0f}" for x in stats["latencies"]) or "none"
    print(
        f"latency (speech end -> first audio played): {latencies} ms | frames sent "
        f"{stats['framesSent']} | frames played {stats['framesPlayed']} "
        f"({stats['samplesPlayed'] / 24000:.1f} s) | underruns {stats['underruns']} | clears "
        f"{stats['clears']} | playback reports {stats['reportsSent']}"
        f"{'' if stats['playbackReports'] else ' (refused by the server)'}"
        f"{' | TIMED OUT waiting for the call to end' if timed_out else ''}"
    )
    for name, value in metrics.items():
        print(f"  {name} {value}")
    print(f"screenshot: {args.screenshot}", file=sys.stderr)
    return 0 if stats["samplesPlayed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
