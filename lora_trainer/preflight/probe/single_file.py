"""The single-file half of model_probe: what a .safetensors checkpoint is, from its header key names alone."""
from __future__ import annotations

from pathlib import Path

from ...families import SPECS
from .core import (FLOW_FAMILIES, SUPPORTED, _BFL_DOUBLE, _DIT_PREFIX, _FILE_COMPONENTS, _MMDIT, _V2_TO_K,
                          ModelProbe, _p, _unsupported_file, read_safetensors_header)

# Single files of families we cannot train: (family, marker keys without the model.diffusion_model. prefix:
# any of them, also required prefix or None). diffusers CHECKPOINT_KEY_NAMES (flux2, flux3, chroma,
# qwen-image-2.1, z-image-turbo, lumina2, wan, hunyuan-video, auraflow, mochi, ltx-video, hidream, sana,
# stable_cascade, cosmos, krea2) and ComfyUI model_detection (Qwen-Image txt_norm, PixArt, Hunyuan-DiT,
# Kandinsky 5). Checked before FLUX.1, as diffusers checks flux2/chroma before flux.
_UNSUPPORTED_FILE_MARKERS = (
    ("FLUX.2", ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight"), None),
    ("FLUX.3", ("early_stream_modulations.image.lin.weight",), None),
    ("Chroma", ("distilled_guidance_layer.in_proj.bias", "distilled_guidance_layer.in_proj.weight",
                "distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.0.norms.0.scale"), None),
    ("HunyuanVideo", ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias",
                      "txt_in.individual_token_refiner.blocks.0.norm1.weight"), None),
    ("Qwen-Image", ("txt_norm.weight", "txt_in.text_norm.weight"), "transformer_blocks."),
    ("Z-Image", ("layers.0.adaLN_modulation.0.weight",), None),
    ("Lumina 2", ("cap_embedder.0.weight", "cap_embedder.1.weight"), None),
    ("Wan", ("head.modulation",), None),
    ("AuraFlow", ("double_layers.0.attn.w1q.weight",), None),
    ("Mochi", ("blocks.0.attn.qkv_x.weight",), None),
    ("LTX-Video", ("patchify_proj.weight", "adaln_single.emb.timestep_embedder.linear_1.bias"), None),
    ("HiDream", ("double_stream_blocks.0.block.adaLN_modulation.1.bias", "caption_projection.0.linear.weight"), None),
    ("PixArt", ("t_block.1.weight",), None),
    ("Sana", ("blocks.0.cross_attn.q_linear.weight",), None),
    ("Hunyuan-DiT", ("mlp_t5.0.weight",), None),
    ("Kandinsky 5", ("visual_transformer_blocks.0.cross_attention.key_norm.weight",), None),
    ("Krea 2", ("txtfusion.projector.weight",), None),
    ("Stable Cascade", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight"), None),
    ("Cosmos", ("net.x_embedder.proj.1.weight",), None),
)



_LORA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")
_LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".hada_w1_a", ".lokr_w1")


def _lora_problem(keys: set[str]) -> dict | None:
    if not any(k.startswith(_LORA_PREFIXES) or any(part in k for part in _LORA_PARTS) for k in keys):
        return None
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        layout = " (FLUX layout)"
    elif any("joint_blocks" in k for k in keys):
        layout = " (SD3 layout)"
    elif any(s in k for k in keys for s in ("down_blocks", "input_blocks", "mid_block")):
        layout = " (Stable Diffusion UNet layout)"
    else:
        layout = ""
    return _p("model_unsupported", f"this file is a LoRA{layout}, not a base model",
              "set base_model to the model the LoRA was trained on (a diffusers folder, a full checkpoint or a hub "
              "id); to continue training this LoRA, set init_lora to it")


def _flow_family_from_keys(keys: set[str], header: dict) -> tuple[str | None, str | None, str | None, dict | None]:
    """(family, variant, evidence, unsupported-problem) for DiT checkpoints; all None if there is none."""
    dit = {k.removeprefix(_DIT_PREFIX) for k in keys}
    prefixed = any(k.startswith(_DIT_PREFIX) for k in keys)
    where = f" under {_DIT_PREFIX}" if prefixed else ""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in dit)

    for name, markers, needs in _UNSUPPORTED_FILE_MARKERS:
        hit = next((m for m in markers if m in dit), None)
        if hit and (needs is None or has(needs)):
            return None, None, None, _unsupported_file(name, f"{hit}{where}")
    if any(_MMDIT.match(k) for k in dit):
        if any(k.startswith("joint_blocks.") and ".x_block.attn2." in k for k in dit):
            variant, why = "sd3.5-medium", "x_block.attn2.* (MMDiT-X dual attention of SD3.5 medium)"
        elif any(k.startswith("joint_blocks.") and ".attn.ln_q." in k for k in dit):
            variant, why = "sd3.5-large", "attn.ln_q.* (RMS q/k norm of SD3.5) without x_block.attn2"
        elif has("joint_blocks.37."):
            variant, why = "sd3.5-large", "joint_blocks.37.* (38 blocks: SD3.5 large)"
        else:
            variant, why = "sd3-medium", "no q/k norm, no x_block.attn2 (SD3 medium)"
        return "sd3", variant, f"SAI MMDiT layout: joint_blocks.*.x_block/context_block{where}; {why}", None
    if any(_BFL_DOUBLE.match(k) for k in dit) and "img_in.weight" in dit:
        if not has("vector_in."):
            return None, None, None, _unsupported_file(
                "FLUX-like (not FLUX.1)", f"BFL double_blocks + img_in{where} but no vector_in.*, FLUX.1's CLIP input")
        if not has("guidance_in."):
            return "flux1", "schnell", f"BFL FLUX layout: double_blocks.*.img_attn + img_in{where}; no guidance_in (schnell)", None
        img_in = header.get((_DIT_PREFIX if prefixed else "") + "img_in.weight") or {}
        width = (img_in.get("shape") or [0, 0])[-1] if isinstance(img_in, dict) else 0
        if width in (384, 128):  # diffusers: 384 -> flux-fill, 128 -> flux-depth (control), 64 -> flux-dev
            return None, None, None, _unsupported_file(
                "FLUX.1 Fill" if width == 384 else "FLUX.1 Canny/Depth control",
                f"img_in input width {width}, not 64", "use FLUX.1-dev or FLUX.1-schnell (text-to-image)")
        return "flux1", "dev", f"BFL FLUX layout: double_blocks.*.img_attn + img_in{where}; guidance_in.* (dev)", None
    return None, None, None, None


def _component_file_problem(keys: set[str]) -> dict | None:
    """A file holding one component (a diffusers UNet/transformer, a VAE, a text encoder), not a model."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    hint = "use a full single-file checkpoint or a diffusers pipeline folder"
    if "conv_in.weight" in keys or has("down_blocks."):
        return _p("model_unsupported", "this looks like a single diffusers component (e.g. a UNet), not a full checkpoint", hint)
    if has("transformer_blocks.") and (has("single_transformer_blocks.") or has("context_embedder.") or has("x_embedder.")):
        return _p("model_unsupported", "this looks like a single diffusers component (a FLUX/SD3 transformer in "
                  "diffusers layout), not a full checkpoint",
                  "point base_model at the pipeline folder that holds it (the one with model_index.json), or at the "
                  "original single-file release (BFL / SAI layout)")
    if has("encoder.") and has("decoder.") and ("decoder.conv_in.weight" in keys or "decoder.conv_out.weight" in keys):
        return _p("model_unsupported", "this looks like a VAE on its own, not a base model", hint)
    if has("encoder.block.") or "shared.weight" in keys or has("text_model.encoder."):
        return _p("model_unsupported", "this looks like a text encoder on its own, not a base model", hint)
    return None


def _family_from_keys(keys: set[str], header: dict) -> tuple[str | None, str | None, dict | None]:
    """(family, evidence, unsupported-problem) for Stable Diffusion checkpoints."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    lora = _lora_problem(keys)
    if lora:
        return None, None, lora
    if has("conditioner.embedders.1.model."):
        return "sdxl", "conditioner.embedders.1.model.* (OpenCLIP-G of SDXL)", None
    if has("conditioner.embedders.0.model."):
        return None, None, _p("model_unsupported", "this is an SDXL refiner checkpoint; LoRA training needs the SDXL base")
    if has("cond_stage_model.model."):
        return "sd2", "cond_stage_model.model.* (OpenCLIP-H of SD2)", None
    if has("cond_stage_model.transformer."):
        return "sd15", "cond_stage_model.transformer.* (CLIP-L of SD1)", None
    to_k = header.get(_V2_TO_K)
    if isinstance(to_k, dict) and to_k.get("shape"):
        width = to_k["shape"][-1]
        if width == 1024:
            return "sd2", "UNet attn2.to_k width 1024", None
        if width == 768:
            return "sd15", "UNet attn2.to_k width 768", None
    if has("model.diffusion_model.label_emb."):
        return "sdxl", "UNet label_emb (SDXL add-embedding)", None
    return None, None, None


def probe_single_file(path: Path, source: str) -> ModelProbe:
    header, prob = read_safetensors_header(path)
    if header is None:
        return ModelProbe("single_file", source, path, None, None, problems=(prob,))
    meta = header.get("__metadata__") or {}
    keys = {k for k in header if k != "__metadata__"}
    family, evidence, unsupported = _family_from_keys(keys, header)
    variant = None
    if family is None and unsupported is None:
        family, variant, evidence, unsupported = _flow_family_from_keys(keys, header)
    if family is None and unsupported is None:
        unsupported = _component_file_problem(keys) or _p(
            "model_unsupported", f"no Stable Diffusion 1.x/2.x/XL, SD3 or FLUX.1 tensor names found in this file; supported: {SUPPORTED}")
    problems: list[dict] = [unsupported] if unsupported else []
    found, missing = [], []
    notes: list[str] = []
    if family in FLOW_FAMILIES:
        found.append("transformer")
        for comp, prefixes in _FILE_COMPONENTS[family]:
            (found if any(k.startswith(prefixes) for k in keys) else missing).append(comp)
        if missing:
            repo = SPECS[family].single_file_config_repo.get(variant)
            notes.append(f"the checkpoint holds {', '.join(found)} only: {', '.join(missing)} (and the tokenizers, "
                         f"scheduler, configs) come from base_model_config or else {repo} (diffusers' default "
                         f"for {family} {variant} single files)")
    elif family:
        te = "conditioner.embedders." if family == "sdxl" else "cond_stage_model."
        for comp, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("text_encoder", te)):
            (found if any(k.startswith(prefix) for k in keys) else missing).append(comp)
        if missing:
            problems.append(_p("model_incomplete", f"checkpoint lacks the {', '.join(missing)} weights"))
    spec_pred = str(meta.get("modelspec.prediction_type", "")).lower()
    if family in FLOW_FAMILIES:
        prediction = "flow"
    elif "v_pred" in keys or spec_pred in ("v", "v_prediction", "v-prediction"):
        prediction = "v_prediction"
    elif spec_pred == "epsilon" or family in ("sd15", "sdxl"):
        prediction = "epsilon"
    else:
        prediction = None
        if family == "sd2":
            notes.append("SD2 single files do not record their prediction type (768-v or 512-base epsilon)")
    return ModelProbe("single_file", source, path, family, prediction, family_evidence=evidence,
                      components_found=tuple(found), components_missing=tuple(missing),
                      problems=tuple(problems), notes=tuple(notes), variant=variant)
