"""Random-weight SDXL stand-ins for the speed benchmarks, built from the published configs (no download).

    python3 bench/models.py --size quarter --out DIR   # ~160M-parameter UNet, every width / 4 (CPU benchmark)
    python3 bench/models.py --size full --out DIR      # the real SDXL architecture (GPU benchmark; ~7 GB)
    python3 bench/models.py --size full --count        # parameter counts only (meta device, no memory)
    python3 bench/models.py --tiny --out DIR           # lora_trainer.testing.tiny's sdxl, for quick checks

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

Both use lora_trainer.testing.tiny's byte-level CLIP tokenizer (vocabulary of 1,000), so the saved text encoders get
``vocab_size`` 1000 instead of 49408 (only the embedding table shrinks; a lookup costs no FLOPs). ``--count``
reports the real 49408 vocabulary.

FLUX.1 (``--model flux``; the builder is ``build_flux_components`` / ``make_flux_model``):

    python3 bench/models.py --model flux --size reduced --out DIR   # the CPU stand-in (transformer 82M)
    python3 bench/models.py --model flux --size full --count        # parameter counts (meta device)
    python3 bench/models.py --model flux --flops                    # FLOP shares of the naive step, real vs reduced

- ``full``: black-forest-labs/FLUX.1-dev's published config.json values: transformer (19 double + 38 single
  blocks, 24 heads x 128 = 3072, joint_attention_dim 4096, pooled 768, axes_dims_rope (16, 56, 56), guidance
  embedder; 11.9B parameters), VAE (128, 256, 512, 512), 16 latent channels, no quant convs, scaling 0.3611,
  shift 0.1159), CLIP-L text tower (768 x 12 layers), T5 v1.1 XXL encoder (d_model 4096, d_ff 10240, 64 heads x
  64, 24 layers, gated-gelu).
- ``full`` with ``t5="standin"`` (the GPU benchmark's default): the same transformer, VAE and CLIP-L, but a T5
  *stand-in* with the real output width (d_model 4096 = joint_attention_dim, d_ff 10240, 64 heads x 64) and only
  2 layers instead of 24: train_lora caches its output once, so only the transformer's memory and speed matter,
  and the stand-in saves 9 GB of host RAM, disk and load time per run. ``t5="full"`` builds the real 24 layers.
- ``reduced`` (the CPU stand-in): the real width ratios, fewer blocks. Transformer 6 heads x 128 = 768 (head dim
  and RoPE axes (16, 56, 56) unchanged), 2 double + 4 single blocks (real 19 + 38), joint_attention_dim 1024,
  pooled 192, MLP ratio 4, guidance embedder (dev). Every other width / 4 with depths and head counts unchanged,
  the quarter-SDXL rule: VAE (32, 64, 128, 128), 16 latent channels, 8 GroupNorm groups (4 channels per group, as
  the real 128 / 32); CLIP-L-like 192 x 12 layers, 12 heads (head dim 16); T5-like d_model 1024, d_ff 2560,
  64 heads x 16, 24 layers, gated-gelu. ``t5_layers`` overrides the T5 depth: with the transformer cut from 57 to
  6 blocks and the encoders kept at full depth, the encoders weigh ~10x more against the transformer than in the
  real model (``--flops`` prints both; bench/RESULTS.md discusses what that does to the naive/train_lora ratio).

FLUX models use lora_trainer.testing.tiny's byte-level CLIP tokenizer (vocabulary 1,000) and lora_trainer.testing.t5's T5
tokenizer (vocabulary 512, model_max_length 512), so the saved encoders get those vocabulary sizes; ``--count``
reports the real 49408 / 32128.
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
    else:  # lora_trainer.testing.tiny's tokenizer puts BOS / EOS last
        bos, eos = vocab_size - 2, vocab_size - 1
    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_id, **kw)


def build_components(size: str = "full", *, vocab_size: int | None = None, seed: int = 0) -> dict:
    """Random-weight unet, vae, text_encoder, text_encoder_2 (fp32, on the current default device)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.testing.tiny import VOCAB_SIZE

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

    from lora_trainer.testing.tiny import _write_vocab_files, make_tiny_tokenizer

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
    """Build and save: size in 'tiny' (lora_trainer.testing.tiny's sdxl), 'quarter', 'full'."""
    import torch

    out = Path(out)
    if size == "tiny":
        from lora_trainer.testing.tiny import make_tiny_pipeline

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


# ============================================================================================ FLUX.1
REAL_T5_VOCAB = 32128
# black-forest-labs/FLUX.1-dev: transformer/config.json
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# vae/config.json
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
                force_upcast=True)
# text_encoder/config.json (CLIP ViT-L/14 text tower; FLUX reads its pooled output only)
FLUX_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
# text_encoder_2/config.json (google/t5-v1_1-xxl encoder)
FLUX_T5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
               dropout_rate=0.1, tie_word_embeddings=False)
# scheduler/scheduler_config.json
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
T5_STANDIN_LAYERS = 2


def random_components(build, device, dtype=None) -> dict:
    """``build()``'s modules (random weights) made on ``device`` directly in ``dtype`` (None: torch's default), the
    VAE then in fp32 as the trainer encodes. Built in the target dtype, not cast after: a 20 B transformer initialised
    in fp32 first would take 80 GB of the card before its cast."""
    import torch

    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype or old)
        with torch.device(device):
            comps = build()
    finally:
        torch.set_default_dtype(old)
    if "vae" in comps:
        comps["vae"].to(dtype=torch.float32)
    return comps


def flux_configs(size: str = "full", *, t5: str = "full", t5_layers: int | None = None) -> dict:
    """transformer / vae / clip / t5 constructor kwargs for 'full' or 'reduced' (see the module docstring)."""
    tr, vae, clip, t5c = dict(FLUX_TRANSFORMER), dict(FLUX_VAE), dict(FLUX_CLIP), dict(FLUX_T5)
    if size == "full":
        if t5 == "standin":
            t5c["num_layers"] = T5_STANDIN_LAYERS
        elif t5 != "full":
            raise ValueError(f"t5 must be 'full' or 'standin', got {t5!r}")
    elif size == "reduced":
        d = 4
        tr.update(num_attention_heads=6, num_layers=2, num_single_layers=4,
                  joint_attention_dim=FLUX_T5["d_model"] // d, pooled_projection_dim=FLUX_CLIP["hidden_size"] // d)
        vae.update(block_out_channels=tuple(c // d for c in FLUX_VAE["block_out_channels"]),
                   norm_num_groups=FLUX_VAE["norm_num_groups"] // d)  # 4 channels per group, as the real VAE
        clip.update({k: clip[k] // d for k in ("hidden_size", "intermediate_size", "projection_dim")})
        t5c.update(d_model=FLUX_T5["d_model"] // d, d_ff=FLUX_T5["d_ff"] // d, d_kv=FLUX_T5["d_kv"] // d)
    else:
        raise ValueError(f"size must be 'full' or 'reduced', got {size!r}")
    if t5_layers:
        t5c["num_layers"] = t5_layers
    # What the transformer reads from the encoders: T5's hidden states, CLIP's pooled (= hidden) vector.
    assert tr["joint_attention_dim"] == t5c["d_model"] and tr["pooled_projection_dim"] == clip["hidden_size"]
    assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"]
    assert t5c["num_heads"] * t5c["d_kv"] == t5c["d_model"]
    return {"transformer": tr, "vae": vae, "clip": clip, "t5": t5c}


def flux_description(size: str, *, t5: str = "full", t5_layers: int | None = None) -> str:
    c = flux_configs(size, t5=t5, t5_layers=t5_layers)
    tr, t5c, clip = c["transformer"], c["t5"], c["clip"]
    return (f"{'full' if size == 'full' else 'reduced'} FLUX.1-dev: transformer {tr['num_attention_heads']}x"
            f"{tr['attention_head_dim']}, {tr['num_layers']}+{tr['num_single_layers']} blocks; VAE "
            f"{tuple(c['vae']['block_out_channels'])}; CLIP {clip['hidden_size']}x{clip['num_hidden_layers']}; "
            f"T5 {t5c['d_model']}x{t5c['num_layers']}")


def build_flux_components(size: str = "full", *, t5: str = "full", t5_layers: int | None = None,
                          clip_vocab: int | None = None, t5_vocab: int | None = None, seed: int = 0,
                          dtype=None) -> dict:
    """Random-weight transformer, vae, text_encoder (CLIP), text_encoder_2 (T5) on the current default device.

    dtype: build the transformer and both encoders directly in that dtype (bf16 for the full model on a GPU: 24 GB
    instead of 48, no fp32 copy anywhere); the VAE is always fp32 (as the trainer and the naive loop run it).
    """
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from lora_trainer.testing.tiny import VOCAB_SIZE
    from lora_trainer.testing.t5 import T5_VOCAB_SIZE

    cfg = flux_configs(size, t5=t5, t5_layers=t5_layers)
    cv = clip_vocab or VOCAB_SIZE
    tv = t5_vocab or T5_VOCAB_SIZE
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if dtype is not None:
                torch.set_default_dtype(dtype)
            transformer = FluxTransformer2DModel(**cfg["transformer"])
            # FLUX pools CLIP-L's EOS token (no projection); the tiny tokenizer pads with EOS, as CLIP-L does.
            clip = CLIPTextModel(_text_config(cfg["clip"], vocab_size=cv, pad_id=cv - 1))
            t5m = T5EncoderModel(T5Config(vocab_size=tv, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                          **cfg["t5"]))
        finally:
            torch.set_default_dtype(old)
        vae = AutoencoderKL(**cfg["vae"])
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5m}


def count_flux_params(size: str, *, t5: str = "full", t5_layers: int | None = None) -> dict:
    import torch

    with torch.device("meta"):
        comps = build_flux_components(size, t5=t5, t5_layers=t5_layers, clip_vocab=REAL_VOCAB, t5_vocab=REAL_T5_VOCAB)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items()}


def save_flux_pipeline(comps: dict, out: Path) -> Path:
    """Write a diffusers FluxPipeline folder (safetensors, 10 GB shards) that train_lora.py loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from lora_trainer.testing.tiny import _write_vocab_files, make_tiny_tokenizer
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=comps["vae"],
                        text_encoder=comps["text_encoder"], tokenizer=make_tiny_tokenizer(),
                        text_encoder_2=comps["text_encoder_2"], tokenizer_2=make_tiny_t5_tokenizer(),
                        transformer=comps["transformer"])
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    _write_vocab_files(out / "tokenizer")
    return out


def make_flux_model(out: Path, size: str, *, t5: str = "full", t5_layers: int | None = None, seed: int = 0,
                    dtype=None, device=None, quiet: bool = False) -> Path:
    """Build and save: size in 'tiny' (lora_trainer.testing.tiny's flux1-dev), 'reduced', 'full'.

    device: where to initialise (a GPU is seconds for the 12B transformer, the host minutes); the weights are
    saved from there (safetensors copies each tensor to the host as it writes it).
    """
    import torch

    out = Path(out)
    if size == "tiny":
        from lora_trainer.testing.tiny import make_tiny_pipeline

        return make_tiny_pipeline(out, "flux1-dev", seed=seed)
    t = time.perf_counter()
    with torch.device(device or "cpu"):
        comps = build_flux_components(size, t5=t5, t5_layers=t5_layers, seed=seed, dtype=dtype)
    n = sum(p.numel() for p in comps["transformer"].parameters())
    t_build = time.perf_counter() - t
    path = save_flux_pipeline(comps, out)
    if not quiet:
        print(f"{size} FLUX.1-dev written to {path}: transformer {n / 1e6:.1f}M parameters (built in {t_build:.1f} s, "
              f"total {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    del comps
    return path


def flux_flops(size: str, *, resolution: int = 256, t5: str = "full", t5_layers: int | None = None,
               max_sequence_length: int = 512, rank: int = 16) -> dict:
    """FLOPs (FlopCounterMode, meta device) of what the naive step runs at batch 1: VAE encode, CLIP, T5, and the
    transformer forward + backward with rank-`rank` LoRA on the family's default targets (input gradients only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lora_trainer.families import SPECS

    from lora_trainer.families.spec import peft_targets

    with torch.device("meta"):
        comps = build_flux_components(size, t5=t5, t5_layers=t5_layers, clip_vocab=REAL_VOCAB, t5_vocab=REAL_T5_VOCAB)
    tr = comps["transformer"]
    from peft import LoraConfig

    layers = {n: (2 if isinstance(m, torch.nn.Linear) else 0) for n, m in tr.named_modules() if n}
    targets = peft_targets(SPECS["flux1"].targets("auto"), layers)
    tr.requires_grad_(False)
    with torch.device("meta"):
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    h = resolution // 8
    out = {}

    def count(fn) -> int:
        with FlopCounterMode(display=False) as c:
            fn()
        return int(c.get_total_flops())

    with torch.device("meta"):
        out["vae_encode"] = count(lambda: comps["vae"].encode(torch.randn(1, 3, resolution, resolution)))
        out["clip"] = count(lambda: comps["text_encoder"](torch.zeros(1, 77, dtype=torch.long)))
        out["t5"] = count(lambda: comps["text_encoder_2"](torch.zeros(1, max_sequence_length, dtype=torch.long)))
        from lora_trainer.families.flux1.adapter import image_ids

        def step():
            x = torch.randn(1, (h // 2) ** 2, 64)
            y = tr(hidden_states=x, timestep=torch.ones(1), guidance=torch.ones(1),
                   pooled_projections=torch.randn(1, comps["text_encoder"].config.hidden_size),
                   encoder_hidden_states=torch.randn(1, max_sequence_length, comps["text_encoder_2"].config.d_model),
                   txt_ids=torch.zeros(max_sequence_length, 3), img_ids=image_ids(h, h, "meta", torch.float32),
                   return_dict=False)[0]
            y.float().square().mean().backward()
        out["transformer_fwd_bwd"] = count(step)
    out["lora_layers"] = sum(1 for n, _ in tr.named_modules() if n.endswith(".lora_A"))
    out["lora_params"] = sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sdxl", "flux"), default="sdxl")
    ap.add_argument("--size", choices=("full", "quarter", "reduced"),
                    help="sdxl: full | quarter (default); flux: full | reduced (default)")
    ap.add_argument("--t5", choices=("full", "standin"), default="full", help="flux --size full: the T5 encoder")
    ap.add_argument("--t5-layers", type=int, help="flux: override the T5 depth")
    ap.add_argument("--flops", action="store_true", help="flux: FLOPs of the naive step's parts, full vs reduced")
    ap.add_argument("--resolution", type=int, default=256, help="for --flops")
    ap.add_argument("--tiny", action="store_true", help="lora_trainer.testing.tiny's sdxl instead (quick checks)")
    ap.add_argument("--out", help="folder to write the diffusers pipeline to")
    ap.add_argument("--count", action="store_true", help="print parameter counts only (no weights allocated)")
    ap.add_argument("--bf16", action="store_true", help="store UNet and text encoders in bf16 (VAE stays fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model == "flux":
        return flux_main(args)
    args.size = args.size or "quarter"
    if args.size == "reduced":
        ap.error("--size reduced is a flux size")

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


def flux_main(args) -> int:
    size = args.size or "reduced"
    if size == "quarter":
        raise SystemExit("--size quarter is an sdxl size; flux has full and reduced")
    if args.flops:
        for sz, kw in (("full", {}), ("reduced", {"t5_layers": args.t5_layers})):
            f = flux_flops(sz, resolution=args.resolution, **kw)
            enc = f["vae_encode"] + f["clip"] + f["t5"]
            total = enc + f["transformer_fwd_bwd"]
            print(f"{sz:>8} at {args.resolution} px ({flux_description(sz, **kw)}): transformer fwd+bwd "
                  f"{f['transformer_fwd_bwd'] / 1e9:.1f} GFLOP ({f['lora_layers']} LoRA layers), VAE encode "
                  f"{f['vae_encode'] / 1e9:.1f}, CLIP {f['clip'] / 1e9:.2f}, T5 {f['t5'] / 1e9:.1f}; encoders = "
                  f"{100 * enc / total:.1f}% of the naive step's FLOPs -> a cache-only ratio of "
                  f"{f['transformer_fwd_bwd'] / total:.2f}x")
        return 0
    if args.count or not args.out:
        for sz, kw in (("full", {}), ("full", {"t5": "standin"}), ("reduced", {"t5_layers": args.t5_layers})):
            counts = count_flux_params(sz, **kw)
            print(f"{flux_description(sz, **kw)}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
        if not args.out:
            return 0
    import torch

    make_flux_model(Path(args.out), "tiny" if args.tiny else size, t5=args.t5, t5_layers=args.t5_layers,
                    seed=args.seed, dtype=torch.bfloat16 if args.bf16 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
