"""Single-file checkpoints of tiny pipelines, for tests: a diffusers folder written as the files users actually
have, by the family's inverse converters.

* ``write_single_file``: the transformer of a family with single-file converters (``families/<name>/convert.py``
  ``from_diffusers``: FLUX.1 in Black Forest Labs' layout, SD3/3.5 in Stability's MMDiT layout), bare or under
  ``model.diffusion_model.``; optionally with the other components as ComfyUI "all-in-one" checkpoints carry them:
  the VAE in the LDM layout under the family's ``ALL_IN_ONE_VAE`` prefix, the text encoders in transformers' layout
  under ``ALL_IN_ONE_TEXT_ENCODERS`` (``text_encoders.clip_l.transformer.`` ...), where diffusers' single_file_utils
  reads them from (``convert_ldm_vae_checkpoint``, ``create_diffusers_clip_model_from_ldm``,
  ``convert_sd3_t5_checkpoint_to_diffusers``).
* ``make_single_file_checkpoint``: a whole SD 1.x / 2.x / SDXL pipeline as an A1111/Civitai checkpoint in the
  original LDM key names (families/_unet/convert.py).

The DiT inverses mirror diffusers 0.42's converters statement by statement (same order, same names), so that a
mistake in either shows up as a round-trip mismatch; every width comes from the model config (tiny widths, never
FLUX's 3072), and each fused tensor is checked against it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..families import FAMILIES, get_part, get_signature, get_spec
from ..families._unet import convert as ldm
from ..runtime.single_file import DIT_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DIT_PREFIX", "component_state_dicts", "make_single_file_checkpoint", "transformer_single_file_state_dict",
           "write_single_file"]


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def _family_of(folder: Path) -> str:
    """The family whose pipeline the folder is and that has a single-file writer (a convert.from_diffusers)."""
    from ..preflight.probe import read_pipeline_index

    cls = (read_pipeline_index(folder)[0] or {}).get("_class_name")
    writers = [n for n in FAMILIES if hasattr(get_part(n, "convert"), "from_diffusers")]
    for name in writers:
        if cls in get_signature(name).pipelines:
            return name
    raise ValueError(f"{folder}: {cls} is not a pipeline of {', '.join(get_spec(n).label for n in writers)}")


def transformer_single_file_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's transformer in its family's original layout (BFL for FLUX.1, SAI for SD3), unprefixed."""
    folder = Path(folder)
    family = _family_of(folder)
    (denoiser,) = get_spec(family).denoisers
    return get_part(family, "convert").from_diffusers(_read_folder_weights(folder / denoiser), _config(folder, denoiser))


def component_state_dicts(folder: Path) -> dict[str, torch.Tensor]:
    """The VAE and text encoders of the folder, keyed as ComfyUI all-in-one checkpoints hold them."""
    folder = Path(folder)
    family = _family_of(folder)
    convert, spec = get_part(family, "convert"), get_spec(family)
    vae = ldm.vae_from_diffusers(_read_folder_weights(folder / "vae"), _config(folder, "vae"))
    out = {convert.ALL_IN_ONE_VAE + k: v for k, v in vae.items()}
    for attr, prefix in convert.ALL_IN_ONE_TEXT_ENCODERS.items():
        sd = _read_folder_weights(folder / attr)
        if spec.component_classes[attr].startswith("CLIP"):  # transformers >= 5.6 saves CLIP without text_model.
            sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
        out.update({prefix + k: v for k, v in sd.items()})
    return out


def write_single_file(folder, out_file, *, prefix: bool = True, components: bool = False,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the tiny pipeline folder's transformer as a single file in its family's original layout.

    prefix: keys under ``model.diffusion_model.`` (ComfyUI / SAI releases) or bare (BFL's flux1-dev.safetensors).
    components: also write the VAE and text encoders as ComfyUI all-in-one checkpoints do (see the module doc).
    dtype: cast every tensor (e.g. torch.bfloat16, or torch.float8_e4m3fn as "fp8" checkpoints hold them).
    """
    from safetensors.torch import save_file

    folder, out_file = Path(folder), Path(out_file)
    sd = {(DIT_PREFIX if prefix else "") + k: v for k, v in transformer_single_file_state_dict(folder).items()}
    if components:
        sd.update(component_state_dicts(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_file), metadata={"format": "pt"})
    return out_file


def make_single_file_checkpoint(pipeline_dir, out_path) -> Path:
    """Write an A1111/Civitai-style single .safetensors (original LDM key names) from an SD 1.x / 2.x / SDXL
    pipeline folder."""
    from safetensors.torch import save_file

    src, out_path = Path(pipeline_dir), Path(out_path)
    parts = [p for p in ("unet", "vae", "text_encoder", "text_encoder_2") if (src / p).is_dir()]
    ckpt = ldm.from_diffusers({p: _read_folder_weights(src / p) for p in parts}, {p: _config(src, p) for p in parts})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(out_path), metadata={"format": "pt"})
    return out_path


def write_tiny_single_file(folder, out_file) -> Path:
    """The single file users of the folder's family have: the transformer alone, as released, for a family with
    its own converters (convert.py ``to_diffusers``), else a whole LDM checkpoint (what diffusers'
    ``from_single_file`` reads for the UNet families). The contract suite probes and trains what this writes."""
    from ..preflight.probe import probe_model

    folder = Path(folder)
    family = probe_model(str(folder)).family
    if family is None:
        raise ValueError(f"{folder}: not a pipeline folder of a registered family")
    if hasattr(get_part(family, "convert"), "to_diffusers"):
        return write_single_file(folder, out_file)
    return make_single_file_checkpoint(folder, out_file)
