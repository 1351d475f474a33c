"""SD2.x as plain data (torch-free): 768 px v-prediction (2.0-v / 2.1) or 512 px epsilon (2.x-base)."""
from __future__ import annotations

from dataclasses import replace

from .._unet.spec import UNET_CLASSES
from ..sd15.spec import SPEC as SD15
from ..spec import CLIP_LAYERS, EncoderReads, TextEntry, ToolNames

# OpenCLIP ViT-H (diffusers format already drops its last layer); the same conditioning as SD1.x.
SPEC = replace(
    SD15, name="sd2", label="SD2.x", display_name="Stable Diffusion 2.x", component_classes=UNET_CLASSES,
    # last_hidden_state of the (already shortened) encoder, as SD1.x
    text_encoder_reads={"text_encoder": EncoderReads(CLIP_LAYERS, -1)},
    tool_file_dora=True, kohya_v2=True, default_resolution=768, prediction_resolution={"epsilon": 512},
    single_file_config_repo={None: "stabilityai/stable-diffusion-2-1"}, gated_repos=(),
    text_entry=TextEntry(tokens=77, sequence=False, width=1024, pooled=0),
    tool_names={None: ToolNames("sd_v2", "stable-diffusion-v2-512", "diffusers"),
                "v": ToolNames("sd_v2", "stable-diffusion-v2-768-v", "diffusers")})
