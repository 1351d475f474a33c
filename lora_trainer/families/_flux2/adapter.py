"""FLUX.2 (dev and klein): one text encoder whose hidden states at three layers are stacked into the prompt
embedding (the pipeline's own ``_get_*_prompt_embeds``), VAE latents patchified 2x2 (4 x 32 = 128 channels at 1/16)
and normalised by the VAE's BatchNorm running statistics, flattened to tokens with 4-axis (T, H, W, L) ids, sigma as
the timestep; dev adds a guidance embedder.

The latents the cache stores are the patchified, normalised [B, 128, H/16, W/16] ones (``latent_patch`` 1: one latent
pixel is one token), exactly what ``Flux2*Pipeline._encode_vae_image`` makes of an image and what its sampler
denormalises and unpatchifies at the end."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from ..adapter import Components
from .._mmdit.adapter import MMDiTFamily


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], as Flux2Pipeline._patchify_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of patchify, as Flux2Pipeline._unpatchify_latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, 4C, 1, 1] of the VAE's BatchNorm running statistics, as the pipelines normalise by them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def bn_encode(vae, pixels: torch.Tensor, patch=patchify) -> torch.Tensor:
    """The 2x2-patchified posterior mode ("argmax", as the pipelines' _encode_vae_image) normalised by the VAE's
    BatchNorm running statistics: FLUX.2's latents, and Ideogram 4's with its own channel order (``patch``)."""
    latents = patch(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())
    mean, std = bn_stats(vae)
    return (latents - mean.to(latents)) / std.to(latents)


def bn_latent_layout(vae_config: Mapping) -> tuple[int, int]:
    """AutoencoderKLFlux2's packed channels (4 x latent_channels) and pixels per packed latent."""
    channels = int(vae_config.get("latent_channels", 32)) * 4
    return channels, 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1) * 2


def latent_ids(b: int, h: int, w: int, device) -> torch.Tensor:
    """[B, h*w, 4] rows (0, row, col, 0), as Flux2Pipeline._prepare_latent_ids (built on the device: a host-built
    grid would be a blocking copy every step)."""
    ids = torch.zeros(h, w, 4, dtype=torch.int64, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 4).expand(b, -1, -1)


def text_ids(b: int, length: int, device) -> torch.Tensor:
    """[B, L, 4] rows (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids."""
    ids = torch.zeros(length, 4, dtype=torch.int64, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.unsqueeze(0).expand(b, -1, -1)


class Flux2Family(MMDiTFamily):
    latent_patch = 1  # the cached latents are patchified already: one latent pixel per token
    samples_from_cache = True

    def call_default(self, name: str):
        """A default of the pipeline's __call__ (text_encoder_out_layers): what inference uses unless told."""
        import diffusers

        return inspect.signature(getattr(diffusers, self.pipeline_class).__call__).parameters[name].default

    @property
    def text_encoder_out_layers(self) -> tuple[int, ...]:
        return tuple(self.call_default("text_encoder_out_layers"))

    # -- latents ---------------------------------------------------------------------------------------
    def encode_latents(self, vae, pixels):
        return bn_encode(vae, pixels)

    def latent_layout(self, vae_config: Mapping) -> tuple[int, int]:
        return bn_latent_layout(vae_config)

    # -- denoiser --------------------------------------------------------------------------------------
    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        txt = cond["prompt_embeds"]
        guidance = self.train_guidance
        out = denoisers["transformer"](
            hidden_states=noisy.reshape(b, c, h * w).permute(0, 2, 1),  # Flux2Pipeline._pack_latents
            encoder_hidden_states=txt, timestep=t.to(noisy.dtype),  # sigma: the model scales it by 1000 itself
            guidance=None if guidance is None else torch.full((b,), guidance, device=noisy.device, dtype=noisy.dtype),
            img_ids=latent_ids(b, h, w, noisy.device), txt_ids=text_ids(b, txt.shape[1], noisy.device),
            return_dict=False)[0]
        # _unpack_latents_with_ids for the row-major grid latent_ids lays out
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    # -- sampling --------------------------------------------------------------------------------------
    def prompt_kwargs(self, cond, negative):
        return {"prompt_embeds": cond["prompt_embeds"]}

    # -- export ----------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        # BFL names with q/k/v fused exactly (kohya / musubi-tuner layout): ComfyUI's generic lora_unet_ map and
        # diffusers' _convert_kohya_flux2_lora_to_diffusers both read it (see _flux2/export.py).
        from .export import flux2_kohya_state_dict

        return flux2_kohya_state_dict(states, configs["transformer"], alpha=alpha, rank=rank, dtype=dtype)


def encoder_call(family: Flux2Family, method: str, comps: Components, captions: list[str], device,
                 **kwargs: Any) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoder (a staticmethod: chat template, padding to max_sequence_length, the stacked
    hidden states), so the cache holds exactly what inference computes."""
    import diffusers

    fn = getattr(getattr(diffusers, family.pipeline_class), method)
    embeds = fn(text_encoder=comps.text_encoders["text_encoder"], tokenizer=comps.tokenizers["text_encoder"],
                prompt=list(captions), device=device, max_sequence_length=family.max_sequence_length,
                hidden_states_layers=family.text_encoder_out_layers, **kwargs)
    return {"prompt_embeds": embeds}
