"""How this Stable Diffusion family is recognised from its files (torch-free; the rules in preflight/probe)."""
from __future__ import annotations

from ..signature import Signature, no_variant

SIGNATURE = Signature(pipelines=frozenset(), variant=no_variant)
