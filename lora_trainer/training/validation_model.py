"""validation_base_model: samples drawn by another release of the run's family (Krea 2 Turbo for a LoRA trained on
Raw, as diffusers' Krea 2 example validates), with the current LoRA applied.

Only its denoiser(s) are loaded (the run's VAE, cached prompts and tokenizers serve it: a release of the same family
shares them), in the base model's dtype, once, on the host; for each sample they get the run's LoRA config and
current weights, go to the device, and come back after, so the device holds them only while sampling (beside the
trained denoiser, which stays where it is). Their sample defaults (steps, guidance, a distilled release's shift)
are the release's own: a second family adapter reads them (ModelFamily.read_release), and validation_inference_steps
/ validation_guidance_scale still override them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..adapters.lora import ADAPTER, is_adapter_param, load_plain_lora_state, plain_lora_state


def _base_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for n, p in module.named_parameters() if not is_adapter_param(n) and p.is_floating_point()),
                torch.float32)


class ValidationModel:
    def __init__(self, cfg, family, comps, events):
        from ..families import get_family

        self.cfg, self.events = cfg, events
        self.family = get_family(family.name, cfg)
        self.family.variant = family.variant
        name = str(cfg.validation_base_model)
        source, single_file = self._source(name)
        self.family.read_release(None if single_file else source, name)
        # Every denoiser of the variant: a two-expert model's both experts (--validate-only checked that this
        # release has the same ones); those the run trains get its LoRA, an untrained one samples frozen.
        runs = {**comps.sampling_only, **comps.denoisers}
        self.denoisers = {n: self._load(n, source, single_file, _base_dtype(runs[n]), type(runs[n]).__name__)
                          for n in family.spec.denoisers_of(family.variant)}
        self.scheduler_config = comps.scheduler_config
        if not single_file:
            import diffusers

            self.scheduler_config = dict(diffusers.DDPMScheduler.load_config(source, subfolder="scheduler",
                                                                              local_files_only=True))
        self._lora_added = False

    def _source(self, name: str) -> tuple[Path, bool]:
        from ..preflight.probe import probe_model
        from ..runtime.loading import download_with_events

        probe = probe_model(name, self.cfg.base_dir)
        if probe.kind == "hub":
            return download_with_events(name, self.events), False
        return Path(probe.path), probe.kind == "single_file"

    def _load(self, name: str, source: Path, single_file: bool, dtype: torch.dtype, cls_name: str
              ) -> torch.nn.Module:
        import diffusers

        self.events.emit("status", phase="loading", message=f"loading validation_base_model's {name}")
        if single_file:
            from ..runtime.single_file import load_transformer_single_file, resolve_config_source

            # Its transformer config: base_model_config, else the base model's own folder (a release of the same
            # family: Raw's and Turbo's configs are one), else the family's reference repo in the HF cache.
            base = Path(self.cfg.resolve(self.cfg.base_model))
            config = resolve_config_source(self.cfg.base_model_config or (base if base.is_dir() else None),
                                           family_name=self.family.name, checkpoint=source)
            return load_transformer_single_file(self.family.name, source, config_source=config, dtype=dtype)
        cls = getattr(diffusers, cls_name)  # the run's own class for it (a second expert is not in the spec's)
        model = cls.from_pretrained(source, subfolder=name, torch_dtype=dtype, use_safetensors=True,
                                    local_files_only=True)
        return model.eval().requires_grad_(False)

    def components(self, comps, device: torch.device) -> Any:
        """``comps`` with this release's denoisers, carrying the run's current LoRA, on ``device`` (an expert the run
        does not train replaces the run's frozen one, without LoRA)."""
        frozen = {n: m.to(device) for n, m in self.denoisers.items() if n not in comps.denoisers}
        for name, model in self.denoisers.items():
            if name in frozen:
                continue
            trained = comps.denoisers[name]
            if not self._lora_added:
                model.add_adapter(trained.peft_config[ADAPTER], adapter_name=ADAPTER)
            load_plain_lora_state(model, plain_lora_state(trained))
            model.to(device)
        self._lora_added = True
        return dataclasses.replace(comps, denoisers={n: m for n, m in self.denoisers.items() if n not in frozen},
                                   sampling_only={**comps.sampling_only, **frozen},
                                   scheduler_config=self.scheduler_config)

    def release(self) -> None:
        for model in self.denoisers.values():
            model.to("cpu")

