"""The stdout event stream: one JSON object per line, the only thing ever written to stdout.

A parent process (a web app, a job queue) parses every stdout line, so purity matters more than anything
here. ``claim_stdout`` moves the real stdout to a private file descriptor and points fd 1 at stderr: after
it, a stray ``print`` from any library, C extensions included, lands on stderr, and only ``EventStream``
can reach the parent's pipe. The schema of each event type lives in events_schema.json.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import IO, Any, Callable

SCHEMA_VERSION = "1.0"


def claim_stdout() -> IO[str]:
    """Return a private line-buffered text stream on the original stdout; fd 1 becomes a copy of stderr."""
    sys.stdout.flush()
    private_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(private_fd, "w", encoding="utf-8", buffering=1, newline="\n")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf; a parent's JSON.parse would reject the whole line, so they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        try:
            return _json_safe(value.item())
        except Exception:  # noqa: BLE001 - anything unconvertible is reported as text
            pass
    return str(value)


class EventStream:
    """Writes events with the common envelope: type, schema_version, run_id, seq, time."""

    def __init__(self, out: IO[str] | None, run_id: str | None = None, *, enabled: bool = True,
                 on_event: Callable[[dict], None] | None = None):
        self._out = out
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.enabled = enabled  # non-main ranks under accelerate keep the API but write nothing
        self._seq = 0
        self._lock = threading.Lock()  # the heartbeat thread writes too; lines must never interleave
        self.last_emit = time.monotonic()
        self.started = time.monotonic()
        self._on_event = on_event
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self.phase = "starting"
        self._progress_start: dict[str, tuple[float, int]] = {}  # phase -> (time, current) of its first event

    def _eta(self, fields: dict) -> float | None:
        """Seconds left in a progress phase, from its average rate since the phase's first progress event."""
        phase, current, total = fields.get("phase"), fields.get("current"), fields.get("total")
        now = time.monotonic()
        t0, c0 = self._progress_start.setdefault(phase, (now, current or 0))
        if not total or current is None or current <= c0 or now <= t0:
            return None
        return round((total - current) * (now - t0) / (current - c0), 1)

    def emit(self, type_: str, **fields: Any) -> dict:
        if type_ == "progress" and "eta_s" not in fields:
            fields["eta_s"] = self._eta(fields)
        with self._lock:
            self._seq += 1
            event = {"type": type_, "schema_version": SCHEMA_VERSION, "run_id": self.run_id,
                     "seq": self._seq, "time": utc_now_iso()}
            event.update(_json_safe(fields))
            self.last_emit = time.monotonic()
            if self.enabled and self._out is not None:
                try:
                    self._out.write(_one_line(json.dumps(event, ensure_ascii=False, separators=(",", ":"))) + "\n")
                    self._out.flush()
                except (BrokenPipeError, ValueError):
                    # The parent went away: nobody is reading, and training may still be worth finishing.
                    self._out = None
        if self._on_event is not None:
            self._on_event(event)
        return event

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    # -- heartbeat -------------------------------------------------------------------------------
    def start_heartbeat(self, interval_s: float) -> None:
        """Emit ``heartbeat`` whenever nothing else was emitted for interval_s, so silence means a hang."""
        if self._heartbeat is not None or interval_s <= 0:
            return
        self._stop_heartbeat.clear()

        def loop() -> None:
            while not self._stop_heartbeat.wait(min(1.0, interval_s / 4)):
                idle = time.monotonic() - self.last_emit
                if idle >= interval_s:
                    self.emit("heartbeat", phase=self.phase, uptime_s=round(time.monotonic() - self.started, 3),
                              idle_s=round(idle, 3))

        self._heartbeat = threading.Thread(target=loop, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None


# json.dumps escapes every control character below U+0020 but leaves U+0085 (NEL) and U+2028 / U+2029 raw, and
# line readers other than a plain "\n" split (Python's str.splitlines, some log shippers) break an event there.
# They can only occur inside JSON strings, where their \u escapes mean the same.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)

