"""How SD1.x is recognised from its files (torch-free; the rule it shares with SD2.x and SDXL: _unet/signature.py).
Its single files are epsilon models unless they say otherwise."""
from __future__ import annotations

from .._unet.signature import SD_TEXT, unet_signature

SIGNATURE = unet_signature("sd15", text_prefix=SD_TEXT, prediction="epsilon")
