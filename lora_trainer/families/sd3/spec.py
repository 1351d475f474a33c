"""SD3 / SD3.5 as plain data (torch-free)."""
from __future__ import annotations

from .._mmdit.spec import MMDIT_ATTENTION, MMDIT_MLP
from ..spec import FamilySpec, FlowDefaults

# VAE 8x, patch 2 -> 16 px. Logit-normal sigmas with the static shift 3.0 of its scheduler and x0 preconditioning:
# what diffusers' and kohya's SD3 scripts do by default.
SPEC = FamilySpec(
    "sd3", "SD3/3.5", "flow", ("transformer",), ("text_encoder", "text_encoder_2", "text_encoder_3"),
    ("text_encoder", "text_encoder_2"), 1024, True, 16,
    {"attention": MMDIT_ATTENTION, "attention_mlp": MMDIT_ATTENTION + MMDIT_MLP,
     "all_linear": ("transformer_blocks.*",)},
    "attention", flow=FlowDefaults(sigma_sampling="logit_normal", shift="static", shift_value=3.0,
                                   precondition_outputs=True),
    sample_guidance=7.0, max_sequence_length={None: 256},
    single_file_config_repo={"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
                             "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
                             "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
                             None: "stabilityai/stable-diffusion-3.5-large"},
    blocks=("transformer_blocks",))
