"""FLUX.2 on a card through the real CLI (device_check.py's ``flux2-<variant>/<size>`` check), and the full-size
FLUX.2 pipelines it trains: random weights from the published configs (reference/dit-families.md §3).

    python3 bench/device_flux2.py --variant klein-9b --count       # parameter counts, meta device
    python3 bench/device_flux2.py --variant klein-9b --out DIR      # build and save (on a card: --device cuda)

Full size: the published transformer (klein 9B: 8 + 24 blocks, 32 x 128, joint 12288, 9.08 B; klein 4B: 5 + 20,
24 heads, 7680, 3.88 B; dev: 8 + 48, 48 heads, 15360, 32.2 B) and the real AutoencoderKLFlux2 config; the text
encoder is a stand-in of the real output width (a Qwen3 / Mistral text model of the real hidden size with enough
layers for the pipeline's text_encoder_out_layers, 2 heads and a 64-wide MLP: ~0.1-0.2 B), because the trainer caches
its output once and releases it: its size changes set-up time, not training memory or speed. The tokenizer is the
tiny offline one. Built on the card in bf16 (seconds), saved in 10 GB shards.

The check trains at 1024 px (tiny: 128 px) with the bf16 base, then with an int8 base and gradient checkpointing
(the 24 GB recipe), rank 16, default targets, batch 1: s/step, peak GPU memory beside the memory plan's figure
(plan_gb in the step events), load and cache times, both LoRA files. An out-of-memory exit is recorded as a result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRANSFORMERS = {  # published Flux2Transformer2DModel configs (the rest: the class defaults, which are dev's)
    "dev": {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "joint_attention_dim": 15360,
            "guidance_embeds": True},
    "klein-9b": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288,
                 "guidance_embeds": False},
    "klein-4b": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
                 "guidance_embeds": False},
}
TINY = {"dev": "flux2-dev", "klein-9b": "flux2-klein-9b", "klein-4b": "flux2-klein-4b"}


def build_components(variant: str, dtype=None) -> dict:
    """The full-size transformer and VAE, and the text-encoder stand-in, on the current default device."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    cfg = TRANSFORMERS[variant]
    width = cfg["joint_attention_dim"] // 3
    layers = 31 if variant == "dev" else 28  # the deepest of text_encoder_out_layers + 1
    te_kwargs = dict(hidden_size=width, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=128, vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=1024)
    if variant == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        from lora_trainer.families.flux2.tiny import make_tiny_mistral_tokenizer

        tok = make_tiny_mistral_tokenizer()
        te = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", sliding_window=None, **te_kwargs),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=8, patch_size=14, image_size=28),
            image_token_index=tok.convert_tokens_to_ids("[IMG]")))
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

        tok = make_tiny_qwen_tokenizer()
        te = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=True, **te_kwargs))
    comps = {"transformer": Flux2Transformer2DModel(**cfg), "vae": AutoencoderKLFlux2(), "text_encoder": te,
             "tokenizer": tok}
    if dtype is not None:
        for name in ("transformer", "text_encoder"):
            comps[name].to(dtype)
    comps["vae"].to(torch.float32)
    return comps


def save_pipeline(variant: str, comps: dict, out: Path) -> Path:
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from lora_trainer.families._flux2.tiny import scheduler

    extra = {} if variant == "dev" else {"is_distilled": False}
    cls = Flux2Pipeline if variant == "dev" else Flux2KleinPipeline
    pipe = cls(scheduler=scheduler(), **comps, **extra)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return Path(out)


def make_model(out: Path, variant: str, size: str, *, device=None, dtype=None) -> Path:
    import torch

    if size == "tiny":
        from lora_trainer.testing.tiny import make_tiny_pipeline

        return make_tiny_pipeline(out, TINY[variant])
    with torch.device(device or "cpu"):
        comps = build_components(variant, dtype=dtype)
    return save_pipeline(variant, comps, out)


def count(variant: str) -> dict:
    import torch

    with torch.device("meta"):
        comps = build_components(variant)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items() if k != "tokenizer"}


def check_flux2(ctx, dc, c) -> None:
    """``dc``: the device_check module (run_cli, expect_completed, mem_max, load_lora, _steady)."""
    import torch

    from lora_trainer.testing.tiny import make_dataset

    variant, size = ctx.args.flux2_variant, ctx.flux2_size
    family = "flux2" if variant == "dev" else "flux2_klein"
    res = 128 if size == "tiny" else 1024
    steps = ctx.args.flux_steps or (6 if size == "full" else 3)
    folder = ctx.tmp / f"model-flux2-{variant}"
    t = time.monotonic()
    if not (folder / "model_index.json").is_file():
        dc.log(f"  building {size} FLUX.2 {variant} in {folder}")
        make_model(folder, variant, size, device=None if size == "tiny" else ctx.device,
                   dtype=None if size == "tiny" else torch.bfloat16)
        if ctx.cuda:
            torch.cuda.empty_cache()
    c.numbers.update(model=f"{size} FLUX.2 {variant}", build_and_save_s=round(time.monotonic() - t, 1),
                     model_gb=round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 1))
    data = make_dataset(ctx.tmp / "data-flux2", n=6, sizes=[(res, res)], trigger="ohwx")
    per_run = None
    for k, (quant, gc) in enumerate((("none", False), ("int8", True))):
        tag = f"{res}px" + ("" if quant == "none" else f"_{quant}") + ("_gc" if gc else "")
        if per_run is not None and ctx.remaining() < 1.3 * per_run:
            c.numbers[f"{tag}_skipped"] = f"{ctx.remaining():.0f} s left, ~{1.3 * per_run:.0f} s needed"
            continue
        cfg = {"dataset_path": str(data), "base_model": str(folder), "output_path": str(ctx.tmp / f"flux2-{tag}"),
               "trigger_words": ["ohwx"], "resolution": res, "min_bucket_resolution": min(256, res), "batch_size": 1,
               "max_train_steps": steps, "checkpointing_steps": None, "lora_rank": 16, "learning_rate": 1e-4,
               "log_every_n_steps": 1, "seed": 7, "device": ctx.device, "mixed_precision": ctx.main_precision,
               "cache_latents": True, "gradient_checkpointing": gc, "heartbeat_seconds": 600,
               "base_quantization": quant, "max_sequence_length": 512, "ignore_memory_plan": True}
        if k == 0:  # the sampling path from cached embeddings on the card: 2 steps, before and after training
            cfg.update(validation_prompts=["ohwx, a red circle"], validation_steps=steps, validation_inference_steps=2)
        path = ctx.tmp / f"flux2-{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        run = dc.run_cli(ctx, path, f"flux2/{tag}", record=False, max_timeout=420.0)
        per_run = run.wall_s
        err = run.last("error")
        if run.rc != 0 and err.get("code") == "out_of_memory":
            c.numbers[f"{tag}_result"] = "out_of_memory"
            c.details[f"{tag}_oom"] = {"message": err.get("message"), "details": err.get("details")}
            continue
        sub = dc.Check(c.name)
        if not dc.expect_completed(sub, run, ctx.main_precision, ctx.device):
            c.problems += [f"{tag}: {p}" for p in sub.problems]
            continue
        started = run.last("run_started")
        sub.require((started.get("family"), started.get("variant")) == (family, variant),
                    f"{tag}: run_started {started.get('family')}/{started.get('variant')}, expected {family}/{variant}")
        elapsed = [e["elapsed_s"] for e in run.of("step")]
        step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
        outputs = run.last("completed").get("outputs") or {}
        mem = (run.of("step")[-1].get("memory") or {}) if run.of("step") else {}
        c.numbers.update({f"{tag}_s_per_step": dc._steady(step_s, 2), f"{tag}_gpu_peak_gb": dc.mem_max(run, "gpu_peak"),
                          f"{tag}_plan_gb": mem.get("plan_gb"), f"{tag}_wall_s": round(run.wall_s, 1),
                          f"{tag}_lora_comfy_tensors": len(dc.load_lora(sub, outputs.get("lora"), f"{tag}_comfy")),
                          f"{tag}_lora_peft_tensors": len(dc.load_lora(sub, outputs.get("peft_lora"), f"{tag}_peft"))})
        c.details[f"{tag}_step_s"] = [round(x, 4) for x in step_s]
        c.problems += sub.problems


def need_s(ctx) -> float:
    """Build + save (klein 9B: 18 GB) and the first run; the second is skipped inside when time is short."""
    return 30.0 if ctx.flux2_size == "tiny" else 150.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=tuple(TRANSFORMERS), default="klein-9b")
    ap.add_argument("--count", action="store_true", help="parameter counts (meta device)")
    ap.add_argument("--out", help="build and save the full-size pipeline here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps(count(args.variant)))
    if args.out:
        import torch

        make_model(Path(args.out), args.variant, "full", device=args.device, dtype=torch.bfloat16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
