"""End-of-run artefacts for people: the figures (plots.py) and a self-contained HTML report.

Written at the end of training and on interruption. The report embeds its images (data: URIs) and needs no
network, so it can be mailed, archived or opened from a container's volume as one file.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from . import plots
from .model_card import family_name, group_label, group_load_calls

REPORT_HTML = "report.html"
LOSS_PNG = plots.LOSS_PNG
_PRECISION = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}
# Marks the page with how many images loaded, and says so on the page when one did not: a broken report is
# visible to its reader, and a headless browser's DOM dump shows it to a test.
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  // Sample clips: counted when their first frame decodes ("loadeddata"), or as broken on an error; a test reads
  // these after the page settles.
  var videos = Array.prototype.slice.call(document.querySelectorAll("video"));
  document.body.setAttribute("data-videos", String(videos.length));
  document.body.setAttribute("data-videos-ready", "0");
  document.body.setAttribute("data-videos-broken", "0");
  function bump(name) {
    document.body.setAttribute(name, String(Number(document.body.getAttribute(name)) + 1));
  }
  videos.forEach(function (v) {
    if (v.readyState >= 2) { bump("data-videos-ready"); return; }
    v.addEventListener("loadeddata", function () { bump("data-videos-ready"); });
    v.addEventListener("error", function () { bump("data-videos-broken"); });
  });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-images-broken", String(broken.length));
  if (broken.length) {
    var p = document.createElement("p"); p.className = "warn";
    p.textContent = broken.length + " image(s) in this report failed to load.";
    document.body.insertBefore(p, document.body.firstChild);
  }
});
</script>"""
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;max-width:1040px;
margin:24px auto;padding:0 20px;background:#f6f7f9}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5a6472;margin:0 0 16px}.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 18px}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:13px;font-weight:600;vertical-align:middle}
.completed{background:#dff3e4;color:#17693a}.interrupted{background:#fdf0d5;color:#8a5a00}
.facts{display:grid;grid-template-columns:repeat(3,1fr);gap:10px 24px}.facts div{min-width:0}
.facts b{display:block;font-size:12px;color:#5a6472;font-weight:600;text-transform:uppercase;letter-spacing:.03em}
.facts span{overflow-wrap:anywhere}
img{max-width:100%;height:auto;border-radius:4px}table{border-collapse:collapse;width:100%;background:#fff}
td,th{border:1px solid #e3e6eb;padding:4px 10px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f0f2f5;font-weight:600}pre{background:#1f2430;color:#e8eaf0;padding:12px 14px;border-radius:6px;
overflow-x:auto;font-size:13px}code{font-size:13px}details summary{cursor:pointer;font-weight:600;margin:6px 0}
.warn{background:#fde2e1;color:#8c1d18;padding:8px 12px;border-radius:6px}.muted{color:#5a6472}
figure.clip{display:flex;flex-direction:column;align-items:flex-start;gap:8px;margin:12px 0}
figure.clip video,figure.clip img.clip{height:240px;width:auto;max-width:100%;background:#000}
figure.clip img.frames{width:100%}figure.clip img{image-rendering:pixelated}
"""


def device_prose(info: Any) -> str:
    """'NVIDIA H200 (139 GB), bf16 mixed precision' / 'the CPU (x86_64, 2 cores), fp32'."""
    precision = _PRECISION.get(info.mixed_precision, info.mixed_precision)
    if info.type == "cuda":
        memory = f" ({info.memory_gb:.0f} GB)" if info.memory_gb else ""
        return f"{info.name}{memory}, {precision}"
    return f"the CPU ({info.name.replace(' (', ', ').rstrip(')')}), {precision}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _img_tag(path: Path, mime: str = "image/png", cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f'<img src="{_data_uri(path, mime)}" alt="{html.escape(path.name)}"{attr}>'


def _clips_html(samples_dir: Path, prompts: list[str], limit: int = 4) -> str:
    """The newest round's clips (a video family's samples: outputs/clips.py), the first of each prompt, each playing
    beside its frame-grid PNG: an mp4 in a looping muted <video>, an animated WebP as an <img>. "" without clips."""
    rounds = sorted(samples_dir.glob("step-*")) if samples_dir.is_dir() else []
    for folder in reversed(rounds):
        clips = sorted(f for f in folder.glob("p*_00_seed*.*") if f.suffix in (".mp4", ".webp"))[:limit]
        if clips:
            break
    else:
        return ""
    e = html.escape
    cells = []
    for clip in clips:
        i = int(clip.name[1:3])
        player = (f'<video src="{_data_uri(clip, "video/mp4")}" controls loop muted autoplay playsinline '
                  f'title="{e(clip.name)}"></video>' if clip.suffix == ".mp4" else _img_tag(clip, "image/webp", "clip"))
        grid = clip.with_suffix(".png")
        caption = e(prompts[i] if i < len(prompts) else f"prompt {i}")
        cells.append(f'<figure class="clip">{player}{_img_tag(grid, cls="frames") if grid.is_file() else ""}'
                     f"<figcaption>{caption} <span class=\"muted\">({e(clip.name)})</span></figcaption></figure>")
    step = folder.name.split("-")[-1].lstrip("0") or "0"
    return f'<h3>Clips at step {step} (the newest samples)</h3>{"".join(cells)}'


def _files_table(out_dir: Path, output_name: str, suffixes: list[str]) -> str:
    what = {}
    for suffix in suffixes:  # a file pair per denoiser group (Wan 2.2 A14B's experts), else the one pair
        group = f" ({group_label(suffix)} expert)" if suffix else ""
        what[f"{output_name}{suffix}.safetensors"] = f"ComfyUI, A1111/Forge (and diffusers){group}"
        what[f"pytorch_lora_weights{suffix}.safetensors"] = f"diffusers / PEFT{group}"
    what.update({"training_manifest.json": "settings, dataset fingerprint, versions",
                 "README.md": "model card (Hugging Face)"})
    rows = []
    for name, use in what.items():
        p = out_dir / name
        if p.is_file():
            size = p.stat().st_size
            shown = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
            rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td>{shown}</td><td>{html.escape(use)}</td></tr>")
    if not rows:
        return '<p class="muted">No final files yet: the run stopped before its end (resume it to finish).</p>'
    return "<table><tr><th>file</th><th>size</th><th>for</th></tr>" + "".join(rows) + "</table>"


def _eval_table(eval_history: list[tuple]) -> str:
    """The validation loss on the held-out set (eval_loss events), one row per pass: the numbers behind the plot's
    green line, at most 40 rows (evenly spaced, first and last kept)."""
    if not eval_history:
        return ""
    rows = list(eval_history)
    if len(rows) > 40:
        rows = [rows[round(i * (len(rows) - 1) / 39)] for i in range(40)]

    def num(v) -> str:
        return f"{v:.5f}" if v is not None and v == v else "-"

    body = "".join(f"<tr><td>{int(r[0])}</td><td>{num(r[1])}</td><td>{', '.join(num(v) for v in r[2])}</td></tr>"
                   for r in rows)
    return ('<h3 id="eval-loss">Held-out loss (eval_loss)</h3><table><tr><th>step</th><th>mean</th>'
            f"<th>per noise level</th></tr>{body}</table>")


def try_write_report(cfg, events, **kwargs) -> dict[str, str]:
    """write_report, or a ``report_failed`` warning: a report is a convenience, never a reason to fail a run."""
    try:
        return write_report(cfg, **kwargs)
    except Exception as exc:  # noqa: BLE001
        events.emit("warning", code="report_failed", message=f"could not write the report: {type(exc).__name__}: {exc}")
        return {}


def _how_to_load(cfg, out_dir: Path, groups: list[tuple[str, str]] | None) -> str:
    e = html.escape
    triggers = ", ".join(cfg.trigger_words)
    if groups:  # one pair per denoiser group, each for its own model (as the model card says)
        calls = group_load_calls(str(out_dir), groups)
        files = ", ".join(f"<code>{e(cfg.output_name + suffix)}.safetensors</code> on the "
                          f"{e(group_label(suffix))} model" for suffix, _ in groups)
        return (f"<p><b>diffusers</b> (one PEFT file per expert)</p><pre>{e(calls)}</pre>"
                f"<p><b>ComfyUI</b>: copy the files to <code>models/loras/</code> and add one <i>LoraLoaderModelOnly</i>"
                f" node per expert model: {files}.</p>")
    name = f"{cfg.output_name}.safetensors"
    return f"""<p><b>diffusers</b> (reads <code>pytorch_lora_weights.safetensors</code>, the exact PEFT weights)</p>
<pre>pipe.load_lora_weights("{e(str(out_dir))}")
image = pipe("{e(triggers)}, ...").images[0]</pre>
<p><b>ComfyUI</b>: copy <code>{e(name)}</code> to <code>models/loras/</code> and add a <i>LoraLoader</i> node
between the checkpoint loader and the sampler.</p>
<p><b>A1111 / Forge</b>: copy it to <code>models/Lora/</code> and prompt with
<code>&lt;lora:{e(cfg.output_name)}:1&gt; {e(triggers)}</code>.</p>"""


def write_report(cfg, *, status: str, family: str, step: int, total_steps: int, run_id: str, device_info: Any,
                 loss_history: list[tuple], duration_s: float | None = None,
                 final_loss: float | None = None, eval_history: list[tuple] = (), variant: str | None = None,
                 groups: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """Write the figures and report.html into cfg.output_path; returns their paths. Main process only. ``groups``:
    (file-name suffix, extra load_lora_weights arguments) per file pair where the family writes one per denoiser
    group (ModelFamily.export_groups), None for the one pair."""
    from ..data.captions import prompts_for

    out_dir = cfg.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / plots.LOSS_PNG
    plots.loss_curve(loss_history, png, eval_history)
    result = {"loss_curve": str(png)}
    samples_png = out_dir / plots.SAMPLES_PNG
    if plots.samples_over_steps(out_dir / "samples", prompts_for(cfg), samples_png):
        result["samples_over_steps"] = str(samples_png)
    e = html.escape
    triggers = ", ".join(cfg.trigger_words)
    facts = [("steps", f"{step} of {total_steps}"), ("base model", str(cfg.base_model)),
             ("trigger words", triggers or "-"), ("final loss", f"{final_loss:.4f}" if final_loss is not None else "-"),
             ("trained on", device_prose(device_info)), ("duration", _duration(duration_s)),
             ({"lokr": "LoKr", "loha": "LoHa"}.get(cfg.network_type, "LoRA"),
              f"rank {cfg.lora_rank}, alpha {cfg.alpha:g}{', DoRA' if cfg.use_dora else ''}"),
             ("learning rate", f"{cfg.learning_rate:g} ({cfg.lr_scheduler}, {cfg.optimizer})"),
             ("data", f"batch {cfg.batch_size}, {cfg.resolution or 'native'} px" if cfg.resolution else
              f"batch {cfg.batch_size}, the family's native resolution")]
    facts_html = "".join(f"<div><b>{e(k)}</b><span>{e(v)}</span></div>" for k, v in facts)
    samples_html = _img_tag(samples_png) + _clips_html(out_dir / "samples", prompts_for(cfg)) \
        if "samples_over_steps" in result else \
        '<p class="muted">No samples: set <code>validation_steps</code> (and <code>validation_prompts</code>).</p>'
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(v))}</td></tr>" for k, v in cfg.to_dict().items())
    suffixes = [suffix for suffix, _ in groups] if groups else [""]
    lora_path = ", ".join(str(out_dir / f"{cfg.output_name}{suffix}.safetensors") for suffix in suffixes)
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(cfg.output_name)}: {e(family)} LoRA ({e(status)})</title><style>{_CSS}</style></head><body>
<h1>{e(cfg.output_name)} <span class="badge {e(status)}">{e(status)}</span></h1>
<p class="sub">A {e(family_name(family, variant))} LoRA trained by train_lora. Status: <b>{e(status)}</b>,
step {step} of {total_steps}, run {e(run_id)}.</p>
<div class="card facts">{facts_html}</div>
<h2>Loss</h2><div class="card">{_img_tag(png)}{_eval_table(eval_history)}</div>
<h2>Samples</h2><div class="card">{samples_html}</div>
<h2>Files</h2>{_files_table(out_dir, cfg.output_name, suffixes)}
<h2>How to load</h2>
{_how_to_load(cfg, out_dir, groups)}
<h2>Configuration</h2><details><summary>All settings ({len(cfg.to_dict())})</summary><table>{rows}</table></details>
<p class="muted">Written by train_lora; the LoRA itself: <code>{e(lora_path)}</code></p>
{_IMAGE_CHECK}</body></html>"""
    path = out_dir / REPORT_HTML
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    result["report"] = str(path)
    return result


def tracker_for(cfg) -> str | None:
    """accelerate's log_with value for report_to; a missing package is a config error, not a crash."""
    if cfg.report_to == "none":
        return None
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.report_to]
    if importlib.util.find_spec(package) is None and not (package == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        from ..contract.errors import ConfigError

        raise ConfigError(f"report_to '{cfg.report_to}' needs the '{package}' package",
                          [{"path": "report_to", "value": cfg.report_to, "message": f"{package} is not installed",
                            "allowed": "\"none\", or install the package"}], hint=f"pip install {package}")
    return cfg.report_to
