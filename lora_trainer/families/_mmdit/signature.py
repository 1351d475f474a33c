"""What the MMDiT families' single files (FLUX.1, SD3/3.5) share (torch-free): which of their two DiT layouts a file
has, decided once, so that each family's rule (its variant and refusals) sees only its own layout, and the parts a
ComfyUI / SAI full checkpoint adds to the transformer.

A DiT file's keys are matched with or without the ``model.diffusion_model.`` prefix:
  ``joint_blocks.N.{x,context}_block.*`` (SAI MMDiT)                          -> sd3
  else ``double_blocks.N.img_attn.*`` + ``distilled_guidance_layer.*``       -> chroma (FLUX.1 pruned: its
                                                                             approximator makes the modulations)
  else ``double_blocks.N.img_attn.*`` + ``img_in.weight`` (BFL FLUX layout)   -> flux1,
  unless it has FLUX.2's model-wide modulations (_flux2/signature.py)
"""
from __future__ import annotations

import re

from .._flux2.signature import is_flux2_file
from ..signature import FileKeys

_SAI_JOINT = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.")
_BFL_DOUBLE = re.compile(r"^double_blocks\.\d+\.img_attn\.")

# component -> key prefixes in a full checkpoint (ComfyUI names the text encoders; SAI's files use either VAE name)
VAE = ("vae", ("vae.", "first_stage_model."))
CLIP_L = "text_encoders.clip_l."
CLIP_G = "text_encoders.clip_g."
T5XXL = "text_encoders.t5xxl."


def dit_family(k: FileKeys) -> str | None:
    """The MMDiT family whose layout the file has (SD3's first, should a file have both), or None."""
    if any(_SAI_JOINT.match(name) for name in k.dit):
        return "sd3"
    double = any(_BFL_DOUBLE.match(name) for name in k.dit)
    if double and any(name.startswith("distilled_guidance_layer.") for name in k.dit):
        return "chroma"
    # FLUX.2 has the same double blocks and img_in, and its model-wide modulations (_flux2/signature.py): its own.
    if double and "img_in.weight" in k.dit and not is_flux2_file(k):
        return "flux1"
    return None
