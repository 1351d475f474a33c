"""Chroma: T5-XXL's sequence (run with its real mask) and FLUX.1's packed latents and positional ids, sigma as the
timestep, no pooled vector and no guidance embedder. The quirk is the mask: the transformer attends to the
caption's real tokens plus one pad token (and every image token), as ChromaPipeline builds it; training takes the
embeddings and the mask from the pipeline's own code. Samples use real CFG against the empty prompt, from cached
embeddings.

The mask reaches the transformer as booleans, so the padding is masked as Chroma was trained (kohya's
apply_t5_attn_mask; ComfyUI masks it too): diffusers 0.42.1's pipeline hands it over as 0./1. floats, which attention
adds to the logits instead of masking (huggingface/diffusers #12116, #13619, still open), so every pad token stays
visible. Training and this trainer's samples both pass the boolean mask (the fix #12116 describes and tested); a
stock ChromaPipeline given a prompt string still has the bug."""
from __future__ import annotations

import torch

from .spec import SPEC
from ..adapter import Components
from .._mmdit.adapter import MMDiTFamily
from ..flux1.adapter import image_ids, pack, unpack


def _pipeline_class():
    from diffusers import ChromaPipeline

    return ChromaPipeline


def transformer_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The transformer's boolean attention_mask [B, L + image tokens] from a caption mask as _get_t5_prompt_embeds
    returns it (real tokens and the first pad 1, the rest 0): ChromaPipeline._prepare_attention_mask, which appends
    the image tokens, given the mask as booleans (see the module docstring)."""
    # _prepare_attention_mask reads nothing of the pipeline instance; its dtype argument is unused.
    return _pipeline_class()._prepare_attention_mask(None, text_mask.shape[0], image_tokens, torch.bool,
                                                      attention_mask=text_mask.bool())


class Chroma(MMDiTFamily):
    spec = SPEC

    # -- conditioning --------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own _get_t5_prompt_embeds: T5 run with the tokenizer's mask, padded to
        max_sequence_length, and the transformer's text mask (real tokens plus the first pad token)."""
        pipe = _pipeline_class()(scheduler=None, vae=None, transformer=None,
                                 text_encoder=comps.text_encoders["text_encoder"],
                                 tokenizer=comps.tokenizers["text_encoder"])
        embeds, mask = pipe._get_t5_prompt_embeds(prompt=captions, max_sequence_length=self.max_sequence_length,
                                                  device=device)
        return {"prompt_embeds": embeds, "attention_mask": mask}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        txt = cond["prompt_embeds"].to(noisy.dtype)
        latents = pack(noisy)
        out = denoisers["transformer"](
            hidden_states=latents, timestep=t.to(noisy.dtype),  # sigma: the model scales it by 1000 itself
            encoder_hidden_states=txt,
            txt_ids=torch.zeros(txt.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h, w, noisy.device, noisy.dtype),
            attention_mask=transformer_mask(cond["attention_mask"], latents.shape[1]),
            return_dict=False)[0]
        return unpack(out, c, h, w)

    # -- sampling ------------------------------------------------------------------------------------
    samples_from_cache = True
    sample_negative_prompt = True  # real CFG needs the negative prompt's embeddings ("" is cached beside the prompts)

    @property
    def guidance_scale(self) -> float:
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        return self.spec.sample_guidance if g is None else float(g)

    def prompt_kwargs(self, cond, negative):
        # Boolean masks: the pipeline then masks as training does (module docstring).
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "prompt_attention_mask": cond["attention_mask"].bool()}
        if negative is not None and self.guidance_scale > 1:  # at <= 1 the pipeline runs no CFG
            kwargs.update(negative_prompt_embeds=negative["prompt_embeds"],
                          negative_prompt_attention_mask=negative["attention_mask"].bool())
        return kwargs


ADAPTER = Chroma
