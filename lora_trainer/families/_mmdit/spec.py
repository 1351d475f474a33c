"""What the flow-matching MMDiT families (FLUX.1, SD3/3.5) share as plain data: target patterns."""
from __future__ import annotations

# Joint attention: the image stream (to_*) and the text stream (add_*, to_add_out); FLUX's single blocks and
# SD3.5-medium's attn2 have to_q/k/v too, so the suffixes reach them.
MMDIT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MMDIT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# Hidden size = heads x head dim, depth = joint (+ single) blocks, as their transformers' config.json name them;
# a config.json without them is taken for FLUX.1's joint blocks (24 x 128 wide, 19 deep).
# The adaLN modulation Linears of the joint and single blocks read only the timestep + pooled-text embedding.
MMDIT_ACTIVATION_KEYS = {"width_keys": {"num_attention_heads": 24, "attention_head_dim": 128},
                         "depth_keys": {"num_layers": 19, "num_single_layers": 0},
                         "conditioning_inputs": ("norm1.linear", "norm1_context.linear", "norm.linear"),
                         "checkpoint_units": ("transformer_blocks", "single_transformer_blocks")}
