"""What the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) share as plain data: target presets, blocks."""
from __future__ import annotations

SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def sd_presets(blocks: tuple[str, ...] = UNET_BLOCKS) -> dict[str, tuple[str, ...]]:
    return {"attention": SD_ATTENTION,
            "attention_mlp": SD_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
            "all_linear": tuple(f"{b}.*" for b in blocks)}
