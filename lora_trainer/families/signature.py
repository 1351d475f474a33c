"""How a family is recognised from its files (torch-free): each family folder's ``signature.py`` holds one
``Signature`` (``SIGNATURE``). The probe (preflight/probe) reads JSON and safetensors headers and asks the
signatures; the adapter asks the same ``variant`` rule of the loaded model's config, so the two cannot disagree."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

# (variant, evidence appended to the family's, refusal) from the denoiser's config (config.json as a dict, or the
# loaded model's .config): a refusal is (what, which model it is, hint) for a model of the family's pipeline that
# cannot be trained (FLUX.1 Fill), else None.
Unsupported = tuple[str, str, str]
VariantRule = Callable[[Mapping], tuple["str | None", str, "Unsupported | None"]]


def no_variant(config: Mapping) -> tuple[None, str, None]:
    return None, "", None


@dataclass(frozen=True)
class Signature:
    pipelines: frozenset[str]  # model_index.json _class_name values trained as this family
    variant: VariantRule
