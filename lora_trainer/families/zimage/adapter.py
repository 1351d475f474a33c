"""Z-Image: Qwen3's hidden_states[-2] under the pipeline's chat template, passed to the transformer as a list of
unpadded sequences; latents as a list of (C, 1, h, w); timestep 1 - sigma; the transformer predicts x0 - noise, so
its output is negated into the velocity our objective regresses (noise - x0), as the pipeline does before its
scheduler step."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .signature import turbo_scheduler
from .spec import SPEC
from ..adapter import Components, ModelFamily


def unpadded(cond) -> list[torch.Tensor]:
    """The cache's padded rows + mask -> the pipeline's list of variable-length caption embeddings."""
    return [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]


class ZImage(ModelFamily):
    spec = SPEC

    samples_from_cache = True
    sample_negative_prompt = True  # base samples with CFG; Turbo (guidance 0) ignores the negative
    turbo = False

    def components(self, denoisers, vae, encoders, tokenizers, sched_cfg: dict, **kwargs) -> Components:
        self.turbo = turbo_scheduler(sched_cfg)  # Turbo samples without CFG (sample_kwargs)
        return super().components(denoisers, vae, encoders, tokenizers, sched_cfg, **kwargs)

    def _load_single_file(self, path, *, dtype, config, progress=None):
        from pathlib import Path

        from ...runtime.single_file import load_components_single_file, resolve_config_source

        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        from diffusers import ZImagePipeline

        # The pipeline's own _encode_prompt (chat template with enable_thinking=True, max_length padding, the
        # mask applied): training sees exactly what sampling sees. It needs only these three attributes.
        shim = SimpleNamespace(tokenizer=comps.tokenizers["text_encoder"], text_encoder=comps.text_encoders["text_encoder"],
                               _execution_device=device)
        embeds = ZImagePipeline._encode_prompt(shim, list(captions), device=device,
                                               max_sequence_length=self.max_sequence_length)
        # The cache stacks fixed-shape rows: padded back to max_sequence_length, with the mask to undo it.
        length, width = self.max_sequence_length, embeds[0].shape[-1]
        out = embeds[0].new_zeros(len(embeds), length, width)
        mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=out.device)
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return {"prompt_embeds": out, "prompt_mask": mask}

    def predict(self, denoisers, noisy, t, cond, geometry):
        x = list(noisy.unsqueeze(2).unbind(0))  # (C, 1, h, w) each: one frame
        out = denoisers["transformer"](x, (1 - t).to(noisy.dtype), unpadded(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(noisy.dtype)

    def prompt_kwargs(self, cond, negative):
        kwargs: dict[str, Any] = {"prompt_embeds": unpadded(cond)}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = unpadded(negative)
        return kwargs

    def sampling_scheduler(self, comps: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)

    def default_sample_steps(self) -> int:
        return 9 if self.turbo else self.SAMPLE_STEPS  # Turbo's model card: 9 steps (8 transformer calls)

    def sample_kwargs(self) -> dict[str, Any]:
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        default = 0.0 if self.turbo else self.spec.sample_guidance
        return {"guidance_scale": default if g is None else g, "max_sequence_length": self.max_sequence_length}

    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from ...outputs.lora_files import alpha_state_dict

        return alpha_state_dict("Z-Image", states, alpha=alpha, rank=rank, dtype=dtype)


ADAPTER = ZImage
