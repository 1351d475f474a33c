"""The FLUX baseline: a FLUX.1 LoRA loop written the way diffusers' train_dreambooth_lora_flux.py teaches.

    python3 bench/naive_flux.py --model DIR --data DIR [--resolution 256] [--batch-size 1] [--steps 14]
                                [--device cpu|cuda] [--gradient-checkpointing] [--sync-timers]

What it does, like the example (examples/dreambooth/train_dreambooth_lora_flux.py, diffusers 0.3x-0.4x, with a
caption per image, i.e. its "custom instance prompts" path, and without --cache_latents):
- loads the components from a diffusers FluxPipeline folder and freezes them; on a GPU the transformer, VAE and
  both text encoders in bf16 (the example casts all four to the weight dtype), on the CPU everything fp32;
- ``transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=...))``
  on the same layers as train_lora's FLUX default (preset ``attention_mlp``: the example's default list --
  attn.to_q/k/v/out.0, attn.add_q/k/v_proj, attn.to_add_out, ff and ff_context -- plus ``proj_mlp`` and the
  single blocks' ``proj_out``, as ``--lora_layers`` would name them), so both sides train the same adapter;
- ``torch.optim.AdamW(params, lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)`` (the example's defaults);
- images are resized (Lanczos, shorter side) and center-cropped once at start-up, as the example's
  DreamBoothDataset does in its constructor;
- every step: tokenize with CLIP (77) and T5 (max_sequence_length 512) and run both encoders under no_grad
  (``compute_text_embeddings``: CLIP's pooled output, T5's last hidden state, text_ids zeros); VAE encode
  (``latent_dist.sample()``, then ``(x - shift_factor) * scaling_factor``); latent image ids
  (``FluxPipeline._prepare_latent_image_ids``); noise; u ~ uniform (``weighting_scheme`` "none"), timesteps
  from the scheduler's table and sigmas by the example's ``get_sigmas`` (a ``.item()`` per sample); pack
  (``FluxPipeline._pack_latents``); guidance 1.0 for the guidance embedder; transformer forward with
  ``timestep / 1000``; unpack; weighted fp32 MSE against ``noise - x0``; backward;
  ``clip_grad_norm_(max_norm=1.0)``; optimizer step; LR-scheduler step; ``zero_grad()``;
  ``loss.detach().item()`` for the progress bar.

Output: one line per step on stderr (``STEP {json}``) with the step time and its parts (data, vae, text,
transformer = forward + loss + backward, optim = clip + step + zero_grad, other = noise / sigmas / ids / packing);
one JSON summary line on stdout (bench/naive_loop.py's protocol, so bench_cpu.py reads both the same way).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

T_START = time.monotonic()
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from naive_loop import list_dataset  # noqa: E402

PARTS = ("data", "vae", "text", "transformer", "optim", "other")
# The example's default --lora_layers, plus what train_lora's FLUX preset adds (proj_mlp, the single blocks'
# proj_out; the top-level proj_out is not a block layer and train_lora leaves it alone too).
EXAMPLE_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                   "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2"]


def lora_targets(transformer) -> list[str]:
    n_single = len(transformer.single_transformer_blocks)
    return EXAMPLE_TARGETS + ["proj_mlp"] + [f"single_transformer_blocks.{i}.proj_out" for i in range(n_single)]


class NaiveFluxLoop:
    """The example's loop as an object, so bench_gpu.py can drive it in-process too."""

    def __init__(self, model_dir, data_dir, *, resolution: int, batch_size: int = 1, device: str = "cpu",
                 rank: int = 16, lr: float = 1e-4, seed: int = 42, gradient_checkpointing: bool = False,
                 sync_timers: bool = False, sync_each_step: bool = True, guidance_scale: float = 1.0,
                 max_sequence_length: int = 512, components: dict | None = None):
        import torch

        self.torch = torch
        self.model_dir, self.resolution, self.batch_size = Path(model_dir), resolution, batch_size
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sync_timers = sync_timers and self.cuda
        self.sync_each_step = sync_each_step
        self.weight_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.guidance_scale, self.max_sequence_length = guidance_scale, max_sequence_length
        self.items = list_dataset(data_dir)
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self._load(components)
        self._lora(rank, gradient_checkpointing)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer, num_warmup_steps=0,
                                          num_training_steps=1000)
        self._preprocess()
        self.order: list[int] = []
        self.train_loss = 0.0

    # -- setup, as the example does it --------------------------------------------------------------
    def _load(self, components: dict | None) -> None:
        import copy

        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        src, wd = str(self.model_dir), self.weight_dtype
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
        self.noise_scheduler_copy = copy.deepcopy(self.noise_scheduler)
        self.tokenizer_one = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        self.tokenizer_two = T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_2")
        if components is None:
            # The example loads fp32 and then casts with .to(weight_dtype); loading straight in the weight dtype
            # ends in the same state without a 48 GB fp32 copy of the full-size transformer in host memory.
            components = {
                "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=wd),
                "text_encoder_2": T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", torch_dtype=wd),
                "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=wd),
                "transformer": FluxTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=wd),
            }
        self.text_encoder_one, self.text_encoder_two = components["text_encoder"], components["text_encoder_2"]
        self.vae, self.transformer = components["vae"], components["transformer"]
        self.vae_shift = self.vae.config.shift_factor
        self.vae_scaling = self.vae.config.scaling_factor
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for m in (self.vae, self.text_encoder_one, self.text_encoder_two, self.transformer):
            m.requires_grad_(False)
            m.to(self.device, dtype=wd)  # the example: vae, transformer and both text encoders to weight_dtype

    def _lora(self, rank: int, gradient_checkpointing: bool) -> None:
        from peft import LoraConfig

        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                         target_modules=lora_targets(self.transformer))
        self.transformer.add_adapter(cfg)
        self.transformer.train()
        for p in self.transformer.parameters():  # cast_training_params: trainable LoRA weights in fp32
            if p.requires_grad:
                p.data = p.data.float()
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.lora_layers = sum(1 for n, _ in self.transformer.named_modules() if n.endswith(".lora_A"))

    def _preprocess(self) -> None:
        """DreamBoothDataset.__init__: resize (shorter side, Lanczos), center crop, ToTensor, Normalize, once."""
        import numpy as np
        from PIL import Image

        torch, res = self.torch, self.resolution
        self.pixels, self.captions = [], []
        for path, caption in self.items:
            with Image.open(path) as im:
                image = im.convert("RGB")
            w, h = image.size
            scale = res / min(w, h)
            image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.LANCZOS)
            top = max(0, round((image.height - res) / 2.0))
            left = max(0, round((image.width - res) / 2.0))
            image = image.crop((left, top, left + res, top + res))
            arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            self.pixels.append((arr - 0.5) / 0.5)
            self.captions.append(caption)

    def _next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    # -- the example's compute_text_embeddings (encode_prompt with CLIP pooled + T5 states) ----------------
    def _encode_prompt(self, prompts: list[str]):
        torch = self.torch
        with torch.no_grad():
            ids = self.tokenizer_one(prompts, padding="max_length", max_length=77, truncation=True,
                                     return_overflowing_tokens=False, return_length=False,
                                     return_tensors="pt").input_ids
            pooled = self.text_encoder_one(ids.to(self.device), output_hidden_states=False).pooler_output
            pooled = pooled.to(dtype=self.text_encoder_one.dtype, device=self.device)
            ids2 = self.tokenizer_two(prompts, padding="max_length", max_length=self.max_sequence_length,
                                      truncation=True, return_length=False, return_overflowing_tokens=False,
                                      return_tensors="pt").input_ids
            prompt_embeds = self.text_encoder_two(ids2.to(self.device))[0]
            prompt_embeds = prompt_embeds.to(dtype=self.text_encoder_two.dtype, device=self.device)
            text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=self.device, dtype=self.text_encoder_one.dtype)
        return prompt_embeds, pooled, text_ids

    def _get_sigmas(self, timesteps, n_dim: int, dtype):
        """The example's get_sigmas: one .item() per sample to find each timestep in the table."""
        torch = self.torch
        sigmas = self.noise_scheduler_copy.sigmas.to(device=self.device, dtype=dtype)
        schedule_timesteps = self.noise_scheduler_copy.timesteps.to(self.device)
        timesteps = timesteps.to(self.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def _tick(self, t: list, times: dict, part: str) -> None:
        if self.sync_timers:
            self.torch.cuda.synchronize()
        now = time.perf_counter()
        times[part] = times.get(part, 0.0) + now - t[0]
        t[0] = now

    # -- one training step ----------------------------------------------------------------------------
    def step(self) -> dict:
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        torch = self.torch
        times: dict = {}
        t0 = time.perf_counter()
        t = [t0]
        idx = self._next_indices()
        pixel_values = torch.stack([self.pixels[i] for i in idx]).contiguous().float()
        prompts = [self.captions[i] for i in idx]
        self._tick(t, times, "data")

        prompt_embeds, pooled_prompt_embeds, text_ids = self._encode_prompt(prompts)
        self._tick(t, times, "text")

        pixel_values = pixel_values.to(self.device, dtype=self.vae.dtype)
        model_input = self.vae.encode(pixel_values).latent_dist.sample()
        model_input = ((model_input - self.vae_shift) * self.vae_scaling).to(dtype=self.weight_dtype)
        self._tick(t, times, "vae")

        latent_image_ids = FluxPipeline._prepare_latent_image_ids(
            model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, self.device, self.weight_dtype)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * self.noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = self.noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
        sigmas = self._get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=bsz, num_channels_latents=model_input.shape[1],
                                            height=model_input.shape[2], width=model_input.shape[3])
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([self.guidance_scale], device=self.device).expand(bsz)
        else:
            guidance = None
        self._tick(t, times, "other")

        model_pred = self.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                      pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                      txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * self.vae_scale_factor,
                                                  width=model_input.shape[3] * self.vae_scale_factor,
                                                  vae_scale_factor=self.vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        loss = loss.mean()
        loss.backward()
        self._tick(t, times, "transformer")

        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        loss_value = loss.detach().item()  # the example's progress-bar logs
        self.train_loss += loss_value
        self._tick(t, times, "optim")
        if self.cuda and self.sync_each_step and not self.sync_timers:
            torch.cuda.synchronize()
        times["step"] = time.perf_counter() - t0
        times["loss"] = loss_value
        return times

    def save_lora(self, path: Path) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        save_file(state, str(path))


def summarize(steps: list[dict], skip: int) -> dict:
    import statistics

    steady = steps[skip:] or steps
    total = sum(s["step"] for s in steady)
    return {"median_step_s": statistics.median(s["step"] for s in steady), "min_step_s": min(s["step"] for s in steady),
            "breakdown_s": {p: statistics.median(s.get(p, 0.0) for s in steady) for p in PARTS},
            "breakdown_share": {p: (sum(s.get(p, 0.0) for s in steady) / total if total else 0.0) for p in PARTS}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the steady-state median")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (the example's default 512)")
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--sync-timers", action="store_true")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--save", metavar="PATH", help="write the LoRA (PEFT keys, safetensors) at the end")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.monotonic() - T_START
    loop = NaiveFluxLoop(args.model, args.data, resolution=args.resolution, batch_size=args.batch_size,
                         device=args.device, rank=args.rank, lr=args.lr, seed=args.seed,
                         gradient_checkpointing=args.gradient_checkpointing, sync_timers=args.sync_timers,
                         guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length)
    t_setup = time.monotonic() - T_START
    steps = []
    for i in range(1, args.steps + 1):
        s = loop.step()
        s["i"] = i
        steps.append(s)
        print("STEP " + json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()}),
              file=sys.stderr, flush=True)
    if args.save:
        loop.save_lora(Path(args.save))
    summary = {"type": "naive_summary", "family": "flux1", "device": str(loop.device),
               "threads": torch.get_num_threads(), "lora_layers": loop.lora_layers,
               "lora_params": sum(p.numel() for p in loop.params), "import_s": round(t_import, 3),
               "setup_s": round(t_setup, 3), "steps": len(steps), "step_s": [round(s["step"], 5) for s in steps],
               "final_loss": steps[-1]["loss"] if steps else None, "wall_s": round(time.monotonic() - T_START, 3),
               **summarize(steps, args.skip)}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
