"""How SDXL is recognised from its files (torch-free; the rule it shares with SD1.x and SD2.x: _unet/signature.py).
Its single files are epsilon models unless they say otherwise."""
from __future__ import annotations

from .._unet.signature import SDXL_TEXT, unet_signature

SIGNATURE = unet_signature("sdxl", text_prefix=SDXL_TEXT, prediction="epsilon")
