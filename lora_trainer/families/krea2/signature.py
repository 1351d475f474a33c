"""How Krea 2 is recognised from its files (torch-free).

diffusers folder: a ``Krea2Pipeline``; Raw and Turbo have one transformer config (no variants).

single file (the original krea-ai/krea-2 layout, which ComfyUI-style releases keep: ``first``, ``blocks.N.attn.wq``,
``txtfusion.projector``, ``last.linear``), bare or under ``model.diffusion_model.``; diffusers 0.42.1 converts it
(single_file_utils ``convert_krea2_transformer_checkpoint_to_diffusers``, detected by ``txtfusion.projector.weight``).

Turbo (8-step distilled): ``is_distilled: true`` in model_index.json, or "turbo" in the name before a download and
for single files: ``distilled`` warns and names Krea-2-Raw, the checkpoint the authors and peers train on.
"""
from __future__ import annotations

from ..signature import DIT, Distilled, DistillFacts, FileKeys, Match, Signature, no_folder_rule, no_variant
from .spec import RAW_REPO

PIPELINES = frozenset({"Krea2Pipeline"})
_MARKERS = ("first.weight", "txtfusion.projector.weight", "blocks.0.attn.wq.weight", "last.linear.weight")


def match_file(k: FileKeys) -> Match | None:
    if not all(m in k.dit for m in _MARKERS):
        return None
    return Match(f"Krea 2 layout: first, blocks.*.attn.wq, txtfusion.projector, last.linear{k.where}")


def distilled(facts: DistillFacts) -> Distilled | None:
    if "is_distilled" in facts.pipeline_config:
        if not facts.pipeline_config["is_distilled"]:
            return None
        evidence = "model_index.json is_distilled: true"
    elif "turbo" in facts.name.replace("\\", "/").rsplit("/", 1)[-1].lower():
        evidence = f"the name {facts.name!r}"
    else:
        return None
    return Distilled("Krea 2 Turbo (8-step distilled)", evidence, RAW_REPO,
                     "Turbo is TDM-distilled to sample in 8 steps without CFG; train on Raw (the authors' and "
                     "diffusers' example do) and sample on Turbo with validation_base_model: LoRAs trained on Raw "
                     "express strongly on Turbo")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=no_variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    # ComfyUI-style releases ship the VAE and Qwen3-VL separately: a single file is the transformer.
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Krea 2 layout", ("txtfusion", "text_fusion", ".attn.wq", ".attn.to_gate")), distilled=distilled)
