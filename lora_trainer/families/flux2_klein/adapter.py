"""FLUX.2 klein: Qwen3 hidden states at the pipeline's text_encoder_out_layers (9, 18, 27), its chat template with
enable_thinking=False (Flux2KleinPipeline._get_qwen3_prompt_embeds); no guidance embedder; base models sample with
real CFG against "" (cached too), step-distilled ones without (is_distilled in model_index.json)."""
from __future__ import annotations

from pathlib import Path

from .spec import SPEC
from .._flux2.adapter import Flux2Family, encoder_call


class Flux2Klein(Flux2Family):
    spec = SPEC
    sample_negative_prompt = True  # base models' CFG encodes "" as the negative prompt

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.is_distilled = False

    def _load_folder(self, source: Path, **kwargs):
        # Also for single files: their config source folder's model_index.json says which release it is.
        from ...preflight.probe.headers import read_json

        index = read_json(Path(source) / "model_index.json")[0] or {}
        self.is_distilled = bool(index.get("is_distilled", False))
        return super()._load_folder(source, **kwargs)

    def _pipeline_extra_kwargs(self) -> dict:
        return {"is_distilled": self.is_distilled}

    def encode_text(self, comps, captions, device):
        return encoder_call(self, "_get_qwen3_prompt_embeds", comps, captions, device)

    def prompt_kwargs(self, cond, negative):
        out = {"prompt_embeds": cond["prompt_embeds"]}
        if negative is not None:
            out["negative_prompt_embeds"] = negative["prompt_embeds"]
        return out

    def default_sample_steps(self) -> int:
        return 4 if self.is_distilled else self.SAMPLE_STEPS  # the distilled releases' model cards: 4 steps

    def sample_kwargs(self):
        kwargs = super().sample_kwargs()
        explicit = self.cfg.validation_guidance_scale if self.cfg is not None else None
        if self.is_distilled and explicit is None:
            kwargs["guidance_scale"] = 1.0  # the pipeline ignores CFG for them anyway, with a warning
        return kwargs


ADAPTER = Flux2Klein
