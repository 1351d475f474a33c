"""Qwen-Image: Qwen2.5-VL's last hidden state (the pipeline's system template, its first 34 tokens dropped) with a
valid-token mask, 16-channel latents of a causal 3-D VAE (a frame axis, per-channel mean / std) packed 2x2 into
64-wide tokens, sigma as the timestep, no pooled vector and no guidance embedder. Samples use real CFG
(true_cfg_scale) against the empty prompt, from cached embeddings."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .spec import SPEC
from ..adapter import Components
from .._mmdit.adapter import MMDiTFamily


def _pipeline_class():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C] through the pipeline's own _pack_latents, on its 5-D layout
    (B, 1 frame, C, h, w) as diffusers' training script feeds it."""
    b, c, h, w = x.shape
    return _pipeline_class()._pack_latents(x.unsqueeze(1), b, c, h, w)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack (the pipeline's _unpack_latents, frame axis dropped); h, w in latent pixels, so the
    pipeline's vae_scale_factor is 1 here."""
    return _pipeline_class()._unpack_latents(x, h, w, 1)[:, :, 0]


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean / latents_std, shaped [1, C, 1, 1, 1] like the pipeline's."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


class QwenImage(MMDiTFamily):
    spec = SPEC

    # -- latents -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, vae, pixels):
        # One frame in, one latent frame out; normalised per channel as the pipeline un-normalises before decoding
        # (latents * std + mean) and diffusers' training script normalises.
        latents = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()
        mean, std = _stats(vae, latents)
        return ((latents - mean) / std)[:, :, 0]

    def latent_layout(self, vae_config: Mapping) -> tuple[int, int]:
        # No block_out_channels: the pipeline's vae_scale_factor is 2 ** len(temperal_downsample).
        return int(vae_config.get("z_dim", 16)), 2 ** len(vae_config.get("temperal_downsample", (False, True, True)))

    # -- conditioning --------------------------------------------------------------------------------
    def _text_pipeline(self, comps: Components):
        return _pipeline_class()(scheduler=None, vae=None, transformer=None,
                                 text_encoder=comps.text_encoders["text_encoder"],
                                 tokenizer=comps.tokenizers["text_encoder"])

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt (template, the 34 dropped tokens, truncation to max_sequence_length),
        each row then zero-padded to max_sequence_length with its mask: the cache stores fixed-shape rows, and the
        masked padding changes nothing the transformer computes (its attention ignores masked keys; text RoPE
        positions only count up)."""
        length = self.max_sequence_length
        embeds, mask = self._text_pipeline(comps).encode_prompt(captions, device=device, max_sequence_length=length)
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = length - embeds.shape[1]
        return {"prompt_embeds": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                "prompt_embeds_mask": torch.nn.functional.pad(mask.to(torch.long), (0, pad))}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        out = denoisers["transformer"](
            hidden_states=pack(noisy), timestep=t.to(noisy.dtype),  # sigma: the model scales it by 1000 itself
            encoder_hidden_states=cond["prompt_embeds"].to(noisy.dtype),
            encoder_hidden_states_mask=cond["prompt_embeds_mask"], img_shapes=[(1, h // 2, w // 2)] * b,
            return_dict=False)[0]
        return unpack(out, h, w)

    # -- sampling ------------------------------------------------------------------------------------
    samples_from_cache = True
    sample_negative_prompt = True  # true CFG needs the negative prompt's embeddings ("" is cached beside the prompts)

    @property
    def true_cfg_scale(self) -> float:
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        return self.spec.sample_guidance if g is None else float(g)

    def prompt_kwargs(self, cond, negative):
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_embeds_mask"]}
        if negative is not None and self.true_cfg_scale > 1:  # at <= 1 the pipeline runs no CFG (and warns)
            kwargs.update(negative_prompt_embeds=negative["prompt_embeds"],
                          negative_prompt_embeds_mask=negative["prompt_embeds_mask"])
        return kwargs

    def sample_kwargs(self):
        # guidance_scale is for guidance-distilled transformers only (the pipeline warns and ignores it).
        return {"true_cfg_scale": self.true_cfg_scale, "max_sequence_length": self.max_sequence_length}

    # -- export --------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from ...outputs.lora_files import alpha_state_dict

        return alpha_state_dict("Qwen-Image", states, alpha=alpha, rank=rank, dtype=dtype)


ADAPTER = QwenImage
