"""Progress events carry an ETA from the phase's average rate (start-up on 100,000 images takes minutes)."""
from __future__ import annotations

import io
import json

from lora_trainer.contract import events as events_mod
from lora_trainer.contract.events import EventStream


def test_progress_eta_from_the_phase_average_rate(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(events_mod.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    ev = EventStream(out)
    ev.emit("progress", phase="caching_latents", current=0, total=1000, unit="images")
    clock[0] += 10
    ev.emit("progress", phase="caching_latents", current=100, total=1000, unit="images")
    clock[0] += 2
    ev.emit("progress", phase="caching_text", current=5, total=10, unit="captions")  # another phase, its own start
    clock[0] += 10
    ev.emit("progress", phase="caching_latents", current=250, total=1000, unit="images")
    etas = [json.loads(line)["eta_s"] for line in out.getvalue().splitlines()]
    assert etas == [None, 90.0, None, round(750 * 22 / 250, 1)]
