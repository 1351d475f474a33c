"""How Ideogram 4 is recognised from its files (torch-free).

diffusers folder: an ``Ideogram4Pipeline`` (one release, no variant; the folder holds both transformers).

single file: the transformer in the original layout the peers' own models use (ai-toolkit, musubi-tuner,
SimpleTuner: ``layers.N.attention.qkv`` fused, ``attention.o``; reference families-2026 section 2), or in diffusers'
names, bare or under ``model.diffusion_model.``: ``llm_cond_proj`` with the blocks' lowercase ``adaln_modulation``
(Z-Image's original layout also fuses ``attention.qkv`` but has ``cap_embedder`` and ``adaLN_modulation.0``).
diffusers 0.42.1 has no single-file converter for it; convert.py maps the layout. What the file lacks (the
unconditional transformer, the VAE, Qwen3-VL, the tokenizer) comes from the config repo.
"""
from __future__ import annotations

from ..signature import DIT, FileKeys, Match, Signature, no_folder_rule, no_variant

PIPELINES = frozenset({"Ideogram4Pipeline"})


def match_file(k: FileKeys) -> Match | None:
    if "llm_cond_proj.weight" not in k.dit or "layers.0.adaln_modulation.weight" not in k.dit:
        return None
    if "layers.0.attention.qkv.weight" in k.dit:
        return Match(f"Ideogram 4 layout: llm_cond_proj, layers.*.attention.qkv, layers.*.adaln_modulation{k.where}")
    if "layers.0.attention.to_q.weight" in k.dit:
        return Match(f"Ideogram 4 transformer in diffusers' names: llm_cond_proj, layers.*.attention.to_q{k.where}")
    return None


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=no_variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Ideogram 4 layout", ("adaln_modulation", ".attention.o.", "feed_forward.w1")))
