"""Anima at its published size for the benches: CosmosTransformer3DModel as Cosmos-Predict2-2B (28 blocks, 16 heads
of 128, text 1024; families-2026.md §5: 1.956 B measured), the AnimaTextConditioner's defaults (6 blocks, 1024 wide,
T5's 32128 ids: 0.135 B), Qwen3-0.6B and the Qwen-Image VAE, as an AnimaModularPipeline folder
(modular_model_index.json). Built on the meta device for counts and the memory plan, or with random weights on a
device for the GPU check: ``build_bf16`` for a bench/device_families.py FamilyBench row (main's device_check), or
``check`` (the older per-family hook, as bench/qwen_image.py's ``check_qwen`` was called).

The GPU check's Qwen3 is a 2-layer stand-in of the real width (1024) over the tiny tokenizer's vocabulary: the
trainer caches the conditioner's output once and releases Qwen3 and the conditioner, so their size changes set-up
time only (as the FLUX T5 and Qwen2.5-VL stand-ins).

    python3 bench/anima_check.py --count                                   # parameter counts (meta device)
    python3 bench/anima_check.py --plan                                    # the memory plan at 1024 px (meta)
    python3 bench/anima_check.py --device cpu --tiny --out /tmp/anima.json # CPU dry run: tiny model, 64 px
    python3 bench/anima_check.py --out $OUT/anima.json                     # on a GPU: full size, 1024 px
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (parameters trained through: transformer + conditioner, image tokens at 1024 px (64 x 64 after 8x VAE and 2x2
# patches), text tokens (the conditioner's 512)) for device_check's MFU estimate.
FULL_SIZE = (2.091e9, 4096, 512)
# Cosmos-Predict2-2B as ComfyUI detects it (2048 wide, 28 blocks, 16 heads, text 1024); no learnable positional
# embedding (diffusers' Cosmos 2.0 single-file table has no name for one).
ANIMA_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                         mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
                         patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
                         extra_pos_embed_type=None)
ANIMA_CONDITIONER: dict = {}  # AnimaTextConditioner's defaults
# Qwen3-0.6B (Qwen/Qwen3-0.6B config.json): 1024 wide, 28 layers, 16 heads of 128, 8 KV heads, tied embeddings.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, vocab_size=151936,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
STANDIN_LAYERS = 2


def components(te: str = "full") -> dict:
    """transformer, text_conditioner, vae, text_encoder at the published configs, on the current default device."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    text = dict(QWEN3_06B)
    if te == "standin":
        text.update(num_hidden_layers=STANDIN_LAYERS, vocab_size=QWEN_VOCAB_SIZE)
    return {"transformer": CosmosTransformer3DModel(**ANIMA_TRANSFORMER),
            "text_conditioner": AnimaTextConditioner(**ANIMA_CONDITIONER), "vae": AutoencoderKLQwenImage(),
            "text_encoder": Qwen3Model(Qwen3Config(**text))}


def count() -> dict:
    import torch

    with torch.device("meta"):
        comps = components("full")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def make_model(out: Path, *, device: str = "cuda", dtype=None, te: str = "standin") -> Path:
    """Build (random weights on ``device`` in ``dtype``; the VAE fp32) and save an AnimaModularPipeline folder."""
    import torch
    from diffusers import AnimaAutoBlocks, FlowMatchEulerDiscreteScheduler

    from lora_trainer.families.anima.tiny import ANIMA_SCHEDULER
    from lora_trainer.testing.parts import save_pipeline
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        comps = components(te)
    for name, module in comps.items():
        module.to(dtype=torch.float32 if name == "vae" or dtype is None else dtype)
    pipe = AnimaAutoBlocks().init_pipeline()
    # The tiny T5 tokenizer's ids stay below its 512 rows: the real conditioner's 32128-row table takes them.
    pipe.update_components(**comps, tokenizer=make_tiny_qwen_tokenizer(), t5_tokenizer=make_tiny_t5_tokenizer(),
                           scheduler=FlowMatchEulerDiscreteScheduler(**ANIMA_SCHEDULER))
    return save_pipeline(pipe, out)


def build_bf16(out: Path, device: str) -> Path:
    """device_families.FamilyBench's build hook: the full-size folder, bf16, random weights, built on ``device``."""
    import torch

    return make_model(Path(out), device=device, dtype=torch.bfloat16)


def make_meta_folder(root: Path) -> Path:
    """Header-only (sparse) weight files of the full-size components in a modular folder: what the plan reads."""
    import torch

    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.anima.tiny import build

    tiny = build()  # configs, tokenizers, scheduler and index from the tiny pipeline, then full-size headers
    from lora_trainer.testing.parts import save_pipeline

    save_pipeline(tiny, root)
    with torch.device("meta"):
        comps = components("full")
    for name, model in comps.items():
        d = root / name
        for f in d.glob("*.safetensors"):
            f.unlink()
        config = dict(model.config) if name != "text_encoder" else model.config.to_dict()
        config["_class_name"] = type(model).__name__
        (d / "config.json").write_text(json.dumps(config, default=list))
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        header_only(d / file, _saved_state(model), "F32" if name == "vae" else "BF16")
    return root


def plan(resolution: int = 1024, **settings) -> dict:
    """The memory plan for the full-size folder (bf16, cached latents and text, LoRA r16 on the default preset)."""
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    tmp = Path(tempfile.mkdtemp(prefix="anima-plan-"))
    folder = make_meta_folder(tmp / "anima")
    data = make_dataset(tmp / "data", n=2, trigger="ohwx")
    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(folder), "output_path": str(tmp / "out"),
                           "trigger_words": ["ohwx"], "resolution": resolution, "lora_rank": 16,
                           "mixed_precision": "bf16", **settings})
    probe = probe_model(str(folder))
    return plan_memory(cfg, probe, probe.family, resolution, gpu=None)


def check(ctx, c, *, run_cli, expect_completed, mem_max, steady, log) -> None:
    """Anima through the real CLI (device_check's helpers passed in, as for check_qwen): the full-size transformer
    built on the card, then 1024 px runs in bf16 with gradient checkpointing, without it, and with an fp8 base:
    s/step, peak GPU memory beside the plan. ``ctx.flux_size == "tiny"``: the tiny pipeline at 64 px (dry run)."""
    import torch

    from bench.device_check import Check
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    tiny = ctx.flux_size == "tiny"
    folder = ctx.tmp / "model-anima"
    t = time.monotonic()
    if not (folder / "modular_model_index.json").is_file():
        log(f"  building {'tiny' if tiny else 'full'} Anima in {folder}")
        if tiny:
            make_tiny_pipeline(folder, "anima")
        else:
            make_model(folder, device=ctx.device, dtype=torch.bfloat16)
            torch.cuda.empty_cache()
    c.numbers.update(model="tiny anima" if tiny else "full Anima transformer + conditioner, 2-layer Qwen3 stand-in",
                     build_and_save_s=round(time.monotonic() - t, 1))
    res = 64 if tiny else 1024
    data = make_dataset(ctx.tmp / "data-anima", n=4, sizes=[(res, res)], trigger="ohwx")
    for tag, extra in (("gc", {"gradient_checkpointing": True}), ("bf16", {}),
                       ("fp8", {"gradient_checkpointing": True, "base_quantization": "fp8"})):
        cfg = {"dataset_path": str(data), "base_model": str(folder), "output_path": str(ctx.tmp / f"anima-{tag}"),
               "trigger_words": ["ohwx"], "resolution": res, "min_bucket_resolution": min(256, res), "batch_size": 1,
               "max_train_steps": 4 if tiny else 8, "checkpointing_steps": None, "lora_rank": 16,
               "learning_rate": 1e-4, "log_every_n_steps": 1, "seed": 7, "device": ctx.device,
               "mixed_precision": ctx.main_precision, "heartbeat_seconds": 600, "ignore_memory_plan": True, **extra}
        path = ctx.tmp / f"anima-{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        run = run_cli(ctx, path, f"anima/{tag}", record=False, max_timeout=300.0)
        if run.rc != 0 and run.last("error").get("code") == "out_of_memory":
            c.numbers[f"{tag}_result"] = "out_of_memory"
            continue
        sub = Check(c.name)
        if not expect_completed(sub, run, ctx.main_precision, ctx.device):
            c.problems += [f"{tag}: {p}" for p in sub.problems]
            continue
        sub.require(run.last("run_started").get("family") == "anima", f"{tag}: not trained as anima")
        elapsed = [e["elapsed_s"] for e in run.of("step")]
        step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
        mem = (run.of("step")[-1].get("memory") or {}) if elapsed else {}
        c.numbers.update({f"{tag}_s_per_step": steady(step_s, 2), f"{tag}_gpu_peak_gb": mem_max(run, "gpu_peak"),
                          f"{tag}_plan_gb": mem.get("plan_gb"), f"{tag}_wall_s": round(run.wall_s, 1)})
        c.problems += sub.problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="parameter counts of the full-size components (meta)")
    ap.add_argument("--plan", action="store_true", help="the memory plan of the full-size model at 1024 px")
    ap.add_argument("--tiny", action="store_true", help="the tiny pipeline at 64 px (CPU dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps({k: f"{v / 1e9:.3f} B" for k, v in count().items()}))
        return 0
    if args.plan:
        for name, settings in (("bf16 gc", {"gradient_checkpointing": True}), ("bf16", {}),
                               ("fp8 gc", {"gradient_checkpointing": True, "base_quantization": "fp8"})):
            p = plan(**settings)
            print(name, json.dumps(p, default=str)[:700])
        return 0
    from bench.zimage_check import run_cli
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="anima-check-"))
    res = 64 if args.tiny else 1024
    model = make_tiny_pipeline(tmp / "model", "anima") if args.tiny else make_model(tmp / "model", device=args.device,
                                                                                    dtype=__import__("torch").bfloat16)
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx", sizes=[(res, res)]))
    results = {"device": args.device, "model": "tiny anima" if args.tiny else "full Anima (Qwen3 stand-in)"}
    runs = {"bf16": {}, "fp8_base": {"base_quantization": "fp8"}, "bf16_checkpointing": {"gradient_checkpointing": True}}
    for name, extra in runs.items():
        precision = {} if args.device == "cpu" else {"mixed_precision": "bf16"}
        results[name] = run_cli(model, data, tmp / name, res, args.steps, **precision, **extra)
        print(name, json.dumps(results[name])[:400], file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    ok = all(r["exit"] == 0 and r["family"] == "anima" for r in results.values() if isinstance(r, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
