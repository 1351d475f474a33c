"""How SD2.x is recognised from its files (torch-free; the rule it shares with SD1.x and SDXL: _unet/signature.py).
Its single files do not say whether they are 768-v (v-prediction) or 512-base (epsilon): the layout is the same."""
from __future__ import annotations

from .._unet.signature import SD_TEXT, unet_signature

SIGNATURE = unet_signature(
    "sd2", text_prefix=SD_TEXT, prediction=None,
    prediction_note="SD2 single files do not record their prediction type (768-v or 512-base epsilon)")
