"""Model families behind one interface (see base.ModelFamily); their torch-free facts are in family_spec."""
from __future__ import annotations

from typing import Any

from .base import Components, ModelFamily


def get_family(name: str, cfg: Any = None) -> ModelFamily:
    from .flux1 import Flux1
    from .sd2 import SD2
    from .sd3 import SD3
    from .sd15 import SD15
    from .sdxl import SDXL

    families = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL, "flux1": Flux1, "sd3": SD3}
    if name not in families:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name](cfg)


__all__ = ["Components", "ModelFamily", "get_family"]
