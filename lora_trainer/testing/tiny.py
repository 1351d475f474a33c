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
import sys
from pathlib import Path

from .. import families
from .dataset import make_dataset
from .single_file import make_single_file_checkpoint  # the SD (LDM) single-file writer, importable here
from .parts import (BOS, EOS, MAX_LENGTH, VOCAB_SIZE, _text_config, _write_vocab_files, make_tiny_tokenizer,
                    save_pipeline, tiny_vocab_and_merges)
from .t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer

# The leaves are re-exported: tests, bench/ and the demo import them from here.
__all__ = ["BOS", "DIT_FAMILIES", "EOS", "FAMILIES", "MAX_LENGTH", "T5_VOCAB_SIZE", "VOCAB_SIZE", "_text_config",
           "_write_vocab_files", "build_tiny_pipeline", "family_of", "load_pipeline", "main", "make_dataset",
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


def _classic(folder: Path, pipe):
    """A video pipeline (its output has ``frames``) through its family's tiny ``wrap_pipeline`` (Wan: one-frame
    clips whose frame is the image), found by the model_index class; any other pipeline as it is."""
    import json

    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    for family in families.FAMILIES:
        if name in families.get_signature(family).pipelines:
            wrap = getattr(families.get_part(family, "tiny"), "wrap_pipeline", None)
            return wrap(pipe) if wrap is not None else pipe
    return pipe


def load_pipeline(folder):
    """A saved pipeline folder, fp32, called as a classic diffusers pipeline (``pipe(prompt=...).images``): a
    modular pipeline's folder (modular_model_index.json, which DiffusionPipeline cannot load: Anima) through
    ModularPipeline.from_pretrained + load_components, wrapped in ClassicCall."""
    import torch
    from diffusers import DiffusionPipeline

    from ..families.adapter import ClassicCall
    from ..preflight.probe import probe_model

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return _classic(folder, DiffusionPipeline.from_pretrained(folder))
    from diffusers.modular_pipelines import ModularPipeline

    family = probe_model(str(folder)).family
    if family is not None:
        families.get_family(family)  # its adapter module sets up what its models need to run (Anima: cosmos_compat)
    pipe = ModularPipeline.from_pretrained(str(folder))
    pipe.load_components(torch_dtype=torch.float32)
    return ClassicCall(pipe)


def make_tiny_pipeline(out_dir, family: str, seed: int = 0) -> Path:
    """Save a complete, randomly initialised diffusers pipeline folder (safetensors only)."""
    return save_pipeline(build_tiny_pipeline(family, seed), out_dir)




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
