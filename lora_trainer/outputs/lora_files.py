"""The ComfyUI / Forge LoRA files of the transformer families that keep diffusers' module names.

``comfy_state_dict`` (FLUX.1, SD3/3.5): ``transformer.`` names, alpha folded in (below). ``alpha_state_dict``
(Z-Image, Qwen-Image): ``diffusion_model.`` names with ``lora_A`` / ``lora_B`` and a ``.alpha`` scalar per module,
what ai-toolkit (and SimpleTuner's ``--lora_format comfyui``) write; ComfyUI applies alpha / rank only from
``.alpha`` (it ignores metadata), and diffusers reads such files through the family's non-diffusers converter
(``_convert_non_diffusers_{z_image,qwen}_lora_to_diffusers``, triggered by ``diffusion_model.`` / ``.alpha``),
which bakes alpha / rank into the weights.

ComfyUI maps diffusers module names under ``transformer.`` for FLUX.1 and SD3 (comfy/lora.py
``model_lora_keys_unet`` via comfy/utils.py ``flux_to_diffusers`` / ``mmdit_to_diffusers``), turning separate
q/k/v LoRAs into offset patches of its fused qkv weights, so no fusing is needed here. It ignores the JSON
metadata and, without a ``.alpha`` tensor, applies scale 1; diffusers' SD3 loader refuses ``.alpha`` tensors
("all LoRA param names contain 'lora'") and, without metadata, assumes alpha == rank, i.e. scale 1 too. So the
file carries no alpha: the scale alpha / rank is folded into lora_B (as ai-toolkit writes alpha = rank), and every
one of these loaders applies exactly the trained delta.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .export import MAGNITUDE, iter_modules, magnitude_fp32
from ..families import get_spec
from ..families._unet.kohya_names import te_path


def comfy_state_dict(family: str, states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states -> ``transformer.<module>.lora_A/lora_B.weight`` (+ CLIP ``text_encoder*.text_model...``), alpha
    folded into lora_B; DoRA magnitudes as fp32 ``dora_scale`` [out, 1] (ComfyUI's output-axis layout, export.py).

    The family's LoRA'd CLIP encoders (``spec.lora_text_encoders``) keep their diffusers names with the
    ``text_model.`` level: ComfyUI's and Forge's model_lora_keys_clip map ``text_encoder.text_model.encoder.layers...``
    (CLIP-L; SD3's ``text_encoder_2`` is CLIP-G) and diffusers accepts it; transformers 5's CLIPTextModel lacks that
    level, so it is added (kohya_names.te_path). kohya ``lora_te1_`` names in this lora_A/lora_B form would be
    dropped by diffusers without a word."""
    text_encoders = get_spec(family).lora_text_encoders
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        if component == "transformer":
            name = f"transformer.{path}"
        elif component in text_encoders:
            name = f"{component}.{te_path(path)}"
        else:
            raise ValueError(f"component {component!r} has no ComfyUI name in a {family} LoRA")
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        # Folded in fp32 before the cast to the save precision, so the only rounding is the save's own.
        out[f"{name}.lora_B.weight"] = (b.detach().to("cpu", torch.float32) * (alpha / rank)).to(dtype).contiguous()
        if MAGNITUDE in parts:
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], *[1] * (a.dim() - 1))
    return out


def alpha_state_dict(label: str, states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     dtype: torch.dtype, rename: Callable[[str], str] = str,
                     fold_alpha: bool = False) -> dict[str, torch.Tensor]:
    """PEFT states of the denoiser -> ``diffusion_model.<rename(module)>.lora_A/lora_B.weight`` + ``.alpha`` (fp32
    scalar); DoRA magnitudes as fp32 ``dora_scale`` [out, 1]. ``label`` names the family in errors.

    ``fold_alpha``: no ``.alpha`` tensors, alpha / rank folded into lora_B instead, for loaders that refuse any key but
    lora_A / lora_B (diffusers' Krea 2 and Anima converters): a loader that reads no alpha applies scale 1 and gets
    exactly the trained delta. All of the scale goes into lora_B (musubi-tuner's convert_lora.py puts its square root
    into each factor: the same delta), so lora_A stays as trained and init_lora reads the factors back."""
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if component != "transformer":
            raise ValueError(f"component {component!r} has no ComfyUI name in a {label} LoRA")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = f"diffusion_model.{rename(path)}"
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        if fold_alpha:  # in fp32 before the cast to the save precision: the only rounding is the save's own
            out[f"{name}.lora_B.weight"] = (b.detach().to("cpu", torch.float32) * (alpha / rank)).to(dtype).contiguous()
        else:
            out[f"{name}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous().clone()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if MAGNITUDE in parts:  # ComfyUI's DoRA layout [out, 1, ...] (diffusers drops it with a warning)
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], *[1] * (a.dim() - 1))
    return out


def fuse_qkv(parts: Mapping[int, tuple[torch.Tensor, torch.Tensor]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate q / k / v LoRAs (part index 0 / 1 / 2 -> fp32 (down, up)) as one LoRA of the fused qkv Linear, exactly:
    the downs stacked, the ups block-diagonal (each part's rows, its own rank's columns), rank = the sum of theirs."""
    order = sorted(parts)
    down = torch.cat([parts[p][0] for p in order], dim=0)
    up = torch.zeros(3 * width, down.shape[0], dtype=torch.float32)
    col = 0
    for p in order:
        part_up = parts[p][1]
        up[p * width:(p + 1) * width, col:col + part_up.shape[1]] = part_up
        col += part_up.shape[1]
    return down, up


def kohya_entry(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up32: torch.Tensor,
                dtype: torch.dtype) -> None:
    """One module of a kohya-named tool file whose up matrix already holds alpha / rank (a fused q/k/v LoRA's:
    SD3's, FLUX.2's): ``.alpha`` = the (fused) rank, so every loader applies scale 1."""
    if f"{name}.lora_down.weight" in out:
        raise ValueError(f"two modules map to the same kohya name {name!r}")
    out[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous().clone()
    out[f"{name}.lora_up.weight"] = up32.to(dtype).contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)  # fp32 scalar: loaders .item() it
