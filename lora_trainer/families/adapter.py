"""The model-family interface. The training loop, data, caches, checkpoints and export talk only to this.

A family provides: its components (trainable denoiser(s), VAE, text encoders, tokenizers, scheduler config),
the conditioning bundle for a batch of captions, the denoiser call (latent packing, positional ids, guidance,
the timestep value the denoiser takes), the objective strategy and its settings, the sampling pipeline, and the
file the ComfyUI/Forge/A1111 loaders read. The facts (components and their classes, defaults, presets, objective
kind) live in the family's torch-free ``spec.py``; a family object carries its spec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .spec import FamilySpec

Progress = Callable[[int, int, str], None]


@dataclass
class Components:
    denoisers: dict[str, torch.nn.Module]  # trainable denoiser(s) by pipeline attribute: {"unet": ...}, {"transformer": ...}
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # ordered as the pipeline names them: text_encoder, text_encoder_2, ...
    tokenizers: dict[str, Any]  # same keys as text_encoders
    scheduler_config: dict
    prediction_type: str  # "epsilon" | "v_prediction" (DDPM families) | "flow"
    variant: str | None = None  # e.g. FLUX.1 "dev" / "schnell"
    merged_lora: dict | None = None  # merge_lora fused into the denoiser (runtime/merge_lora.py): what the manifest records
    # The spec's sampling_only components (Ideogram 4's unconditional transformer): frozen, on the host; sampling
    # moves them to the accelerator and back.
    sampling_only: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)

    def modules(self) -> list[torch.nn.Module]:
        return [*self.denoisers.values(), self.vae, *self.text_encoders.values(), *self.sampling_only.values()]


# FlowSettings field <- the scheduler config key the pipelines' calculate_shift reads for it.
_SHIFT_KEYS = {"base_shift": "base_shift", "max_shift": "max_shift", "base_seq_len": "base_image_seq_len",
               "max_seq_len": "max_image_seq_len"}


def resolution_shift_constants(scheduler_config: Mapping) -> dict:
    """The "resolution" shift's constants from the model's own scheduler config, as its pipeline computes mu for
    sampling (Qwen-Image: 0.5 at 256 tokens to 0.9 at 8192); keys it lacks keep FlowSettings' (FLUX's) defaults,
    which FLUX.1-dev's config repeats."""
    return {field: scheduler_config[key] for field, key in _SHIFT_KEYS.items()
            if scheduler_config.get(key) is not None}

class ClassicCall:
    """A modular diffusers pipeline (``ModularPipeline``: Anima's, FLUX.3's) called as the sampler and the tests
    call classic ones, ``pipe(prompt=..., ...).images``; everything else (components, load_lora_weights) is the
    wrapped pipeline's."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(images=self.pipe(**kwargs, output="images"))

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class ModelFamily:
    """Base class. Subclasses set the class attributes and implement encode_text / predict."""

    spec: FamilySpec

    def __init__(self, cfg: Any = None):
        self.cfg = cfg  # the run's TrainConfig (None in unit tests that only need names)
        self.variant: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    # The component classes come from the spec (one home, torch-free), in the pipeline's attribute order.
    @property
    def pipeline_class(self) -> str:
        return self.spec.pipeline_class

    @property
    def denoiser_classes(self) -> dict[str, str]:
        return {n: self.spec.component_classes[n] for n in self.spec.denoisers}

    @property
    def text_encoder_classes(self) -> dict[str, str]:
        return {n: self.spec.component_classes[n] for n in self.spec.text_encoders}

    @property
    def tokenizer_classes(self) -> dict[str, str]:
        return {self.spec.tokenizer_of(n): self.spec.tokenizer_class(n) for n in self.spec.text_encoders}

    # -- loading -------------------------------------------------------------------------------
    def load(self, source: Path, *, single_file: bool, dtype: torch.dtype, single_file_config: str | None = None,
             progress: Progress | None = None, load_dtypes: Mapping[str, torch.dtype] | None = None) -> Components:
        """``load_dtypes``: components to load at another dtype than ``dtype`` (quantize.load_dtypes: converted
        layer by layer from their file's own dtype)."""
        if single_file:
            comps = self._load_single_file(source, dtype=dtype, config=single_file_config, progress=progress)
        else:
            comps = self._load_folder(source, dtype=dtype, progress=progress, load_dtypes=load_dtypes)
        self.variant = comps.variant
        return comps

    def _load_folder(self, source: Path, *, dtype: torch.dtype, progress: Progress | None,
                     load_denoiser: Callable[[str], torch.nn.Module] | None = None,
                     load_dtypes: Mapping[str, torch.dtype] | None = None) -> Components:
        """Every component from a diffusers folder; ``load_denoiser(name)`` takes the denoiser(s) from elsewhere
        (a single-file checkpoint) while the rest still comes from ``source``."""
        import diffusers
        import transformers

        names = [*self.denoiser_classes, "vae", *self.text_encoder_classes, *self.spec.sampling_only]
        tick = (lambda i, what: progress(i, len(names), what)) if progress else (lambda i, what: None)
        common = dict(use_safetensors=True, local_files_only=True)
        at = lambda name: (load_dtypes or {}).get(name, dtype)  # noqa: E731
        denoisers = {}
        for i, name in enumerate(self.denoiser_classes):
            tick(i, name)
            if load_denoiser is not None:
                denoisers[name] = load_denoiser(name)
                continue
            cls = getattr(diffusers, self.denoiser_classes[name])
            denoisers[name] = cls.from_pretrained(source, subfolder=name, torch_dtype=at(name), **common)
        tick(len(denoisers), "vae")
        # The VAE stays fp32: SD/SDXL VAEs overflow in fp16, and it runs once per image when latents are cached.
        vae_cls = getattr(diffusers, self.spec.component_classes["vae"])
        vae = vae_cls.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **common)
        encoders, tokenizers = {}, {}
        for i, name in enumerate(self.text_encoder_classes):
            tick(len(denoisers) + 1 + i, name)
            cls = getattr(transformers, self.text_encoder_classes[name])
            encoders[name] = cls.from_pretrained(source, subfolder=name, torch_dtype=at(name), **common)
            tokenizers[name] = self.load_tokenizer(source, name)
        sampling_only = {}
        for i, name in enumerate(self.spec.sampling_only):
            tick(len(denoisers) + 1 + len(encoders) + i, name)
            cls = getattr(diffusers, self.spec.component_classes[name])
            sampling_only[name] = cls.from_pretrained(source, subfolder=name, torch_dtype=dtype, **common)
        tick(len(names), "done")
        # load_config only reads scheduler_config.json, whatever the scheduler class named in it.
        sched_cfg = dict(diffusers.DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=True))
        return self.components(denoisers, vae, encoders, tokenizers, sched_cfg, sampling_only=sampling_only)

    def load_tokenizer(self, source: Path, encoder: str):
        """``encoder``'s tokenizer from its folder in ``source`` (by the spec's class; a family whose pipeline
        takes another object there, Qwen-Image 2.1's text-only processor, overrides this)."""
        import transformers

        tok = self.spec.tokenizer_of(encoder)
        return getattr(transformers, self.tokenizer_classes[tok]).from_pretrained(source, subfolder=tok,
                                                                                   local_files_only=True)

    def _load_single_file(self, path: Path, *, dtype: torch.dtype, config: str | None,
                          progress: Progress | None = None) -> Components:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs = {"config": config} if config else {}
        # Weights come only from the .safetensors file; `config` supplies component configs and tokenizers.
        pipe = cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
        pipe.vae.to(torch.float32)
        return self._from_pipe(pipe)

    def _from_pipe(self, pipe) -> Components:
        denoisers = {n: getattr(pipe, n) for n in self.denoiser_classes}
        encoders = {n: getattr(pipe, n) for n in self.text_encoder_classes}
        tokenizers = {n: getattr(pipe, self.spec.tokenizer_of(n)) for n in self.text_encoder_classes}
        return self.components(denoisers, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config),
                               sampling_only={n: getattr(pipe, n) for n in self.spec.sampling_only})

    def components(self, denoisers, vae, encoders, tokenizers, sched_cfg: dict, *,
                   sampling_only: Mapping[str, torch.nn.Module] | None = None) -> Components:
        return Components(denoisers=denoisers, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                          scheduler_config=sched_cfg, prediction_type=self.prediction_type_of(sched_cfg),
                          variant=self.variant_of(denoisers), sampling_only=dict(sampling_only or {}))

    def prediction_type_of(self, sched_cfg: dict) -> str:
        return "flow" if self.spec.is_flow else (sched_cfg.get("prediction_type") or "epsilon")

    def variant_of(self, denoisers: dict[str, torch.nn.Module]) -> str | None:
        """The variant by the rules the probe applies: config.json, then the name (the family's signature)."""
        from . import get_signature

        sig = get_signature(self.name)
        variant = sig.variant(dict(denoisers[self.spec.denoisers[0]].config))[0]
        base_model = getattr(self.cfg, "base_model", None) if self.cfg is not None else None
        return sig.named_variant(str(base_model), variant) if base_model else variant

    def with_prediction_type(self, comps: Components, prediction_type: str) -> Components:
        """The same components, trained and sampled for another prediction type (an explicit config override)."""
        return dataclasses.replace(comps, prediction_type=prediction_type,
                                   scheduler_config={**comps.scheduler_config, "prediction_type": prediction_type})

    # -- latents -------------------------------------------------------------------------------------
    # Latent pixels per transformer token side in the latents encode_latents returns: FLUX.1 packs 2x2 latent
    # pixels into a token; a family whose latents are already patchified (FLUX.2) says 1. The resolution shift
    # counts tokens with it.
    latent_patch = 2

    @torch.no_grad()
    def encode_latents(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> the normalised latents [B, C, h, w] the denoiser is trained on (and
        that the latent cache stores). Default: the posterior mean, shifted and scaled by the VAE's config; a family
        with its own normalisation (per-channel statistics, a frame axis, patchified latents) overrides it.
        The posterior mean, not a sample: a cached latent then does not depend on batch composition or on how much
        of the RNG stream earlier cache misses consumed, which keeps reruns and resumes bit-exact."""
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def latent_layout(self, vae_config: Mapping) -> tuple[int, int]:
        """(channels, downsampling) of encode_latents' output, from the VAE's config alone (the latent cache's
        size is planned before anything is encoded)."""
        channels = int(vae_config.get("latent_channels", 4))
        return channels, 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)

    # -- training ------------------------------------------------------------------------------------
    def objective(self, comps: Components):
        """The training objective strategy: DDPM (epsilon / v) or rectified flow, with the run's settings (flow
        defaults are the loaded variant's: FLUX.1-schnell trains unshifted, dev with the resolution shift)."""
        cfg = self.cfg
        if self.spec.is_flow:
            from .spec import flow_options
            from ..objectives.flow import FlowMatchingObjective, FlowSettings

            return FlowMatchingObjective(FlowSettings(**flow_options(cfg, self.spec, comps.variant),
                                                      **resolution_shift_constants(
                                                          getattr(comps, "scheduler_config", None) or {})),
                                         patch_size=self.latent_patch)
        from diffusers import DDPMScheduler

        from ..objectives.ddpm import DiffusionObjective, ObjectiveSettings

        # Training always uses the DDPM forward process, whatever sampler the model ships with.
        return DiffusionObjective(DDPMScheduler.from_config(comps.scheduler_config), ObjectiveSettings(
            prediction_type=comps.prediction_type, noise_offset=cfg.noise_offset, min_snr_gamma=cfg.min_snr_gamma))

    @property
    def max_sequence_length(self) -> int:
        """Text tokens per caption for a family with a sequence encoder: max_sequence_length, else the variant's."""
        explicit = getattr(self.cfg, "max_sequence_length", None) if self.cfg is not None else None
        return explicit or self.spec.max_sequence_length.get(self.variant, self.spec.max_sequence_length[None])

    @property
    def train_guidance(self) -> float | None:
        """The value a guidance-distilled variant's guidance embedder gets while training (FLUX.1-dev, FLUX.2 dev):
        train_guidance_scale, else the spec's; None for a model without the embedder."""
        if not self.spec.has_guidance_embedder(self.variant):
            return None
        explicit = getattr(self.cfg, "train_guidance_scale", None) if self.cfg is not None else None
        return self.spec.train_guidance[self.variant] if explicit is None else float(explicit)

    def tokenize(self, tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning bundle for a batch of captions (what predict's ``cond`` receives); tensors only, one
        row per caption, so the text cache can store and stack them."""
        raise NotImplementedError

    def text_cache_row(self, row: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """One caption's text-cache entry from its row of encode_text's batch: as it is, or trimmed (Ideogram 4
        keeps only its real tokens; the cache zero-pads variable-length rows at batch time)."""
        return row

    def predict(self, denoisers: Mapping[str, torch.nn.Module], noisy: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor], geometry: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents [B, C, H, W], shaped like them. ``t`` is what the
        objective draws (DDPM timestep indices, or flow sigmas in (0, 1]); ``geometry`` [B, 6] is each image's
        (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        raise NotImplementedError

    # -- sampling ------------------------------------------------------------------------------------
    def pipeline(self, comps: Components):
        """A diffusers pipeline over the (LoRA-wrapped) components, for sample images."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs: dict[str, Any] = {**comps.denoisers, **comps.sampling_only, "vae": comps.vae,
                                  "scheduler": self.sampling_scheduler(comps)}
        for name in self.text_encoder_classes:
            kwargs[name] = comps.text_encoders.get(name)  # None once released after caching (samples_from_cache)
            kwargs[self.spec.tokenizer_of(name)] = comps.tokenizers[name]
        return cls(**kwargs, **self._pipeline_extra_kwargs())

    def _pipeline_extra_kwargs(self) -> dict:
        return {}

    def read_release(self, folder: Path | None, name: str) -> None:
        """Take a release's own sampling settings (its model_index.json in ``folder``, or ``name`` where there is no
        folder: a single file) that its denoiser's config does not hold: validation_base_model samples with them.
        Default: none (the sample defaults come from the loaded components)."""

    # Families whose pipelines take precomputed prompt embeddings set this, so that after caching the text
    # encoders (T5-XXL: 9.5 GB in bf16) leave the GPU and host memory for good.
    samples_from_cache = False
    sample_negative_prompt = False  # the pipeline's CFG encodes "" as the negative prompt

    def prompt_kwargs(self, cond: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor] | None) -> dict:
        """Pipeline keyword arguments that replace a prompt by its cached conditioning (samples_from_cache)."""
        raise NotImplementedError

    def sampling_scheduler(self, comps: Components):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(comps.scheduler_config)

    SAMPLE_STEPS = 25

    def sample_steps(self) -> int:
        """Denoising steps per sample image: validation_inference_steps, or where it is unset the loaded model's
        (a step-distilled release samples in a few steps: FLUX.1-schnell, klein distilled, Z-Image Turbo)."""
        explicit = getattr(self.cfg, "validation_inference_steps", None) if self.cfg is not None else None
        return explicit or self.default_sample_steps()

    def default_sample_steps(self) -> int:
        return self.SAMPLE_STEPS

    def sample_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline call (guidance, sequence length)."""
        g = self.cfg.validation_guidance_scale if self.cfg is not None else None
        return {"guidance_scale": self.spec.sample_guidance if g is None else g}

    # -- export ----------------------------------------------------------------------------------------
    def export_groups(self, components) -> list[tuple[str, dict[str, str]]]:
        """The LoRA file pairs a run writes, from its trained ``components``: (suffix of the files' names,
        {component name inside the files: trained component}). Default: one pair holding every component under its
        own name. A model whose denoisers load separately (Wan 2.2 A14B's experts, each a file for the loader of
        its own transformer) writes a pair per group."""
        return [("", {c: c for c in components})]

    def load_kwargs(self, suffix: str) -> str:
        """The extra ``load_lora_weights`` arguments a group's PEFT file needs (the model card says them)."""
        return ""

    def file_groups(self, components) -> list[tuple[str, str]] | None:
        """(file-name suffix, load_kwargs) per file pair where a run writes named pairs; None for the one pair."""
        groups = self.export_groups(list(components))
        return None if [g[0] for g in groups] == [""] else [(suffix, self.load_kwargs(suffix)) for suffix, _ in groups]

    def denoisers_routed(self, comps: Components) -> bool:
        """Whether a training step may leave some of the trained denoisers unrun (each sample going to one of them:
        Wan 2.2 A14B with both experts trained). Several processes then reduce their gradients without DDP
        (distributed/routed.py)."""
        return False

    def group_metadata(self, suffix: str) -> dict[str, str]:
        """Metadata keys a group's files carry beyond the run's (both files of the pair): what tells the group's
        files apart for tools that read them. Default: none."""
        return {}

    def tool_state_dict(self, states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any], *,
                        alpha: float, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The LoRA file for ComfyUI / Forge / A1111 (``<output_name>.safetensors``) from PEFT states; ``configs``:
        each denoiser's config by component (its architecture fixes some names)."""
        raise NotImplementedError
