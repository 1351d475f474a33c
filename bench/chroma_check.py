"""Chroma at its published size for the benches: Chroma1-HD's transformer config (ChromaTransformer2DModel's
defaults: FLUX.1's 19 + 38 blocks of 3072 without per-block modulation, a 5-layer 5120-wide approximator; 8.900 B),
FLUX.1's VAE and T5-XXL, built on the meta device for counts and the memory plan, or with random weights on a device
for the GPU check (``check``, which device_check.py calls like bench/qwen_image.py's ``check_qwen``).

The GPU check's T5 is a 2-layer stand-in of T5-XXL's width (4096, so the text cache and the transformer's txt_in
see real shapes) with the tiny tokenizer's vocabulary: the trainer caches its output once and releases it, so its
depth changes set-up time only (as device_check's FLUX T5 stand-in).

    python3 bench/chroma_check.py --count                  # parameter counts (meta device)
    python3 bench/chroma_check.py --plan                   # the memory plan at 1024 px for the published sizes
    python3 bench/chroma_check.py --tiny --device cpu      # the CLI dry run of ``check`` on the tiny model, 64 px
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# lodestones/Chroma1-HD transformer/config.json = ChromaTransformer2DModel's defaults.
CHROMA_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                          approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)
# (transformer parameters, image tokens at 1024 px, text tokens): device_check's FULL_SIZE entry for the MFU estimate.
FULL_SIZE = (8.900e9, 4096, 512)


def components(t5_layers: int | None = None, *, t5_vocab: int | None = None) -> dict:
    """Random-weight transformer, vae and text_encoder on the current default device (meta for counts)."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from bench.models import FLUX_T5, FLUX_VAE, REAL_T5_VOCAB

    t5 = {**FLUX_T5, **({"num_layers": t5_layers} if t5_layers else {})}
    return {"transformer": ChromaTransformer2DModel(**CHROMA_TRANSFORMER), "vae": AutoencoderKL(**FLUX_VAE),
            "text_encoder": T5EncoderModel(T5Config(vocab_size=t5_vocab or REAL_T5_VOCAB, pad_token_id=0,
                                                    eos_token_id=1, decoder_start_token_id=0, **t5))}


def count() -> dict:
    import torch

    with torch.device("meta"):
        comps = components()
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def make_model(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    """Build (random weights, directly on ``device``) and save a ChromaPipeline folder with the T5 stand-in."""
    import torch
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from bench.models import T5_STANDIN_LAYERS
    from lora_trainer.families.chroma.tiny import CHROMA_SCHEDULER
    from lora_trainer.testing.t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        comps = components(T5_STANDIN_LAYERS, t5_vocab=T5_VOCAB_SIZE)
    for name, module in comps.items():
        module.to(dtype=torch.float32 if name == "vae" or dtype is None else dtype)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**CHROMA_SCHEDULER), vae=comps["vae"],
                          text_encoder=comps["text_encoder"], tokenizer=make_tiny_t5_tokenizer(),
                          transformer=comps["transformer"])
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


# name -> config keys (mixed precision: device_check's, bf16 on a card): the plain run, with gradient checkpointing,
# and an fp8 / nf4 base with checkpointing.
RUNS = {"base": {}, "gc": {"gradient_checkpointing": True},
        "fp8_gc": {"gradient_checkpointing": True, "base_quantization": "fp8"},
        "nf4_gc": {"gradient_checkpointing": True, "base_quantization": "nf4"}}


def check(ctx, c, *, run_cli, expect_completed, mem_max, steady, log) -> None:
    """Chroma through the real CLI (device_check's helpers passed in): the full-size transformer (17.8 GB in bf16)
    built on the card, then 1024 px runs (RUNS): s/step, peak GPU memory beside the plan. ``ctx.flux_size ==
    "tiny"``: the tiny random pipeline at 64 px (the CPU dry run)."""
    import torch

    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    tiny = ctx.flux_size == "tiny"
    folder = ctx.tmp / "model-chroma"
    t = time.monotonic()
    if not (folder / "model_index.json").is_file():
        log(f"  building {'tiny' if tiny else 'full'} Chroma in {folder}")
        if tiny:
            make_tiny_pipeline(folder, "chroma")
        else:
            make_model(folder, device=ctx.device, dtype=torch.bfloat16)
            torch.cuda.empty_cache()
    c.numbers.update(model="tiny chroma" if tiny else "full Chroma1-HD transformer + 2-layer T5-XXL stand-in",
                     build_and_save_s=round(time.monotonic() - t, 1),
                     model_gb=round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 1))
    res = 64 if tiny else 1024
    data = make_dataset(ctx.tmp / "data-chroma", n=4, sizes=[(res, res)], trigger="ohwx")
    steps = 4 if tiny else 6
    for name, extra in RUNS.items():
        if ctx.device == "cpu" and "base_quantization" in extra:
            continue  # quantised bases need a card
        tag = f"{res}px_{name}"
        cfg = {"dataset_path": str(data), "base_model": str(folder), "output_path": str(ctx.tmp / f"chroma-{tag}"),
               "trigger_words": ["ohwx"], "resolution": res, "min_bucket_resolution": min(256, res), "batch_size": 1,
               "max_train_steps": steps, "checkpointing_steps": None, "lora_rank": 16, "learning_rate": 1e-4,
               "log_every_n_steps": 1, "seed": 7, "device": ctx.device, "mixed_precision": ctx.main_precision,
               "heartbeat_seconds": 600, "max_sequence_length": 128, "ignore_memory_plan": True, **extra}
        path = ctx.tmp / f"chroma-{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        run = run_cli(ctx, path, f"chroma/{tag}", record=False, max_timeout=420.0)
        if run.rc != 0 and run.last("error").get("code") == "out_of_memory":
            c.numbers[f"{tag}_result"] = "out_of_memory"
            continue
        from bench.device_check import Check  # the same record type, for this run's own problems

        sub = Check(c.name)
        if not expect_completed(sub, run, ctx.main_precision, ctx.device):
            c.problems += [f"{tag}: {p}" for p in sub.problems]
            continue
        sub.require(run.last("run_started").get("family") == "chroma", f"{tag}: not trained as chroma")
        elapsed = [e["elapsed_s"] for e in run.of("step")]
        step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
        mem = (run.of("step")[-1].get("memory") or {}) if elapsed else {}
        c.numbers.update({f"{tag}_s_per_step": steady(step_s, 2), f"{tag}_gpu_peak_gb": mem_max(run, "gpu_peak"),
                          f"{tag}_plan_gb": mem.get("plan_gb"), f"{tag}_rss_peak_gb": mem_max(run, "rss"),
                          f"{tag}_wall_s": round(run.wall_s, 1)})
        c.problems += sub.problems


def make_plan_folder(root: Path) -> Path:
    """A ChromaPipeline folder the probe accepts with every component's real header (no weights; sparse files):
    what the memory plan reads, as bench_memory_plan.make_folder writes FLUX.1's."""
    import torch

    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.chroma.tiny import CHROMA_SCHEDULER
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    with torch.device("meta"):
        comps = components()
    classes = {"transformer": ["diffusers", "ChromaTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ChromaPipeline", **classes}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(CHROMA_SCHEDULER))
    make_tiny_t5_tokenizer().save_pretrained(root / "tokenizer")  # the plan never reads it
    for name, model in comps.items():
        d = root / name
        d.mkdir(exist_ok=True)
        config = model.config.to_dict() if name == "text_encoder" else dict(model.config)
        (d / "config.json").write_text(json.dumps({**config, "_class_name": classes[name][1]}, default=list))
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        header_only(d / file, _saved_state(model), "F32" if name == "vae" else "BF16")
    return root


def _dry_run(device: str) -> int:
    """``check`` on the tiny model through device_check's own helpers (the CPU dry run)."""
    from bench import device_check as dc

    tmp = Path(tempfile.mkdtemp(prefix="chroma-check-"))
    schema = json.loads((ROOT / "events_schema.json").read_text())
    ctx = SimpleNamespace(flux_size="tiny", tmp=tmp, device=device, cuda=device == "cuda", run_times=[],
                          main_precision="bf16" if device == "cuda" else "no", remaining=lambda: 600.0,
                          validator=dc.jsonschema.Draft7Validator(schema))
    c = dc.Check("chroma/tiny")
    check(ctx, c, run_cli=dc.run_cli, expect_completed=dc.expect_completed, mem_max=dc.mem_max, steady=dc._steady,
          log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"numbers": c.numbers, "problems": c.problems}, indent=1))
    return 0 if not c.problems and any(k.endswith("_s_per_step") for k in c.numbers) else 1


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="print parameter counts (meta device)")
    ap.add_argument("--tiny", action="store_true", help="run check() on the tiny model (dry run)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.count:
        for name, n in count().items():
            print(f"{name}: {n / 1e9:.3f} B")
        return 0
    if args.tiny:
        return _dry_run(args.device)
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
