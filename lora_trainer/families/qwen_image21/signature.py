"""How Qwen-Image 2.1 is recognised from its files (torch-free).

diffusers folder: a ``QwenImage21Pipeline``. A Turbo release (diffusers ships ``QwenImage21TurboModularPipeline`` for
a step-distilled checkpoint, 8 steps without guidance) is told by its name: ``distilled`` warns and names the base.

single file (ComfyUI's layout, diffusers CHECKPOINT_KEY_NAMES "qwen-image-2.1"): diffusers' module names under
``model.diffusion_model.`` or bare, marked by ``txt_in.text_norm`` (Qwen-Image's is ``txt_norm``), the shared
``modulation.1`` and ``img_mlp`` either separate (``proj`` / ``gate_layer``) or fused (``gate_up``, gate rows first),
which diffusers' convert_qwen_image21_transformer_checkpoint_to_diffusers splits.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import DIT, Distilled, DistillFacts, FileKeys, Match, Refusal, Signature, no_folder_rule

PIPELINES = frozenset({"QwenImage21Pipeline"})
BASE_REPO = "Qwen/Qwen-Image-2.1"
_MARKERS = ("txt_in.text_norm.weight", "img_in.weight", "modulation.1.weight")


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json: one variant."""
    if tcfg.get("causal_condition") is False:
        return None, "", ("a Qwen-Image 2.1 transformer with causal_condition false",
                          "a Qwen-Image 2.1 transformer not modulated as the released one",
                          f"use {BASE_REPO}")
    return None, "", None


def match_file(k: FileKeys) -> Match | Refusal | None:
    if not all(m in k.dit for m in _MARKERS):
        return None
    return Match(f"Qwen-Image 2.1 layout: txt_in.text_norm, img_in, modulation.1{k.where}")


def distilled(facts: DistillFacts) -> Distilled | None:
    cls = str(facts.pipeline_config.get("_class_name", ""))
    if "turbo" not in facts.name.lower() and "Turbo" not in cls:
        return None
    evidence = f"model_index.json _class_name {cls}" if "Turbo" in cls else f"the name {facts.name!r}"
    return Distilled("Qwen-Image 2.1 Turbo (step-distilled)", evidence, BASE_REPO,
                     "a LoRA trained on a step-distilled checkpoint degrades its few-step sampling (as with Z-Image "
                     "Turbo); train on the base and apply the LoRA to Turbo if it must be used")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    # The VAE and the Qwen3-VL encoder ship as separate files: a single file is the transformer.
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Qwen-Image 2.1 layout", ("img_mlp.gate_layer", "txt_in.in_layer")),
    distilled=distilled)
