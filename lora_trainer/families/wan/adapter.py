"""Wan 2.1 text-to-video: umt5-xxl's last hidden state (the pipeline's own prompt cleaning, zero-padded past the
caption to max_sequence_length, no mask), 16-channel latents of a causal 3-D VAE (8x spatial, 4x temporal, a clip
of 4k+1 frames gives k+1 latent frames; per-channel mean / std), denoised unpacked as [B, C, F, h, w] with the
timestep in [0, 1000] (sigma x 1000, what the pipeline's flow scheduler passes). Images are one-frame clips.
Samples use CFG against the empty prompt from cached embeddings, with the release's own scheduler (UniPC, flow
sigmas, flow_shift).

Wan 2.2 T2V-A14B (experts.py): ``transformer`` (high noise) and ``transformer_2`` (low noise). The experts a run
trains (train_experts) are its denoisers and carry LoRA; an expert it does not train is frozen in
``Components.sampling_only`` (on the host, on the accelerator only while sampling), and the objective then draws
only the trained expert's sigmas (objectives/sigma_range.py). ``predict`` routes each sample by its sigma as the
pipeline does (t = sigma x 1000 >= boundary_ratio x 1000: the high-noise expert), splitting a batch that straddles
the boundary and putting the outputs back in order. Each expert's LoRA is its own file pair (``export_groups``)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .experts import A14B, EXPERTS, SECOND_EXPERT
from .spec import SPEC
from ..adapter import Components, ModelFamily


def _pipeline_class():
    from diffusers import WanPipeline

    return WanPipeline


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean / latents_std, shaped [1, C, 1, 1, 1] as WanPipeline reads them."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


# diffusers module names -> Wan's original ones (ComfyUI's, ai-toolkit's wan_lora_convert.py, what diffusers'
# _convert_non_diffusers_wan_lora_to_diffusers reads back).
_ORIGINAL = (("attn1.", "self_attn."), ("attn2.", "cross_attn."), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "o"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("norm_added_k", "norm_k_img"),
             ("add_k_proj", "k_img"), ("add_v_proj", "v_img"))


def original_name(path: str) -> str:
    """A transformer module path in Wan's original layout: blocks.0.attn1.to_q -> blocks.0.self_attn.q."""
    for new, old in _ORIGINAL:
        path = path.replace(new, old)
    return path


def _model_index(folder) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())


def _boundary(index: Mapping) -> float:
    """A two-expert release's boundary_ratio (its model_index.json; T2V's 0.875 where it is not written)."""
    return float(index.get("boundary_ratio") or EXPERTS.boundary)


class FrameGrid:
    """WanPipeline called as the sampler calls image pipelines (``pipe(...).images[0]``): it makes a clip of
    ``frames`` frames and returns a few of them side by side as ``images`` (outputs/clips.frame_grid; a one-frame clip:
    that frame) and the clip as ``frames``, which the sampler saves as a video. Everything else (components,
    load_lora_weights) is the wrapped pipeline's."""

    def __init__(self, pipe, frames: int):
        self.pipe, self.frames = pipe, frames

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        from ...outputs.clips import frame_grid

        frames = self.pipe(**kwargs, num_frames=self.frames, output_type="pil").frames[0]
        return SimpleNamespace(images=[frame_grid(frames)], frames=[frames])

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class Wan(ModelFamily):
    spec = SPEC

    latent_patch = 2  # patch (1, 2, 2): 2x2 latent pixels a token

    # -- latents -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, vae, pixels):
        """[B, 3, F, H, W] (F = 4k+1) in [-1, 1] -> [B, 16, k+1, H/8, W/8], normalised per channel as the pipeline
        un-normalises before decoding (latents / (1 / std) + mean). An image [B, 3, H, W] is a one-frame clip and
        comes back as [B, 16, H/8, W/8] (its frame axis dropped, as Qwen-Image's): image batches then go through the
        loop, the caches and the masks exactly as any image family's; predict puts the axis back."""
        x = pixels.to(vae.device, vae.dtype)
        image = x.ndim == 4
        latents = vae.encode(x[:, :, None] if image else x).latent_dist.mode()
        mean, std = _stats(vae, latents)
        latents = (latents - mean) / std
        return latents[:, :, 0] if image else latents

    def latent_layout(self, vae_config: Mapping) -> tuple[int, int]:
        return int(vae_config.get("z_dim", 16)), int(vae_config.get("scale_factor_spatial", 8))

    # -- conditioning --------------------------------------------------------------------------------
    def _text_pipeline(self, comps: Components):
        return _pipeline_class()(tokenizer=comps.tokenizers["text_encoder"],
                                 text_encoder=comps.text_encoders["text_encoder"], vae=None, scheduler=None,
                                 transformer=None)

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt (ftfy / whitespace cleaning, the tokenizer's eos, states past the
        caption zeroed), at max_sequence_length: exactly the prompt_embeds sampling computes."""
        embeds, _ = self._text_pipeline(comps).encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device=device)
        return {"prompt_embeds": embeds}

    def predict(self, denoisers, noisy, t, cond, geometry):
        """``noisy`` [B, C, F, h, w] (4-D [B, C, h, w] is taken as one frame and returned so); with two experts each
        sample goes to the one its sigma belongs to."""
        if self.boundary is None:
            return self._denoise(denoisers["transformer"], noisy, t, cond)
        names = self.route(t)
        absent = sorted(set(names) - set(denoisers))
        if absent:  # train_experts restricts the sigmas (objective); fixed eval_timesteps may not be
            raise RuntimeError(f"sigma(s) {t.tolist()} belong to {', '.join(absent)}, which this run does not train "
                               f"(train_experts: {getattr(self.cfg, 'train_experts', 'both')})")
        if len(set(names)) == 1:
            return self._denoise(denoisers[names[0]], noisy, t, cond)
        order, outs = [], []
        for name in dict.fromkeys(names):
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=noisy.device)
            order.append(idx)
            outs.append(self._denoise(denoisers[name], noisy[idx], t[idx], {k: v[idx] for k, v in cond.items()}))
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    def route(self, t: torch.Tensor) -> list[str]:
        """The expert of each sample, as WanPipeline picks it: t >= boundary_ratio x num_train_timesteps (1000)
        -> the high-noise ``transformer``. Compared in float32 before any cast to the transformer's dtype (bf16
        would round 874.9 up to 876). One host read a step: the split needs the indices."""
        (_, high), (_, low) = EXPERTS.groups
        return [high if h else low for h in (t.float() * 1000 >= self.boundary * 1000).tolist()]

    def _denoise(self, transformer, noisy, t, cond):
        # several processes: the DDP wrapper, which has no dtype of its own
        dtype = getattr(transformer, "module", transformer).dtype
        image = noisy.ndim == 4
        x = noisy[:, :, None] if image else noisy
        timestep = (t * 1000).to(dtype)  # the scheduler's timesteps: sigma x 1000
        if self.expand_timesteps:
            # Wan 2.2 TI2V-5B: one timestep per token, as its pipeline passes them (all equal without an image;
            # measured: the same output as one per sample, so this is parity with the pipeline, not a fix).
            b, _, f, h, w = x.shape
            timestep = timestep[:, None].expand(b, f * (h // 2) * (w // 2))
        out = transformer(hidden_states=x.to(dtype), timestep=timestep,
                          encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                          return_dict=False)[0]
        return out[:, :, 0] if image else out

    @property
    def expand_timesteps(self) -> bool:
        return self.variant == "ti2v-5b"

    def _pipeline_extra_kwargs(self) -> dict:
        extra = {"boundary_ratio": self.boundary} if self.boundary is not None else {}
        return {**extra, "expand_timesteps": True} if self.expand_timesteps else extra

    # -- experts (Wan 2.2 T2V-A14B) --------------------------------------------------------------------
    boundary: float | None = None  # the loaded release's boundary_ratio; None: one transformer

    @property
    def train_experts(self) -> str:
        return getattr(self.cfg, "train_experts", None) or "both"

    def _load_folder(self, source: Path, *, dtype, progress, load_denoiser=None, load_dtypes=None) -> Components:
        comps = super()._load_folder(source, dtype=dtype, progress=progress, load_denoiser=load_denoiser,
                                     load_dtypes=load_dtypes)
        index = _model_index(source)
        if load_denoiser is not None or (index.get(SECOND_EXPERT) or [None, None])[1] is None:
            if self.train_experts != "both":  # preflight refuses it where it read the files; a hub download here
                from ...contract.errors import ConfigError

                raise ConfigError(f"train_experts: {self.train_experts!r} needs a model with two experts",
                                  [{"path": "train_experts", "value": self.train_experts, "allowed": '"both"',
                                    "message": "this Wan model has one transformer (only Wan 2.2 T2V-A14B has two)"}])
            return comps
        from diffusers import WanTransformer3DModel

        second = WanTransformer3DModel.from_pretrained(
            source, subfolder=SECOND_EXPERT, torch_dtype=(load_dtypes or {}).get("transformer", dtype),
            use_safetensors=True, local_files_only=True)
        self.boundary = _boundary(index)
        return self.experts_arranged(comps, second)

    def read_release(self, folder, name) -> None:
        """validation_base_model: a two-expert release's own boundary_ratio (its model_index.json)."""
        if folder is not None and self.variant == A14B:
            self.boundary = _boundary(_model_index(folder))

    def experts_arranged(self, comps: Components, second: torch.nn.Module) -> Components:
        """The two experts split by train_experts: the trained ones are the denoisers (LoRA, optimizer, the
        device), the other is frozen in sampling_only (host memory; sampling moves it to the accelerator)."""
        experts = {"transformer": comps.denoisers["transformer"], SECOND_EXPERT: second}
        trained = EXPERTS.trained(self.train_experts)
        return dataclasses.replace(
            comps, variant=A14B, denoisers={n: m for n, m in experts.items() if n in trained},
            sampling_only={**comps.sampling_only, **{n: m for n, m in experts.items() if n not in trained}})

    def objective(self, comps: Components):
        """With one expert trained, only its sigmas are drawn (objectives/sigma_range.py: the configured
        distribution conditioned on the expert's range, one draw per sample from the run's generator)."""
        objective = super().objective(comps)
        if self.boundary is not None:
            objective.sigma_range = EXPERTS.sigma_range(self.train_experts, self.boundary)
        return objective

    def denoisers_routed(self, comps: Components) -> bool:
        return self.boundary is not None and len(comps.denoisers) > 1

    def export_groups(self, components):
        """One file pair per expert, named for where it goes: ``<output_name>_high_noise.safetensors`` (ComfyUI,
        on the high-noise model) and ``pytorch_lora_weights_high_noise.safetensors`` (``transformer.`` keys:
        ``pipe.load_lora_weights(file)``); ``_low_noise`` likewise (``load_into_transformer_2=True``)."""
        if self.boundary is None:
            return super().export_groups(components)
        return [(f"_{name}", {"transformer": comp}) for name, comp in EXPERTS.groups if comp in components]

    def load_kwargs(self, suffix: str) -> str:
        return "load_into_transformer_2=True" if suffix == f"_{EXPERTS.groups[1][0]}" else ""

    def group_metadata(self, suffix: str) -> dict[str, str]:
        """An expert's files name the timesteps (0-1000) it denoises, as musubi-tuner records a --min_timestep /
        --max_timestep run (modelspec.timestep_range "875,1000" for the high-noise expert): the metadata, not only
        the file name, says which model a file goes on."""
        if self.boundary is None or not suffix:
            return {}
        low, high = EXPERTS.sigma_range(suffix.lstrip("_"), self.boundary)
        return {"modelspec.timestep_range": f"{round(low * 1000)},{round(high * 1000)}"}

    # -- sampling ------------------------------------------------------------------------------------
    def __init__(self, cfg=None):
        super().__init__(cfg)
        # Frames a sample clip has (validation_frames, 4k+1); an adapter without a run's config samples one frame.
        self.sample_frames = int(getattr(cfg, "validation_frames", 1)) if cfg is not None else 1

    def pipeline(self, comps: Components):
        return FrameGrid(super().pipeline(comps), self.sample_frames)

    samples_from_cache = True
    sample_negative_prompt = True  # CFG against "" (the pipeline's default negative prompt)

    def prompt_kwargs(self, cond, negative):
        kwargs = {"prompt_embeds": cond["prompt_embeds"]}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
        return kwargs

    def sampling_scheduler(self, comps: Components):
        # The release's own sampler (Wan 2.1: UniPC with flow sigmas and flow_shift 3.0 for 480p, 5.0 for 720p).
        import diffusers

        name = comps.scheduler_config.get("_class_name") or "UniPCMultistepScheduler"
        return getattr(diffusers, name).from_config(comps.scheduler_config)

    SAMPLE_STEPS = 30  # fewer than the pipeline's 50: samples during training are previews

    def sample_kwargs(self):
        return {**super().sample_kwargs(), "max_sequence_length": self.max_sequence_length}

    # -- export --------------------------------------------------------------------------------------
    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        """``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` + ``.alpha``: the only layout ComfyUI maps for Wan
        (reference section 5.3: diffusers names load 0 of 40 there), and one diffusers' Wan loader converts."""
        from ...outputs.lora_files import alpha_state_dict

        return alpha_state_dict("Wan", states, alpha=alpha, rank=rank, dtype=dtype, rename=original_name)


ADAPTER = Wan
