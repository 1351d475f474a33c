"""What a single .safetensors checkpoint is, from its header alone: a LoRA (refused), a family's checkpoint (asked
of the families' signatures), a model this trainer does not train (named), or one component on its own."""
from __future__ import annotations

from pathlib import Path

from ...families import FAMILIES, SPECS, get_signature
from ...families.signature import CHECKPOINT, DIT, FileKeys, Match, Refusal, Signature
from .headers import read_safetensors_header
from .result import SUPPORTED, ModelProbe, problem, refused, unsupported_file

# Single files of models we cannot train: (model, marker keys without the model.diffusion_model. prefix: any of
# them, also required prefix or None). diffusers CHECKPOINT_KEY_NAMES (flux3,
# lumina2, wan, hunyuan-video, auraflow, mochi, ltx-video, hidream, sana, stable_cascade, cosmos)
# and ComfyUI model_detection (PixArt, Hunyuan-DiT, Kandinsky 5). Checked before the
# DiT families (Chroma, which has FLUX.1's double blocks, is told from FLUX.1 in _mmdit/signature.py).
_UNSUPPORTED_FILE_MARKERS = (
    ("FLUX.3", ("early_stream_modulations.image.lin.weight",), None),
    ("HunyuanVideo", ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias",
                      "txt_in.individual_token_refiner.blocks.0.norm1.weight"), None),
    # Lumina 2's NextDiT: Z-Image shares its names but has adaLN_modulation.0 (a Linear), Lumina 2 .1 (behind a SiLU).
    ("Lumina 2", ("layers.0.adaLN_modulation.1.weight",), "cap_embedder."),
    ("AuraFlow", ("double_layers.0.attn.w1q.weight",), None),
    ("Mochi", ("blocks.0.attn.qkv_x.weight",), None),
    ("LTX-Video", ("patchify_proj.weight", "adaln_single.emb.timestep_embedder.linear_1.bias"), None),
    ("HiDream", ("double_stream_blocks.0.block.adaLN_modulation.1.bias", "caption_projection.0.linear.weight"), None),
    ("PixArt", ("t_block.1.weight",), None),
    ("Sana", ("blocks.0.cross_attn.q_linear.weight",), None),
    ("Hunyuan-DiT", ("mlp_t5.0.weight",), None),
    ("Kandinsky 5", ("visual_transformer_blocks.0.cross_attention.key_norm.weight",), None),
    ("Stable Cascade", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight"), None),
    ("Cosmos", ("net.x_embedder.proj.1.weight",), None),
)
_LORA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")
_LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".hada_w1_a", ".lokr_w1")

Found = tuple["str | None", "str | None", "str | None", "dict | None"]  # (family, variant, evidence, problem)


def _signatures(layout: str) -> list[tuple[str, Signature]]:
    return [(name, sig) for name in FAMILIES if (sig := get_signature(name)).file_layout == layout]


def _lora_problem(keys: frozenset[str]) -> dict | None:
    if not any(k.startswith(_LORA_PREFIXES) or any(part in k for part in _LORA_PARTS) for k in keys):
        return None
    layout = ""
    # The DiT layouts' names first: the UNet's (down_blocks, mid_block) are the generic diffusers ones.
    for _, sig in _signatures(DIT) + _signatures(CHECKPOINT):
        if sig.lora_layout and any(part in k for k in keys for part in sig.lora_layout[1]):
            layout = f" ({sig.lora_layout[0]})"
            break
    return problem("model_unsupported", f"this file is a LoRA{layout}, not a base model",
                   "set base_model to the model the LoRA was trained on (a diffusers folder, a full checkpoint or a "
                   "hub id); to continue training this LoRA, set init_lora to it")


def _component_file_problem(keys: frozenset[str]) -> dict | None:
    """A file holding one component (a diffusers UNet/transformer, a VAE, a text encoder), not a model."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    hint = "use a full single-file checkpoint or a diffusers pipeline folder"
    if "conv_in.weight" in keys or has("down_blocks."):
        return problem("model_unsupported", "this looks like a single diffusers component (e.g. a UNet), not a full checkpoint", hint)
    if has("transformer_blocks.") and (has("single_transformer_blocks.") or has("context_embedder.") or has("x_embedder.")):
        return problem("model_unsupported", "this looks like a single diffusers component (a FLUX/SD3 transformer in "
                       "diffusers layout), not a full checkpoint",
                       "point base_model at the pipeline folder that holds it (the one with model_index.json), or at "
                       "the original single-file release (BFL / SAI layout)")
    if has("encoder.") and has("decoder.") and ("decoder.conv_in.weight" in keys or "decoder.conv_out.weight" in keys):
        return problem("model_unsupported", "this looks like a VAE on its own, not a base model", hint)
    if has("encoder.block.") or "shared.weight" in keys or has("text_model.encoder."):
        return problem("model_unsupported", "this looks like a text encoder on its own, not a base model", hint)
    return None


def _first_match(k: FileKeys, layout: str) -> Found | None:
    for name, sig in _signatures(layout):
        found = sig.match_file(k)
        if isinstance(found, Refusal):
            return None, None, None, refused(found)
        if isinstance(found, Match):
            return name, found.variant, found.evidence, None
    return None


def _detect(k: FileKeys) -> Found:
    """First match wins: a LoRA, whole checkpoints, the DiTs we do not train, the DiT families; else all None."""
    lora = _lora_problem(k.keys)
    if lora:
        return None, None, None, lora
    found = _first_match(k, CHECKPOINT)
    if found:
        return found
    for name, markers, needs in _UNSUPPORTED_FILE_MARKERS:
        hit = next((m for m in markers if m in k.dit), None)
        if hit and (needs is None or k.dit_has(needs)):
            return None, None, None, unsupported_file(name, f"{hit}{k.where}")
    return _first_match(k, DIT) or (None, None, None, None)


def probe_single_file(path: Path, source: str) -> ModelProbe:
    header, prob = read_safetensors_header(path)
    if header is None:
        return ModelProbe("single_file", source, path, None, None, problems=(prob,))
    meta = header.get("__metadata__") or {}
    keys = frozenset(k for k in header if k != "__metadata__")
    family, variant, evidence, unsupported = _detect(FileKeys(keys, header))
    if family is None and unsupported is None:
        unsupported = _component_file_problem(keys) or problem(
            "model_unsupported", f"no Stable Diffusion 1.x/2.x/XL, SD3 or FLUX.1 tensor names found in this file; supported: {SUPPORTED}")
    problems: list[dict] = [unsupported] if unsupported else []
    found, missing = [], []
    notes: list[str] = []
    sig = get_signature(family) if family else None
    spec = SPECS[family] if family else None
    if sig and spec:
        dit = sig.file_layout == DIT
        if dit:  # the denoiser is what the family was detected by
            found.extend(spec.denoisers)
        for comp, prefixes in sig.file_components:
            (found if any(k.startswith(prefixes) for k in keys) else missing).append(comp)
        if missing and dit:
            repo = spec.single_file_config_repo.get(variant)
            notes.append(f"the checkpoint holds {', '.join(found)} only: {', '.join(missing)} (and the tokenizers, "
                         f"scheduler, configs) come from base_model_config or else {repo} (diffusers' default "
                         f"for {family} {variant} single files)")
        elif missing:
            problems.append(problem("model_incomplete", f"checkpoint lacks the {', '.join(missing)} weights"))
    spec_pred = str(meta.get("modelspec.prediction_type", "")).lower()
    if spec and spec.is_flow:
        prediction = "flow"
    elif "v_pred" in keys or spec_pred in ("v", "v_prediction", "v-prediction"):
        prediction = "v_prediction"
    elif spec_pred == "epsilon":
        prediction = "epsilon"
    elif sig:
        prediction = sig.file_prediction
        if prediction is None and sig.file_prediction_note:
            notes.append(sig.file_prediction_note)
    else:
        prediction = None
    return ModelProbe("single_file", source, path, family, prediction, family_evidence=evidence,
                      components_found=tuple(found), components_missing=tuple(missing),
                      problems=tuple(problems), notes=tuple(notes), variant=variant)
