"""What the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) share as plain data."""
from __future__ import annotations

SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
# The ModuleLists offload_blocks streams and shard_base shards (the mid block is a single module).
UNET_REPEATED_BLOCKS = ("down_blocks", "up_blocks")
UNET_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer"}
UNET_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The memory plan's facts (families/spec.py Activations): the Linears that read only the conditioning (each resnet's
# timestep projection, cross-attention keys / values), and what gradient checkpointing recomputes on its own (each
# resnet, each transformer block of the attentions).
UNET_ACTIVATION_KEYS = {"conditioning_inputs": ("time_emb_proj", "attn2.to_k", "attn2.to_v"),
                        "checkpoint_units": ("resnets", "transformer_blocks")}


def sd_presets(blocks: tuple[str, ...] = UNET_BLOCKS) -> dict[str, tuple[str, ...]]:
    return {"attention": SD_ATTENTION,
            "attention_mlp": SD_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
            "all_linear": tuple(f"{b}.*" for b in blocks)}
