"""Z-Image on a lent GPU: the real CLI on the published architecture with random weights, at 1024 px, bf16 and
with a quantised base; s/step and peak GPU memory beside the memory plan's figure (the step events carry both).

    python3 bench/zimage_check.py --out $OUT/zimage.json                 # on the GPU machine (~6-8 min)
    python3 bench/zimage_check.py --device cpu --tiny --out /tmp/z.json  # CPU dry run, tiny model, 64 px (~1 min)
    python3 bench/zimage_check.py --count                                # parameter counts on the meta device

Model: ZImageTransformer2DModel's defaults (= Tongyi-MAI/Z-Image's transformer/config.json: dim 3840, 30 layers +
2 + 2 refiners, 6.15 B), the FLUX VAE (bench/models.py FLUX_VAE), and a 2-layer Qwen3 stand-in of Qwen3-4B's width
2560 (the trainer caches its hidden states once and releases it, so its depth changes set-up time only; the real
36-layer encoder is 4.0 B). The transformer is built on the card in bf16 (12.3 GB) and saved once.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-4B (text_encoder/config.json of Tongyi-MAI/Z-Image): 2560 wide, 36 layers, 32 heads of 128, 8 KV heads.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
STANDIN_LAYERS = 2


def build(out: Path, device: str, *, layers: int = STANDIN_LAYERS) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from bench.models import FLUX_VAE
    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

    old = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            transformer = ZImageTransformer2DModel()
            te = Qwen3Model(Qwen3Config(vocab_size=QWEN_VOCAB_SIZE, **{**QWEN3_4B, "num_hidden_layers": layers},
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    finally:
        torch.set_default_dtype(old)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=AutoencoderKL(**FLUX_VAE),
                          text_encoder=te, tokenizer=make_tiny_qwen_tokenizer(), transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def count() -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        t = ZImageTransformer2DModel()
        te = Qwen3Model(Qwen3Config(vocab_size=151936, **QWEN3_4B,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    return {"transformer": sum(p.numel() for p in t.parameters()), "qwen3_4b": sum(p.numel() for p in te.parameters())}


def run_cli(model: Path, data: Path, out: Path, resolution: int, steps: int, **extra) -> dict:
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(out), "trigger_words": ["ohwx"],
           "resolution": resolution, "max_train_steps": steps, "lora_rank": 16, "lora_alpha": 16,
           "validation_steps": None, "log_every_n_steps": 1, "ignore_memory_plan": True,
           **extra}
    (out.parent / f"{out.name}.json").write_text(json.dumps(cfg))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(out.parent / f"{out.name}.json")],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps_ev = [e for e in events if e["type"] == "step"]
    elapsed = [e["elapsed_s"] for e in steps_ev]
    dts = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    mem = [e.get("memory") or {} for e in steps_ev]
    started = next((e for e in events if e["type"] == "run_started"), {})
    return {"exit": proc.returncode, "family": started.get("family"), "steps": len(steps_ev),
            "s_per_step": round(sum(dts[2:]) / len(dts[2:]), 3) if len(dts) > 2 else None,
            "gpu_peak_gb": max((m.get("gpu_peak_gb") or 0 for m in mem), default=None),
            "plan_gb": mem[-1].get("plan_gb") if mem else None, "wall_s": round(time.time() - t0, 1),
            "error": None if proc.returncode == 0 else proc.stderr[-1500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny zimage pipeline at 64 px (dry run)")
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps(count()))
        return 0
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="zimage-check-"))
    res = 64 if args.tiny else 1024
    model = make_tiny_pipeline(tmp / "model", "zimage") if args.tiny else build(tmp / "model", args.device)
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx", sizes=[(res, res)]))
    results = {"device": args.device, "model": "tiny zimage" if args.tiny else "full Z-Image (Qwen3 stand-in)"}
    runs = {"bf16": {}, "fp8_base": {"base_quantization": "fp8"},
            "bf16_checkpointing": {"gradient_checkpointing": True}}
    for name, extra in runs.items():
        precision = {} if args.device == "cpu" else {"mixed_precision": "bf16"}
        results[name] = run_cli(model, data, tmp / name, res, args.steps, **precision, **extra)
        print(name, json.dumps(results[name])[:400], file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    ok = all(r["exit"] == 0 and r["family"] == "zimage" for k, r in results.items() if isinstance(r, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
