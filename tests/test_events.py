"""The event stream: envelope, sequence numbers, stdout purity against stray prints, heartbeat."""
from __future__ import annotations

import io
import subprocess
import sys
import time

from conftest import ROOT, parse_events
from lora_trainer.contract.events import EventStream


def test_envelope_seq_and_non_finite_numbers():
    buf = io.StringIO()
    ev = EventStream(buf, run_id="r1")
    ev.emit("warning", code="x", message="a", details={"v": float("nan")})
    ev.emit("warning", code="y", message="b")
    events = parse_events(buf.getvalue())
    assert [e["seq"] for e in events] == [1, 2] and events[0]["details"]["v"] is None
    assert all(e["run_id"] == "r1" and e["schema_version"].startswith("1.") for e in events)


def test_heartbeat_only_when_silent():
    buf = io.StringIO()
    ev = EventStream(buf)
    ev.set_phase("caching_latents")
    ev.start_heartbeat(0.4)
    time.sleep(1.3)
    ev.stop_heartbeat()
    beats = [e for e in parse_events(buf.getvalue()) if e["type"] == "heartbeat"]
    assert 2 <= len(beats) <= 4 and all(b["phase"] == "caching_latents" for b in beats)
    buf2 = io.StringIO()
    busy = EventStream(buf2)
    busy.start_heartbeat(0.5)
    for _ in range(10):
        busy.emit("status", phase="training", message="busy")
        time.sleep(0.1)
    busy.stop_heartbeat()
    assert not [e for e in parse_events(buf2.getvalue()) if e["type"] == "heartbeat"]


def test_claim_stdout_diverts_stray_output_to_stderr():
    code = """
import os, sys
from lora_trainer.contract.events import EventStream, claim_stdout
out = claim_stdout()
print("stray print from a library")
os.write(1, b"raw fd write from C code\\n")
sys.stdout.write("another\\n")
EventStream(out, run_id="x").emit("status", phase="p", message="only this on stdout")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    events = parse_events(proc.stdout)
    assert len(events) == 1 and events[0]["message"] == "only this on stdout"
    for text in ("stray print", "raw fd write", "another"):
        assert text in proc.stderr


def test_unicode_line_separators_stay_inside_one_line(tmp_path):
    """U+0085 / U+2028 / U+2029 in a value (a config key, a caption, a path) are escaped: a reader that splits on
    every Unicode line break (Python's splitlines, found by the config fuzzer) still gets one event per line."""
    import json

    buf = io.StringIO()
    EventStream(buf).emit("warning", code="x", message="a\x85b\u2028c\u2029d")
    assert len(buf.getvalue().splitlines()) == 1
    assert json.loads(buf.getvalue())["message"] == "a\x85b\u2028c\u2029d"
    cfg = tmp_path / "c.json"
    cfg.write_bytes(b'{"":["\\u0085"], "\\u2028": 1}')
    proc = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg), "--validate-only"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    (event,) = parse_events(proc.stdout)  # every stdout line JSON and schema-valid
    assert event["code"] == "config_invalid"
