"""Anima: a modular diffusers pipeline (``AnimaModularPipeline``; ``DiffusionPipeline`` cannot load it) over the
Cosmos-Predict2 DiT. Text: Qwen3's last hidden state (no template, padding "longest", zero-masked) and the caption's
T5 token ids go through the text conditioner; its output (zero-padded to at least min_sequence_length tokens) is
the transformer's ``encoder_hidden_states``, which the text cache stores, so Qwen3 and the conditioner are released
after caching. Latents: the Qwen-Image VAE's (one frame, per-channel mean / std: qwen_image's encode_latents), given
to the transformer as [B, C, 1, h, w]; timestep = sigma (the pipeline's t / num_train_timesteps); ``padding_mask``
zeros; the output is the velocity (noise - x0) the FlowMatch Euler step integrates, as our objective regresses.

The conditioner's output length is part of the conditioning: the transformer attends to every token the pipeline
gives it, padding zeros included (max(T5 tokens, min_sequence_length) of them for one prompt). The cache stores
rows padded further to a common length with a mask of that true length; predict hands the mask to the
transformer's cross-attention (attention_mask), which then sees exactly the pipeline's tokens, and samples get the
rows cut back to it.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .cosmos_compat import install
from .spec import SPEC
from ..adapter import ClassicCall, Components, ModelFamily
from ..qwen_image.adapter import QwenImage

install()  # any process that trains or samples Anima imports this module first
CONDITIONER = "text_conditioner"  # the conditioner and its T5 tokenizer ride in comps.text_encoders / .tokenizers


class Anima(ModelFamily):
    spec = SPEC

    samples_from_cache = True
    sample_negative_prompt = True  # CFG against "" (the modular pipeline's default negative prompt)

    # -- loading -------------------------------------------------------------------------------------
    def _load_folder(self, source: Path, *, dtype, progress, load_denoiser=None, load_dtypes=None) -> Components:
        """The components by class from the modular folder's subfolders (what ModularPipeline.load_components
        reads), plus the text conditioner and the T5 tokenizer, kept beside the text encoder: they are text
        encoding here, cached and released with it."""
        from diffusers import AnimaTextConditioner
        from transformers import T5TokenizerFast

        install()
        comps = super()._load_folder(source, dtype=dtype, progress=progress, load_denoiser=load_denoiser,
                                     load_dtypes=load_dtypes)
        comps.text_encoders[CONDITIONER] = AnimaTextConditioner.from_pretrained(
            source, subfolder=CONDITIONER, torch_dtype=(load_dtypes or {}).get(CONDITIONER, dtype),
            use_safetensors=True, local_files_only=True)
        comps.tokenizers[CONDITIONER] = T5TokenizerFast.from_pretrained(source, subfolder="t5_tokenizer",
                                                                        local_files_only=True)
        return comps

    def _load_single_file(self, path, *, dtype, config, progress=None):
        from ...runtime.single_file import load_components_single_file, resolve_config_source

        install()
        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    # -- latents: the Qwen-Image VAE's, normalised per channel, frame axis dropped ---------------------
    encode_latents = QwenImage.encode_latents
    latent_layout = QwenImage.latent_layout

    # -- conditioning --------------------------------------------------------------------------------
    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        from diffusers.modular_pipelines.anima.before_denoise import AnimaTextConditioningStep
        from diffusers.modular_pipelines.anima.encoders import AnimaTextEncoderStep

        conditioner = comps.text_encoders[CONDITIONER]
        # The modular pipeline's own steps, on a stand-in for the pipeline holding what they read.
        shim = SimpleNamespace(text_encoder=comps.text_encoders["text_encoder"], tokenizer=comps.tokenizers["text_encoder"],
                               t5_tokenizer=comps.tokenizers[CONDITIONER], text_conditioner=conditioner,
                               _execution_device=device)
        enc = AnimaTextEncoderStep.encode_prompt(shim, list(captions), prepare_unconditional_embeds=False,
                                                 max_sequence_length=self.max_sequence_length, device=device)
        embeds = AnimaTextConditioningStep._condition_prompt_embeds(
            shim, qwen_prompt_embeds=enc["qwen_prompt_embeds"], qwen_attention_mask=enc["qwen_attention_mask"],
            t5_input_ids=enc["t5_input_ids"], t5_attention_mask=enc["t5_attention_mask"], device=device,
            conditioning_dtype=conditioner.dtype, output_dtype=conditioner.dtype)
        # One prompt alone gets max(its T5 tokens, min_sequence_length) tokens; a batch pads to its longest with
        # zero rows (the conditioner masks them), which are the mask's job here.
        floor = int(conditioner.config.min_sequence_length)
        true_len = enc["t5_attention_mask"].sum(1).clamp(min=floor)
        width = max(floor, self.max_sequence_length)
        out = torch.nn.functional.pad(embeds, (0, 0, 0, width - embeds.shape[1]))
        mask = torch.arange(width, device=out.device)[None] < true_len.to(out.device)[:, None]
        return {"prompt_embeds": out, "prompt_mask": mask}

    def predict(self, denoisers, noisy, t, cond, geometry):
        b, c, h, w = noisy.shape
        mask = cond["prompt_mask"].bool()
        length = int(mask.sum(1).max())  # tokens past every row's own are masked for all: cut them
        mask = mask[:, :length]
        out = denoisers["transformer"](
            hidden_states=noisy.unsqueeze(2), timestep=t.to(noisy.dtype),  # sigma = t / num_train_timesteps
            encoder_hidden_states=cond["prompt_embeds"][:, :length].to(noisy.dtype),
            attention_mask=None if bool(mask.all()) else mask,
            padding_mask=noisy.new_zeros(1, 1, h, w), return_dict=False)[0]
        return out[:, :, 0]

    # -- sampling ------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        """The modular pipeline's own blocks from the conditioned embeddings on (its text-conditioning step needs
        Qwen3's states and the T5 ids, which are not kept): input, latents, timesteps, the CFG denoise loop, the
        VAE decode. Called like a classic pipeline (``.images``)."""
        from diffusers import AnimaModularPipeline, FlowMatchEulerDiscreteScheduler
        from diffusers.guiders import ClassifierFreeGuidance
        from diffusers.modular_pipelines import SequentialPipelineBlocks
        from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaCoreDenoiseStep, AnimaDecodeStep

        install()
        core = AnimaCoreDenoiseStep()
        blocks = {n: b for n, b in core.sub_blocks.items() if n != "text_conditioning"}
        blocks["decode"] = AnimaDecodeStep()
        pipe = AnimaModularPipeline(blocks=SequentialPipelineBlocks.from_blocks_dict(blocks))
        pipe.update_components(transformer=comps.denoisers["transformer"], vae=comps.vae,
                               scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config),
                               guider=ClassifierFreeGuidance(guidance_scale=self.guidance_scale))
        return ClassicCall(pipe)

    @property
    def guidance_scale(self) -> float:
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        return self.spec.sample_guidance if g is None else float(g)

    def prompt_kwargs(self, cond, negative):
        kwargs = {"prompt_embeds": _cut(cond)}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = _cut(negative)
        return kwargs

    def sample_kwargs(self) -> dict[str, Any]:
        return {}  # guidance is the guider's (pipeline); max_sequence_length was applied when the text was cached

    # -- export --------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from .export import tool_state_dict

        return tool_state_dict(states, alpha=alpha, rank=rank, dtype=dtype)


def _cut(cond) -> torch.Tensor:
    """One cached prompt back to the tokens the pipeline gives the transformer (its mask's length)."""
    (n,) = {int(m.sum()) for m in cond["prompt_mask"]}
    return cond["prompt_embeds"][:, :n]


ADAPTER = Anima
