"""How Anima is recognised from its files (torch-free).

diffusers folder: an ``AnimaModularPipeline`` (``_class_name`` of ``modular_model_index.json``, or of a
``model_index.json``); one variant. Cosmos-Predict2's own pipelines (T5-XXL, no text conditioner) are not Anima.

single file (ComfyUI's ``anima-*.safetensors``, Cosmos-Predict2's MiniTrainDIT names): ``blocks.N.self_attn`` /
``cross_attn`` / ``adaln_modulation_self_attn`` with ``x_embedder.proj.1`` and ``t_embedding_norm``, bare, under
``net.`` or ``model.diffusion_model.``. A Cosmos-Predict2 file has the same transformer names but no ``llm_adapter``:
without it a file could be either, and the file is still trained as Anima's transformer (the conditioner comes from
the config source); the evidence says whether the adapter was seen.
"""
from __future__ import annotations

from ..signature import DIT, FileKeys, Match, Signature, no_folder_rule, no_variant

PIPELINES = frozenset({"AnimaModularPipeline"})
_MARKERS = ("blocks.0.self_attn.q_proj.weight", "blocks.0.cross_attn.k_proj.weight",
            "blocks.0.adaln_modulation_self_attn.1.weight", "x_embedder.proj.1.weight", "t_embedding_norm.weight")


def match_file(k: FileKeys) -> Match | None:
    names = {n.removeprefix("net.") for n in k.dit}
    if not all(m in names for m in _MARKERS):
        return None
    adapter = any(n.startswith("llm_adapter.") for n in names)
    return Match("Cosmos-Predict2 (MiniTrainDIT) layout: blocks.*.self_attn / cross_attn / adaln_modulation_*, "
                 f"x_embedder.proj.1, t_embedding_norm{k.where}"
                 + ("; llm_adapter (Anima's text conditioner)" if adapter else "; no llm_adapter"))


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=no_variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    # ComfyUI ships the Qwen VAE and Qwen3-0.6B as separate files: a single file is the transformer (+ adapter).
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Anima / Cosmos layout", ("self_attn.q_proj", "adaln_modulation_self_attn", "llm_adapter")))
