"""GPU speed benchmark for ONE device call (<= 8 minutes on an H100/H200): train_lora's step vs the naive loop.

    python3 bench/bench_gpu.py --out bench_gpu.json                      # on the GPU machine (SDXL)
    python3 bench/bench_gpu.py --model flux --model-dir /tmp/flux1-dev-full --out bench_gpu_flux.json
    python3 bench/bench_gpu.py --device cpu --tiny --out /tmp/gpu.json   # a quick check without a GPU
    python3 bench/bench_gpu.py --device cpu --tiny --model flux --out /tmp/gpu_flux.json

``--model flux``: FLUX.1-dev at full size (bench/models.py: the published transformer, VAE and CLIP-L configs,
random weights built on the GPU directly in bf16, and a 2-layer T5 stand-in of the real width 4096 unless
``--t5 full``), batch 1 at 512 then 1024 px (``--resolutions``), no gradient checkpointing then with it; the
naive side is bench/naive_flux.py (diffusers' train_dreambooth_lora_flux.py step, VAE + CLIP + T5 + transformer
every step, all bf16). ``--model-dir`` reuses a folder that bench/device_check.py ``--flux-dir`` wrote (saving
and reloading 24 GB is most of the set-up time). No targets are set for FLUX: the table reports s/step,
images/s, peak VRAM, MFU.

What it measures, in one process:
1. the card (name, capability, memory, torch / CUDA versions) and a bf16 matmul ceiling (8192^3 matmuls,
   timed with CUDA events): the denominator of MFU;
2. the full-size SDXL architecture from its published configs (bench/models.py), random weights, built on
   the device and saved once to a temp folder (UNet and text encoders bf16, VAE fp32), 8 generated
   1024x1024 images with captions;
3. for batch 1 and 4, without and with gradient checkpointing (in that order of importance; a time budget
   skips the rest and says so):
   - train_lora: ``lora_trainer.training.trainer.Trainer`` driven in-process from a config (cache_latents, default text
     cache, mixed_precision bf16, LoRA rank 16 on to_q/to_k/to_v/to_out.0), timing ``Trainer._optimizer_step``
     -- the trainer's own step -- on its own epoch plan, with a CUDA sync only before and after the timed steps;
   - the first train_lora configuration again on PEFT's own LoRA forward (``train_lora[peft forward]``): what
     the lean forward (lora_trainer/adapters/fused.py) saves on the card;
   - naive: bench/naive_loop.py's NaiveLoop in its GPU form (frozen UNet and text encoders bf16, VAE fp32,
     image load + VAE + both text encoders + UNet every step, bf16 autocast for the UNet);
   images/s, peak VRAM of the training phase (torch.cuda.max_memory_allocated after a reset; weights
   included), FLOPs of one step counted with torch.utils.flop_counter.FlopCounterMode, MFU = model FLOPs per
   second / the measured ceiling (model FLOPs: the count without checkpointing, so recomputation does not
   count as useful work), and the number of host syncs in one step (torch.cuda.set_sync_debug_mode).
4. Targets: images/s >= 3x naive at equal batch; >= 30% MFU at batch 4 without checkpointing; peak VRAM
   <= 8 GiB at batch 1 with checkpointing.

The table is the last output; ``--out PATH`` writes it as JSON (PATH) and markdown (PATH with .md).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

T0 = time.monotonic()
GiB = 2**30


def log(msg: str) -> None:
    print(f"[bench_gpu {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- device helpers
class Dev:
    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / GiB if self.cuda else None

    def allocated_gib(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GiB if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def info(self) -> dict:
        torch = self.torch
        out = {"device": str(self.device), "torch": torch.__version__, "cuda": torch.version.cuda}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            out.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / GiB, 1),
                       sm_count=p.multi_processor_count)
        else:
            import platform

            out.update(name=f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
        return out


def matmul_ceiling(dev: Dev, n: int, reps: int) -> dict:
    """Best-case dense bf16 throughput: n x n x n matmuls, timed after a warm-up."""
    torch = dev.torch
    a = torch.randn(n, n, device=dev.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    dev.sync()
    times = []
    for _ in range(reps):
        if dev.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    flops = 2 * n**3
    best, med = min(times), statistics.median(times)
    del a, b
    dev.free()
    return {"n": n, "reps": reps, "tflops_median": flops / med / 1e12, "tflops_best": flops / best / 1e12}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_syncs(dev: Dev, fn) -> int | None:
    """Host<->device synchronisations in fn (CUDA only)."""
    if not dev.cuda:
        return None
    torch = dev.torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


# ------------------------------------------------------------------------------------------- the two contenders
def trainer_config(work: Path, model: Path, data: Path, *, batch: int, ckpt: bool, resolution: int,
                   device: str, precision: str, base: str = "none", offload: float = 0) -> Path:
    out = work / f"out_b{batch}_r{resolution}_{'ckpt' if ckpt else 'nockpt'}_{base}_{offload}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(out), "trigger_words": ["ohwx"],
           "max_train_steps": 100000, "batch_size": batch, "resolution": resolution,
           "min_bucket_resolution": min(256, resolution), "lora_rank": 16, "gradient_checkpointing": ckpt,
           "cache_latents": True, "checkpointing_steps": None, "log_every_n_steps": 1000, "heartbeat_seconds": 3600,
           "mixed_precision": precision, "device": device, "overwrite_output": True, "base_quantization": base,
           "offload_blocks": offload, "ignore_memory_plan": True}
    path = work / f"config_b{batch}_r{resolution}_{int(ckpt)}_{base}_{offload}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


class TrainLoraRunner:
    name = "train_lora"

    def __init__(self, config: Path):
        from lora_trainer.config.config import load_config
        from lora_trainer.contract.events import EventStream
        from lora_trainer.training.trainer import Trainer

        cfg, _ = load_config(config)
        self.trainer = Trainer(cfg, EventStream(None))
        self.trainer.setup()
        from lora_trainer.data.datasets import run_plan

        self.plan, self.epoch, self.i = run_plan, 0, 0
        self.batches = run_plan(cfg, self.trainer.images, 0)

    def step(self):
        if self.i >= len(self.batches):
            self.epoch, self.i = self.epoch + 1, 0
            t = self.trainer
            self.batches = self.plan(t.cfg, t.images, self.epoch)
        batch = self.batches[self.i]
        self.i += 1
        return self.trainer._optimizer_step([batch], self.epoch, self.i - 1)

    def close(self) -> None:
        self.trainer.cleanup()
        self.trainer = None


class NaiveRunner:
    name = "naive"

    def __init__(self, model: Path, data: Path, *, batch: int, ckpt: bool, resolution: int, device: str,
                 kind: str = "sdxl"):
        if kind == "flux":
            from naive_flux import NaiveFluxLoop as Loop
        else:
            from naive_loop import NaiveLoop as Loop

        self.loop = Loop(model, data, resolution=resolution, batch_size=batch, device=device,
                         gradient_checkpointing=ckpt, sync_each_step=False)

    def step(self):
        return self.loop.step()

    def close(self) -> None:
        self.loop = None


def measure(dev: Dev, runner, *, batch: int, warmup: int, steps: int, flops: bool) -> dict:
    for _ in range(warmup):
        runner.step()
    dev.sync()
    dev.reset_peak()
    t = time.perf_counter()
    for _ in range(steps):
        runner.step()
    dev.sync()
    wall = time.perf_counter() - t
    res = {"step_s": wall / steps, "images_per_s": batch * steps / wall, "peak_vram_gib": dev.peak_gib(),
           "resident_gib": dev.allocated_gib()}
    res["host_syncs_per_step"] = count_syncs(dev, runner.step)
    if flops:
        res["flops_per_step"] = count_flops(runner.step)
    return res


def peft_forward_row(dev: Dev, runner: TrainLoraRunner, lean: dict, args) -> dict:
    """The same trainer's step on PEFT's own LoRA forward instead of the lean one (adapters/fused.py), then back:
    what the lean forward saves on this card (row ``train_lora[peft forward]``, ``vs_lean``)."""
    from lora_trainer.adapters.fused import fuse_lora_forward, unfuse_lora_forward

    modules = list(runner.trainer.lora_modules.values())
    unfuse_lora_forward(modules)
    try:
        res = measure(dev, runner, batch=lean["batch"], warmup=1, steps=args.steps, flops=False)
    finally:
        fuse_lora_forward(modules)
    res.update(who="train_lora[peft forward]", batch=lean["batch"], ckpt=lean["ckpt"], resolution=lean["resolution"],
               vs_lean=res["step_s"] / lean["step_s"])
    log(f"  PEFT's forward: {res['step_s']:.3f} s/step ({res['vs_lean']:.2f}x the lean forward's)")
    return res


# ------------------------------------------------------------------------------------------- report
TARGETS = ("images/s >= 3x naive at equal batch", ">= 30% MFU at batch 4 without checkpointing",
           "peak VRAM <= 8 GiB at batch 1 with checkpointing")


def finish(rows: list[dict], ceiling: dict, dev_info: dict, args, extra: dict) -> dict:
    peak = ceiling["tflops_median"] * 1e12
    by = {(r["who"], r["batch"], r["ckpt"], r["resolution"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        model_flops = (by.get((r["who"], r["batch"], False, r["resolution"])) or r).get("flops_per_step")
        r["model_flops_per_step"] = model_flops
        r["mfu"] = model_flops / r["step_s"] / peak if model_flops else None
        hw = r.get("flops_per_step")
        r["hfu"] = hw / r["step_s"] / peak if hw else None
        naive = by.get(("naive", r["batch"], r["ckpt"], r["resolution"]))
        if r["who"] == "train_lora" and naive:
            r["speedup_vs_naive"] = r["images_per_s"] / naive["images_per_s"]
    verdicts = []
    if extra.get("kind") == "flux":
        return _render(rows, ceiling, dev_info, args, extra, [])
    sp = [r.get("speedup_vs_naive") for r in rows if r["who"] == "train_lora" and r.get("speedup_vs_naive")]
    verdicts.append((TARGETS[0], "n/a" if not sp else
                     ("MET" if min(sp) >= 3 else "MISSED") + f" (speed-ups {', '.join(f'{x:.2f}x' for x in sp)})"))
    res = args.resolutions_list[0]
    b4 = by.get(("train_lora", 4, False, res))
    verdicts.append((TARGETS[1], "n/a" if not b4 or b4.get("mfu") is None else
                     ("MET" if b4["mfu"] >= 0.30 else "MISSED") + f" ({100 * b4['mfu']:.1f}%)"))
    b1 = by.get(("train_lora", 1, True, res))
    verdicts.append((TARGETS[2], "n/a" if not b1 or b1.get("peak_vram_gib") is None else
                     ("MET" if b1["peak_vram_gib"] <= 8 else "MISSED") + f" ({b1['peak_vram_gib']:.2f} GiB)"))
    return _render(rows, ceiling, dev_info, args, extra, verdicts)


def _render(rows: list[dict], ceiling: dict, dev_info: dict, args, extra: dict, verdicts: list) -> dict:
    head = ["trainer", "px", "batch", "grad ckpt", "s/step", "images/s", "vs naive", "peak VRAM GiB", "TFLOP/step",
            "MFU", "HFU", "syncs/step"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["who"], str(r["resolution"]), str(r["batch"]), "yes" if r["ckpt"] else "no", r["error"],
                          "", "", "", "", "", "", ""])
            continue
        f = lambda v, fmt: "n/a" if v is None else fmt.format(v)  # noqa: E731
        table.append([r["who"], str(r["resolution"]), str(r["batch"]), "yes" if r["ckpt"] else "no", f(r["step_s"], "{:.3f}"),
                      f(r["images_per_s"], "{:.2f}"), f(r.get("speedup_vs_naive"), "{:.2f}x"),
                      f(r["peak_vram_gib"], "{:.2f}"), f(r.get("flops_per_step") and r["flops_per_step"] / 1e12, "{:.3g}"),
                      f(r["mfu"] and 100 * r["mfu"], "{:.1f}%"), f(r["hfu"] and 100 * r["hfu"], "{:.1f}%"),
                      f(r.get("host_syncs_per_step"), "{}")])
    title = (f"GPU benchmark: {dev_info.get('name')} (torch {dev_info['torch']}, CUDA {dev_info.get('cuda')}); "
             f"{extra['model']} at {args.resolutions} px, LoRA rank 16, {'bf16' if extra['precision'] == 'bf16' else 'fp32'}; bf16 ceiling "
             f"{ceiling['tflops_median']:.1f} TFLOP/s ({ceiling['n']}^3 matmul, best {ceiling['tflops_best']:.1f})")
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    text = [title, " | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    text += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    text += [f"target: {t}: {v}" for t, v in verdicts]
    for note in extra.get("notes", []):
        text.append(f"note: {note}")
    md = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    md += [""] + [f"- target: {t}: **{v}**" for t, v in verdicts] + [f"- note: {n}" for n in extra.get("notes", [])]
    return {"text": "\n".join(text), "markdown": "\n".join(md) + "\n", "verdicts": verdicts}


def missing_packages() -> list[str]:
    """What train_lora needs that this Python lacks (the GPU image has no diffusers or jsonschema)."""
    import importlib.util

    need = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "jsonschema", "PIL", "numpy",
            "tokenizers")
    return [n for n in need if importlib.util.find_spec(n) is None]


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", choices=("sdxl", "flux"), default="sdxl")
    ap.add_argument("--tiny", action="store_true", help="lora_trainer.testing.tiny's sdxl / flux1-dev at 64 px "
                                                        "(checks on the CPU)")
    ap.add_argument("--size", choices=("full", "quarter", "reduced"), default="full",
                    help="bench/models.py size when not --tiny (sdxl quarter / flux reduced: to check the "
                         "full-size path cheaply)")
    ap.add_argument("--t5", choices=("standin", "full"), default="standin", help="flux: the T5 encoder")
    ap.add_argument("--model-dir", help="the diffusers folder to use (built there if missing, and kept)")
    ap.add_argument("--resolution", type=int, help="one resolution (default: sdxl 1024, flux 512,1024; tiny 64)")
    ap.add_argument("--resolutions", help="comma list, e.g. 512,1024")
    ap.add_argument("--batches", help="default sdxl 1,4; flux 1")
    ap.add_argument("--checkpointing", default="0,1", help="comma list of 0/1")
    ap.add_argument("--base-formats", default="",
                    help="comma list of base_quantization formats to time too (int8,nf4,fp8), batch 1, checkpointing")
    ap.add_argument("--offload", default="", help="comma list of offload_blocks values to time too, e.g. 0.5")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--budget-s", type=float, default=420, help="skip configurations that would start after this")
    ap.add_argument("--matmul-n", type=int, help="ceiling matmul size (default 8192 on CUDA, 1024 on the CPU)")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--work", help="work folder (default: a temp folder, removed)")
    ap.add_argument("--out", help="write results as JSON to this path and markdown beside it (.md)")
    args = ap.parse_args(argv)
    flux = args.model == "flux"
    if args.resolutions is None:
        args.resolutions = str(args.resolution) if args.resolution else "64" if args.tiny else "512,1024" if flux else "1024"
    args.resolutions_list = [int(r) for r in args.resolutions.split(",") if r]
    args.resolution = max(args.resolutions_list)  # the dataset's image size
    args.batches = args.batches or ("1" if flux else "1,4")
    if missing := missing_packages():
        raise SystemExit(f"missing Python packages: {', '.join(missing)} (carry them as wheels: see bench/RESULTS.md)")

    import torch

    dev = Dev(args.device)
    if dev.cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --tiny for a check run")
    precision = "bf16" if dev.cuda else "no"
    if dev.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: fp32 matmuls (VAE) are not TF32
    info = dev.info()
    log(f"device: {info}")
    ceiling = matmul_ceiling(dev, args.matmul_n or (8192 if dev.cuda else 1024), 20 if dev.cuda else 5)
    log(f"bf16 matmul ceiling: {ceiling['tflops_median']:.1f} TFLOP/s (best {ceiling['tflops_best']:.1f})")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    notes: list[str] = []
    try:
        from lora_trainer.testing.tiny import make_dataset
        from models import build_components, flux_description, make_flux_model, make_model, save_pipeline

        model = Path(args.model_dir) if args.model_dir else work / "model"
        data = work / "data"
        t = time.monotonic()
        if not (model / "model_index.json").is_file() and flux:
            size = "tiny" if args.tiny else args.size if args.size != "quarter" else "reduced"
            # On the device in bf16: seconds and no host copy of the 12B transformer; saved from there.
            make_flux_model(model, size, t5=args.t5, dtype=torch.bfloat16 if dev.cuda else None, device=dev.device)
            dev.free()
        elif not (model / "model_index.json").is_file():
            if args.tiny:
                make_model(model, "tiny")
            else:
                # Random init on the device is seconds; on the host it is minutes for 2.6B parameters.
                with torch.device(dev.device):
                    comps = build_components(args.size)
                n_unet = sum(p.numel() for p in comps["unet"].parameters())
                log(f"built {args.size} SDXL on {dev.device} (UNet {n_unet / 1e6:.1f}M params); saving")
                store = torch.bfloat16 if dev.cuda else torch.float32
                for k in ("unet", "text_encoder", "text_encoder_2"):
                    comps[k] = comps[k].to(store).to("cpu")
                comps["vae"] = comps["vae"].to("cpu")
                save_pipeline(comps, model)
                del comps
                dev.free()
        if not data.is_dir():
            make_dataset(data, 8, sizes=[(args.resolution, args.resolution)])
        log(f"model + data ready in {time.monotonic() - t:.1f} s")
        model_desc = ("tiny FLUX.1-dev (lora_trainer.testing.tiny)" if flux and args.tiny else
                      flux_description("full" if args.size == "full" else "reduced",
                                       t5=args.t5 if args.size == "full" else "full") + ", random" if flux else
                      "tiny SDXL (lora_trainer.testing.tiny)" if args.tiny else
                      "full SDXL architecture (UNet 2567.5M, random)" if args.size == "full" else
                      "quarter-width SDXL (UNet 160.8M, random)")

        batches = [int(b) for b in args.batches.split(",") if b]
        ckpts = [bool(int(c)) for c in args.checkpointing.split(",") if c]
        # no-ckpt first: MFU and speed-up targets need them
        configs = [(b, c, r, "none", 0, ("train_lora", "naive")) for c in ckpts for r in args.resolutions_list
                   for b in batches]
        # then issue 11's memory savers, train_lora alone (batch 1, checkpointing): each quantised base format,
        # and block streaming, labelled e.g. "train_lora[int8]" / "train_lora[offload 0.5]" in the table
        configs += [(1, True, r, fmt, 0, (f"train_lora[{fmt}]",)) for fmt in args.base_formats.split(",")
                    if fmt not in ("", "none") for r in args.resolutions_list]
        configs += [(1, True, r, "none", float(off), (f"train_lora[offload {off}]",))
                    for off in args.offload.split(",") if off and float(off) for r in args.resolutions_list]
        durations: list[float] = []
        peft_done = False  # the first train_lora configuration is timed again on PEFT's own LoRA forward
        for batch, ckpt, resolution, base, offload, whos in configs:
            for who in whos:
                est = max(durations) if durations else 0.0
                if time.monotonic() - T0 + est > args.budget_s:
                    rows.append({"who": who, "batch": batch, "ckpt": ckpt, "resolution": resolution,
                                 "error": "skipped (time budget)"})
                    log(f"skip {who} b{batch} {resolution}px ckpt={ckpt}: time budget")
                    continue
                t = time.monotonic()
                log(f"{who} batch {batch} {resolution} px checkpointing {ckpt}: setup")
                dev.free()
                base_alloc = dev.allocated_gib()
                runner = None
                try:
                    if who.startswith("train_lora"):
                        cfg = trainer_config(work, model, data, batch=batch, ckpt=ckpt, resolution=resolution,
                                             device=args.device, precision=precision, base=base, offload=offload)
                        runner = TrainLoraRunner(cfg)
                    else:
                        runner = NaiveRunner(model, data, batch=batch, ckpt=ckpt, resolution=resolution,
                                             device=args.device, kind=args.model)
                    setup_s = time.monotonic() - t
                    res = measure(dev, runner, batch=batch, warmup=args.warmup, steps=args.steps,
                                  flops=not args.no_flops)
                    res.update(who=who, batch=batch, ckpt=ckpt, resolution=resolution, setup_s=setup_s,
                               baseline_alloc_gib=base_alloc)
                    log(f"  {res['images_per_s']:.3f} images/s, {res['step_s']:.3f} s/step, peak "
                        f"{res['peak_vram_gib']} GiB, flops {res.get('flops_per_step')}, syncs {res.get('host_syncs_per_step')}")
                    rows.append(res)
                    if who == "train_lora" and not peft_done:
                        rows.append(peft_forward_row(dev, runner, res, args))
                        peft_done = True
                except Exception as exc:  # noqa: BLE001 - an OOM or failure is a result too
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    log(f"  failed: {msg}")
                    rows.append({"who": who, "batch": batch, "ckpt": ckpt, "resolution": resolution, "error": msg})
                finally:
                    if runner is not None:
                        runner.close()
                    del runner
                    dev.free()
                durations.append(time.monotonic() - t)
        if base_alloc := dev.allocated_gib():
            notes.append(f"{base_alloc:.2f} GiB still allocated after the last run")
        notes.append("train_lora caches latents and text embeddings before the timed steps (not counted); naive "
                     + ("runs the VAE, CLIP and T5 every step (images pre-loaded, as the example's dataset does)"
                        if flux else "loads images and runs the VAE and both text encoders every step"))
        if flux and not args.tiny and args.t5 == "standin":
            notes.append("T5 is a 2-layer stand-in of the real width (4096): the naive rows omit ~4.8 TFLOP "
                         "(~5-10 ms on this card) of the real 24-layer T5 per step")
        notes.append("MFU counts model FLOPs (FlopCounterMode, no recomputation); HFU counts what ran, recompute included")
        notes += [f"train_lora[peft forward]: the same trainer on PEFT's own LoRA forward: {r['vs_lean']:.2f}x the "
                  "lean forward's step (lora_trainer/adapters/fused.py)" for r in rows if r.get("vs_lean")]
        if not dev.cuda:
            notes.append("CPU check run: numbers say nothing about a GPU")
        report = finish(rows, ceiling, info, args, {"model": model_desc, "precision": precision, "notes": notes,
                                                    "kind": args.model})
        log(f"total {time.monotonic() - T0:.0f} s")
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"device": info, "ceiling": ceiling, "rows": rows, "verdicts": report["verdicts"],
                                       "args": vars(args), "notes": notes}, indent=1, default=str))
            out.with_suffix(".md").write_text(report["markdown"])
        print("\n" + report["text"], flush=True)
        return 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)  # a --model-dir outside it stays


if __name__ == "__main__":
    sys.exit(main())
