"""Ideogram 4: one packed sequence ``[left padding | text | image]`` through Ideogram4Transformer2DModel.

* Text: the pipeline's own ``encode_prompt`` (chat template, no added special tokens, left padding, 13 Qwen3-VL
  layers concatenated, padding zeroed), so training sees what sampling sees. The cache keeps each caption's real
  tokens only (``text_cache_row``) with their count; a batch is right-padded by the cache and left-padded here.
* Latents: AutoencoderKLFlux2's posterior mode, patchified 2x2 into 128 channels in the order the pipeline's decode
  unpatchifies (patch row, patch column, channel: not FLUX.2's channel-major order) and normalised by the VAE's
  BatchNorm running statistics (as FLUX.2); one latent pixel is one token (``latent_patch`` 1).
* Objective: the transformer's time is ``1 - sigma`` (0 = noise) and it predicts ``x0 - noise``; predict feeds
  ``1 - sigma`` and negates, so the shared objective (velocity ``noise - x0`` at sigma) trains it unchanged: the
  loss is the same number diffusers' script computes (tests/test_family_ideogram4.py checks one step of the
  pipeline's own sampler).
* Samples: the pipeline's own loop from cached features (``_FromCache`` replaces only its encode_prompt), with the
  unconditional transformer (a ``sampling_only`` component, on the host while training) for its asymmetric
  guidance: the pipeline's schedule at its 48 steps, else a constant (its schedule has 48 entries).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .spec import SPEC
from ..adapter import Components, ModelFamily
from .._flux2.adapter import bn_encode, bn_latent_layout

TEXT, IMAGE = 3, 2  # the transformer's LLM_TOKEN_INDICATOR / OUTPUT_IMAGE_INDICATOR
IMAGE_POSITION_OFFSET = 65536


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channels ordered (patch row, patch column, C): the inverse of
    Ideogram4Pipeline's decode (view(B, h, w, 2, 2, C).permute(0, 5, 1, 3, 2, 4))."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    return x.view(b, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c4 // 4, 2 * h, 2 * w)


def packed_inputs(feats: torch.Tensor, lengths: torch.Tensor, grid_h: int, grid_w: int):
    """(text features, position_ids, segment_ids, indicator) of the packed sequence for right-padded text rows
    ``feats`` [B, L, F] holding ``lengths`` real tokens each: the layout Ideogram4Pipeline._prepare_ids and
    encode_prompt build, left-padded to L, made on the features' device without reading the lengths back."""
    b, length, width = feats.shape
    dev = feats.device
    j = torch.arange(length, device=dev)[None]
    offset = length - lengths.to(dev).long()[:, None]
    is_text = j >= offset
    # Left padding: row j takes real token j - offset; the padding rows wrap onto the zero rows past the tokens.
    src = (j - offset) % length
    text = feats.gather(1, src[..., None].expand(b, length, width))
    text_pos = torch.where(is_text, j - offset, 0)[..., None].expand(b, length, 3)
    hh = torch.arange(grid_h, device=dev).view(-1, 1).expand(grid_h, grid_w).reshape(-1)
    ww = torch.arange(grid_w, device=dev).view(1, -1).expand(grid_h, grid_w).reshape(-1)
    image_pos = torch.stack([torch.zeros_like(hh), hh, ww], dim=1) + IMAGE_POSITION_OFFSET
    n = grid_h * grid_w
    position_ids = torch.cat([text_pos, image_pos[None].expand(b, n, 3)], dim=1)
    ones = torch.ones(b, n, dtype=torch.long, device=dev)
    segment_ids = torch.cat([torch.where(is_text, 1, -1), ones], dim=1)
    indicator = torch.cat([torch.where(is_text, TEXT, 0), IMAGE * ones], dim=1)
    return text, position_ids, segment_ids, indicator


def _pipeline_class():
    from diffusers import Ideogram4Pipeline

    return Ideogram4Pipeline


def _from_cache_class():
    class _FromCache(_pipeline_class()):
        """Ideogram4Pipeline whose encode_prompt returns cached features (``prompt_embeds`` [B, L, F] right-padded,
        ``text_length`` [B]) packed with the pipeline's own _prepare_ids; everything else is its __call__."""

        _cached = None

        def __call__(self, prompt=None, *, prompt_embeds=None, text_length=None, **kwargs):
            if prompt_embeds is None:
                return super().__call__(prompt=prompt, **kwargs)
            self._cached = (prompt_embeds, text_length)
            try:
                return super().__call__(prompt=[""] * prompt_embeds.shape[0], **kwargs)
            finally:
                self._cached = None

        def encode_prompt(self, prompt, grid_h, grid_w, max_sequence_length, device):
            if self._cached is None:
                return super().encode_prompt(prompt, grid_h, grid_w, max_sequence_length, device)
            feats, lengths = self._cached
            lengths = [int(n) for n in lengths]
            if max(lengths) > max_sequence_length:
                raise ValueError(f"prompt has {max(lengths)} tokens, exceeds max_sequence_length={max_sequence_length}")
            text = feats.new_zeros(len(lengths), max_sequence_length, feats.shape[-1])
            for i, n in enumerate(lengths):
                text[i, max_sequence_length - n:] = feats[i, :n]
            text = text.to(device, torch.float32)  # what encode_prompt returns
            ids = self._prepare_ids(lengths, grid_h, grid_w, max_sequence_length, device)
            image = text.new_zeros(len(lengths), grid_h * grid_w, text.shape[-1])
            return (torch.cat([text, image], dim=1), *ids)

    return _FromCache


class Ideogram4(ModelFamily):
    spec = SPEC
    latent_patch = 1  # the cached latents are patchified already: one latent pixel per token
    samples_from_cache = True
    ENCODE_CHUNK = 4

    # -- loading ---------------------------------------------------------------------------------------
    def _load_single_file(self, path, *, dtype, config, progress=None):
        from pathlib import Path

        from ...runtime.single_file import load_components_single_file, resolve_config_source

        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    # -- latents ---------------------------------------------------------------------------------------
    def encode_latents(self, vae, pixels):
        return bn_encode(vae, pixels, patchify)

    def latent_layout(self, vae_config: Mapping) -> tuple[int, int]:
        return bn_latent_layout(vae_config)

    # -- conditioning ----------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's encode_prompt at max_sequence_length (it refuses longer prompts); its left-padded rows
        turned right-padded to the longest caption here, with each caption's token count."""
        encoder = comps.text_encoders["text_encoder"]
        pipe = _pipeline_class()(scheduler=None, vae=None, text_encoder=encoder,
                                 tokenizer=comps.tokenizers["text_encoder"], transformer=None,
                                 unconditional_transformer=None)
        length = self.max_sequence_length
        rows, lengths = [], []
        # A few captions per call: the pipeline keeps 13 taps and a fp32 copy of 2048 x 53,248 per caption (436 MB).
        for i in range(0, len(captions), self.ENCODE_CHUNK):
            embeds, _, _, indicator = pipe.encode_prompt(list(captions[i:i + self.ENCODE_CHUNK]), grid_h=1, grid_w=1,
                                                         max_sequence_length=length, device=device)
            # Left-padded: the real tokens are the last ones. The pipeline widened the encoder's output to fp32; the
            # encoder's own dtype holds it exactly (the transformer casts it back to its dtype when sampling).
            for row, n in zip(embeds[:, :length].to(encoder.dtype), (indicator[:, :length] == TEXT).sum(1).tolist()):
                rows.append(row[length - n:])
                lengths.append(n)
            del embeds
        longest = max(lengths)
        padded = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])
        return {"prompt_embeds": padded, "text_length": torch.tensor(lengths, device=padded.device)}

    def text_cache_row(self, row: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": row["prompt_embeds"][: int(row["text_length"])].clone(),
                "text_length": row["text_length"]}

    # -- denoiser --------------------------------------------------------------------------------------
    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        feats = cond["prompt_embeds"]
        text, position_ids, segment_ids, indicator = packed_inputs(feats, cond["text_length"], h, w)
        length = feats.shape[1]
        tokens = noisy.reshape(b, c, h * w).transpose(1, 2)
        hidden = torch.cat([tokens.new_zeros(b, length, c), tokens], dim=1)
        llm = torch.cat([text, text.new_zeros(b, h * w, text.shape[-1])], dim=1).to(noisy.dtype)
        out = denoisers["transformer"](
            hidden_states=hidden, timestep=(1 - t).to(noisy.dtype), encoder_hidden_states=llm,
            position_ids=position_ids, segment_ids=segment_ids, indicator=indicator, return_dict=False)[0]
        # Image rows only; x0 - noise at model time 1 - sigma, negated: the velocity noise - x0 at sigma.
        return -out[:, length:].transpose(1, 2).reshape(b, c, h, w).to(noisy.dtype)

    # -- sampling --------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        kwargs: dict[str, Any] = {**comps.denoisers, **comps.sampling_only, "vae": comps.vae,
                                  "scheduler": self.sampling_scheduler(comps),
                                  "text_encoder": comps.text_encoders.get("text_encoder"),
                                  "tokenizer": comps.tokenizers["text_encoder"]}
        return _from_cache_class()(**kwargs)

    def sampling_scheduler(self, comps: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)

    def prompt_kwargs(self, cond, negative):
        # The unconditional transformer takes no text: no negative prompt.
        return {"prompt_embeds": cond["prompt_embeds"], "text_length": cond["text_length"]}

    def sample_kwargs(self) -> dict[str, Any]:
        """The pipeline's own guidance schedule (7.0, then 3.0 for the last 3 "polish" steps) at its 48 steps;
        validation_guidance_scale, or at another step count (the schedule has 48 entries) the schedule's main
        value, as a constant."""
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        length = {"max_sequence_length": self.max_sequence_length}
        if g is None and self.sample_steps() == self.default_sample_steps():
            import inspect

            schedule = inspect.signature(_pipeline_class().__call__).parameters["guidance_schedule"].default
            return {"guidance_scale": None, "guidance_schedule": list(schedule), **length}
        return {"guidance_scale": self.spec.sample_guidance if g is None else float(g), "guidance_schedule": None,
                **length}

    def default_sample_steps(self) -> int:
        return 48  # the pipeline's default

    # -- export ----------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from .export import comfy_state_dict

        return comfy_state_dict(states, configs["transformer"], alpha=alpha, rank=rank, dtype=dtype)


ADAPTER = Ideogram4
