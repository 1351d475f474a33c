"""The run's figures, drawn with matplotlib's object API (Figure + Agg canvas: no pyplot global state, no display):
the loss curve with the learning rate, and the samples over steps (prompt by step)."""
from __future__ import annotations

import math
import os
from pathlib import Path

LOSS_PNG = "loss_curve.png"
SAMPLES_PNG = "samples_over_steps.png"
MAX_STEP_COLUMNS = 8  # more validation rounds than this: evenly spaced, first and last kept
_RAW, _SMOOTH, _LR, _SKIP = "#9ab8e6", "#1450c8", "#e07b00", "#c0392b"
_EVAL = "#2a9d3f"
EVAL_LABEL = "held-out loss (eval_loss)"


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def smooth(values: list[float | None], alpha: float = 0.1) -> list[float]:
    """The loss EMA the trainer reports (weight 0.1), carried over skipped steps (None: NaN, a gap in the plot)."""
    out, ema = [], None
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(float("nan"))
            continue
        ema = v if ema is None else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def loss_curve(history: list[tuple], path: Path, eval_history: list[tuple] = ()):
    """history: (step, loss or None, lr) per optimizer step (older checkpoints: (step, loss)); eval_history:
    (step, mean held-out loss, per-level losses) per validation-loss pass, drawn as its own line. A skipped
    (non-finite) step is a gap in both lines and a mark on the axis; the loss axis turns logarithmic when the loss
    spans more than a factor of 30, where a linear axis would flatten everything after the first steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    steps = [h[0] for h in history]
    loss = [h[1] if h[1] is not None and math.isfinite(h[1]) else None for h in history]
    finite = [v for v in loss if v is not None]
    evals = [(h[0], h[1]) for h in eval_history if h[1] is not None and math.isfinite(h[1])]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    if not finite:
        ax.text(0.5, 0.5, "no finite loss recorded yet", ha="center", va="center", transform=ax.transAxes)
    else:
        raw = [float("nan") if v is None else v for v in loss]
        marker = "o" if len(finite) == 1 else None
        ax.plot(steps, raw, color=_RAW, lw=0.9, marker=marker, label="loss (per step)")
        ax.plot(steps, smooth(loss), color=_SMOOTH, lw=2, label="smoothed (EMA 0.1)")
        if evals:  # overfitting shows as this line turning up while the training loss keeps falling
            ax.plot([s for s, _ in evals], [v for _, v in evals], color=_EVAL, lw=1.8, marker="o", ms=4,
                    label=EVAL_LABEL)
        spread = finite + [v for _, v in evals]
        if min(spread) > 0 and max(spread) / min(spread) > 30:
            ax.set_yscale("log")
        skipped = [s for s, v in zip(steps, loss) if v is None]
        if skipped:
            ax.plot(skipped, [0] * len(skipped), "x", color=_SKIP, transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"skipped step ({len(skipped)})")
    handles, labels = ax.get_legend_handles_labels()
    lrs = [h[2] for h in history if len(h) > 2 and h[2] is not None]
    if lrs and len(lrs) == len(history):
        ax2 = ax.twinx()
        ax2.plot(steps, lrs, color=_LR, lw=1.2, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color=_LR)
        ax2.tick_params(axis="y", colors=_LR)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:  # below the axes: inside, it hides the start of a falling curve
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    ax.set_title("Training loss and learning rate", fontsize=11)
    _save(fig, path)
    return fig  # for tests: the axes, scales and lines as drawn


def _pick_steps(steps: list[int]) -> list[int]:
    if len(steps) <= MAX_STEP_COLUMNS:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (MAX_STEP_COLUMNS - 1)) for i in range(MAX_STEP_COLUMNS)})
    return [steps[i] for i in idx]


def samples_over_steps(samples_dir: Path, prompts: list[str], path: Path) -> bool:
    """One row per prompt (its first image), one column per validation step (step 0: the base model). Reads
    samples/step-NNNNNN/pPP_00_seed*.png as sampling.py writes them. False when there is nothing to draw."""
    from matplotlib.figure import Figure
    from PIL import Image

    by_step: dict[int, dict[int, Path]] = {}
    for folder in sorted(samples_dir.glob("step-*")) if samples_dir.is_dir() else []:
        try:
            step = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        for f in folder.glob("p*_00_seed*.png"):
            by_step.setdefault(step, {})[int(f.name[1:3])] = f
    if not by_step:
        return False
    steps = _pick_steps(sorted(by_step))
    rows = max(len(prompts), 1 + max(max(v) for v in by_step.values()))
    fig = Figure(figsize=(1.9 * len(steps) + 1.6, 1.9 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, len(steps), squeeze=False)
    for r in range(rows):
        for c, step in enumerate(steps):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            f = by_step[step].get(r)
            if f is not None:
                with Image.open(f) as im:
                    ax.imshow(im.convert("RGB"))
            else:
                ax.text(0.5, 0.5, "-", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title("base model" if step == 0 else f"step {step}", fontsize=9)
            if c == 0:
                label = prompts[r] if r < len(prompts) else f"prompt {r}"
                ax.set_ylabel(label if len(label) <= 28 else label[:27] + "…", fontsize=8)
    fig.suptitle("Samples over training (rows: prompts, columns: steps)", fontsize=10)
    _save(fig, path)
    return True
