"""How FLUX.2 dev is recognised from its files (torch-free).

diffusers folder: a ``Flux2Pipeline`` class; variant "dev" when the transformer has a guidance embedder
(``guidance_embeds``), which klein's lacks (a klein transformer here is refused, naming model_type flux2_klein).

single file (BFL FLUX.2 layout, _flux2/signature.py) with ``guidance_in.*``: "dev".
"""
from __future__ import annotations

from collections.abc import Mapping

from .._flux2.signature import LORA_LAYOUT, is_flux2_file
from ..signature import DIT, FileKeys, Match, Signature, no_folder_rule

PIPELINES = frozenset({"Flux2Pipeline"})


def variant(tcfg: Mapping):
    if not tcfg:
        return None, "", None
    if not tcfg.get("guidance_embeds"):
        return None, "", ("a FLUX.2 transformer without a guidance embedder in a Flux2Pipeline",
                          "FLUX.2 klein's transformer", "use a Flux2KleinPipeline folder (model_type flux2_klein)")
    return "dev", "; transformer guidance_embeds true (dev)", None


def match_file(k: FileKeys) -> Match | None:
    if not is_flux2_file(k) or not k.dit_has("guidance_in."):
        return None
    return Match(f"BFL FLUX.2 layout: single_stream_modulation{k.where}; guidance_in.* (dev)", "dev")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(), file_prediction="flow", file_prediction_note=None, lora_layout=LORA_LAYOUT)
