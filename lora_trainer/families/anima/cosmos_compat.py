"""diffusers 0.42.1's CosmosTransformer3DModel resizes its padding mask with torchvision (imported only where
installed); this trainer does not depend on torchvision (README), so without it every forward of a model with
``concat_padding_mask`` (Anima's) fails with NameError. ``install`` gives that module the one function it calls,
with torchvision's own tensor semantics for InterpolationMode.NEAREST (``F.interpolate(mode="nearest")``); where
torchvision is installed it changes nothing."""
from __future__ import annotations

import enum
from types import SimpleNamespace


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"


def _resize(img, size, interpolation=_InterpolationMode.NEAREST, **_):
    import torch.nn.functional as F

    if interpolation is not _InterpolationMode.NEAREST:
        raise NotImplementedError(f"cosmos_compat resizes with NEAREST only, not {interpolation}")
    if list(img.shape[-2:]) == list(size):
        return img
    return F.interpolate(img, size=list(size), mode="nearest")


def install() -> None:
    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):
        transformer_cosmos.transforms = SimpleNamespace(
            functional=SimpleNamespace(resize=_resize), InterpolationMode=_InterpolationMode)
