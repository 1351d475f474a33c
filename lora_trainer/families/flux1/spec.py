"""FLUX.1 (dev, schnell) as plain data (torch-free)."""
from __future__ import annotations

from .._mmdit.spec import MMDIT_ATTENTION, MMDIT_MLP
from ..spec import FamilySpec, FlowDefaults

# VAE 8x, then 2x2 latent packing -> 16 px. Training draws sigmas from a sigmoid(N(0,1)) (ai-toolkit, SimpleTuner,
# kohya's recommendation) and, for dev, shifts them by FLUX's resolution-dependent mu, the same shift its sampler
# applies, so training spends its steps where sampling does; schnell samples unshifted.
# Guidance: FLUX.1-dev's guidance embedder is fed 1.0 in training (BFL's advice, black-forest-labs/flux #79;
# ai-toolkit and SimpleTuner default): LoRAs trained at 3.5 come out weaker when sampled at 3.5.
SPEC = FamilySpec(
    "flux1", "FLUX.1", "flow", ("transformer",), ("text_encoder", "text_encoder_2"), ("text_encoder",), 1024,
    True, 16,
    {"attention": MMDIT_ATTENTION,
     "attention_mlp": MMDIT_ATTENTION + MMDIT_MLP + ("proj_mlp", "single_transformer_blocks.*.proj_out"),
     "all_linear": ("transformer_blocks.*", "single_transformer_blocks.*")},
    "attention_mlp", flow=FlowDefaults(sigma_sampling="sigmoid", shift="resolution"), sample_guidance=3.5,
    train_guidance={"dev": 1.0, "schnell": None}, max_sequence_length={"dev": 512, "schnell": 256, None: 512},
    single_file_config_repo={"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell",
                             None: "black-forest-labs/FLUX.1-dev"},
    blocks=("transformer_blocks", "single_transformer_blocks"))
