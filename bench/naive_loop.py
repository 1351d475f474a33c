"""The baseline: an SDXL LoRA loop written the way diffusers' train_text_to_image_lora_sdxl.py example teaches.

    python3 bench/naive_loop.py --model DIR --data DIR [--resolution 256] [--batch-size 1] [--steps 14]
                                [--device cpu|cuda] [--gradient-checkpointing] [--sync-timers]

What it does, like the example (examples/text_to_image/train_text_to_image_lora_sdxl.py, diffusers 0.3x):
- loads the components from a diffusers folder; freezes them; frozen UNet and text encoders in the weight dtype
  (fp32 on the CPU, bf16 on a GPU), the VAE always in fp32;
- ``unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``; on a GPU the UNet forward runs under bf16 autocast
  (what ``accelerator.prepare`` does with ``mixed_precision="bf16"``);
- ``torch.optim.AdamW(params, lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)`` -- no foreach/fused flag;
- every step: load + resize (Lanczos, shorter side) + center-crop the batch's images with PIL (a DataLoader
  with num_workers=0 does this in the training process), tokenize with both tokenizers, VAE-encode
  (``latent_dist.sample()``), both text encoders (penultimate hidden states, pooled output of the second),
  noise and timesteps, UNet forward, fp32 MSE, ``loss.item()`` for the running loss, backward,
  ``clip_grad_norm_(max_norm=1.0)``, optimizer step, LR-scheduler step, ``zero_grad()``.

Output: one line per step on stderr (``STEP {json}``) with the step time and its parts (data, vae, text,
unet = forward + loss + backward, optim = clip + step + zero_grad); one JSON summary line on stdout.
``--sync-timers`` synchronises CUDA around each part so the breakdown is exact (it costs a little speed);
on the CPU the parts are exact anyway.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

T_START = time.monotonic()

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PARTS = ("data", "vae", "text", "unet", "optim", "other")


def list_dataset(data_dir: Path) -> list[tuple[Path, str]]:
    items = []
    for p in sorted(Path(data_dir).rglob("*")):
        if p.suffix.lower() in IMAGE_EXT:
            cap = p.with_suffix(".txt")
            items.append((p, cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""))
    if not items:
        raise SystemExit(f"no images in {data_dir}")
    return items


class NaiveLoop:
    """The example's loop as an object, so bench_gpu.py can drive it in-process too."""

    def __init__(self, model_dir, data_dir, *, resolution: int, batch_size: int = 1, device: str = "cpu",
                 rank: int = 16, lr: float = 1e-4, seed: int = 42, gradient_checkpointing: bool = False,
                 sync_timers: bool = False, sync_each_step: bool = True, components: dict | None = None):
        import torch

        self.torch = torch
        self.model_dir, self.resolution, self.batch_size = Path(model_dir), resolution, batch_size
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sync_timers = sync_timers and self.cuda
        # A sync at the end of each step makes per-step times exact but stops the next step's image loading from
        # overlapping the GPU's backward pass; bench_gpu.py turns it off and syncs only around its timed steps.
        self.sync_each_step = sync_each_step
        self.weight_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.items = list_dataset(data_dir)
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self._load(components)
        self._lora(rank, gradient_checkpointing)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer, num_warmup_steps=0,
                                          num_training_steps=1000)
        self.order: list[int] = []
        self.train_loss = 0.0

    # -- setup, as the example does it --------------------------------------------------------------
    def _load(self, components: dict | None) -> None:
        torch = self.torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        src = str(self.model_dir)
        self.noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
        self.tokenizer_one = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", use_fast=False)
        self.tokenizer_two = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", use_fast=False)
        if components is None:
            # The example loads fp32 and then casts with .to(weight_dtype); loading straight in the weight dtype
            # ends in the same state without a 10 GB fp32 copy of the full-size UNet in host memory.
            wd = self.weight_dtype
            components = {
                "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=wd),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2",
                                                                              torch_dtype=wd),
                "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=torch.float32),
                "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=wd),
            }
        self.text_encoder_one, self.text_encoder_two = components["text_encoder"], components["text_encoder_2"]
        self.vae, self.unet = components["vae"], components["unet"]
        for m in (self.vae, self.text_encoder_one, self.text_encoder_two, self.unet):
            m.requires_grad_(False)
        self.unet.to(self.device, dtype=self.weight_dtype)
        self.vae.to(self.device, dtype=torch.float32)  # the example keeps the VAE fp32 (SDXL's overflows in fp16)
        self.text_encoder_one.to(self.device, dtype=self.weight_dtype)
        self.text_encoder_two.to(self.device, dtype=self.weight_dtype)

    def _lora(self, rank: int, gradient_checkpointing: bool) -> None:
        from peft import LoraConfig

        cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                         target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        self.unet.add_adapter(cfg)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        # With fp16 the example casts these to fp32 (cast_training_params); PEFT already keeps them fp32 here.
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]

    # -- data: what the example's preprocess_train + collate_fn do, per batch -------------------------
    def _next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def _load_batch(self, idx: list[int]) -> dict:
        import numpy as np
        from PIL import Image

        torch, res = self.torch, self.resolution
        pixels, original_sizes, crop_top_lefts, captions = [], [], [], []
        for i in idx:
            path, caption = self.items[i]
            with Image.open(path) as im:
                image = im.convert("RGB")
            original_sizes.append((image.height, image.width))
            # transforms.Resize(res, LANCZOS): shorter side to res
            w, h = image.size
            scale = res / min(w, h)
            image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.LANCZOS)
            # transforms.CenterCrop(res)
            top = max(0, round((image.height - res) / 2.0))
            left = max(0, round((image.width - res) / 2.0))
            image = image.crop((left, top, left + res, top + res))
            crop_top_lefts.append((top, left))
            # ToTensor + Normalize([0.5], [0.5])
            arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            pixels.append((arr - 0.5) / 0.5)
            captions.append(caption)
        tok = lambda t: t(captions, padding="max_length", max_length=t.model_max_length, truncation=True,  # noqa: E731
                          return_tensors="pt").input_ids
        return {"pixel_values": torch.stack(pixels).contiguous().float(), "input_ids_one": tok(self.tokenizer_one),
                "input_ids_two": tok(self.tokenizer_two), "original_sizes": original_sizes,
                "crop_top_lefts": crop_top_lefts}

    def _encode_prompt(self, ids_list):
        torch = self.torch
        prompt_embeds_list = []
        for text_encoder, ids in zip((self.text_encoder_one, self.text_encoder_two), ids_list):
            out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = out[0]
            prompt_embeds = out[-1][-2]
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
        prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
        return prompt_embeds, pooled_prompt_embeds.view(bs_embed, -1)

    def _tick(self, t: list, times: dict, part: str) -> None:
        if self.sync_timers:
            self.torch.cuda.synchronize()
        now = time.perf_counter()
        times[part] = times.get(part, 0.0) + now - t[0]
        t[0] = now

    # -- one training step ----------------------------------------------------------------------------
    def step(self) -> dict:
        torch, F = self.torch, self.torch.nn.functional
        times: dict = {}
        t0 = time.perf_counter()
        t = [t0]
        batch = self._load_batch(self._next_indices())
        self._tick(t, times, "data")

        pixel_values = batch["pixel_values"].to(self.device, dtype=self.vae.dtype)
        model_input = self.vae.encode(pixel_values).latent_dist.sample()
        model_input = (model_input * self.vae.config.scaling_factor).to(self.weight_dtype)
        self._tick(t, times, "vae")

        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                  device=model_input.device).long()
        noisy_model_input = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        target_size = (self.resolution, self.resolution)
        add_time_ids = torch.cat([torch.tensor([list(o + c + target_size)]).to(self.device, dtype=self.weight_dtype)
                                  for o, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
        self._tick(t, times, "other")

        prompt_embeds, pooled = self._encode_prompt([batch["input_ids_one"], batch["input_ids_two"]])
        self._tick(t, times, "text")

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            model_pred = self.unet(noisy_model_input, timesteps, prompt_embeds,
                                   added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled},
                                   return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss_value = loss.item()  # the example's running loss: a host sync every step, before backward
        self.train_loss += loss_value
        loss.backward()
        self._tick(t, times, "unet")

        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self._tick(t, times, "optim")
        if self.cuda and self.sync_each_step and not self.sync_timers:
            torch.cuda.synchronize()
        times["step"] = time.perf_counter() - t0
        times["loss"] = loss_value
        return times

    def save_lora(self, path: Path) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        save_file(state, str(path))


def summarize(steps: list[dict], skip: int) -> dict:
    import statistics

    steady = steps[skip:] or steps
    med = statistics.median(s["step"] for s in steady)
    shares = {}
    total = sum(s["step"] for s in steady)
    for part in PARTS:
        shares[part] = sum(s.get(part, 0.0) for s in steady) / total if total else 0.0
    return {"median_step_s": med, "min_step_s": min(s["step"] for s in steady),
            "breakdown_s": {p: statistics.median(s.get(p, 0.0) for s in steady) for p in PARTS},
            "breakdown_share": shares}


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
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--sync-timers", action="store_true")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--save", metavar="PATH", help="write the LoRA (PEFT keys, safetensors) at the end")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.monotonic() - T_START
    loop = NaiveLoop(args.model, args.data, resolution=args.resolution, batch_size=args.batch_size,
                     device=args.device, rank=args.rank, lr=args.lr, seed=args.seed,
                     gradient_checkpointing=args.gradient_checkpointing, sync_timers=args.sync_timers)
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
    summary = {"type": "naive_summary", "device": str(loop.device), "threads": torch.get_num_threads(),
               "import_s": round(t_import, 3), "setup_s": round(t_setup, 3), "steps": len(steps),
               "step_s": [round(s["step"], 5) for s in steps], "final_loss": steps[-1]["loss"] if steps else None,
               "wall_s": round(time.monotonic() - T_START, 3), **summarize(steps, args.skip)}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
