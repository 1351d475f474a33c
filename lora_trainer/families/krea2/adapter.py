"""Krea 2: a stack of Qwen3-VL hidden states (the pipeline's text_encoder_select_layers taps, its Qwen-Image system
template with the 34 dropped prefix tokens and the 5-token suffix) with its bool mask; Qwen-Image VAE latents
(per-channel mean / std, the frame axis dropped: Qwen-Image's own encode_latents) packed 2x2 into 64-wide tokens;
sigma as the timestep; the velocity noise - x0 out (diffusers' train_dreambooth_lora_krea2.py). Samples use Krea's
CFG form against "" (Raw) or none (Turbo: is_distilled), from cached embeddings."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .spec import SPEC
from ..adapter import Components, ModelFamily
from ..qwen_image.adapter import QwenImage

# The pipeline's packing, with its vae_scale_factor 1 (latent pixels in) and its patch size.
_SHIM = SimpleNamespace(patch_size=2, vae_scale_factor=1)


def _pipeline_class():
    from diffusers import Krea2Pipeline

    return Krea2Pipeline


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C] through the pipeline's own _pack_latents."""
    b, c, h, w = x.shape
    return _pipeline_class()._pack_latents(_SHIM, x, b, c, h, w)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse (the pipeline's _unpack_latents, frame axis dropped); h, w in latent pixels."""
    return _pipeline_class()._unpack_latents(_SHIM, x, h, w)[:, :, 0]


def position_ids(text_len: int, h: int, w: int, device) -> torch.Tensor:
    """The pipeline's rotary coordinates: text rows at the origin, image rows (0, y, x) on the 2x2 patch grid."""
    return _pipeline_class().prepare_position_ids(text_len, h // 2, w // 2, device)


class Krea2(ModelFamily):
    spec = SPEC

    def __init__(self, cfg=None):
        super().__init__(cfg)
        # model_index.json's pipeline settings (the taps, is_distilled), read at load: the text encoding and the
        # samples use the release's own.
        self.pipeline_config: dict[str, Any] = {}

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipeline_config.get("is_distilled", False))

    def read_release(self, folder: Path | None, name: str) -> None:
        from ...preflight.probe.headers import read_json
        from ..signature import DistillFacts
        from .signature import distilled

        index = (read_json(Path(folder) / "model_index.json")[0] or {}) if folder is not None else {}
        self.pipeline_config = {k: index[k] for k in ("text_encoder_select_layers", "is_distilled", "patch_size")
                                if k in index}
        if "is_distilled" not in index:  # a single file: Turbo by its name, as the probe tells it
            self.pipeline_config["is_distilled"] = distilled(DistillFacts(name, {}, {}, {})) is not None

    def _load_folder(self, source: Path, **kwargs):
        # Also for single files: their config source folder's model_index.json says which release it is.
        self.read_release(source, str(getattr(self.cfg, "base_model", "") or source))
        return super()._load_folder(source, **kwargs)

    def _load_single_file(self, path, *, dtype, config, progress=None):
        from ...runtime.single_file import load_components_single_file, resolve_config_source

        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    def _pipeline_extra_kwargs(self) -> dict:
        return dict(self.pipeline_config)

    # -- latents: the Qwen-Image VAE's, normalised as Qwen-Image's (one implementation for both) ------------
    encode_latents = QwenImage.encode_latents
    latent_layout = QwenImage.latent_layout

    # -- conditioning --------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt (template, taps, dropped prefix, suffix, position ids of the real tokens):
        max_sequence_length rows per caption (the pipeline pads to it), the bool mask of the real ones."""
        pipe = _pipeline_class()(scheduler=None, vae=None, transformer=None,
                                 text_encoder=comps.text_encoders["text_encoder"],
                                 tokenizer=comps.tokenizers["text_encoder"], **self.pipeline_config)
        embeds, mask = pipe.encode_prompt(list(captions), device=device, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.bool()}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        embeds = cond["prompt_embeds"].to(noisy.dtype)
        out = denoisers["transformer"](
            hidden_states=pack(noisy), encoder_hidden_states=embeds,
            timestep=t.to(noisy.dtype),  # sigma: the model scales it by 1000 itself
            position_ids=position_ids(embeds.shape[1], h, w, noisy.device),
            encoder_attention_mask=cond["prompt_embeds_mask"].bool(), return_dict=False)[0]
        return unpack(out, h, w)

    # -- sampling ------------------------------------------------------------------------------------
    samples_from_cache = True
    sample_negative_prompt = True  # Raw's CFG encodes "" as the negative prompt

    @property
    def guidance_scale(self) -> float:
        """The pipeline's guidance_scale in Krea's form (0: no CFG): validation_guidance_scale, else Raw's 4.5 or
        Turbo's 0."""
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        if g is not None:
            return float(g)
        return 0.0 if self.is_distilled else self.spec.sample_guidance

    def prompt_kwargs(self, cond, negative):
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_embeds_mask"].bool()}
        if negative is not None and self.guidance_scale > 0:  # at 0 the pipeline runs no CFG
            kwargs.update(negative_prompt_embeds=negative["prompt_embeds"],
                          negative_prompt_embeds_mask=negative["prompt_embeds_mask"].bool())
        return kwargs

    def sampling_scheduler(self, comps: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)

    def default_sample_steps(self) -> int:
        return 8 if self.is_distilled else 28  # the pipeline's documented steps for Turbo / Raw

    def sample_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length}

    # -- export --------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from .export import comfy_state_dict

        return comfy_state_dict(states, alpha=alpha, rank=rank, dtype=dtype)


ADAPTER = Krea2
