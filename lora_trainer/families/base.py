"""The model-family interface. The training loop, data and checkpoint code talk only to this.

A family knows how to load its components, turn captions into conditioning, build the UNet's extra inputs,
and which LoRA targets and export names it uses. Adding SD3 or Flux means adding a module here, not touching
the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # ordered: "text_encoder", "text_encoder_2"
    tokenizers: dict[str, Any]  # same keys as text_encoders
    noise_scheduler: Any  # a diffusers DDPMScheduler built from the model's scheduler config
    prediction_type: str
    scheduler_config: dict = field(default_factory=dict)

    @property
    def unet_config(self) -> dict:
        return dict(self.unet.config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


class ModelFamily:
    """Base class; subclasses set the class attributes and override what differs."""

    name: str = ""
    pipeline_class: str = ""
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    bucketing_default: bool = False

    def default_resolution(self, prediction_type: str) -> int:
        return 512

    # -- loading -------------------------------------------------------------------------------
    def load(self, source: Path, *, single_file: bool, dtype: torch.dtype, single_file_config: str | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if single_file:
            return self._load_single_file(source, dtype=dtype, config=single_file_config)
        names = ["unet", "vae", *self.text_encoder_names]
        total = len(names)

        def tick(i: int, what: str) -> None:
            if progress:
                progress(i, total, what)

        tick(0, "unet")
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, use_safetensors=True,
                                                    local_files_only=True)
        tick(1, "vae")
        # The VAE stays fp32: SD/SDXL VAEs overflow in fp16 and it only runs once per image when caching.
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True,
                                            local_files_only=True)
        encoders, tokenizers = {}, {}
        for i, name in enumerate(self.text_encoder_names):
            tick(2 + i, name)
            encoders[name] = self._text_encoder_class(name).from_pretrained(
                source, subfolder=name, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
            tokenizers[name] = self._load_tokenizer(source, name.replace("text_encoder", "tokenizer"))
        tick(total, "done")
        sched_cfg = DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=True)
        return self._components(unet, vae, encoders, tokenizers, sched_cfg)

    def _components(self, unet, vae, encoders, tokenizers, sched_cfg: dict) -> Components:
        from diffusers import DDPMScheduler

        prediction_type = sched_cfg.get("prediction_type", "epsilon") or "epsilon"
        # Training always uses the DDPM forward process, whatever sampler the model ships with.
        noise_scheduler = DDPMScheduler.from_config(sched_cfg)
        return Components(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                          noise_scheduler=noise_scheduler, prediction_type=prediction_type,
                          scheduler_config=dict(sched_cfg))

    def with_prediction_type(self, comps: Components, prediction_type: str) -> Components:
        """The same components, trained and sampled for another prediction type (an explicit config override)."""
        sched_cfg = {**comps.scheduler_config, "prediction_type": prediction_type}
        return self._components(comps.unet, comps.vae, comps.text_encoders, comps.tokenizers, sched_cfg)

    def _load_single_file(self, path: Path, *, dtype: torch.dtype, config: str | None) -> Components:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs = {"config": config} if config else {}
        # Weights come only from the .safetensors file; `config` supplies component configs and tokenizers.
        pipe = cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
        encoders = {n: getattr(pipe, n) for n in self.text_encoder_names}
        tokenizers = {n: getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in self.text_encoder_names}
        pipe.vae.to(torch.float32)
        return self._components(pipe.unet, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config))

    def _text_encoder_class(self, name: str):
        from transformers import CLIPTextModel

        return CLIPTextModel

    @staticmethod
    def _load_tokenizer(source: Path, subfolder: str):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(source, subfolder=subfolder, local_files_only=True)

    # -- conditioning ----------------------------------------------------------------------------
    def tokenize(self, comps: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tok in comps.tokenizers.items():
            out[name] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
        return out

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning tensors for a batch of captions; keys are what unet_kwargs expects."""
        ids = self.tokenize(comps, captions)["text_encoder"].to(device)
        hidden = comps.text_encoders["text_encoder"](ids, return_dict=False)[0]
        return {"encoder_hidden_states": hidden}

    def unet_kwargs(self, cond: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        """Extra UNet inputs. time_ids: [B, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    # -- export ------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        """A diffusers pipeline over the (LoRA-wrapped) components, for sample images."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs = {"unet": comps.unet, "vae": comps.vae, "scheduler": self._sampling_scheduler(comps)}
        for name in self.text_encoder_names:
            kwargs[name] = comps.text_encoders[name]
            kwargs[name.replace("text_encoder", "tokenizer")] = comps.tokenizers[name]
        return cls(**kwargs, **self._pipeline_extra_kwargs())

    def _pipeline_extra_kwargs(self) -> dict:
        return {}

    @staticmethod
    def _sampling_scheduler(comps: Components):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(comps.scheduler_config)
