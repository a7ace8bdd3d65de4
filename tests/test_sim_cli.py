"""The sim CLI serves until SIGINT and prints where (a real subprocess, bounded)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from websockets.sync.client import connect

EXAMPLES = Path(__file__).parent.parent / "specs" / "sim-examples"
CMD = "import sys; from voiceactors.sim.cli import main; sys.exit(main())"


def test_cli_serves_until_sigint():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CMD,
            "--port",
            "0",
            "--script",
            str(EXAMPLES / "order.toml"),
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(
            r"voiceactors sim listening on ws://127\.0\.0\.1:(\d+)/v1/realtime\n", line
        )
        assert m, line
        url = f"ws://127.0.0.1:{m[1]}/v1/realtime?model=gpt-realtime"
        with connect(url, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
            ws.send(json.dumps({"type": "response.create"}))
            events = []
            while not events or events[-1]["type"] != "response.done":
                events.append(json.loads(ws.recv(timeout=10)))
        done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
        assert done["transcript"] == "Two cheeseburgers and a large fries. Anything else?"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
