"""Tiny, randomly initialised Stable Diffusion pipelines and toy datasets.

Everything here is built offline (no hub access): real checkpoints are
gigabytes, so tests, the demo and benchmarks run against models that keep the
real block layout and parameter names (what LoRA target matching depends on)
but with tiny widths.

    python -m lora_trainer.tiny pipeline --family sdxl --out DIR
    python -m lora_trainer.tiny dataset --out DIR -n 8

Each family folder builds its own tiny models (families/<name>/tiny.py: ``VARIANTS``, ``DEFAULT``, ``build``);
this module finds them through the registry, so the tiny names (``FAMILIES``, the CLI's ``--family`` choices)
follow the families with no edit here. The shared leaves are parts.py (CLIP tokenizer, text encoder configs,
VAE), t5.py and dataset.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .. import families
from .dataset import make_dataset
from .parts import (BOS, EOS, MAX_LENGTH, VOCAB_SIZE, _text_config, _write_vocab_files, make_tiny_tokenizer,
                    save_pipeline, tiny_vocab_and_merges)
from .t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer

# The leaves are re-exported: tests, bench/ and the demo import them from here.
__all__ = ["BOS", "DIT_FAMILIES", "EOS", "FAMILIES", "MAX_LENGTH", "T5_VOCAB_SIZE", "VOCAB_SIZE", "_text_config",
           "_write_vocab_files", "build_tiny_pipeline", "family_of", "main", "make_dataset",
           "make_single_file_checkpoint", "make_tiny_pipeline", "make_tiny_t5_tokenizer", "make_tiny_tokenizer",
           "tiny_vocab_and_merges"]


def _tiny_modules() -> dict[str, tuple[str, object]]:
    # tiny name -> (family, its tiny module), in registry order.
    out = {}
    for family in families.FAMILIES:
        module = families.get_part(family, "tiny")
        for name in module.VARIANTS if module is not None else ():
            out[name] = (family, module)
    return out


_TINY = _tiny_modules()
FAMILIES = tuple(_TINY)
# The LDM single-file writer below converts a UNet; the other tiny names (the DiT families) have single-file
# writers of their own.
DIT_FAMILIES = tuple(name for name, (family, _) in _TINY.items()
                     if "unet" not in families.get_spec(family).denoisers)


def _known(name: str) -> None:
    if name not in _TINY:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(FAMILIES)}")


def family_of(name: str) -> str:
    """The registry family a tiny name belongs to."""
    _known(name)
    return _TINY[name][0]


def build_tiny_pipeline(family: str, seed: int = 0):
    """The in-memory pipeline (fp32, CPU) that `make_tiny_pipeline` saves; the caller's RNG is left untouched."""
    _known(family)
    module = _TINY[family][1]
    return module.build(module.VARIANTS[family], seed)


def make_tiny_pipeline(out_dir, family: str, seed: int = 0) -> Path:
    """Save a complete, randomly initialised diffusers pipeline folder (safetensors only)."""
    return save_pipeline(build_tiny_pipeline(family, seed), out_dir)


# --------------------------------------------------------------------------- single-file (LDM) export
# The inverse of diffusers' loaders/single_file_utils.py converters, so the
# A1111/Civitai loading path (from_single_file) can be tested offline.

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet(sd: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1  # LDM gives each downsampler its own input block
    up_has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in sd.items():
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, b, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            idx = 1 + b * per + i if kind == "down" else b * per + i
            if part == "resnets":
                head, _, tail = rest.partition(".")
                rest, slot = f"{_RESNET[head]}.{tail}", 0
            else:
                slot = 1
            new = f"{'input' if kind == 'down' else 'output'}_blocks.{idx}.{slot}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in up_has_attn else 1}.conv.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.([^.]+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"
        elif key.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + key[len("mid_block.attentions.0."):]
        else:
            stem, _, leaf = key.rpartition(".")
            new = f"{_UNET_FIXED[stem]}.{leaf}"
        out["model.diffusion_model." + new] = t
    return out


def _ldm_vae(sd: dict, num_blocks: int) -> dict:
    out = {}
    for key, t in sd.items():
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         key):
            coder, kind, i, part, j, rest = m.groups()
            # LDM numbers decoder levels from the bottom, diffusers from the top.
            level = int(i) if kind == "down" else num_blocks - 1 - int(i)
            if part == "resnets":
                new = f"{coder}.{kind}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{coder}.{kind}.{level}.{kind}sample.{rest}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if t.ndim == 2:  # LDM's VAE attention uses 1x1 convs
                t = t[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = t
    return out


def _ldm_open_clip(sd: dict, prefix: str) -> dict:
    import torch

    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight")}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for key in [k for k in sd if ".q_proj." in k]:
        leaf = key.rsplit(".", 1)[1]
        base = key.split(".self_attn.")[0].replace("encoder.layers.", "transformer.resblocks.")
        qkv = [sd.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{prefix}{base}.attn.in_proj_{leaf}"] = torch.cat(qkv)
    renames = (("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), ("self_attn.", "attn."), ("final_layer_norm", "ln_final"))
    for key, t in sd.items():
        for a, b in renames:
            key = key.replace(a, b)
        out[prefix + key] = t
    return out


def make_single_file_checkpoint(pipeline_dir, out_path) -> Path:
    """Write an A1111/Civitai-style single .safetensors (original LDM key names) from a pipeline folder."""
    from safetensors.torch import load_file, save_file

    src, out_path = Path(pipeline_dir), Path(out_path)

    def weights(sub: str) -> dict:
        (path,) = [p for p in (src / sub).glob("*.safetensors")]
        return load_file(path)

    def config(sub: str) -> dict:
        return json.loads((src / sub / "config.json").read_text())

    ckpt = _ldm_unet(weights("unet"), config("unet")["layers_per_block"])
    ckpt.update(_ldm_vae(weights("vae"), len(config("vae")["block_out_channels"])))
    te = {"text_model." + k.removeprefix("text_model."): v for k, v in weights("text_encoder").items()}
    if (src / "text_encoder_2").is_dir():
        ckpt.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        ckpt.update(_ldm_open_clip(weights("text_encoder_2"), "conditioner.embedders.1.model."))
    elif config("text_encoder").get("hidden_act") == "gelu":  # SD2 ships OpenCLIP-H
        ckpt.update(_ldm_open_clip(te, "cond_stage_model.model."))
    else:
        ckpt.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(out_path), metadata={"format": "pt"})
    return out_path


# --------------------------------------------------------------------------- CLI


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="save a tiny random diffusers pipeline")
    p.add_argument("--family", choices=FAMILIES, default=FAMILIES[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-file", metavar="PATH", help="also write an LDM-style single-file .safetensors")
    d = sub.add_parser("dataset", help="write a toy image/caption dataset")
    d.add_argument("--out", required=True)
    d.add_argument("-n", type=int, default=8)
    d.add_argument("--sizes", type=_parse_sizes, help="comma list of WxH, e.g. 64x64,96x64")
    d.add_argument("--caption-ext", default=".txt")
    d.add_argument("--trigger", default="ohwx")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-captions", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "pipeline":
        if args.single_file and args.family in DIT_FAMILIES:
            parser.error("--single-file is only implemented for the UNet families")
        path = make_tiny_pipeline(args.out, args.family, seed=args.seed)
        print(f"tiny {args.family} pipeline written to {path}", file=sys.stderr)
        if args.single_file:
            sf = make_single_file_checkpoint(path, args.single_file)
            print(f"single-file checkpoint written to {sf}", file=sys.stderr)
    else:
        path = make_dataset(args.out, args.n, sizes=args.sizes, caption_ext=args.caption_ext,
                            trigger=args.trigger, seed=args.seed, with_captions=not args.no_captions)
        print(f"{args.n} images written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
