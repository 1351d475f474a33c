"""FLUX.1-dev through the real CLI on a card: device_check.py's ``flux1-dev/<size>`` check (its module docstring
says what the check measures and why the T5 is a stand-in)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def check_flux1(ctx, dc, c) -> None:
    """``dc``: the device_check module (run_cli, expect_completed, mem_max, load_lora, _steady, log, Check)."""
    """FLUX.1-dev through the real CLI: build (full size on the card, bf16), then short runs at 512 and 1024 px
    (tiny: 64 and 128): exit 0, family/variant, s/step, peak GPU memory, load and cache times, LoRA files."""
    sys.path.insert(0, str(ROOT / "bench"))
    from lora_trainer.testing.tiny import make_dataset
    from models import flux_description, make_flux_model

    size = ctx.flux_size
    tiny = size == "tiny"
    resolutions = {"tiny": (64, 128), "reduced": (128, 256), "full": (512, 1024)}[size]
    steps = {resolutions[0]: ctx.args.flux_steps or (8 if size == "full" else 4),
             resolutions[1]: ctx.args.flux_steps or (6 if size == "full" else 4)}
    # reduced (a CPU dry run of the full-size path): built in bf16 like the full model, with a 2-layer T5.
    t5_layers = 2 if size == "reduced" else None
    t = time.monotonic()
    if not (ctx.flux_dir / "model_index.json").is_file():
        dc.log(f"  building {size} FLUX.1-dev in {ctx.flux_dir}")
        make_flux_model(ctx.flux_dir, size, t5="standin", t5_layers=t5_layers,
                        dtype=None if tiny or not (ctx.cuda or size == "reduced") else torch.bfloat16,
                        device=None if tiny else ctx.device, quiet=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
    size_gb = sum(f.stat().st_size for f in ctx.flux_dir.rglob("*") if f.is_file()) / 1e9
    c.numbers.update(model="tiny flux1-dev" if tiny else flux_description(size, t5="standin", t5_layers=t5_layers),
                     build_and_save_s=round(time.monotonic() - t, 1), model_gb=round(size_gb, 1))
    data = make_dataset(ctx.tmp / "data-flux", n=8, sizes=[(resolutions[1], resolutions[1])], trigger="ohwx")
    per_run = None
    # bf16 at both sizes, then the 24 / 16 GB recipes of issue 11: an 8-bit base at the larger size and NF4 at the
    # smaller one, with gradient checkpointing (their memory plans say 16.1 and ~9 GiB for the full model); last, the
    # bf16 base with half its blocks streamed from host memory (offload_blocks; the plan says 7.4 GiB less).
    cases = [(resolutions[0], "none", 0), (resolutions[1], "none", 0), (resolutions[1], "int8", 0),
             (resolutions[0], "nf4", 0), (resolutions[1], "none", 0.5)]
    for k, (res, quant, offload) in enumerate(cases):
        tag = f"{res}px" + ("" if quant == "none" else f"_{quant}") + ("_offload" if offload else "")
        if per_run is not None and ctx.remaining() < 1.3 * per_run:
            c.numbers[f"{tag}_skipped"] = f"{ctx.remaining():.0f} s left, ~{1.3 * per_run:.0f} s needed"
            dc.log(f"  skip {tag}: {c.numbers[f'{tag}_skipped']}")
            continue
        out = ctx.tmp / f"flux-{tag}"
        cfg = {"dataset_path": str(data), "base_model": str(ctx.flux_dir), "output_path": str(out),
               "trigger_words": ["ohwx"], "resolution": res, "min_bucket_resolution": min(256, res), "batch_size": 1,
               "max_train_steps": steps[res], "checkpointing_steps": None, "lora_rank": 16, "learning_rate": 1e-4,
               "log_every_n_steps": 1, "seed": 7, "device": ctx.device, "mixed_precision": ctx.main_precision,
               "cache_latents": True, "gradient_checkpointing": quant != "none" or bool(offload),
               "heartbeat_seconds": 600, "base_quantization": quant, "offload_blocks": offload,
               "ignore_memory_plan": True}
        if k == 0:  # the sampling path on the card, cheaply: 2 denoising steps, before and after training
            cfg.update(validation_prompts=["ohwx, a red circle, blue background"], validation_steps=steps[res],
                       validation_inference_steps=2)
        cfg_path = ctx.tmp / f"flux-{tag}.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        run = dc.run_cli(ctx, cfg_path, f"flux/{tag}", record=False, max_timeout=420.0)
        per_run = run.wall_s
        err = run.last("error")
        if run.rc != 0 and err.get("code") == "out_of_memory" and k == 1:
            # "1024 px if memory allows": an OOM there is the answer, not a broken trainer.
            c.numbers[f"{tag}_result"] = "out_of_memory"
            c.details[f"{tag}_oom"] = {"message": err.get("message"), "details": err.get("details")}
            continue
        sub = dc.Check(c.name)
        if not dc.expect_completed(sub, run, ctx.main_precision, ctx.device):
            c.problems += [f"{tag}: {p}" for p in sub.problems]
            continue
        started = run.last("run_started")
        sub.require(started.get("family") == "flux1" and started.get("variant") == "dev",
                    f"{tag}: run_started family/variant {started.get('family')}/{started.get('variant')}, "
                    f"expected flux1/dev")
        step_events = run.of("step")
        sub.require(len(step_events) == steps[res], f"{tag}: {len(step_events)} step events, expected {steps[res]}")
        elapsed = [e["elapsed_s"] for e in step_events]
        step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
        if k == 0:
            samples = run.of("sample")
            sub.require(len(samples) >= 2 and all(Path(x["path"]).is_file() for x in samples),
                        f"{tag}: samples {samples[:2]}")
        outputs = run.last("completed").get("outputs") or {}
        kohya = dc.load_lora(sub, outputs.get("lora"), f"{tag}_comfy")
        peft = dc.load_lora(sub, outputs.get("peft_lora"), f"{tag}_peft")
        loading = run.at(lambda e: e.get("type") == "status" and e.get("phase") == "loading_model")
        caching = run.at(lambda e: e.get("type") == "status" and e.get("phase") == "caching_latents")
        text = run.at(lambda e: e.get("type") == "progress" and e.get("phase") == "caching_text")
        began = run.at(lambda e: e.get("type") == "run_started")
        first = run.at(lambda e: e.get("type") == "step")
        mem = (step_events[-1].get("memory") or {}) if step_events else {}
        c.numbers.update({
            f"{tag}_s_per_step": dc._steady(step_s, 2), f"{tag}_first_step_s": round(step_s[0], 2) if step_s else None,
            f"{tag}_img_per_s": round(1 / dc._steady(step_s, 2), 2) if step_s and dc._steady(step_s, 2) else None,
            f"{tag}_gpu_peak_gb": dc.mem_max(run, "gpu_peak"), f"{tag}_gpu_alloc_gb": mem.get("gpu_allocated_gb"),
            f"{tag}_gpu_reserved_peak_gb": dc.mem_max(run, "gpu_reserved_peak"), f"{tag}_plan_gb": mem.get("plan_gb"),
            f"{tag}_rss_peak_gb": dc.mem_max(run, "rss"), f"{tag}_wall_s": round(run.wall_s, 1),
            f"{tag}_load_s": round(caching - loading, 1) if loading is not None and caching is not None else None,
            f"{tag}_cache_s": round(began - caching, 1) if began is not None and caching is not None else None,
            f"{tag}_spawn_to_first_step_s": round(first, 1) if first is not None else None,
            f"{tag}_loss_last": sub.numbers.get("loss_last"),
            f"{tag}_lora_peft_tensors": len(peft), f"{tag}_lora_comfy_tensors": len(kohya)})
        c.details[f"{tag}_step_s"] = [round(x, 4) for x in step_s]
        c.details[f"{tag}_text_cache_progress_at_s"] = text
        c.details[f"{tag}_warnings"] = sub.details.get("warnings")
        c.problems += sub.problems
