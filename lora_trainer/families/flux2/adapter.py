"""FLUX.2 dev: Mistral Small 3.1 hidden states at the pipeline's text_encoder_out_layers (10, 20, 30), its chat
template with FLUX.2's system message (Flux2Pipeline._get_mistral_3_small_prompt_embeds); a guidance embedder fed
train_guidance during training (1.0 by default); guidance-distilled, so samples need no negative prompt."""
from __future__ import annotations

from .spec import SPEC
from .._flux2.adapter import Flux2Family, encoder_call


class Flux2Dev(Flux2Family):
    spec = SPEC

    def encode_text(self, comps, captions, device):
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return encoder_call(self, "_get_mistral_3_small_prompt_embeds", comps, captions, device,
                            system_message=SYSTEM_MESSAGE)


ADAPTER = Flux2Dev
