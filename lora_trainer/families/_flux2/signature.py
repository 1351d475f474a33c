"""How FLUX.2 files are recognised (torch-free), shared by flux2 (dev) and flux2_klein.

Single files in Black Forest Labs' FLUX.2 layout (``flux2-dev.safetensors``, the klein releases), bare or under
``model.diffusion_model.``: FLUX.1's ``double_blocks`` / ``single_blocks`` / ``img_in`` names, plus the model-wide
modulations ``double_stream_modulation_img.lin`` / ``single_stream_modulation.lin`` (diffusers' CHECKPOINT_KEY_NAMES
"flux2" marker) and no ``vector_in`` (no CLIP). ``guidance_in.*`` (a guidance embedder) -> dev, else klein.

klein's size, by the transformer's depth: single blocks = 4 x double blocks -> 4B (5 + 20), 3 x -> 9B (8 + 24);
dev is 8 + 48 (6 x). Depth ratios, not widths, so the tiny test models (1 double block) classify like the real ones.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import FileKeys

MARKERS = ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight")
KLEIN_BY_RATIO = {4: "klein-4b", 3: "klein-9b"}
KLEIN_BASE = {"klein-4b": "black-forest-labs/FLUX.2-klein-base-4B", "klein-9b": "black-forest-labs/FLUX.2-klein-base-9B"}
LORA_LAYOUT = ("FLUX.2 layout", ("to_qkv_mlp_proj", "single_stream_modulation", "double_stream_modulation"))


def is_flux2_file(k: FileKeys) -> bool:
    return any(m in k.dit for m in MARKERS)


def count(keys, prefix: str) -> int:
    ids = {int(n.split(".", 2)[1]) for n in keys if n.startswith(prefix) and n.split(".", 2)[1].isdigit()}
    return max(ids) + 1 if ids else 0


def klein_size(double: int, single: int) -> str | None:
    if double <= 0 or single % double:
        return None
    return KLEIN_BY_RATIO.get(single // double)


def klein_variant_of_config(tcfg: Mapping) -> tuple[str | None, str]:
    double, single = int(tcfg.get("num_layers") or 0), int(tcfg.get("num_single_layers") or 0)
    size = klein_size(double, single)
    if size is None:
        return None, f"; transformer {double} double + {single} single blocks: neither klein 4B's nor 9B's ratio"
    return size, f"; transformer {double} double + {single} single blocks ({size})"


def klein_variant_of_file(k: FileKeys) -> tuple[str | None, str]:
    double, single = count(k.dit, "double_blocks."), count(k.dit, "single_blocks.")
    size = klein_size(double, single)
    return size, f"{double} double + {single} single blocks" + (f" ({size})" if size else "")
