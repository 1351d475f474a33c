"""The memory plan against the measured peak RSS of real CPU training runs (the CLI, two steps each), on
quarter-width models: FLUX.1-dev reduced (every width / 4, 2 double + 4 single blocks, a 2-layer T5) and quarter
SDXL (bench/models.py). On the CPU the "accelerator" is host memory, so the run's peak RSS should be the plan's
total plus what the plan leaves on the host by design (the VAE after latent caching, SDXL's text encoders after
text caching; FLUX.1 drops its encoders) plus the process's libraries: the run's RSS when it starts loading the model
(read from /proc when it reports it) is subtracted from its peak. Prints a table; bench/RESULTS.md records it.

    python3 bench/bench_plan_rss.py [--work DIR] [--resolution 512] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 2 ** 30
CASES = [  # (model, settings)
    ("flux", {"gradient_checkpointing": False}),
    ("flux", {"gradient_checkpointing": True}),
    ("flux", {"gradient_checkpointing": True, "target_modules": "all_linear"}),
    ("flux", {"gradient_checkpointing": True, "base_quantization": "int8"}),
    ("sdxl", {"gradient_checkpointing": False}),
    ("sdxl", {"gradient_checkpointing": True}),
]


def _vm_rss(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sample_run(cmd: list[str], env: dict) -> tuple[dict, list[dict]]:
    """Run the CLI, sampling its RSS from /proc every 5 ms while reading its events: (figures, events).
    Figures (bytes): ``load_start`` (RSS at its first loading_model progress: libraries imported, no weight read;
    the child reads on meanwhile, so a few MB of it may be in), ``started`` (at run_started: weights loaded and
    converted, caches built), ``train_peak`` (highest sample from run_started to the last step event), ``peak``
    (the kernel's high-water mark over the whole run, from wait4)."""
    import threading

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT, text=True)
        state = {"phase": "start", "train_peak": 0, "done": False}

        def sampler():
            while not state["done"]:
                rss = _vm_rss(proc.pid)
                if rss and state["phase"] == "training":
                    state["train_peak"] = max(state["train_peak"], rss)
                time.sleep(0.005)

        threading.Thread(target=sampler, daemon=True).start()
        events, fig, steps_left = [], {}, None
        for line in proc.stdout:
            e = json.loads(line)
            events.append(e)
            if "load_start" not in fig and e["type"] == "progress" and e.get("phase") == "loading_model":
                fig["load_start"] = _vm_rss(proc.pid)
            elif e["type"] == "run_started":
                fig["started"] = _vm_rss(proc.pid)
                state["phase"], steps_left = "training", e["total_steps"] - e["start_step"]
            elif e["type"] == "step":
                steps_left -= 1
                if steps_left == 0:
                    state["phase"] = "after"
        state["done"] = True
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[-1]} exited {code}: {err.read().decode()[-2000:]}")
        fig.update(train_peak=state["train_peak"], peak=usage.ru_maxrss * 1024)
        return fig, events


def models(work: Path) -> dict[str, Path]:
    from models import make_flux_model, make_model

    flux, sdxl = work / "flux-reduced", work / "sdxl-quarter"
    if not (flux / "model_index.json").is_file():
        make_flux_model(flux, "reduced", t5_layers=2, quiet=True)
    if not (sdxl / "model_index.json").is_file():
        make_model(sdxl, "quarter", quiet=True)
    return {"flux": flux, "sdxl": sdxl}


def host_extras(cfg_path: Path, env: dict) -> dict:
    """The plan's parts with nothing cached: what the VAE and the text encoders weigh (validate-only, torch-free)."""
    cfg = json.loads(cfg_path.read_text())
    cfg.update(cache_latents=False, cache_text_embeddings=False, output_path=cfg["output_path"] + "-uncached")
    path = cfg_path.with_name(cfg_path.stem + "-uncached.json")
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "train_lora.py", "--config", str(path), "--validate-only"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    v = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next(e for e in v if e["type"] == "validation")["summary"]["memory"]["parts_gib"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="keep models and runs here (default: a temp folder)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    from lora_trainer.testing.tiny import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_plan_rss_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    paths = models(work)
    data = make_dataset(work / "data", n=2, sizes=[(args.resolution, args.resolution)], trigger="ohwx")
    rows = []
    for k, (model, settings) in enumerate(CASES):
        out = work / f"run{k}"
        cfg = {"dataset_path": str(data), "base_model": str(paths[model]), "output_path": str(out),
               "trigger_words": ["ohwx"], "resolution": args.resolution, "min_bucket_resolution": args.resolution,
               "max_train_steps": args.steps, "checkpointing_steps": None, "lora_rank": 16, "device": "cpu",
               "overwrite_output": True, "log_every_n_steps": 1, "enable_bucketing": False, **settings}
        cfg_path = work / f"run{k}.json"
        cfg_path.write_text(json.dumps(cfg))
        fig, events = sample_run([sys.executable, "train_lora.py", "--config", str(cfg_path)], env)
        started = next(e for e in events if e["type"] == "run_started")
        plan = started["memory_plan"]
        parts = plan["parts_gib"]
        uncached = host_extras(cfg_path, env)
        released = (started.get("text_cache") or {}).get("text_encoders_released", False)
        extra = uncached["vae"] + (0 if released else uncached["text_encoders"])
        # resident before the first step: the frozen weights and what stays on the host by design
        resident_plan = parts["denoiser_weights"] + extra
        resident = (fig["started"] - fig["load_start"]) / GIB
        # added by training: LoRA gradients and optimizer state, activations (the plan's slack is on everything)
        step_plan = parts["lora"] + parts["activations"]
        step = (fig["train_peak"] - fig["started"]) / GIB
        rows.append((model, ", ".join(f"{k}={v}" for k, v in settings.items()), f"{plan['total_gib']:.2f}",
                     f"{resident_plan:.2f} / {resident:.2f}", f"{step_plan:.2f} / {step:.2f}",
                     f"{(fig['peak'] - fig['load_start']) / GIB:.2f}"))
        print(f"{model} {settings}: {fig}", file=sys.stderr)
    head = ("model", "settings", "plan total GiB", "weights + host VAE/TE: plan / measured",
            "training adds (LoRA + activations): plan / measured", "whole-run peak above load start")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"\nmemory plan vs RSS, CPU, fp32, {args.resolution} px, batch 1, r16, {args.steps} steps (RSS sampled "
          "every 5 ms; 'measured' weights = RSS at run_started - RSS at load start, training = peak during the "
          "steps - RSS at run_started)")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
