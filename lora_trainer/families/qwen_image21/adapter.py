"""Qwen-Image 2.1: Qwen3-VL's last decoder layer (before its final norm) under the pipeline's raw template, the system
turn dropped, with a valid-token mask; 64-channel latents of an RGBA VAE (16x, per-channel mean / std) flattened one
token per latent pixel; one single-stream block-causal transformer over [text, target image] whose output covers
the joint sequence (the image is its last rows); sigma as the timestep. Text-to-image only: no condition images.
Everything that shapes the denoiser's inputs is the pipeline's own code (encode_prompt, _encode_vae_image,
_pack_latents / _unpack_latents), so training sees what sampling sees."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import torch

from .spec import SPEC
from ..adapter import Components, ModelFamily


def _pipeline_class():
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline


def target_slots(image_pad_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The pipeline's append_target_slots: the text's image-slot mask (all False without condition images) and one
    True slot per 2x2 group of the target's latent tokens."""
    return torch.cat([image_pad_mask, image_pad_mask.new_ones(image_pad_mask.shape[0], tokens // 4)], dim=1)


def trimmed(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached rows (padded to max_sequence_length) -> the batch's longest caption, as encode_prompt pads a batch.
    The padding is not inert here: RoPE places the image after every text slot, padding included, so a caption
    padded to 512 would put the image at another distance from its text than sampling does. An all-valid mask
    becomes None, as encode_prompt returns it."""
    n = max(int(mask.sum(dim=1).max()), 1)
    embeds, mask = embeds[:, :n], mask[:, :n].bool()
    return embeds, (None if bool(mask.all()) else mask)


class QwenImage21(ModelFamily):
    spec = SPEC
    latent_patch = 1  # one token per latent pixel (the pipeline's image_seq_len counts them so)
    sample_sigmas: list | None = None  # the pipeline's checkpoint-provided sampling grid (model_index.json)

    # -- loading -------------------------------------------------------------------------------------
    def load_tokenizer(self, source, encoder):
        from .processor import Qwen3VLTextProcessor

        return Qwen3VLTextProcessor.from_pretrained(source, subfolder=self.spec.tokenizer_of(encoder),
                                                    local_files_only=True)

    def _load_folder(self, source, **kwargs):
        comps = super()._load_folder(source, **kwargs)
        try:
            self.sample_sigmas = json.loads((source / "model_index.json").read_text()).get("sample_sigmas")
        except (OSError, ValueError):
            self.sample_sigmas = None
        return comps

    def _load_single_file(self, path, *, dtype, config, progress=None):
        from pathlib import Path

        from ...runtime.single_file import load_components_single_file, resolve_config_source

        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    # -- latents -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, vae, pixels):
        # The VAE reads RGBA; the pipeline converts RGB images to RGBA (alpha 255 -> 1.0 after [-1, 1]
        # normalisation). Then its own _encode_vae_image: posterior mode, per-channel (z - mean) / std.
        x = pixels.to(vae.device, vae.dtype)
        rgba = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)[:, :, None]
        shim = SimpleNamespace(vae=vae, latent_channels=vae.config.z_dim)
        return _pipeline_class()._encode_vae_image(shim, rgba, None)[:, :, 0]

    def latent_layout(self, vae_config):
        # The pipeline's vae_scale_factor (16); its modular pipeline derives it as 2 ** len(temperal_downsample).
        return int(vae_config.get("z_dim", 64)), 2 ** len(vae_config.get("temperal_downsample", (False,) + (True,) * 3))

    # -- conditioning --------------------------------------------------------------------------------
    def _text_pipeline(self, comps: Components):
        return _pipeline_class()(scheduler=None, vae=None, transformer=None,
                                 text_encoder=comps.text_encoders["text_encoder"],
                                 processor=comps.tokenizers["text_encoder"])

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt (raw template, " " for an empty prompt, left padding, the hooked
        pre-norm last layer, the system turn dropped), each row then zero-padded (or cut) to max_sequence_length
        with its mask: the cache stores fixed-shape rows; predict trims them back."""
        length = self.max_sequence_length
        embeds, mask, _ = self._text_pipeline(comps).encode_prompt(list(captions), device=device)
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        embeds, mask = embeds[:, :length], mask[:, :length]
        pad = length - embeds.shape[1]
        return {"prompt_embeds": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                "prompt_embeds_mask": torch.nn.functional.pad(mask.to(torch.long), (0, pad))}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        embeds, mask = trimmed(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        pipe = _pipeline_class()
        latents = pipe._pack_latents(noisy, b, c, h, w)
        img_mask = target_slots(torch.zeros(b, embeds.shape[1], dtype=torch.bool, device=noisy.device), h * w)
        out = denoisers["transformer"](
            hidden_states=latents, timestep=t.to(noisy.dtype),  # sigma: the pipeline passes t / 1000
            encoder_hidden_states=embeds.to(noisy.dtype), encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h, w)]] * b, img_mask=img_mask, return_dict=False)[0]
        # The output covers [text, image]; the pipeline keeps the last h*w rows. vae_scale_factor 1: h, w are latent.
        return pipe._unpack_latents(out[:, -h * w:], h, w, 1)[:, :, 0]

    # -- sampling ------------------------------------------------------------------------------------
    samples_from_cache = True
    sample_negative_prompt = True  # used only when validation_guidance_scale > 1 (true CFG)

    @property
    def true_cfg_scale(self) -> float:
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        return self.spec.sample_guidance if g is None else float(g)

    def prompt_kwargs(self, cond, negative):
        embeds, mask = trimmed(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        kwargs: dict[str, Any] = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if negative is not None and self.true_cfg_scale > 1:  # at <= 1 the pipeline runs no CFG (and warns)
            n_embeds, n_mask = trimmed(negative["prompt_embeds"], negative["prompt_embeds_mask"])
            kwargs.update(negative_prompt_embeds=n_embeds, negative_prompt_embeds_mask=n_mask)
        return kwargs

    def sampling_scheduler(self, comps: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)

    def _explicit_steps(self) -> bool:
        return bool(getattr(self.cfg, "validation_inference_steps", None)) if self.cfg is not None else False

    def _pipeline_extra_kwargs(self) -> dict:
        # The checkpoint's sample_sigmas fix the step count; validation_inference_steps asks for another grid
        # (the pipeline's linspace(1, 1/n, n), shifted the same way).
        return {"sample_sigmas": None if self._explicit_steps() else self.sample_sigmas}

    def default_sample_steps(self) -> int:
        return len(self.sample_sigmas) if self.sample_sigmas else 40  # the pipeline's default

    def sample_kwargs(self):
        return {"true_cfg_scale": self.true_cfg_scale}

    # -- export --------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from ...outputs.lora_files import alpha_state_dict

        return alpha_state_dict("Qwen-Image 2.1", states, alpha=alpha, rank=rank, dtype=dtype)


ADAPTER = QwenImage21
