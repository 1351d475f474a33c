"""How FLUX.2 klein is recognised from its files (torch-free).

diffusers folder: a ``Flux2KleinPipeline`` class (its KV and inpaint pipelines hold the same components); variant
by depth (_flux2/signature.py): "klein-4b" or "klein-9b". A guidance embedder (``guidance_embeds``) is FLUX.2-dev's.

single file (BFL FLUX.2 layout) without ``guidance_in.*``: variant by depth likewise.

Distilled: ``is_distilled: true`` in model_index.json (the step-distilled FLUX.2-klein-4B / -9B releases), or, before
a download and for single files, BFL's release name without "base" (FLUX.2-klein-4B, flux-2-klein-9b.safetensors);
the base checkpoints are what peers train on.
"""
from __future__ import annotations

from collections.abc import Mapping

from .._flux2.signature import KLEIN_BASE, LORA_LAYOUT, is_flux2_file, klein_variant_of_config, klein_variant_of_file
from ..signature import DIT, Distilled, DistillFacts, FileKeys, Match, Signature, no_folder_rule

PIPELINES = frozenset({"Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"})
# BFL's names: hub repos FLUX.2-klein-4B / FLUX.2-klein-base-4B, files flux-2-klein-4b.safetensors / -base-4b.
_RELEASE_NAMES = ("flux.2-klein", "flux-2-klein", "flux2-klein")


def variant(tcfg: Mapping):
    if not tcfg:
        return None, "", None
    if tcfg.get("guidance_embeds"):
        return None, "", ("a FLUX.2 transformer with a guidance embedder in a klein pipeline", "FLUX.2-dev's transformer",
                          "use a Flux2Pipeline folder for FLUX.2-dev (model_type flux2)")
    return (*klein_variant_of_config(tcfg), None)


def match_file(k: FileKeys) -> Match | None:
    if not is_flux2_file(k) or k.dit_has("guidance_in."):
        return None
    size, evidence = klein_variant_of_file(k)
    return Match(f"BFL FLUX.2 layout: single_stream_modulation{k.where}; no guidance_in (klein); {evidence}", size)


def distilled(facts: DistillFacts) -> Distilled | None:
    size = klein_variant_of_config(facts.denoiser_config)[0] if facts.denoiser_config else None
    name = facts.name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if "is_distilled" in facts.pipeline_config:
        if not facts.pipeline_config["is_distilled"]:
            return None
        evidence = "model_index.json is_distilled: true"
    elif any(n in name for n in _RELEASE_NAMES) and "base" not in name:
        evidence = f"the name {facts.name!r}: BFL's name for a klein release without base"
        size = size or ("klein-9b" if "9b" in name else "klein-4b" if "4b" in name else None)
    else:
        return None
    label = {"klein-4b": "4B", "klein-9b": "9B"}.get(size or "", "")
    base = KLEIN_BASE.get(size or "", "black-forest-labs/FLUX.2-klein-base-4B (or -9B, the same size)")
    return Distilled(f"FLUX.2 klein {label} (distilled)".replace("  ", " "), evidence, base,
                     "it is step-distilled to sample in 4 steps without CFG; a LoRA trained on it shifts that")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(), file_prediction="flow", file_prediction_note=None, lora_layout=LORA_LAYOUT,
    distilled=distilled)
