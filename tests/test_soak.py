"""The soak tool: its pure parts (plans, fixtures, metrics parsing, the verdict) and a
smoke run of the real server as a subprocess (four sessions, one of each behaviour).

Rules: loopback only; the end-to-end run is a subprocess under a timeout.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak", TOOL)
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak
_spec.loader.exec_module(soak)


# ------------------------------------------------------------------------ pure parts


def test_the_first_four_plans_cover_every_behaviour_and_the_rest_are_seeded() -> None:
    first = [soak.make_plan(i, seed=7) for i in range(4)]
    assert [bool(p.barge) for p in first] == [False, True, False, False]
    assert [p.bad is not None for p in first] == [False, False, True, False]
    assert [p.hangup for p in first] == [None, None, None, "fin"]
    assert all(len(p.turns) == 1 for p in first) and first[1].turns == ("order",)
    later = [soak.make_plan(i, seed=7) for i in range(4, 200)]
    assert later == [soak.make_plan(i, seed=7) for i in range(4, 200)]
    assert later != [soak.make_plan(i, seed=8) for i in range(4, 200)]
    assert all(1 <= len(p.turns) <= 3 and 0 <= p.bad_at < len(p.turns) for p in later)
    # Barge-ins only over the long utterance (the agent must still be talking).
    assert all(p.turns[i] == "order" for p in later for i in p.barge)
    assert {p.hangup for p in later} == {None, "fin", "rst"}
    assert {p.bad for p in later} == {None, *soak.BAD_INPUTS}


def test_utterances_are_trimmed_whole_frames_of_the_speech() -> None:
    labels = json.loads((soak.AUDIO / "labels.json").read_text())
    utterances = soak.load_utterances()
    assert set(utterances) == set(labels)
    for name, u in utterances.items():
        label = labels[name]
        kept_ms = len(u.frames) * 20
        speech_ms = label["speech_end_ms"] - label["speech_start_ms"]
        assert speech_ms < kept_ms <= speech_ms + soak.LEAD_MS + soak.TAIL_MS + 20
        assert kept_ms < label["duration_ms"]
        event = json.loads(u.frames[0])
        assert event["type"] == "input_audio_buffer.append"
        assert len(base64.b64decode(event["audio"])) == soak.FRAME_BYTES


def test_bad_inputs_are_what_they_say() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(soak.bad_input("malformed_json", "x"))
    b64 = json.loads(soak.bad_input("bad_base64", "x"))
    assert b64["event_id"] == "x"
    with pytest.raises(binascii.Error):
        base64.b64decode(b64["audio"], validate=True)
    assert json.loads(soak.bad_input("unknown_event", "x"))["event_id"] == "x"
    assert isinstance(soak.bad_input("binary_frame", "x"), bytes)


def test_metrics_text_is_parsed_into_the_watched_figures() -> None:
    text = (
        "# HELP voiceactors_gateway_sessions_active Sessions running.\n"
        "# TYPE voiceactors_gateway_sessions_active gauge\n"
        "voiceactors_gateway_sessions_active 3\n"
        "voiceactors_gateway_sessions_total 12\n"
        'voiceactors_session_ended_total{reason="client_closed"} 7\n'
        'voiceactors_session_ended_total{reason="completed"} 0\n'
        "voiceactors_session_barge_ins_total 2\n"
        "voiceactors_session_client_errors_total 1.0\n"
        "garbage line\n"
    )
    figures = soak.summarize_metrics(soak.parse_metrics(text))
    assert figures["sessions_active"] == 3 and figures["sessions_total"] == 12
    assert figures["ended"] == {"client_closed": 7}  # zero reasons left out
    assert figures["barge_ins"] == 2 and figures["client_errors"] == 1
    assert figures["connections_active"] is None


def test_percentiles_are_nearest_rank() -> None:
    assert soak.percentiles([]) is None
    xs = [float(x) for x in range(100, 0, -1)]
    assert soak.percentiles(xs) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert soak.percentiles([3.0]) == {"p50": 3.0, "p90": 3.0, "p99": 3.0, "max": 3.0}


def _sample(label: str, rss: float, fds: int, sessions: int, active: int = 0) -> dict[str, Any]:
    return {
        "label": label,
        "rss_mb": rss,
        "fds": fds,
        "fd_kinds": {"socket": fds},
        "threads": 2,
        "sessions_total": sessions,
        "sessions_active": active,
    }


def _verdict(samples: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    args = ["--min-judged-sessions", "100", "--max-growth-mb", "20"]
    opts = soak.parse_args(args + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])
    tally = soak.Tally(started=300, completed=300)
    idle = {
        "sessions_active_zero": samples[-1]["sessions_active"] == 0,
        "fds_at_baseline": samples[-1]["fds"] <= samples[0]["fds"],
        "connections_active_at_baseline": True,
    }
    doc: dict[str, Any] = soak.document(opts, samples, tally, idle, [])
    return doc


def test_the_verdict_judges_fds_sessions_and_growth_per_1000_sessions() -> None:
    ok = _verdict(
        [_sample("baseline", 50, 14, 0), _sample("warm", 60, 30, 50), _sample("idle", 62, 14, 350)]
    )
    assert ok["verdict"] == {"ok": True, "failures": []}
    assert ok["rss"]["growth"] == {
        "judged": True,
        "sessions_after_warmup": 300,
        "rss_delta_mb": 2.0,
        "mb_per_1000_sessions": 6.67,
    }
    leak = _verdict(
        [
            _sample("baseline", 50, 14, 0),
            _sample("warm", 60, 30, 50),
            _sample("idle", 70, 15, 350, active=1),
        ]
    )
    failures = leak["verdict"]["failures"]
    assert not leak["verdict"]["ok"] and len(failures) == 3
    assert "sessions_active is 1" in failures[0] and "fds 15" in failures[1]
    assert "33.33 MB per 1000 sessions" in failures[2]
    # Too few sessions after the warm-up: reported, not judged.
    few = _verdict(
        [_sample("baseline", 50, 14, 0), _sample("warm", 60, 30, 50), _sample("idle", 70, 14, 60)]
    )
    assert few["verdict"]["ok"] and few["rss"]["growth"]["judged"] is False
    assert few["rss"]["growth"]["mb_per_1000_sessions"] == 1000.0


# ------------------------------------------------------------------------- end to end


def test_a_short_soak_of_the_real_server_passes_with_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [
        sys.executable,
        str(TOOL),
        "--minutes",
        "1",
        "--concurrency",
        "4",
        "--sessions",
        "4",
        "--warmup",
        "1",
        "--sample-every",
        "5",
        "--no-progress",
        "--json",
        str(out),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict       PASS" in proc.stdout
    doc = json.loads(out.read_text())
    c = doc["clients"]
    assert c["started"] == c["completed"] == 4 and c["unexpected"] == 0
    assert c["barge_ins"] == 1 and c["hangups"] == 1
    assert c["bad_inputs"] == c["bad_answered"] == 1
    end = doc["samples"][-1]
    assert end["label"] == "idle" and end["sessions_active"] == 0
    assert end["sessions_total"] == 4 and sum(end["ended"].values()) == 4
    assert end["barge_ins"] >= 1 and end["client_errors"] >= 1
    assert doc["idle"] == {
        "sessions_active_zero": True,
        "fds_at_baseline": True,
        "connections_active_at_baseline": True,
    }
    assert doc["fds"]["end_idle"] <= doc["fds"]["baseline"]
    assert 10 < doc["rss"]["baseline_mb"] <= doc["rss"]["end_mb"] < 1000
    assert doc["server_log_problems"] == []
    assert 0 < doc["setup_ms"]["p50"] <= doc["setup_ms"]["max"] < soak.CREATED_TIMEOUT_S * 1000
