"""Full-size family checks for device_check.py, one table: each family at its published size (random weights), built
on the card in a child process and trained through the real CLI at 1024 px.

    python3 bench/device_families.py --list                       # the registered family checks
    python3 bench/device_families.py --build qwen-image DIR        # build one full-size folder (a card: --device cuda)

A family check is a ``FamilyBench`` row: how to build its full-size folder (a function in the family's own bench
module, ``module:function(out, device=, dtype=)``), which tiny variant stands in for a CPU dry run, the runs to make (bf16;
an 8-bit base with gradient checkpointing, the 24 GB recipe; ...) and its size for the MFU estimate. device_check
runs the rows ``--families`` names (default: all) and reports per run s/step, peak GPU memory beside the memory
plan's figure, both LoRA files and an MFU estimate (``add_mfu``). The build runs in a child so that the parent,
which only spawns CLI runs, never holds a full-size model on the card.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BF16 = ("bf16", {})
INT8_GC = ("int8_gc", {"base_quantization": "int8", "gradient_checkpointing": True})
FP8 = ("fp8", {"base_quantization": "fp8"})
GC = ("bf16_gc", {"gradient_checkpointing": True})
FP8_GC = ("fp8_gc", {"base_quantization": "fp8", "gradient_checkpointing": True})
NF4_GC = ("nf4_gc", {"base_quantization": "nf4", "gradient_checkpointing": True})
GC_COMPILED = ("bf16_gc_compiled", {"gradient_checkpointing": True, "compile": True})  # vs GC: compile's gain
GC_OFFLOAD = ("bf16_gc_offload", {"gradient_checkpointing": True, "offload_blocks": 0.5})  # vs GC: streaming's cost


SAME = "<variant>"


@dataclass(frozen=True)
class FamilyBench:
    label: str  # the check is named "<label>/<full|tiny>"
    family: str  # run_started.family every run must report
    variant: str | None
    tiny: str  # lora_trainer.testing.tiny's name: the CPU dry run's model
    build: str  # "bench.module:function", called as function(out, device=..., dtype=torch.bfloat16) -> Path (random weights)
    full_size: tuple[float, int, int]  # transformer parameters, image tokens at 1024 px, text tokens (add_mfu)
    runs: tuple[tuple[str, dict], ...] = (BF16, INT8_GC)
    config: dict = field(default_factory=dict)  # every run's extra config (e.g. max_sequence_length)
    need_s: float = 150.0  # build + save + the first run on a card, estimated: later runs are skipped inside
    resolution: int = 1024  # the runs' resolution (bucket area); the tiny dry run trains at 64 px
    # A video family's clips (width, height, frames, fps; the tiny run: 64 x 48, 5 frames): generated moving-square
    # clips (lora_trainer.testing.video) beside stills of their size, trained with video_frames / video_fps.
    clips: dict | None = None
    tiny_variant: str | None = SAME  # the variant the tiny model reports where it is not ``variant`` (Wan 2.1's: none)


FAMILY_BENCHES: dict[str, FamilyBench] = {b.label: b for b in (
    FamilyBench("flux2-klein-9b", "flux2_klein", "klein-9b", "flux2-klein-9b", "bench.device_flux2:build_klein_9b",
                (9.079e9, 4096, 512), config={"max_sequence_length": 512}),
    FamilyBench("zimage", "zimage", None, "zimage", "bench.zimage_check:build_bf16", (6.155e9, 4096, 512),
                runs=(BF16, FP8, GC, GC_OFFLOAD, GC_COMPILED)),
    FamilyBench("qwen-image", "qwen_image", None, "qwen-image", "bench.qwen_image:make_model", (20.430e9, 4096, 512),
                runs=(GC, ("int8_gc", INT8_GC[1])), config={"max_sequence_length": 128}, need_s=240.0),
    FamilyBench("qwen-image-2.1", "qwen_image21", None, "qwen-image-2.1", "bench.qwen_image21_check:make_model",
                (7.115e9, 4096, 512), runs=(GC, FP8_GC, NF4_GC), config={"max_sequence_length": 128}),
    FamilyBench("chroma", "chroma", None, "chroma", "bench.chroma_check:make_model", (8.900e9, 4096, 512),
                runs=(BF16, GC, FP8_GC, NF4_GC), config={"max_sequence_length": 128}),
    FamilyBench("anima", "anima", None, "anima", "bench.anima_check:make_model", (2.091e9, 4096, 512),
                runs=(BF16, FP8, GC, GC_OFFLOAD), need_s=90.0),
    FamilyBench("krea2", "krea2", None, "krea2", "bench.krea2_check:make_model", (12.820e9, 4096, 512),
                runs=(GC, BF16, FP8_GC, GC_COMPILED), config={"max_sequence_length": 128}, need_s=180.0),
    FamilyBench("ideogram4", "ideogram4", None, "ideogram4", "bench.ideogram4_check:make_model", (9.279e9, 4096, 512),
                runs=(GC, BF16, FP8_GC, NF4_GC), config={"max_sequence_length": 128}),
    # Wan at 480p (832 x 480, bucket area 640^2), 33-frame clips: image tokens below are one latent frame's at the
    # 832 x 448 bucket (16-px tokens for 2.1, 32-px for 2.2's 16x VAE); add_mfu multiplies by the latent frames.
    FamilyBench("wan21-1.3b", "wan", "t2v-1.3b", "wan21", "bench.wan_check:make_21", (1.419e9, 52 * 28, 512),
                runs=(BF16, GC), resolution=640, clips=dict(width=832, height=480, frames=33, fps=16), need_s=120.0,
                tiny_variant=None),
    FamilyBench("wan22-5b", "wan", "ti2v-5b", "wan22-5b", "bench.wan_check:make_22", (5.000e9, 26 * 14, 512),
                runs=(GC, BF16), resolution=640, clips=dict(width=832, height=480, frames=33, fps=16), need_s=150.0),
)}


def add_mfu(ctx, c, full_size: tuple[float, int, int], latent_frames: int = 1) -> None:
    """MFU of each ``<run>_s_per_step`` of a full-size check: model FLOPs 4 x parameters x tokens per step (the
    frozen base's forward 2NT and its input gradients 2NT; no weight gradients, the LoRA's own FLOPs and attention
    left out, so an underestimate), over the measured bf16 ceiling; a video family's image tokens times the latent
    frames a step holds. Not for tiny runs or the CPU."""
    peak = getattr(ctx, "peak_tflops", None)
    if not peak or not ctx.cuda or "tiny" in c.name:
        return
    params, image_tokens, text_tokens = full_size
    image_tokens *= latent_frames
    flops = 4 * params * (image_tokens + text_tokens)
    for key, value in list(c.numbers.items()):
        if key.endswith("_s_per_step") and isinstance(value, (int, float)) and value > 0:
            c.numbers[key.replace("_s_per_step", "_mfu_pct")] = round(100 * flops / value / (peak * 1e12), 1)


def build(bench: FamilyBench, out: Path, device: str) -> Path:
    import torch

    module, function = bench.build.split(":")
    return getattr(importlib.import_module(module), function)(out, device=device, dtype=torch.bfloat16)


def check_family(ctx, dc, c, bench: FamilyBench, *, tiny: bool) -> None:
    """``dc``: the device_check module (run_cli, expect_completed, mem_max, load_lora, _steady, log, Check)."""
    from lora_trainer.preflight.probe.headers import has_pipeline_index
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    res, steps = (64, 3) if tiny else (bench.resolution, ctx.args.flux_steps or 6)
    folder = ctx.tmp / f"model-{bench.label}"
    t = time.monotonic()
    if not has_pipeline_index(folder):  # model_index.json, or a modular pipeline's (Anima)
        dc.log(f"  building {'tiny' if tiny else 'full'} {bench.label} in {folder}")
        if tiny:
            make_tiny_pipeline(folder, bench.tiny)
        else:  # a child: the full-size weights leave the card with it
            proc = subprocess.run([sys.executable, __file__, "--build", bench.label, str(folder), "--device",
                                   str(ctx.device)], cwd=ROOT, capture_output=True, text=True)
            if not c.require(proc.returncode == 0, f"build exit {proc.returncode}: {proc.stderr[-1500:]}"):
                return
    c.numbers.update(model=f"{'tiny' if tiny else 'full'} {bench.label}", build_and_save_s=round(time.monotonic() - t, 1),
                     model_gb=round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 1))
    data, video = _dataset(ctx.tmp / f"data-{bench.label}", bench, res, tiny)
    per_run = None
    for k, (name, extra) in enumerate(bench.runs):
        tag = f"{res}px_{name}"
        if per_run is not None and ctx.remaining() < 1.3 * per_run:
            c.numbers[f"{tag}_skipped"] = f"{ctx.remaining():.0f} s left, ~{1.3 * per_run:.0f} s needed"
            continue
        cfg = {"dataset_path": str(data), "base_model": str(folder), "output_path": str(ctx.tmp / f"{bench.label}-{tag}"),
               "trigger_words": ["ohwx"], "resolution": res, "min_bucket_resolution": min(256, res), "batch_size": 1,
               "max_train_steps": steps, "checkpointing_steps": None, "lora_rank": 16, "learning_rate": 1e-4,
               "log_every_n_steps": 1, "seed": 7, "device": ctx.device, "mixed_precision": ctx.main_precision,
               "cache_latents": True, "heartbeat_seconds": 600, "ignore_memory_plan": True, **video, **bench.config,
               **extra}
        if k == 0:  # the sampling path from cached embeddings on the card: 2 steps, before and after training
            cfg.update(validation_prompts=["ohwx, a red circle"], validation_steps=steps, validation_inference_steps=2)
        path = ctx.tmp / f"{bench.label}-{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        run = dc.run_cli(ctx, path, f"{bench.label}/{tag}", record=False, max_timeout=420.0)
        per_run = run.wall_s
        err = run.last("error")
        if run.rc != 0 and err.get("code") == "out_of_memory":  # an answer about the card, not a broken trainer
            c.numbers[f"{tag}_result"] = "out_of_memory"
            c.details[f"{tag}_oom"] = {"message": err.get("message"), "details": err.get("details")}
            continue
        sub = dc.Check(c.name)
        if not dc.expect_completed(sub, run, ctx.main_precision, ctx.device):
            c.problems += [f"{tag}: {p}" for p in sub.problems]
            continue
        started = run.last("run_started")
        got = (started.get("family"), started.get("variant"))
        want = (bench.family, bench.variant if not tiny or bench.tiny_variant == SAME else bench.tiny_variant)
        sub.require(got == want, f"{tag}: run_started {got}, expected {want}")
        if k == 0:
            sub.require(len(run.of("sample")) >= 2, f"{tag}: {len(run.of('sample'))} sample events, expected 2")
        elapsed = [e["elapsed_s"] for e in run.of("step")]
        step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
        outputs = run.last("completed").get("outputs") or {}
        mem = (run.of("step")[-1].get("memory") or {}) if elapsed else {}
        c.numbers.update({f"{tag}_s_per_step": dc._steady(step_s, 2), f"{tag}_gpu_peak_gb": dc.mem_max(run, "gpu_peak"),
                          f"{tag}_plan_gb": mem.get("plan_gb"), f"{tag}_rss_peak_gb": dc.mem_max(run, "rss"),
                          f"{tag}_wall_s": round(run.wall_s, 1),
                          f"{tag}_lora_comfy_tensors": len(dc.load_lora(sub, outputs.get("lora"), f"{tag}_comfy")),
                          f"{tag}_lora_peft_tensors": len(dc.load_lora(sub, outputs.get("peft_lora"), f"{tag}_peft"))})
        c.details[f"{tag}_step_s"] = [round(x, 4) for x in step_s]
        if bench.clips:  # what the plan counted (the largest clip bucket) and whether clips trained or were skipped
            c.numbers[f"{tag}_plan_latent_frames"] = ((started.get("memory_plan") or {}).get("video") or {}).get(
                "latent_frames")
            c.numbers[f"{tag}_clips"] = started.get("num_clips")
            c.numbers[f"{tag}_clips_skipped"] = any(w.get("code") == "video_not_trained" for w in run.of("warning"))
        c.details[f"{tag}_warnings"] = sub.details.get("warnings")
        c.problems += sub.problems
    for variant, label in (("_offload", "_vs_resident"), ("_compiled", "_vs_eager")):
        # streaming's target: <= 1.3 x the resident step; compile's: <= 0.8 x the eager one
        for key in [k for k in c.numbers if k.endswith(f"{variant}_s_per_step")]:
            base = c.numbers.get(key.replace(f"{variant}_s_per_step", "_s_per_step"))
            if base and c.numbers[key]:
                c.numbers[key.replace("_s_per_step", label)] = round(c.numbers[key] / base, 2)
    frames = [v for k, v in c.numbers.items() if k.endswith("_plan_latent_frames") and v]
    add_mfu(ctx, c, bench.full_size, frames[0] if frames and not any(
        v for k, v in c.numbers.items() if k.endswith("_clips_skipped")) else 1)


def _dataset(folder: Path, bench: FamilyBench, res: int, tiny: bool) -> tuple[Path, dict]:
    """The run's dataset and its video keys: 4 stills of the clips' size plus 4 generated clips (and a broken one,
    listed and skipped) for a video family, else 4 square images."""
    from lora_trainer.testing.tiny import make_dataset

    if not bench.clips:
        return make_dataset(folder, n=4, sizes=[(res, res)], trigger="ohwx"), {}
    from lora_trainer.testing.video import write_broken, write_clip

    spec = dict(bench.clips, **(dict(width=64, height=48, frames=5) if tiny else {}))
    w, h, frames, fps = spec["width"], spec["height"], spec["frames"], spec["fps"]
    data = make_dataset(folder, n=4, sizes=[(w, h)], trigger="ohwx")
    for i in range(4):  # a little longer than asked: the sampled window may start anywhere
        clip = write_clip(data / f"clip{i}.mp4", frames=frames + 4 * i + 2, fps=fps, width=w, height=h)
        clip.with_suffix(".txt").write_text(f"ohwx, a white square moving right, clip {i}")
    write_broken(data / "broken.mp4", data / "clip0.mp4")
    return data, {"video_frames": frames, "video_fps": fps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the registered family checks")
    ap.add_argument("--build", nargs=2, metavar=("LABEL", "DIR"), help="build one full-size folder")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.list:
        for b in FAMILY_BENCHES.values():
            print(f"{b.label}: {b.family}/{b.variant} {b.full_size[0] / 1e9:.2f} B, runs "
                  f"{', '.join(name for name, _ in b.runs)}, tiny {b.tiny}")
    if args.build:
        label, out = args.build
        build(FAMILY_BENCHES[label], Path(out), args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
