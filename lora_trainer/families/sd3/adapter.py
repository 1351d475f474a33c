"""SD3 / SD3.5: CLIP-L and CLIP-G penultimate states concatenated and zero-padded to T5's width, then joined with
T5's sequence; the two pooled CLIP vectors concatenated; latents patchified inside the model; timestep t = 1000 sigma."""
from __future__ import annotations

import torch

from .spec import SPEC
from ..adapter import Components
from .._mmdit.adapter import MMDiTFamily


class SD3(MMDiTFamily):
    spec = SPEC

    samples_from_cache = True
    sample_negative_prompt = True

    def prompt_kwargs(self, cond, negative):
        return {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled"],
                "negative_prompt_embeds": negative["prompt_embeds"],
                "negative_pooled_prompt_embeds": negative["pooled"]}

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            ids = self.tokenize(comps.tokenizers[name], captions).to(device)
            out = comps.text_encoders[name](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the pipeline's clip_skip=None
            pooled.append(out[0])
        t5 = self.t5_embeds(comps, "text_encoder_3", captions, device)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def predict(self, denoisers, noisy, t, cond, geometry):
        return denoisers["transformer"](hidden_states=noisy, timestep=t.to(noisy.dtype) * 1000,
                                        encoder_hidden_states=cond["prompt_embeds"],
                                        pooled_projections=cond["pooled"], return_dict=False)[0]

    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        # The kohya/SAI layout (q/k/v fused exactly): the one file Forge maps, and ComfyUI too. diffusers loads
        # none of it, so its users take pytorch_lora_weights.safetensors. Fused q/k/v cannot carry DoRA's
        # per-part magnitudes, so a DoRA LoRA gets the diffusers-named file (ComfyUI and diffusers).
        from ...outputs.export import is_dora
        from .export import sd3_kohya_state_dict

        if is_dora(states):
            return super().tool_state_dict(states, configs, alpha=alpha, rank=rank, dtype=dtype)
        return sd3_kohya_state_dict(states, configs["transformer"], alpha=alpha, rank=rank, dtype=dtype)



ADAPTER = SD3
