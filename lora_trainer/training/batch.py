"""One micro-batch's inputs: captions, latents (+ geometry, masks) and the data's loss weights.

Every random choice is derived from (seed, epoch, batch, slot), so a resumed run rebuilds exactly the batch an
uninterrupted one would have; nothing here keeps state between steps."""
from __future__ import annotations

import random

import torch

from ..data import clips
from ..data.captions import build_caption
from ..data.datasets import loss_weights as dataset_weights
from ..data.images import load_pixels
from ..data.masks import loss_weights as mask_weights
from ..objectives.ddpm import LossWeights


def captions(cfg, by_index: dict, batch: list[int], epoch: int, batch_index: int) -> list[str]:
    out = []
    for j, idx in enumerate(batch):
        rng = random.Random(f"caption:{cfg.seed}:{epoch}:{batch_index}:{j}")
        img = by_index[idx]
        out.append(build_caption(img.caption, img.trigger_words(cfg.trigger_words), prepend=cfg.prepend_trigger_words,
                                 shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                 dropout_rate=cfg.caption_dropout_rate, rng=rng))
    return out


def latents(cfg, fam, vae, by_index: dict, latent_cache, masks, batch: list[int], epoch: int, batch_index: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """(latents, geometry, masks): from the latent cache, or decoded, augmented and encoded now. A clip trains the
    epoch's window (data/clips.py): its cache entry, or its frames decoded now."""
    if latent_cache is not None:
        slots = [clips.slot(cfg, by_index[i], epoch) for i in batch]
        lat, geometry = latent_cache.batch(slots, device)
        return lat, geometry, latent_cache.batch_masks(slots, masks)
    pix, tids, pixel_masks = [], [], []
    for j, idx in enumerate(batch):
        rng = random.Random(f"aug:{cfg.seed}:{epoch}:{batch_index}:{j}")
        flip = cfg.flip_aug and rng.random() < 0.5  # drawn first, as before masks existed: the same augmentations
        img = by_index[idx]
        if img.is_clip:
            p, t = clips.load_window(cfg, img, clips.window(cfg, img, epoch), random_crop=cfg.random_crop, rng=rng,
                                     flip=flip)
        else:
            p, t = load_pixels(img, random_crop=cfg.random_crop, rng=rng, flip=flip)
        pix.append(p)
        tids.append(t)
        pixel_masks.append(masks and masks.pixels(idx, t, flip=flip))
    lat = fam.encode_latents(vae, torch.stack(pix)).float()
    return lat, torch.stack(tids).to(device), pixel_masks


def weights(masks, batch_masks, lat: torch.Tensor, by_index: dict, batch: list[int]) -> LossWeights | None:
    """A mask per element (masked_loss) and a weight per sample (a dataset's loss_weight); None when neither."""
    return LossWeights.of(mask_weights(masks, batch_masks, lat), dataset_weights(by_index, batch, lat.device))
