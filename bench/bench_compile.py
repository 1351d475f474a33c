"""Regional compilation (config ``compile``) on the CPU: compile time and the steady training step with and without.

    python3 bench/bench_compile.py [--model sdxl|flux|both] [--steps 8] [--threads 1]

The denoiser the trainer trains (random weights, bench/models.py): the quarter-width SDXL UNet (LoRA rank 16 on
to_q/to_k/to_v/to_out.0, 256 px: latents 32 x 32, 77 text tokens) or the reduced FLUX.1-dev transformer (rank 16 on
the family's default targets, 256 px: 256 image + 64 text tokens); fp32, batch 1, AdamW, gradient checkpointing
off. Each mode runs in its own process (``--child``) so that the compiled run starts cold; inductor's on-disk cache
is pointed at a fresh folder per run (TORCHINDUCTOR_CACHE_DIR), so "compile" is a first run's compile, as a user's
first run on a machine. The step is the denoiser's forward + backward + optimizer step, timed in-process; the
compile is the first step's time minus the median of the others. The table is the last output.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(model: str, compiled: bool, steps: int) -> dict:
    import torch

    from lora_trainer.adapters.fused import fuse_lora_forward
    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.families import SPECS
    from lora_trainer.runtime.compile import compile_denoisers

    torch.manual_seed(0)
    if model == "sdxl":
        from diffusers import UNet2DConditionModel
        from models import configs

        net, spec = UNet2DConditionModel(**configs("quarter")["unet"]), SPECS["sdxl"]
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        c = net.config
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim

        def inputs(g):
            return dict(sample=torch.randn(1, c.in_channels, 32, 32, generator=g), timestep=torch.tensor([500]),
                        encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, generator=g),
                        added_cond_kwargs={"text_embeds": torch.randn(1, text, generator=g),
                                           "time_ids": torch.randn(1, 6, generator=g)})
    else:
        from diffusers import FluxTransformer2DModel
        from models import flux_configs

        net, spec = FluxTransformer2DModel(**flux_configs("reduced")["transformer"]), SPECS["flux1"]
        targets = spec.targets("attention_mlp")
        c = net.config

        def inputs(g):
            return dict(hidden_states=torch.randn(1, 256, c.in_channels, generator=g),
                        encoder_hidden_states=torch.randn(1, 64, c.joint_attention_dim, generator=g),
                        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                        timestep=torch.tensor([0.5]), img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(64, 3),
                        guidance=torch.tensor([3.5]))
    net.requires_grad_(False)
    params = add_lora(net, rank=16, alpha=16, dropout=0.0, targets=targets, use_dora=False, path="target_modules")
    fuse_lora_forward([net])  # as the trainer does (training/attach.py)
    net.train()
    stats = compile_denoisers({"denoiser": net}, spec.blocks) if compiled else None
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        out = net(**inputs(g)).sample
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    steady = statistics.median(times[1:])
    return {"model": model, "compiled": compiled, "first_s": round(times[0], 2), "steady_s": round(steady, 4),
            "min_s": round(min(times[1:]), 4), "compile_s": round(times[0] - steady, 1),
            "graphs": stats.graphs if stats else None, "blocks": stats.blocks if stats else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sdxl", "flux", "both"), default="both")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children (default 1)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "COMPILED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.steps)), flush=True)
        return 0
    rows = []
    for model in (("sdxl", "flux") if args.model == "both" else (args.model,)):
        for compiled in (False, True):
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run([sys.executable, __file__, "--child", model, str(int(compiled)), "--steps",
                                       str(args.steps)], env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| model | mode | first step s | steady step s | min s | compile s | graphs | vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    eager = {r["model"]: r["steady_s"] for r in rows if not r["compiled"]}
    for r in rows:
        print(f"| {r['model']} | {'compiled' if r['compiled'] else 'eager'} | {r['first_s']} | {r['steady_s']} | "
              f"{r['min_s']} | {r['compile_s'] if r['compiled'] else '-'} | {r['graphs'] or '-'} | "
              f"{r['steady_s'] / eager[r['model']]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
