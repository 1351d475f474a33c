"""Random-weight SDXL stand-ins for the speed benchmarks, built from the published configs (no download).

    python3 bench/models.py --size quarter --out DIR   # ~160M-parameter UNet, every width / 4 (CPU benchmark)
    python3 bench/models.py --size full --out DIR      # the real SDXL architecture (GPU benchmark; ~7 GB)
    python3 bench/models.py --size full --count        # parameter counts only (meta device, no memory)
    python3 bench/models.py --tiny --out DIR           # lora_trainer.tiny's sdxl, for quick checks

Sizes:
- ``full``: stabilityai/stable-diffusion-xl-base-1.0's unet/vae/text_encoder/text_encoder_2 config.json values
  (UNet 2.57B parameters).
- ``quarter``: every channel width and hidden size divided by 4 -- UNet block_out_channels (80, 160, 320),
  cross_attention_dim 512, addition_time_embed_dim 64, projection_class_embeddings_input_dim 704; VAE
  (32, 64, 128, 128); CLIP-L hidden 192 x 12 layers; OpenCLIP-bigG hidden 320 x 32 layers, projection 320.
  Depths, block types and the attention layout (transformer_layers_per_block (1, 2, 10), head *counts*
  (5, 10, 20) for the UNet, 12 / 20 heads for the text encoders) are unchanged, so every head is 16 wide instead
  of 64. GroupNorm keeps SDXL's channels per group (UNet 10, VAE 4), i.e. 8 groups instead of 32: 80 channels do
  not split into 32 groups.

Both use lora_trainer.tiny's byte-level CLIP tokenizer (vocabulary of 1,000), so the saved text encoders get
``vocab_size`` 1000 instead of 49408 (only the embedding table shrinks; a lookup costs no FLOPs). ``--count``
reports the real 49408 vocabulary.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REAL_VOCAB = 49408

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers names; attention_head_dim is, as in
# the published file, the number of heads per block -- diffusers' legacy naming).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), dual_cross_attention=False,
    use_linear_projection=True, upcast_attention=None, resnet_time_scale_shift="default",
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    conv_in_kernel=3, conv_out_kernel=3,
)
# vae/config.json (the SDXL VAE: scaling 0.13025, force_upcast because it overflows in fp16).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True,
)
# text_encoder/config.json (OpenAI CLIP ViT-L/14 text tower) and text_encoder_2/config.json (OpenCLIP bigG).
SDXL_TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768)
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False, prediction_type="epsilon")


def configs(size: str = "full") -> dict:
    """unet / vae / te1 / te2 constructor kwargs for 'full' or 'quarter'."""
    if size == "full":
        return {"unet": dict(SDXL_UNET), "vae": dict(SDXL_VAE), "te1": dict(SDXL_TE1), "te2": dict(SDXL_TE2)}
    if size != "quarter":
        raise ValueError(f"size must be 'full' or 'quarter', got {size!r}")
    d = 4
    unet = dict(SDXL_UNET)
    unet.update(block_out_channels=tuple(c // d for c in SDXL_UNET["block_out_channels"]),
                cross_attention_dim=SDXL_UNET["cross_attention_dim"] // d,
                addition_time_embed_dim=SDXL_UNET["addition_time_embed_dim"] // d,
                projection_class_embeddings_input_dim=SDXL_UNET["projection_class_embeddings_input_dim"] // d,
                norm_num_groups=SDXL_UNET["norm_num_groups"] // d)  # 10 channels per group, as in SDXL
    vae = dict(SDXL_VAE)
    vae.update(block_out_channels=tuple(c // d for c in SDXL_VAE["block_out_channels"]),
               norm_num_groups=SDXL_VAE["norm_num_groups"] // d)  # 4 channels per group, as in SDXL
    te1 = {k: (v // d if k in ("hidden_size", "intermediate_size", "projection_dim") else v) for k, v in SDXL_TE1.items()}
    te2 = {k: (v // d if k in ("hidden_size", "intermediate_size", "projection_dim") else v) for k, v in SDXL_TE2.items()}
    # Consistency the UNet relies on: cross-attention = both encoders' hidden sizes, pooled = te2 projection.
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    return {"unet": unet, "vae": vae, "te1": te1, "te2": te2}


def _text_config(kw: dict, *, vocab_size: int, pad_id: int):
    from transformers import CLIPTextConfig

    if vocab_size == REAL_VOCAB:
        bos, eos = 49406, 49407
    else:  # lora_trainer.tiny's tokenizer puts BOS / EOS last
        bos, eos = vocab_size - 2, vocab_size - 1
    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_id, **kw)


def build_components(size: str = "full", *, vocab_size: int | None = None, seed: int = 0) -> dict:
    """Random-weight unet, vae, text_encoder, text_encoder_2 (fp32, on the current default device)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.tiny import VOCAB_SIZE

    vocab = vocab_size or VOCAB_SIZE
    cfg = configs(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        te1 = CLIPTextModel(_text_config(cfg["te1"], vocab_size=vocab, pad_id=vocab - 1))
        # SDXL's tokenizer_2 pads with "!" (id 0).
        te2 = CLIPTextModelWithProjection(_text_config(cfg["te2"], vocab_size=vocab, pad_id=0))
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def count_params(size: str) -> dict:
    """Parameter counts without allocating (meta device), with the real 49408-token vocabulary."""
    import torch

    with torch.device("meta"):
        comps = build_components(size, vocab_size=REAL_VOCAB)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items()}


def save_pipeline(comps: dict, out: Path, *, unet_dtype=None, te_dtype=None) -> Path:
    """Write a diffusers StableDiffusionXLPipeline folder (safetensors) that train_lora.py loads.

    unet_dtype / te_dtype: store those weights in e.g. bf16 (the full model: 5 GB instead of 10); the VAE is
    always fp32 (as SDXL ships it for training).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from lora_trainer.tiny import _write_vocab_files, make_tiny_tokenizer

    if unet_dtype is not None:
        comps["unet"].to(unet_dtype)
    if te_dtype is not None:
        comps["text_encoder"].to(te_dtype)
        comps["text_encoder_2"].to(te_dtype)
    pipe = StableDiffusionXLPipeline(
        vae=comps["vae"], text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
        tokenizer=make_tiny_tokenizer(), tokenizer_2=make_tiny_tokenizer(pad_token="!"),
        unet=comps["unet"], scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        _write_vocab_files(out / sub)
    return out


def make_model(out: Path, size: str, *, seed: int = 0, dtype=None, device=None, quiet: bool = False) -> Path:
    """Build and save: size in 'tiny' (lora_trainer.tiny's sdxl), 'quarter', 'full'."""
    import torch

    out = Path(out)
    if size == "tiny":
        from lora_trainer.tiny import make_tiny_pipeline

        return make_tiny_pipeline(out, "sdxl", seed=seed)
    t = time.perf_counter()
    with torch.device(device or "cpu"):
        comps = build_components(size, seed=seed)
    n_unet = sum(p.numel() for p in comps["unet"].parameters())
    path = save_pipeline(comps, out, unet_dtype=dtype, te_dtype=dtype)
    if not quiet:
        print(f"{size} SDXL written to {path}: UNet {n_unet / 1e6:.1f}M parameters "
              f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "quarter"), default="quarter")
    ap.add_argument("--tiny", action="store_true", help="lora_trainer.tiny's sdxl instead (quick checks)")
    ap.add_argument("--out", help="folder to write the diffusers pipeline to")
    ap.add_argument("--count", action="store_true", help="print parameter counts only (no weights allocated)")
    ap.add_argument("--bf16", action="store_true", help="store UNet and text encoders in bf16 (VAE stays fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.count or not args.out:
        for size in ("full", "quarter"):
            counts = count_params(size)
            print(f"{size:>7}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
        if not args.out:
            return 0
    import torch

    make_model(Path(args.out), "tiny" if args.tiny else args.size, seed=args.seed,
               dtype=torch.bfloat16 if args.bf16 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
