"""Leaves the tiny family builders (families/<name>/tiny.py) share: the byte-level CLIP tokenizer, CLIP text
encoder configs, the 16-channel flow-model VAE, seeding and saving. Imports nothing from the families, so a family's
tiny module can import it and the dispatcher (testing/tiny.py) can import the families without a cycle.

torch, diffusers and transformers are imported inside the functions: the registry lists the tiny names (the CLI's
choices) by importing the family tiny modules, which must stay cheap.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

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


# --------------------------------------------------------------------------- flow-model VAE
# 16 latent channels like both real FLUX.1 and SD3 VAEs; four blocks -> three downsamples = 8x.
LATENT_CHANNELS = 16
VAE_BLOCK_OUT_CHANNELS = (16, 32, 64, 64)  # real (128, 256, 512, 512)
VAE_NORM_GROUPS = 16  # real 32
VAE_SCALE_FACTOR = 8  # 64 px image -> 8x8 latent


def flow_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    n = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=2, latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_NORM_GROUPS, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )


# --------------------------------------------------------------------------- seeding and saving


@contextmanager
def seeded(seed: int):
    """Only the CPU generator is seeded (torch.manual_seed would also reseed CUDA), inside fork_rng so the
    caller's random stream is left untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def save_pipeline(pipe, out_dir) -> Path:
    """Save a pipeline folder (safetensors only); its CLIP tokenizers also get vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    from diffusers.modular_pipelines import ModularPipeline

    out = Path(out_dir)
    # A modular pipeline (Anima) writes modular_model_index.json; its save_pretrained takes a str path only, and
    # says explicitly that the index points at this folder.
    modular = {"overwrite_modular_index": True} if isinstance(pipe, ModularPipeline) else {}
    pipe.save_pretrained(str(out), safe_serialization=True, **modular)
    for name, component in pipe.components.items():
        if isinstance(component, CLIPTokenizer):
            _write_vocab_files(out / name)
    return out
