"""The memory plan (lora_trainer/preflight/memory_plan.py) for the real FLUX.1-dev and SDXL architectures, beside published
figures. Needs no weights: the models are built on the meta device from their published configs (bench/models.py)
and written as header-only safetensors files (sparse: the header of the real tensors, the data a hole), which is
all the plan reads.

    python3 bench/bench_memory_plan.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_SIZES = {"F32": 4, "BF16": 2, "F16": 2}


def header_only(path: Path, state: dict, dtype: str = "BF16") -> None:
    """A safetensors file of ``state``'s names and shapes whose data is a sparse hole (no disk blocks)."""
    header, offset, size = {}, 0, _SIZES[dtype]
    for name, t in sorted(state.items()):
        n = t.numel() * size
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
    os.truncate(path, 8 + len(raw) + offset)


def _saved_state(model) -> dict:
    """What save_pretrained writes: each parameter once (T5's tied embedding table is stored as ``shared`` only),
    plus the persistent buffers."""
    state = model.state_dict()
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    once = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in once or k not in every}


def write_header_only_components(root: Path, comps: dict, classes: dict) -> None:
    """Each of ``comps`` (meta-device models) as a diffusers component folder under ``root``: its config.json (class
    from ``classes[name][1]``) and a header-only weight file (VAE fp32, everything else bf16): a plan folder."""
    for name, model in comps.items():
        config = dict(model.config) if name != "text_encoder" else model.config.to_dict()
        config["_class_name"] = classes[name][1]
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config, default=list))
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        header_only(root / name / file, _saved_state(model), "F32" if name == "vae" else "BF16")


def _meta_components(family: str) -> dict:
    """The real architecture's components (the published configs in bench/models.py, real vocabularies) on the meta
    device: shapes without memory."""
    import torch

    from bench import models

    with torch.device("meta"):
        if family == "flux1":
            return models.build_flux_components("full", clip_vocab=models.REAL_VOCAB, t5_vocab=models.REAL_T5_VOCAB)
        if family == "qwen_image":
            from bench.qwen_image import meta_components

            return meta_components()
        return models.build_components("full", vocab_size=models.REAL_VOCAB)


def make_folder(root: Path, family: str) -> Path:
    """A diffusers folder the probe accepts, with every component's real header (configs from bench/models.py): the
    denoiser and text encoders in bf16, the VAE in fp32 as both models ship it."""
    root.mkdir(parents=True, exist_ok=True)
    if family == "flux1":
        comps = {"transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", **comps}
    elif family == "qwen_image":
        comps = {"transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "tokenizer": ["transformers", "Qwen2Tokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        index = {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.1", **comps}
    else:
        comps = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
        index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", **comps}
    models = _meta_components(family)
    (root / "model_index.json").write_text(json.dumps(index))
    for comp in comps:
        d = root / comp
        d.mkdir(exist_ok=True)
        if comp == "scheduler" and family == "qwen_image":
            from lora_trainer.families.qwen_image.tiny import QWEN_SCHEDULER
            (d / "scheduler_config.json").write_text(json.dumps(QWEN_SCHEDULER))
        elif comp == "scheduler":
            (d / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon", "shift": 3.0}))
        elif comp.startswith("tokenizer"):  # the tiny builders' tokenizers: the plan never reads them
            if "Qwen" in comps[comp][1]:
                from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer
                make_tiny_qwen_tokenizer().save_pretrained(d)
            elif "T5" in comps[comp][1]:
                from lora_trainer.testing.t5 import make_tiny_t5_tokenizer
                make_tiny_t5_tokenizer().save_pretrained(d)
            else:
                from lora_trainer.testing.tiny import _write_vocab_files, make_tiny_tokenizer
                make_tiny_tokenizer().save_pretrained(d)
                _write_vocab_files(d)
        else:
            model = models[comp]
            config = dict(model.config) if comp in ("vae",) or comps[comp][0] == "diffusers" else model.config.to_dict()
            config["_class_name"] = comps[comp][1]
            (d / "config.json").write_text(json.dumps(config, default=list))
            name = "model.safetensors" if comps[comp][0] == "transformers" else "diffusion_pytorch_model.safetensors"
            header_only(d / name, _saved_state(model), "F32" if comp == "vae" else "BF16")
    return root


# (family, resolution, settings, published figure, source)
_BLOG_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the blog's r4 LoRA: 4,669,440 parameters
CASES = [
    ("flux1", 512, {"lora_rank": 4, "target_modules": _BLOG_TARGETS, "optimizer": "adamw8bit",
                    "gradient_checkpointing": True}, "26 GB (512x768)",
     "huggingface/blog flux-qlora.md, bf16 base, r4 attention, 8-bit Adam, GC, cached latents + text"),
    ("flux1", 1024, {"lora_rank": 16, "optimizer": "adamw8bit", "gradient_checkpointing": True}, "~27 GiB (formula)",
     "shared/reference quantized-base.md section 7 worked example, bf16"),
    ("flux1", 512, {"lora_rank": 16, "optimizer": "adamw8bit", "gradient_checkpointing": True}, "~25 GiB (formula)",
     "same, 512 px"),
    ("sdxl", 1024, {"lora_rank": 16, "optimizer": "adamw8bit", "gradient_checkpointing": True}, "fits 8 GB, 10 GB advised",
     "kohya sd-scripts docs/train_SDXL-en.md; reference ~8 GiB bf16 + GC + cached"),
    ("sdxl", 1024, {"lora_rank": 16, "optimizer": "adamw", "gradient_checkpointing": False}, "-",
     "no published figure (activations measured 5.2 GiB at 1024 px)"),
    # The defaults (target_modules auto = attention_mlp, no checkpointing), then fp8 / int8 / NF4 bases without and
    # with checkpointing: fp8 and int8 hold a bf16 copy of each Linear for the backward (weight_copies).
    ("flux1", 1024, {}, "-", "the default config (reference: 33.5 GiB of activations without GC)"),
    ("flux1", 1024, {"base_quantization": "fp8"}, "-", "fp8 base, no GC: more than bf16"),
    ("flux1", 1024, {"base_quantization": "nf4"}, "-", "NF4 base, no GC"),
    ("flux1", 1024, {"base_quantization": "fp8", "gradient_checkpointing": True}, "-", "fp8 base, GC"),
    ("flux1", 1024, {"cache_latents": False, "cache_text_embeddings": False, "gradient_checkpointing": True}, "-",
     "nothing cached, GC: T5-XXL + CLIP-L bf16, VAE fp32 and its encode"),
]
# shard_base over N processes (the plan per process; WORLD_SIZE = N): no published figure for a sharded LoRA run
SHARDED = [("flux1", 1024, {"lora_rank": 16, "optimizer": "adamw", "gradient_checkpointing": True, "shard_base": True}, n)
           for n in (1, 2, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", metavar="DIR")
    args = ap.parse_args(argv)
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_memplan_"))
    try:
        data = make_dataset(work / "data", n=2, trigger="ohwx")
        folders = {f: make_folder(work / f, f) for f in ("flux1", "sdxl")}
        gpu = {"name": "a 24 GB card", "memory_bytes": 24 * 2 ** 30}
        rows = []
        cases = [(*c, 1) for c in CASES] + [(f, r, st, "-", f"{n} process(es)", n) for f, r, st, n in SHARDED]
        for family, res, settings, published, source, processes in cases:
            cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(folders[family]), "trigger_words": ["ohwx"],
                                   "output_path": str(work / "out"), "resolution": res, "mixed_precision": "bf16",
                                   **settings})
            probe = probe_model(str(folders[family]), work)
            plan = plan_memory(cfg, probe, probe.family, res, gpu=gpu, processes=processes)
            p = plan["parts_gib"]
            rows.append((f"{family} {res} px", ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults",
                         f"{plan['total_gib']:.1f}", f"{p['denoiser_weights']:.1f} / {p['weight_copies']:.1f} / "
                         f"{p['text_encoders']:.1f} / {p['vae']:.2f} / {p['lora']:.2f} / {p['activations']:.1f} / "
                         f"{p['fixed']:.1f}", published, source))
        head = ("case", "settings", "plan GiB", "weights / copies / TE / VAE / LoRA / activations / fixed", "published",
                "source")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        print("\nmemory plan vs published figures (bf16 base, batch 1)")
        for r in [head, tuple("-" * w for w in widths), *rows]:
            print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
