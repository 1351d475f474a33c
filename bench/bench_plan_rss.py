"""The memory plan against the measured peak RSS of real CPU training runs (the CLI, two steps each), on
quarter-width models: FLUX.1-dev reduced (every width / 4, 2 double + 4 single blocks, a 2-layer T5) and quarter
SDXL (bench/models.py). On the CPU the "accelerator" is host memory, so the run's peak RSS should be the plan's
total plus what the plan leaves on the host by design (the VAE after latent caching, SDXL's text encoders after
text caching; FLUX.1 drops its encoders) plus the process's libraries, measured separately as the RSS of a process
that only imports them. Prints a table; bench/RESULTS.md records it.

    python3 bench/bench_plan_rss.py [--work DIR] [--resolution 512] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
IMPORTS = ("import torch, diffusers, transformers, peft, accelerate, safetensors, PIL, numpy; "
           "import lora_trainer.trainer, lora_trainer.loading, lora_trainer.data, lora_trainer.text_cache")


def peak_rss(cmd: list[str], env: dict) -> tuple[int, str, str]:
    """(peak RSS in bytes of the child, stdout, stderr): the kernel's high-water mark, from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[-1]} exited {proc.returncode}: {err.read().decode()[-2000:]}")
        return usage.ru_maxrss * 1024, out.read().decode(), err.read().decode()


def models(work: Path) -> dict[str, Path]:
    from models import make_flux_model, make_model

    flux, sdxl = work / "flux-reduced", work / "sdxl-quarter"
    if not (flux / "model_index.json").is_file():
        make_flux_model(flux, "reduced", t5_layers=2, quiet=True)
    if not (sdxl / "model_index.json").is_file():
        make_model(sdxl, "quarter", quiet=True)
    return {"flux": flux, "sdxl": sdxl}


def host_extras(cfg_path: Path, env: dict) -> tuple[dict, dict]:
    """The plan's parts with nothing cached: what the VAE and the text encoders weigh (validate-only, torch-free)."""
    cfg = json.loads(cfg_path.read_text())
    cfg.update(cache_latents=False, cache_text_embeddings=False, output_path=cfg["output_path"] + "-uncached")
    path = cfg_path.with_name(cfg_path.stem + "-uncached.json")
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "train_lora.py", "--config", str(path), "--validate-only"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    v = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    plan = next(e for e in v if e["type"] == "validation")["summary"]["memory"]
    return plan["parts_gib"], plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="keep models and runs here (default: a temp folder)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    from lora_trainer.tiny import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_plan_rss_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    paths = models(work)
    data = make_dataset(work / "data", n=2, sizes=[(args.resolution, args.resolution)], trigger="ohwx")
    base, _, _ = peak_rss([sys.executable, "-c", IMPORTS], env)
    rows = []
    for k, (model, settings) in enumerate(CASES):
        out = work / f"run{k}"
        cfg = {"dataset_path": str(data), "base_model": str(paths[model]), "output_path": str(out),
               "trigger_words": ["ohwx"], "resolution": args.resolution, "min_bucket_resolution": args.resolution,
               "max_train_steps": args.steps, "checkpointing_steps": None, "lora_rank": 16, "device": "cpu",
               "overwrite_output": True, "log_every_n_steps": 1, "enable_bucketing": False, **settings}
        cfg_path = work / f"run{k}.json"
        cfg_path.write_text(json.dumps(cfg))
        peak, stdout, _ = peak_rss([sys.executable, "train_lora.py", "--config", str(cfg_path)], env)
        events = [json.loads(line) for line in stdout.splitlines()]
        started = next(e for e in events if e["type"] == "run_started")
        plan = started["memory_plan"]
        uncached, _ = host_extras(cfg_path, env)
        released = (started.get("text_cache") or {}).get("text_encoders_released", False)
        extra_gib = uncached["vae"] + (0 if released else uncached["text_encoders"])
        expected = plan["total_gib"] + extra_gib
        measured = (peak - base) / GIB
        rows.append((model, ", ".join(f"{k}={v}" for k, v in settings.items()), f"{plan['total_gib']:.3f}",
                     f"{plan['parts_gib']['activations']:.3f}", f"{extra_gib:.3f}", f"{expected:.3f}",
                     f"{measured:.3f}", f"{measured / expected:.2f}"))
        print(f"{model} {settings}: plan {plan['total_gib']:.3f} + host {extra_gib:.3f} GiB, measured "
              f"{measured:.3f} GiB above {base / GIB:.3f} GiB of libraries", file=sys.stderr)
    head = ("model", "settings", "plan GiB", "of it activations", "+ host-resident VAE/TE", "expected",
            "measured (peak RSS - libraries)", "measured / expected")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"\nmemory plan vs peak RSS, CPU, fp32, {args.resolution} px, batch 1, r16, {args.steps} steps; "
          f"libraries alone: {base / GIB:.3f} GiB")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
