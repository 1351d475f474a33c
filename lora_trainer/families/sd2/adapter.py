"""Stable Diffusion 2.x: OpenCLIP ViT-H text encoder (diffusers format already drops its last layer),
768 px v-prediction (2.0-v / 2.1) or 512 px epsilon (2.x-base). Conditioning is the same as SD1.x; what differs
is the target (from the scheduler's prediction_type) and the native resolution."""
from __future__ import annotations

from .spec import SPEC
from ..sd15.adapter import SD15


class SD2(SD15):
    spec = SPEC


ADAPTER = SD2
