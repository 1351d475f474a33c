"""Model families behind one interface (see base.ModelFamily)."""
from __future__ import annotations

from .base import Components, ModelFamily


def get_family(name: str) -> ModelFamily:
    from .sd2 import SD2
    from .sd15 import SD15
    from .sdxl import SDXL

    families = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}
    if name not in families:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]()


__all__ = ["Components", "ModelFamily", "get_family"]
