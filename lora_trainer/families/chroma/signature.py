"""How Chroma is recognised from its files (torch-free).

diffusers folder: a ``ChromaPipeline`` (Img2Img / Inpaint hold the same components). Chroma1-HD and Chroma1-Base
share every config: one variant. Chroma1-Flash (step- and CFG-distilled) has the same files too, told by its name:
``distilled`` warns and names the base to train on.

single file (``Chroma1-HD.safetensors``, BFL layout, bare or under ``model.diffusion_model.``): FLUX.1's double and
single blocks with ``distilled_guidance_layer.*`` (the approximator) where FLUX.1 has ``time_in`` / ``vector_in`` /
``guidance_in`` and per-block ``img_mod.lin``; _mmdit/signature.py gives such files to Chroma, never to FLUX.1.
Chroma Radiance (pixel space: a conv ``img_in_patch`` and a NeRF head instead of ``img_in`` and ``final_layer``)
is refused."""
from __future__ import annotations

import re
from collections.abc import Mapping

from .._mmdit.signature import T5XXL, VAE, dit_family
from ..signature import DIT, Distilled, DistillFacts, FileKeys, Match, Refusal, Signature, no_folder_rule

PIPELINES = frozenset({"ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"})
BASE_REPO = "lodestones/Chroma1-HD"
_FLASH = re.compile(r"chroma[^/]*flash", re.IGNORECASE)  # lodestones/Chroma1-Flash, Chroma1-Flash.safetensors


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json: one variant (None)."""
    ic, oc = tcfg.get("in_channels"), tcfg.get("out_channels")
    if ic is not None and oc is not None and ic != oc:
        return None, "", (f"a Chroma transformer with in_channels {ic} != out_channels {oc}",
                          "an image-conditioned Chroma", "use lodestones/Chroma1-HD or lodestones/Chroma1-Base")
    return None, "", None


def match_file(k: FileKeys) -> Match | Refusal | None:
    if dit_family(k) != "chroma":
        return None
    where = k.where
    if k.dit_has("img_in_patch.") or k.dit_has("nerf_"):
        return Refusal("Chroma Radiance", f"distilled_guidance_layer + img_in_patch / nerf_* tensors{where}",
                       "Chroma Radiance works in pixel space (no VAE); use lodestones/Chroma1-HD or Chroma1-Base")
    if "img_in.weight" not in k.dit:
        return Refusal("Chroma-like (not Chroma1)", f"distilled_guidance_layer + double_blocks{where} but no img_in",
                       "use lodestones/Chroma1-HD or lodestones/Chroma1-Base")
    return Match(f"BFL FLUX layout with distilled_guidance_layer (Chroma's approximator){where}")


def distilled(facts: DistillFacts) -> Distilled | None:
    if not _FLASH.search(facts.name):
        return None
    return Distilled("Chroma1-Flash (step- and guidance-distilled)", f"the name {facts.name!r}", BASE_REPO,
                     "Flash samples in a few steps without CFG; a LoRA trained on it learns against the distillation "
                     "and transfers badly to Chroma1-HD / Chroma1-Base, which LoRAs are shared for")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(VAE, ("text_encoder", (T5XXL,))), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Chroma layout", ("distilled_guidance_layer",)), distilled=distilled)
