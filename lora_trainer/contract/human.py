"""Human-readable progress for a person at a terminal (`--progress human`, or `auto` on a TTY).

It consumes the same events the JSON stream would carry, so both modes report the same facts; it never
writes JSON, and JSON mode never writes this.
"""
from __future__ import annotations

from typing import IO


def _columns() -> int:
    # A terminal that reports 0 columns (fresh pseudo-terminals, some CI consoles) would make tqdm draw an
    # empty bar; shutil falls back to COLUMNS or 100.
    import shutil

    return max(60, shutil.get_terminal_size((100, 20)).columns)


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class HumanProgress:
    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.bar = None
        self.phase_bar = None

    def _write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)

    def _close_phase_bar(self) -> None:
        if self.phase_bar is not None:
            self.phase_bar.close()
            self.phase_bar = None

    def __call__(self, ev: dict) -> None:
        from tqdm import tqdm

        t = ev["type"]
        if t == "step":
            self._close_phase_bar()
            if self.bar is None:
                self.bar = tqdm(total=ev["total_steps"], initial=ev["step"] - 1, file=self.stream, unit="step",
                                ncols=_columns(), desc="training",
                                # tqdm's own rate would count events, not steps; our postfix has the real figures
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            self.bar.n = ev["step"]
            loss = ev.get("loss")
            post = {"loss": f"{loss:.4f}" if loss is not None else "nan",
                    "lr": f"{ev['lr']:.2e}" if ev.get("lr") is not None else "?",
                    "img/s": f"{ev['images_per_sec']:.2f}" if ev.get("images_per_sec") else "?",
                    "eta": _fmt_eta(ev.get("eta_s"))}
            self.bar.set_postfix(post, refresh=True)
        elif t == "progress":
            total = ev.get("total")
            if self.phase_bar is None or self.phase_bar.desc != ev["phase"]:
                self._close_phase_bar()
                self.phase_bar = tqdm(total=total, file=self.stream, desc=ev["phase"], unit=ev.get("unit", "it"),
                                      ncols=_columns(), leave=False)
            self.phase_bar.total = total
            self.phase_bar.n = ev["current"]
            self.phase_bar.refresh()
        elif t == "heartbeat":
            return
        else:
            self._close_phase_bar()
            self._write(self._line(ev))
            if t in ("completed", "error", "interrupted") and self.bar is not None:
                self.bar.close()
                self.bar = None

    @staticmethod
    def _line(ev: dict) -> str:
        t = ev["type"]
        if t == "validation":
            head = "config OK" if ev["ok"] else f"{len(ev['errors'])} error(s)"
            lines = [f"validation: {head}, {len(ev['warnings'])} warning(s)"]
            lines += [f"  error   {e.get('path', '')}: {e['message']}" for e in ev["errors"]]
            lines += [f"  warning {w.get('path', '')}: {w['message']}" for w in ev["warnings"]]
            ds = ev.get("summary", {}).get("dataset") or {}
            if ds:
                lines.append(f"  dataset: {ds.get('usable')} usable image(s), {ds.get('total_steps')} step(s) planned")
            return "\n".join(lines)
        if t == "run_started":
            dev = ev["device"]
            return (f"training {ev['family']} LoRA on {dev['name']} ({ev['mixed_precision']}), "
                    f"{ev['num_images']} image(s), steps {ev['start_step']}->{ev['total_steps']}")
        if t == "status":
            return f"[{ev['phase']}] {ev['message']}"
        if t == "checkpoint":
            return f"checkpoint at step {ev['step']}: {ev['path']}"
        if t == "resumed":
            return f"resumed from {ev['checkpoint']} at step {ev['step']}"
        if t == "sample":
            clip = f" (clip: {ev['video']})" if ev.get("video") else ""
            return f"sample (step {ev['step']}): {ev['path']}{clip}"
        if t == "warning":
            return f"warning: {ev['message']}"
        if t == "error":
            hint = f"\n  hint: {ev['hint']}" if ev.get("hint") else ""
            problems = ev.get("details", {}).get("problems", [])
            extra = "".join(f"\n  {p.get('path')}: {p.get('message')}" for p in problems[:20])
            return f"error ({ev['code']}, exit {ev['exit_code']}): {ev['message']}{extra}{hint}"
        if t == "interrupted":
            return f"interrupted by {ev['signal']} at step {ev['step']}; checkpoint: {ev['checkpoint']}"
        if t == "completed":
            outs = "\n".join(f"  {k}: {v}" for k, v in ev["outputs"].items())
            return f"done: {ev['steps']} step(s) in {ev['duration_s']:.1f} s\n{outs}"
        return f"{t}: {ev}"
