"""How Z-Image is recognised from its files (torch-free).

diffusers folder: a ``ZImagePipeline`` (or its img2img pipeline: the same components). Base and Turbo share one
transformer config, so the signature reports no variant; an Omni transformer (``siglip_feat_dim`` set, image
conditioning) is refused.

single file (ComfyUI's ``z_image_turbo_bf16.safetensors``, the original layout: fused ``attention.qkv``,
``cap_embedder``, ``noise_refiner``, ``context_refiner``), bare or under ``model.diffusion_model.``: the main
layers' ``adaLN_modulation.0`` (a Linear at index 0; Lumina 2's NextDiT, which shares the other names, has it at
index 1 behind a SiLU) with ``cap_embedder`` and both refiners. What it lacks comes from base_model_config or the
spec's single_file_config_repo.

Turbo (step-distilled) is told by its scheduler (static shift 3.0; Z-Image base ships 6.0, InvokeAI #8799) or its
name: ``distilled`` warns and names the base to train on.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import (DIT, Distilled, DistillFacts, FileKeys, Match, Refusal, Signature, no_folder_rule)

PIPELINES = frozenset({"ZImagePipeline", "ZImageImg2ImgPipeline"})
BASE_REPO = "Tongyi-MAI/Z-Image"
TURBO_SHIFT = 3.0
# Where ComfyUI all-in-one files would keep the other components (its Lumina 2 / Z-Image text encoder slot).
VAE = ("vae", ("vae.",))
TEXT_ENCODER = ("text_encoder", ("text_encoders.",))


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json: one variant (None); Omni is refused."""
    if tcfg.get("siglip_feat_dim") is not None:
        return None, "", ("a Z-Image transformer with siglip_feat_dim set", "Z-Image Omni (image-conditioned)",
                          "use Tongyi-MAI/Z-Image (text-to-image)")
    return None, "", None


def match_file(k: FileKeys) -> Match | Refusal | None:
    if "layers.0.adaLN_modulation.0.weight" not in k.dit or not k.dit_has("cap_embedder."):
        return None
    where = k.where
    if k.dit_has("siglip_embedder.") or k.dit_has("control_"):
        return Refusal("Z-Image Omni / ControlNet", f"siglip_embedder / control_* tensors{where}",
                       "use the text-to-image Z-Image (or Z-Image-Turbo) transformer")
    if not (k.dit_has("noise_refiner.") and k.dit_has("context_refiner.")):
        return None
    return Match(f"Z-Image layout: layers.*.adaLN_modulation.0 + cap_embedder + noise/context_refiner{where}")


def turbo_scheduler(scheduler_config: Mapping) -> bool:
    """Z-Image-Turbo's scheduler (static shift 3.0); the base ships 6.0. The adapter samples by it too."""
    return scheduler_config.get("shift") == TURBO_SHIFT and not scheduler_config.get("use_dynamic_shifting")


def distilled(facts: DistillFacts) -> Distilled | None:
    sched = facts.scheduler_config
    by_scheduler = turbo_scheduler(sched)
    by_name = "turbo" in facts.name.lower()
    if not (by_scheduler or by_name):
        return None
    evidence = (f"scheduler_config.json static shift {TURBO_SHIFT}, Turbo's (Z-Image base: 6.0)" if by_scheduler
                else f"the name {facts.name!r}")
    return Distilled("Z-Image-Turbo (step-distilled)", evidence, BASE_REPO,
                     "training on Turbo breaks its few-step distillation: the LoRA has little effect or the images "
                     "degrade (ostris/ai-toolkit #545, tdrussell/diffusion-pipe #462); ai-toolkit keeps Turbo by "
                     "merging a de-distillation adapter (ostris/zimage_turbo_training_adapter) while training")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(VAE, TEXT_ENCODER), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Z-Image layout", ("noise_refiner", "context_refiner", "adaLN_modulation")),
    distilled=distilled)
