"""Sample images (and a video family's clips: outputs/clips.py) from the current LoRA during training.

Sampling must not perturb training: it runs in eval mode (no LoRA dropout), draws from its own seeded
generators, and restores every global RNG state afterwards, so a run with samples trains the same weights
as one without.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..data.captions import prompts_for
from ..outputs.clips import clip_of, frame_grid, write_clip
from ..runtime.compile import eager


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _grid(images: list, cols: int):
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _log_to_dashboard(cfg, accelerator, grid, step: int) -> None:
    if cfg.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    elif cfg.report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({"samples": [wandb.Image(grid)]}, step=step)


def validation_model(trainer) -> Any:
    """The run's ValidationModel (training/validation_model.py) when validation_base_model is set, loaded at the
    first sample and kept on the trainer; else None."""
    if not trainer.cfg.validation_base_model:
        return None
    if getattr(trainer, "_validation_model", None) is None:
        from .validation_model import ValidationModel

        trainer._validation_model = ValidationModel(trainer.cfg, trainer.family, trainer.comps, trainer.events)
    return trainer._validation_model


def generate_samples(cfg, family, comps, *, ema: Any = None, **kwargs: Any) -> list[str]:
    """One set of samples (``_generate_set``), or with ``ema`` (training/ema.py, ema_decay) one per set of weights
    ema_sampling asks for, each drawn with those weights in the model and labelled."""
    from .ema import sample_sets

    paths: list[str] = []
    for weights, subdir, context in sample_sets(ema):
        with context:
            paths += _generate_set(cfg, family, comps, weights=weights, subdir=subdir, **kwargs)
    return paths


def _generate_set(cfg, family, comps, *, accelerator: Any, events, resolution: int, step: int,
                  cached: Any = None, every_rank: bool = False, validation_model: Any = None,
                  weights: str | None = None, subdir: str | None = None) -> list[str]:
    """Generate, save and report sample images with the LoRA-wrapped ``comps`` (accelerate's Accelerator gives
    the device, autocast and the dashboards); returns their paths. Main process only, unless ``every_rank``: a
    sharded denoiser (shard_base) gathers each block from every process, so they all generate the same images, and
    only the main process saves them. ``cached(prompts)``: the text cache's lookup, when the text encoders were
    released (the prompts' conditioning is in it). ``validation_model`` (validation_base_model): its denoisers, with
    the current LoRA, draw the samples, at its own sample defaults. ``weights`` ("raw" / "ema", with ema_decay) labels
    the ``sample`` events; ``subdir``: a folder inside the step's for a second set (training/ema.py)."""
    main = accelerator.is_main_process
    if not main and not every_rank:
        return []
    device = accelerator.device
    out_dir = cfg.output_path / "samples" / f"step-{step:06d}"
    out_dir = out_dir / subdir if subdir else out_dir
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    denoisers = dict(comps.denoisers)  # the plain modules, LoRA attached: no DDP wrapper in a pipeline
    moved = []
    # A frozen model the validation release replaces (an expert the run does not train) stays on the host.
    replaced = set(validation_model.denoisers) if validation_model is not None else set()
    for module in (comps.vae, *comps.text_encoders.values(),
                   *(m for n, m in comps.sampling_only.items() if n not in replaced)):
        if next(module.parameters()).device != device:
            moved.append(module)
            module.to(device)
    training_modes = {m: m.training for m in (*denoisers.values(), *comps.text_encoders.values())}
    for m in training_modes:
        m.eval()
    events.emit("status", phase="sampling", message=f"generating sample images at step {step}")
    paths, images = [], []
    try:
        # compiled blocks sample eagerly (runtime/compile.py): sampling's shapes would compile graphs used once
        with preserved_rng(), torch.no_grad(), eager():
            if validation_model is not None:
                family, comps = validation_model.family, validation_model.components(comps, device)
            pipe = family.pipeline(comps)
            pipe.set_progress_bar_config(disable=True)
            extra, steps = family.sample_kwargs(), family.sample_steps()
            for pi, prompt in enumerate(prompts_for(cfg)):
                for k in range(cfg.num_validation_images):
                    seed = cfg.seed + 1000 * pi + k  # fixed per (prompt, index): samples are comparable over time
                    generator = torch.Generator(device=device).manual_seed(seed)
                    text = {"prompt": prompt} if cached is None else family.prompt_kwargs(
                        cached([prompt]), cached([""]) if family.sample_negative_prompt else None)
                    with accelerator.autocast():
                        result = pipe(**text, num_inference_steps=steps,
                                      height=resolution, width=resolution, generator=generator, **extra)
                    path = out_dir / f"p{pi:02d}_{k:02d}_seed{seed}.png"
                    if not main:
                        continue
                    # A video family's result carries its clip: saved as a video, and as a grid of its frames in the
                    # PNG every image reader (grid.png, samples_over_steps, model card, dashboards) shows.
                    clip = clip_of(result)
                    image = frame_grid(clip) if clip else result.images[0]
                    video = path.with_suffix(f".{cfg.validation_video_format}") if clip else None
                    if video is not None:
                        write_clip(clip, video, cfg.video_fps)
                    _save_png(image, path)
                    images.append(image)
                    paths.append(str(path))
                    events.emit("sample", step=step, path=str(path), prompt=prompt, seed=seed, index=k,
                                video=str(video) if video else None, frames=len(clip) if clip else 1,
                                **({"weights": weights} if weights else {}))
            if images and main:
                grid = _grid(images, cols=cfg.num_validation_images)
                _save_png(grid, out_dir / "grid.png")
                _log_to_dashboard(cfg, accelerator, grid, step)
            del pipe
    finally:
        if validation_model is not None:
            validation_model.release()
        for m, was_training in training_modes.items():
            m.train(was_training)
        for module in moved:
            module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return paths
