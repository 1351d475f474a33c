"""Tiny, randomly initialised Stable Diffusion pipelines and toy datasets.

Everything here is built offline (no hub access): real SD checkpoints are
gigabytes, so tests, the demo and benchmarks run against models that keep the
real block layout and parameter names (what LoRA target matching depends on)
but with tiny widths.

    python -m lora_trainer.tiny pipeline --family sdxl --out DIR
    python -m lora_trainer.tiny dataset --out DIR -n 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .single_file import make_single_file_checkpoint  # the SD (LDM) single-file writer; kept importable here

# FLUX.1 / SD3 live in tiny_dit, imported lazily (tiny_dit builds on this module).
DIT_FAMILIES = ("flux1-dev", "flux1-schnell", "sd3")
FAMILIES = ("sd15", "sd2", "sd2-v", "sdxl") + DIT_FAMILIES
MAX_LENGTH = 77
# 512 byte-level symbols + 486 merges + 2 specials; fixed so that the text
# encoders' embedding tables never drift from the tokenizer.
VOCAB_SIZE = 1000
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that become single tokens, so captions tokenize to realistic lengths
# instead of one token per byte.
_WORDS = (
    "ohwx sks photo of a an the and with in on at to is by for from style portrait "
    "red green blue yellow purple orange white black pink teal gray brown cyan "
    "circle square triangle diamond ring stripe star shape background gradient "
    "person man woman dog cat car house tree sky cloud light dark bright color "
    "painting drawing art high quality detailed simple plain close up view "
    "this that it my your new old small large big little one two three"
).split()


def _bytes_to_unicode() -> list[str]:
    # Same table (and order) as OpenAI CLIP / GPT-2: printable bytes map to
    # themselves, the rest to code points >= 256 so nothing is whitespace.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_vocab_and_merges(vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab in CLIP's layout: bytes, bytes+</w>, merges, specials last.

    Every byte has a token with and without the end-of-word suffix, so any
    text (emoji, CJK, ...) encodes without falling back to the unk token.
    """
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    known, merges, pairs = set(tokens), [], set()
    budget = vocab_size - 2

    def add(a: str, b: str) -> bool:
        if (a, b) in pairs:
            return True
        if a + b not in known:
            if len(tokens) >= budget:
                return False
            tokens.append(a + b)
            known.add(a + b)
        pairs.add((a, b))
        merges.append((a, b))
        return True

    letters = "abcdefghijklmnopqrstuvwxyz"
    # Left-to-right merges per word; the letter bigrams top the vocab up to
    # exactly `budget` so the size is a constant, not an accident of _WORDS.
    for word in _WORDS:
        syms = list(word)
        syms[-1] += "</w>"
        cur = syms[0]
        for s in syms[1:]:
            if not add(cur, s):
                break
            cur += s
    for a in letters:
        for b in letters:
            if len(tokens) < budget:
                add(a, b)
    if len(tokens) != budget:
        raise ValueError(f"vocab_size {vocab_size} is not reachable with the built-in merges")
    vocab = {t: i for i, t in enumerate(tokens + [BOS, EOS])}
    return vocab, merges


def _write_vocab_files(folder: Path) -> None:
    # tokenizers-backed CLIPTokenizer only saves tokenizer.json; the real SD
    # repos also ship vocab.json + merges.txt, which older loaders need.
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tiny_tokenizer(pad_token: str = EOS):
    """A CLIPTokenizer over the tiny vocab (SD pads with EOS; SDXL's tokenizer_2 with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_LENGTH)


def _text_config(hidden: int, act: str, pad_id: int, projection_dim: int | None = None, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        # Real ids (not CLIP's legacy eos=2) so pooling picks the EOS position.
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=pad_id,
    )


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    # Four blocks -> three downsamples: the same 8x image-to-latent ratio as the real VAE.
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=16,
        sample_size=64, scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# sample_size 8 latents -> 64 px default images (real: 64 -> 512 px, 128 -> 1024 px).
_UNET_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)


def _build_sd(family: str):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    v2 = family != "sd15"
    hidden = 64 if v2 else 32  # SD2's OpenCLIP-H is wider than SD1's CLIP-L; keep that difference.
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=hidden,
        # diffusers' "attention_head_dim" is really the head count (legacy
        # naming); SD1 uses 8 everywhere, SD2 a constant head width.
        attention_head_dim=(2, 2, 4, 4) if v2 else 8,
        use_linear_projection=v2,
    )
    text_encoder = CLIPTextModel(_text_config(hidden, "gelu" if v2 else "quick_gelu", VOCAB_SIZE - 1))
    if family == "sd2-v":
        # Like stabilityai/stable-diffusion-2-1 (768-v).
        scheduler = DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=_vae(0.18215, False), text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    h1, h2, proj, time_dim = 32, 64, 32, 8
    # projection_dim != hidden_size on purpose: code that confuses the two
    # for the pooled embedding breaks here instead of silently on real SDXL.
    text_encoder = CLIPTextModel(_text_config(h1, "quick_gelu", VOCAB_SIZE - 1))
    # 10 layers (still tiny) so the single-file export carries resblocks.9,
    # the key diffusers' infer_diffusers_model_type uses to recognise SDXL.
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(h2, "gelu", 0, projection_dim=proj, layers=10))
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=h1 + h2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text embeds + 6 micro-conditioning values (orig size, crop, target size).
        projection_class_embeddings_input_dim=proj + 6 * time_dim,
    )
    scheduler = EulerDiscreteScheduler(**_SD_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False,
                                       prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025, True), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=make_tiny_tokenizer(), tokenizer_2=make_tiny_tokenizer(pad_token="!"),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def make_tiny_pipeline(out_dir, family: str, seed: int = 0) -> Path:
    """Save a complete, randomly initialised diffusers pipeline folder (safetensors only)."""
    import torch

    if family in DIT_FAMILIES:
        from . import tiny_dit

        return tiny_dit.make_tiny_pipeline(out_dir, family, seed=seed)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    # Only the CPU generator is seeded (torch.manual_seed would also reseed
    # CUDA), inside fork_rng so the caller's random stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        pipe = _build_sdxl() if family == "sdxl" else _build_sd(family)
    pipe.save_pretrained(out, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).is_dir():
            _write_vocab_files(out / sub)
    return out


# --------------------------------------------------------------------------- datasets

_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "purple": (130, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (240, 130, 180), "teal": (30, 150, 150),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "stripe")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape in ("circle", "ring"):
        draw.ellipse(box, fill=fill if shape == "circle" else None, outline=fill, width=max(2, int(r / 3)))
    elif shape in ("square", "stripe"):
        draw.rectangle(box if shape == "square" else [cx - 2 * r, cy - r / 3, cx + 2 * r, cy + r / 3], fill=fill)
    else:
        tri = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        diamond = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        draw.polygon(tri if shape == "triangle" else diamond, fill=fill)


def make_dataset(out_dir, n: int = 8, *, sizes=None, caption_ext: str = ".txt", trigger: str | None = "ohwx",
                 seed: int = 0, with_captions: bool = True) -> Path:
    """Write `n` toy images (a coloured shape on a solid or gradient background) plus captions.

    `sizes` is a list of (width, height) cycled over the images (default 64x64).
    Every fourth image is a JPEG so loaders see mixed formats. Output is a pure
    function of the arguments (one numpy Generator drives every choice).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(s) for s in sizes] if sizes else [(64, 64)]
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    for i in range(n):
        w, h = (int(v) for v in sizes[i % len(sizes)])
        bg, fg = rng.choice(len(names), size=2, replace=False)
        bg2 = (bg + 1 + rng.integers(len(names) - 1)) % len(names)
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        gradient = bool(rng.integers(2))
        c0 = np.array(_COLORS[names[bg]], dtype=np.float32)
        if gradient:
            t = np.linspace(0.0, 1.0, w if w >= h else h, dtype=np.float32)
            t = t[None, :, None] if w >= h else t[:, None, None]
            pixels = np.broadcast_to(c0 + t * (np.array(_COLORS[names[bg2]], np.float32) - c0), (h, w, 3))
            bg_text = f"{names[bg]} to {names[bg2]} gradient background"
        else:
            pixels = np.broadcast_to(c0, (h, w, 3))
            bg_text = f"{names[bg]} background"
        # Mild noise so images are not trivially compressible / perfectly flat.
        pixels = np.clip(pixels + rng.normal(0.0, 6.0, size=(h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
        r = float(rng.uniform(0.18, 0.32)) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(ImageDraw.Draw(img), shape, float(cx), float(cy), r, _COLORS[names[fg]])
        stem = f"img_{i:04d}"
        img.save(out / (stem + (".jpg" if i % 4 == 3 else ".png")), quality=90)  # PNG ignores quality
        if with_captions:
            article = "an" if names[fg][0] in "aeiou" else "a"
            parts = ([trigger] if trigger else []) + [f"{article} {names[fg]} {shape}", bg_text]
            (out / f"{stem}{caption_ext}").write_text(", ".join(parts), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- CLI


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer.tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="save a tiny random diffusers pipeline")
    p.add_argument("--family", choices=FAMILIES, default="sd15")
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
