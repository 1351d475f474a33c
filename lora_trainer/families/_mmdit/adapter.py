"""What the flow-matching MMDiT families (FLUX.1, SD3/3.5) share: a transformer denoiser, CLIP + T5 text
encoders, a FlowMatchEuler sampler, and diffusers-named LoRA files for ComfyUI / Forge."""
from __future__ import annotations

from typing import Any

import torch

from ..adapter import Components, ModelFamily


class MMDiTFamily(ModelFamily):

    def t5_embeds(self, comps: Components, name: str, captions: list[str], device: torch.device) -> torch.Tensor:
        # Padded to max_length and unmasked, as the diffusers pipelines encode prompts for sampling: a LoRA
        # trained on other padding would see different text states at inference.
        ids = self.tokenize(comps.tokenizers[name], captions, self.max_sequence_length).to(device)
        return comps.text_encoders[name](ids, output_hidden_states=False)[0]

    def _load_single_file(self, path, *, dtype, config, progress=None):
        # Pipeline.from_single_file wants the text encoders in the file, reads all of it, and cannot convert FLUX
        # at widths other than 3072: the transformer comes from the file, the rest from the config source.
        from pathlib import Path

        from ...runtime.single_file import load_components_single_file, resolve_config_source

        source = resolve_config_source(config, family_name=self.name, checkpoint=Path(path))
        return load_components_single_file(self, Path(path), config_source=source, dtype=dtype, progress=progress)

    def sampling_scheduler(self, comps: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)

    def sample_kwargs(self) -> dict[str, Any]:
        return {**super().sample_kwargs(), "max_sequence_length": self.max_sequence_length}

    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from ...outputs.lora_files import comfy_state_dict

        return comfy_state_dict(self.name, states, alpha=alpha, rank=rank, dtype=dtype)
