"""End-of-run artefacts for people: a loss-curve PNG and a self-contained HTML report.

Written at the end of training and on interruption. Drawn with PIL alone (no plotting dependency).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

LOSS_PNG = "loss_curve.png"
REPORT_HTML = "report.html"


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def loss_curve_png(history: list[tuple[int, float]], path: Path, size: tuple[int, int] = (800, 400)) -> None:
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in history if v is not None and math.isfinite(v)]
    d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
    if pts:
        steps = [p[0] for p in pts]
        vals = [p[1] for p in pts]
        s0, s1 = min(steps), max(steps)
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        sx = lambda s: left + (s - s0) / max(1, s1 - s0) * (w - left - right)  # noqa: E731
        sy = lambda v: h - bottom - (v - lo) / (hi - lo) * (h - top - bottom)  # noqa: E731
        if len(pts) > 1:
            d.line([(sx(s), sy(v)) for s, v in pts], fill=(160, 190, 230), width=1)
            d.line([(sx(s), sy(v)) for s, v in zip(steps, _smooth(vals))], fill=(20, 80, 200), width=2)
        else:
            d.ellipse([sx(s0) - 3, sy(vals[0]) - 3, sx(s0) + 3, sy(vals[0]) + 3], fill=(20, 80, 200))
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            d.text((4, sy(v) - 6), f"{v:.4f}", fill=(60, 60, 60))
        d.text((left, h - bottom + 8), f"step {s0}", fill=(60, 60, 60))
        d.text((w - right - 80, h - bottom + 8), f"step {s1}", fill=(60, 60, 60))
    d.text((left + 8, top + 4), "training loss (light: per step, dark: EMA 0.1)", fill=(60, 60, 60))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _img_tag(path: Path, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{style} alt="{html.escape(path.name)}">'


def write_report(cfg, *, status: str, family: str, step: int, total_steps: int, run_id: str, device_info: Any,
                 loss_history: list[tuple[int, float | None]]) -> dict[str, str]:
    """Write the loss curve and report.html into cfg.output_path; returns their paths. Main process only."""
    out_dir = cfg.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / LOSS_PNG
    loss_curve_png(loss_history, png)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in cfg.to_dict().items())
    grids = []
    samples_dir = out_dir / "samples"
    for grid in sorted(samples_dir.glob("step-*/grid.png")) if samples_dir.is_dir() else []:
        grids.append(f"<figure>{_img_tag(grid, 512)}<figcaption>{html.escape(grid.parent.name)}</figcaption></figure>")
    files = []
    for p in sorted(out_dir.glob("*.safetensors")):
        files.append(f"<tr><td>{html.escape(p.name)}</td><td>{p.stat().st_size / 2**20:.2f} MiB</td></tr>")
    lora_name = f"{cfg.output_name}.safetensors"
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>train_lora report: {html.escape(cfg.output_name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:2px 8px;text-align:left;font-size:13px}}figure{{display:inline-block}}</style></head><body>
<h1>{html.escape(cfg.output_name)} ({html.escape(family)} LoRA)</h1>
<p>Status: <b>{html.escape(status)}</b>, step {step} of {total_steps}, run {html.escape(run_id)},
device {html.escape(device_info.name)} ({html.escape(device_info.mixed_precision)}).</p>
<h2>Loss</h2>{_img_tag(png)}
<h2>Samples</h2>{''.join(grids) or '<p>No samples (set validation_steps).</p>'}
<h2>Output files</h2><table>{''.join(files) or '<tr><td>none yet</td></tr>'}</table>
<h2>How to load</h2><pre>
# diffusers
pipe.load_lora_weights("{html.escape(str(out_dir / lora_name))}")
# ComfyUI: copy {html.escape(lora_name)} to models/loras/ and use a LoraLoader node
# A1111 / Forge: copy it to models/Lora/ and prompt with &lt;lora:{html.escape(cfg.output_name)}:1&gt; {html.escape(', '.join(cfg.trigger_words))}
</pre>
<h2>Configuration</h2><table>{rows}</table></body></html>"""
    path = out_dir / REPORT_HTML
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return {"loss_curve": str(png), "report": str(path)}


def tracker_for(cfg) -> str | None:
    """accelerate's log_with value for report_to; a missing package is a config error, not a crash."""
    if cfg.report_to == "none":
        return None
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.report_to]
    if importlib.util.find_spec(package) is None and not (package == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        from .errors import ConfigError

        raise ConfigError(f"report_to '{cfg.report_to}' needs the '{package}' package",
                          [{"path": "report_to", "value": cfg.report_to, "message": f"{package} is not installed",
                            "allowed": "\"none\", or install the package"}], hint=f"pip install {package}")
    return cfg.report_to
