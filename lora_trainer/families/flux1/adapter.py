"""FLUX.1 dev / schnell: CLIP-L (pooled vector only) + T5-XXL (sequence), 16-channel VAE latents packed into 2x2
patches (64 channels per token) with 3-axis positional ids, sigma as the timestep, and for dev a guidance
embedder that is fed a fixed value during training."""
from __future__ import annotations

import torch

from .spec import SPEC
from ..adapter import Components
from .._mmdit.adapter import MMDiTFamily


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of pack, as FluxPipeline._unpack_latents."""
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] rows (0, row, col) of the packed latent grid, as FluxPipeline._prepare_latent_image_ids."""
    # Built on the device: a host-built grid would be a blocking host-to-device copy every step.
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype=dtype)


class Flux1(MMDiTFamily):
    spec = SPEC

    samples_from_cache = True

    def default_sample_steps(self) -> int:
        return 4 if self.variant == "schnell" else self.SAMPLE_STEPS  # schnell is timestep-distilled: 1-4 steps

    def prompt_kwargs(self, cond, negative):
        return {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled"]}

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.tokenize(comps.tokenizers["text_encoder"], captions).to(device)
        pooled = comps.text_encoders["text_encoder"](ids, output_hidden_states=False).pooler_output
        return {"prompt_embeds": self.t5_embeds(comps, "text_encoder_2", captions, device), "pooled": pooled}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        txt = cond["prompt_embeds"]
        guidance = self.train_guidance
        out = denoisers["transformer"](
            hidden_states=pack(noisy), timestep=t.to(noisy.dtype),  # sigma: the model scales it by 1000 itself
            guidance=None if guidance is None else torch.full((b,), guidance, device=noisy.device, dtype=noisy.dtype),
            pooled_projections=cond["pooled"], encoder_hidden_states=txt,
            txt_ids=torch.zeros(txt.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack(out, c, h, w)


ADAPTER = Flux1
