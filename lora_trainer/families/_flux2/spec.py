"""What the FLUX.2 families (dev, klein) share as plain data: target presets, flow defaults, memory figures, tool
names (torch-free)."""
from __future__ import annotations

from ..spec import Activations, FlowDefaults, ToolNames

# Double blocks: joint attention over the image (to_*) and text (add_*, to_add_out) streams. Single blocks are fully
# fused: to_qkv_mlp_proj is q, k, v and the MLP's input in one Linear and attn.to_out the attention output and MLP
# output in one, so "attention" cannot exclude their MLP part (diffusers' train_dreambooth_lora_flux2 default targets
# the same single-block Linears). "attn.to_out" alone would name the double blocks' ModuleList, hence the pattern.
FLUX2_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")
FLUX2_MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
FLUX2_PRESETS = {"attention": FLUX2_ATTENTION, "attention_mlp": FLUX2_ATTENTION + FLUX2_MLP,
                 # The blocks hold no modulation Linears (FLUX.2 shares them model-wide), so this equals attention_mlp.
                 "all_linear": ("transformer_blocks.*", "single_transformer_blocks.*")}

# VAE 8x, then 2x2 patchify -> 16 px per token. Inference shifts sigmas by compute_empirical_mu (token count and
# step count: mu ~2.0 at 1024 px / 50 steps); diffusers' scripts train unshifted uniform sigmas (the dynamic-shift
# scheduler config makes its table unshifted), ai-toolkit sigmoid(N(0, 1)) unshifted. We draw sigmoid and shift by
# the scheduler config's resolution rule (mu 1.15 at 4096 tokens, 1024 px) like FLUX.1-dev: between the two, and
# closer to where the sampler spends its steps. flow_* keys override.
FLUX2_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="resolution")

# Width = heads x head dim, depth = double + single blocks (config.json keys; defaults: FLUX.2-dev's). The Linears
# fed only by the timestep (+ guidance) embedding are model-wide modulations; context_embedder reads the frozen text.
FLUX2_ACTIVATIONS = Activations(
    kind="transformer", width_keys={"num_attention_heads": 48, "attention_head_dim": 128},
    depth_keys={"num_layers": 8, "num_single_layers": 48},
    conditioning_inputs=("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                         "single_stream_modulation.linear", "norm_out.linear", "context_embedder"),
    checkpoint_units=("transformer_blocks", "single_transformer_blocks"),
    # Saved-for-backward bytes per block against FLUX.1's at equal tokens and width (CPU, bf16 autocast, 4 x 128 wide,
    # 1280 tokens, r16, saved_tensors_hooks): attention preset double 1.2x, single 1.45x (its to_qkv_mlp_proj and
    # to_out carry the MLP too), attention_mlp 1.14x / 1.12x; weighted by klein 9B's 8 + 24 blocks ~1.4. The CPU
    # keeps the attention matrix, which a GPU's fused attention does not: bench/device_flux2.py measures the card.
    block_scale=1.4)
FLUX2_BLOCKS = ("transformer_blocks", "single_transformer_blocks")

# musubi-tuner (src/musubi_tuner/utils/sai_model_spec.py ARCH_FLUX_2_*, IMPL_FLUX_2; ss_base_model_version is its
# architecture_full_name: dataset/image_video_dataset.py ARCHITECTURE_FLUX_2_*_FULL).
FLUX2_IMPL = "https://github.com/black-forest-labs/flux2"
FLUX2_DEV_NAMES = ToolNames("flux_2_dev", "Flux.2-dev", FLUX2_IMPL)
FLUX2_KLEIN_4B_NAMES = ToolNames("flux_2_klein_4b", "Flux.2-klein-4b", FLUX2_IMPL)
FLUX2_KLEIN_9B_NAMES = ToolNames("flux_2_klein_9b", "Flux.2-klein-9b", FLUX2_IMPL)
