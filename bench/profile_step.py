"""Profile train_lora's optimizer step in-process, and measure candidate speed-ups without editing lora_trainer/.

    python3 bench/profile_step.py --config c.json [--steps 4] [--pairs 4] [--quick] [--only NAME,...]

Drives ``lora_trainer.training.trainer.Trainer`` exactly as the CLI does (load_config -> Trainer.setup(), events
discarded), then calls ``Trainer._optimizer_step`` -- the trainer's own step -- on the trainer's own epoch plan.

1. Split of the step (forward = ``Trainer._loss``, backward, clip, optimizer, zero_grad) with timers.
2. torch.profiler over ``--steps`` steps: self CPU time by operator family and the top operators.
3. Experiments, each measured A/B *interleaved per step* (baseline, variant, baseline, variant, ...
   ``--pairs`` pairs) so that noise from other processes hits both; the report is the median ratio.
   - threads: torch.set_num_threads(1) if the process runs 2+ threads, else 2 (OMP_NUM_THREADS sets the start)
   - channels_last: UNet weights and input latents in channels_last
   - attn_classic: diffusers' AttnProcessor (bmm + softmax) instead of the default SDPA processor
   - bf16_autocast: torch.autocast("cpu", bfloat16) around forward (what mixed_precision "bf16" does), with
     its numerics: loss and LoRA-gradient error against fp32 on identical inputs
   - fused_adamw: the trainer's step with AdamW(fused=True) swapped in for its foreach AdamW
   - optimizer: AdamW for-loop vs foreach (the trainer's choice on the CPU) vs fused, on the real LoRA params
   - text_tokens_half (FLUX / SD3 only): half the cached T5 sequence (the cost of max_sequence_length / 2)
   - peft_forward: PEFT's own LoRA forward instead of the trainer's lean one (adapters/fused.py)
   - lora_floor: the LoRA layers compute only their base layer, and the gradient is taken to the denoiser's first
     layer's output (a trainable scalar there) so that the backward still runs: the denoiser's own forward +
     backward without any LoRA work, slightly more than the floor a LoRA step cannot go under (the backward also
     crosses the blocks before the first LoRA layer)
   - bf16_weights: frozen UNet weights stored in bf16 + autocast (= config mixed_precision "bf16"; destructive,
     so it runs last)
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[profile_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_trainer(config: Path):
    from lora_trainer.config.config import load_config
    from lora_trainer.contract.events import EventStream
    from lora_trainer.training.trainer import Trainer

    cfg, _ = load_config(config)
    trainer = Trainer(cfg, EventStream(None))
    trainer.setup()
    return trainer


class Batches:
    """The trainer's own epoch plan, endless."""

    def __init__(self, trainer):
        from lora_trainer.data.datasets import run_plan

        self.t, self.plan, self.epoch, self.i = trainer, run_plan, 0, 0
        self.batches = run_plan(trainer.cfg, trainer.images, 0)

    def next(self):
        if self.i >= len(self.batches):
            self.epoch += 1
            self.i = 0
            self.batches = self.plan(self.t.cfg, self.t.images, self.epoch)
        b = self.batches[self.i]
        self.i += 1
        return [b], self.epoch, self.i - 1


def timed_step(trainer, batches: Batches, ctx=None) -> float:
    group, epoch, i = batches.next()
    t = time.perf_counter()
    with ctx or contextlib.nullcontext():
        loss = trainer._optimizer_step(group, epoch, i)
    float(loss)  # on a GPU this would be the sync; on the CPU everything has run already
    return time.perf_counter() - t


def lora_params(trainer) -> list:
    """The denoiser's LoRA parameters (``denoiser_params`` since the family refactor; ``unet_params`` before)."""
    return getattr(trainer, "denoiser_params", None) or trainer.unet_params


def denoiser(trainer):
    """The (plain, unwrapped) denoiser: the UNet or the FLUX / SD3 transformer."""
    comps = getattr(trainer.comps, "denoisers", None)
    return next(iter(comps.values())) if comps else trainer.unet


def split_step(trainer, batches: Batches, n: int) -> dict:
    """The step's phases, timed around the trainer's own calls (same order as Trainer._optimizer_step). ``glue``:
    the forward's time outside the denoiser's own call (batch assembly, noise, timesteps, the objective's loss)."""
    acc = trainer.accelerator
    parts: dict[str, list[float]] = {k: [] for k in ("forward", "glue", "backward", "clip", "optimizer", "zero_grad",
                                                     "step")}
    net, inside = denoiser(trainer), []
    pre = net.register_forward_pre_hook(lambda m, a: inside.append(-time.perf_counter()))
    post = net.register_forward_hook(lambda m, a, out: inside.append(time.perf_counter()))
    try:
        for _ in range(n):
            (batch,), epoch, i = batches.next()
            inside.clear()
            t0 = time.perf_counter()
            with acc.autocast():
                loss = trainer._loss(batch, epoch, i)
            t1 = time.perf_counter()
            acc.backward(loss)
            t2 = time.perf_counter()
            acc.clip_grad_norm_(lora_params(trainer) + trainer.te_params, trainer.cfg.max_grad_norm)
            t3 = time.perf_counter()
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            t4 = time.perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            t5 = time.perf_counter()
            glue = (t1 - t0) - sum(inside)
            for k, v in zip(parts, (t1 - t0, glue, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                parts[k].append(v)
    finally:
        pre.remove()
        post.remove()
    return {k: statistics.median(v) for k, v in parts.items()}


FAMILIES = (
    ("conv", ("conv", "mkldnn_convolution", "slow_conv")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "baddbmm", "bmm", "softmax")),
    ("matmul (linear)", ("addmm", "aten::mm", "matmul", "linear")),
    ("norm", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt", "norm")),
)


def profile_ops(trainer, batches: Batches, steps: int, top: int = 15) -> tuple[dict, list]:
    from torch.profiler import ProfilerActivity, profile

    timed_step(trainer, batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            timed_step(trainer, batches)
    avgs = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in avgs)
    fam = {name: 0.0 for name, _ in FAMILIES}
    fam["elementwise / other ops"] = 0.0
    for e in avgs:
        key = e.key.lower()
        for name, pats in FAMILIES:
            if any(p in key for p in pats):
                fam[name] += e.self_cpu_time_total
                break
        else:
            fam["elementwise / other ops"] += e.self_cpu_time_total
    fam = {k: (v / total, v / 1e6 / steps) for k, v in fam.items()}
    top_ops = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:top]
    rows = [(e.key, e.self_cpu_time_total / total, e.self_cpu_time_total / 1e6 / steps, e.count // steps) for e in top_ops]
    return fam, rows


def ab(trainer, batches: Batches, pairs: int, enter, leave, name: str) -> dict:
    """Interleaved A/B: baseline step, variant step, ...; enter()/leave() switch the variant on and off."""
    base, var = [], []
    for k in range(pairs):
        base.append(timed_step(trainer, batches))
        enter()
        try:
            var.append(timed_step(trainer, batches))
        finally:
            leave()
    b, v = statistics.median(base), statistics.median(var)
    log(f"  {name}: baseline {b:.3f} s, variant {v:.3f} s ({v / b:.2f}x)")
    return {"name": name, "baseline_s": b, "variant_s": v, "ratio": v / b, "baseline_all": base, "variant_all": var}


def grad_numerics(trainer, batches: Batches, ctx_factory) -> dict:
    """Loss and LoRA gradients for the same batch, noise and timesteps: fp32 vs the variant context."""
    import torch

    (batch,), epoch, i = batches.next()
    state = trainer.noise_gen.get_state()

    def run(ctx):
        trainer.noise_gen.set_state(state)
        trainer.optimizer.zero_grad(set_to_none=True)
        with ctx:
            loss = trainer._loss(batch, epoch, i)
        loss.backward()
        grads = torch.cat([p.grad.detach().float().flatten() for p in lora_params(trainer) if p.grad is not None])
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss), grads

    l32, g32 = run(contextlib.nullcontext())
    lv, gv = run(ctx_factory())
    # LoRA B starts at zero, so at step 0 only B has gradients; after the warm-up steps both A and B do.
    cos = float(torch.nn.functional.cosine_similarity(g32, gv, dim=0))
    rel = float((g32 - gv).norm() / g32.norm().clamp_min(1e-30))
    return {"loss_fp32": l32, "loss_variant": lv, "loss_rel_err": abs(lv - l32) / abs(l32),
            "grad_cosine": cos, "grad_rel_err": rel}


def lora_floor(trainer, batches: Batches, unet, pairs: int) -> dict:
    """The step with every LoRA layer reduced to its base layer (see the module doc)."""
    import types

    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    first = next(m for m in unet.children() if any(True for _ in m.parameters()))
    scalar = torch.nn.Parameter(torch.ones((), device=trainer.device))
    state = {}

    def base_only(self, x, *args, **kwargs):
        return self.base_layer(x, *args, **kwargs)

    def on():
        state["saved"] = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            layer.forward = types.MethodType(base_only, layer)
        state["hook"] = first.register_forward_hook(lambda m, a, out: out * scalar)

    def off():
        for layer, fwd in zip(layers, state.pop("saved")):
            layer.__dict__.pop("forward", None)
            if fwd is not None:
                layer.forward = fwd
        state.pop("hook").remove()
    return ab(trainer, batches, pairs, on, off, f"no LoRA work, backward to {type(first).__name__}'s output (floor)")


def optimizer_bench(params, reps: int) -> dict:
    """AdamW step time on copies of the LoRA params with random grads: for-loop / foreach / fused."""
    import torch

    out = {}
    for name, kw in (("for-loop (torch default on CPU)", {"foreach": False}), ("foreach (trainer)", {"foreach": True}),
                     ("fused", {"fused": True})):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **kw)
        except (RuntimeError, ValueError) as exc:
            out[name] = f"unavailable: {exc}"
            continue
        for _ in range(2):
            opt.step()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t)
        clip = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=kw.get("foreach", None) if name != "fused" else True)
            clip.append(time.perf_counter() - t)
        out[name] = {"step_s": statistics.median(ts), "clip_s": statistics.median(clip)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=4, help="steps under torch.profiler")
    ap.add_argument("--pairs", type=int, default=4, help="A/B pairs per experiment")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer experiments (threads, bf16_autocast, fused_adamw, optimizer, peft_forward, lora_floor)")
    ap.add_argument("--only", help="comma list of experiments")
    args = ap.parse_args(argv)

    import torch

    log(f"setting up the Trainer from {args.config}")
    t = time.perf_counter()
    trainer = make_trainer(Path(args.config))
    log(f"setup {time.perf_counter() - t:.1f} s; warm-up {args.warmup} steps")
    batches = Batches(trainer)
    warm = [timed_step(trainer, batches) for _ in range(args.warmup)]
    log(f"warm-up steps: {' '.join(f'{x:.2f}' for x in warm)}")
    unet = denoiser(trainer)  # the UNet, or the FLUX / SD3 transformer
    attn_procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    n_lora = sum(p.numel() for p in lora_params(trainer))
    lora_layers = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    info = {"threads": torch.get_num_threads(), "attn_processors": attn_procs, "lora_params": n_lora,
            "lora_layers": lora_layers, "optimizer": type(trainer.optimizer.optimizer).__name__,
            "optimizer_defaults": {k: trainer.optimizer.optimizer.defaults.get(k) for k in ("foreach", "fused")},
            "dtype": str(next(unet.parameters()).dtype), "mixed_precision": trainer.device_info.mixed_precision}

    log("timing the step's phases")
    split = split_step(trainer, batches, max(3, args.pairs))
    log(f"profiling {args.steps} steps with torch.profiler")
    fam, top = profile_ops(trainer, batches, args.steps)

    wanted = ["threads", "channels_last", "attn_classic", "bf16_autocast", "fused_adamw", "optimizer", "peft_forward",
              "lora_floor", "bf16_weights"]
    tc = trainer.text_cache
    captions = (list(tc.captions) if hasattr(tc, "captions") else list(getattr(tc, "entries", {}))) if tc else []
    flux_like = bool(captions) and "prompt_embeds" in tc.batch(captions[:1])
    if flux_like:
        wanted.insert(1, "text_tokens_half")
    if args.quick:
        wanted = ["threads", "bf16_autocast", "fused_adamw", "optimizer", "peft_forward", "lora_floor"] + (
            ["text_tokens_half"] if flux_like else [])
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
    exps, notes = [], {}
    default_threads = torch.get_num_threads()
    for name in wanted:
        log(f"experiment {name}")
        if name == "threads":
            other = 2 if default_threads == 1 else 1
            exps.append(ab(trainer, batches, args.pairs, lambda: torch.set_num_threads(other),
                           lambda: torch.set_num_threads(default_threads),
                           f"torch.set_num_threads({other}) instead of {default_threads}"))
        elif name == "channels_last":
            exps.append(ab(trainer, batches, args.pairs, lambda: unet.to(memory_format=torch.channels_last),
                           lambda: unet.to(memory_format=torch.contiguous_format), "UNet channels_last"))
        elif name == "attn_classic":
            from diffusers.models.attention_processor import AttnProcessor

            saved = dict(unet.attn_processors)
            # set_attn_processor pops from the dict it is given: pass a copy each time.
            exps.append(ab(trainer, batches, args.pairs, lambda: unet.set_attn_processor(AttnProcessor()),
                           lambda: unet.set_attn_processor(dict(saved)),
                           "attention: classic bmm+softmax instead of SDPA"))
        elif name == "bf16_autocast":
            ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            state = {}

            def on():
                state["cm"] = ctx()
                state["cm"].__enter__()

            def off():
                state.pop("cm").__exit__(None, None, None)
            exps.append(ab(trainer, batches, args.pairs, on, off, "bf16 autocast (fp32 weights)"))
            notes["bf16_autocast_numerics"] = grad_numerics(trainer, batches, ctx)
        elif name == "fused_adamw":
            inner = trainer.optimizer.optimizer
            fused = torch.optim.AdamW(lora_params(trainer) + trainer.te_params, lr=trainer.cfg.learning_rate,
                                      weight_decay=trainer.cfg.weight_decay, fused=True)

            def swap(opt):
                trainer.optimizer.optimizer = opt
            exps.append(ab(trainer, batches, args.pairs, lambda: swap(fused), lambda: swap(inner),
                           "AdamW(fused=True) instead of foreach, in the trainer's step"))
        elif name == "text_tokens_half":
            # FLUX / SD3: the cached T5 states are padded to max_sequence_length (512 for FLUX.1-dev) and the
            # transformer attends to all of them; at 256 px that is 512 text tokens beside 256 image tokens. The
            # variant feeds only the first half of the cached sequence: the compute of max_sequence_length / 2
            # (the numbers differ from a real 256-token encoding; the cost does not).
            cache = trainer.text_cache
            plain = cache.batch

            def halved(captions):
                out = plain(captions)
                n = out["prompt_embeds"].shape[1]
                out["prompt_embeds"] = out["prompt_embeds"][:, : n // 2]
                return out
            n_txt = plain(captions[:1])["prompt_embeds"].shape[1]
            exps.append(ab(trainer, batches, args.pairs, lambda: setattr(cache, "batch", halved),
                           lambda: setattr(cache, "batch", plain),
                           f"text tokens {n_txt // 2} instead of {n_txt} (max_sequence_length)"))
        elif name == "peft_forward":
            from lora_trainer.adapters.fused import fuse_lora_forward, unfuse_lora_forward

            mods = list(trainer.lora_modules.values())
            exps.append(ab(trainer, batches, args.pairs, lambda: unfuse_lora_forward(mods),
                           lambda: fuse_lora_forward(mods), "PEFT's LoRA forward instead of the lean one"))
        elif name == "lora_floor":
            exps.append(lora_floor(trainer, batches, unet, args.pairs))
        elif name == "optimizer":
            notes["optimizer"] = optimizer_bench(lora_params(trainer), reps=20)
        elif name == "bf16_weights":
            # Frozen base weights to bf16 (LoRA params stay fp32), as mixed_precision "bf16" loads them; autocast on.
            for n, p in unet.named_parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            after = [timed_step(trainer, batches, ctx()) for _ in range(args.pairs)]
            exps.append({"name": "bf16 frozen weights + autocast (after the run's fp32 baseline, not interleaved)",
                         "baseline_s": exps[0]["baseline_s"] if exps else split["step"],
                         "variant_s": statistics.median(after),
                         "ratio": statistics.median(after) / (exps[0]["baseline_s"] if exps else split["step"])})

    # ------------------------------------------------------------------ report (last output)
    lines = [f"train_lora step profile ({info['dtype']}, mixed_precision {info['mixed_precision']}, "
             f"threads {info['threads']}, {info['lora_layers']} LoRA layers / {n_lora / 1e6:.2f}M params, "
             f"attention {', '.join(attn_procs)}, optimizer {info['optimizer']} {info['optimizer_defaults']})",
             "step phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()),
             "self CPU time by operator family (share, s/step):"]
    for k, (share, s) in sorted(fam.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {k:<26} {100 * share:5.1f}%  {s:.3f} s")
    lines.append("top operators (self CPU, share, s/step, calls/step):")
    for key, share, s, calls in top:
        lines.append(f"  {key:<44} {100 * share:5.1f}%  {s:.3f} s  x{calls}")
    lines.append("experiments (interleaved per step, median):")
    for e in exps:
        lines.append(f"  {e['name']:<58} {e['baseline_s']:.3f} s -> {e['variant_s']:.3f} s  ({e['ratio']:.2f}x)")
    if "bf16_autocast_numerics" in notes:
        n = notes["bf16_autocast_numerics"]
        lines.append(f"  bf16 autocast numerics vs fp32 (same batch/noise/t): loss {n['loss_fp32']:.5f} vs "
                     f"{n['loss_variant']:.5f} (rel {n['loss_rel_err']:.1e}); LoRA grad cosine {min(1.0, n['grad_cosine']):.5f}, "
                     f"rel err {n['grad_rel_err']:.1e}")
    if "optimizer" in notes:
        for k, v in notes["optimizer"].items():
            lines.append(f"  AdamW {k:<32} " + (f"step {1e3 * v['step_s']:.1f} ms, clip_grad_norm_ {1e3 * v['clip_s']:.1f} ms"
                                                 if isinstance(v, dict) else v))
    print("\n".join(lines), flush=True)
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
