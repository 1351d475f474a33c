"""The model-family registry. A family is one folder ``families/<name>/`` (how to add one: README.md here):

* ``spec.py``      ``SPEC``, its torch-free facts (families/spec.py ``FamilySpec``);
* ``signature.py`` ``SIGNATURE``, how its files are recognised (families/signature.py ``Signature``);
* ``adapter.py``   ``ADAPTER``, the torch side behind the interface in families/adapter.py.

This module imports no torch: ``SPECS`` / ``get_spec`` / ``get_signature`` serve preflight; ``get_family`` imports the adapter when
training needs it. ``FAMILIES`` is the one list of what the trainer trains (the schema's ``model_type`` enum is
tested against it).
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .signature import Signature
from .spec import FamilySpec

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import ModelFamily

FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "flux1", "sd3", "flux2", "flux2_klein", "zimage", "qwen_image",
                              "qwen_image21", "chroma", "anima", "krea2", "ideogram4", "wan")


def _part(name: str, part: str):
    return import_module(f"{__name__}.{name}.{part}")


SPECS: dict[str, FamilySpec] = {name: _part(name, "spec").SPEC for name in FAMILIES}


def _known(name: str) -> None:
    if name not in SPECS:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")


def get_spec(name: str) -> FamilySpec:
    _known(name)
    return SPECS[name]


def get_signature(name: str) -> Signature:
    _known(name)
    return _part(name, "signature").SIGNATURE


def get_part(name: str, part: str):
    """A family folder's optional module (``convert``: single-file converters; ``tiny``: the test builder;
    ``export``: its own tool-file naming), or None when the family has none. Imports it: torch may come with it."""
    _known(name)
    from importlib.util import find_spec

    if find_spec(f"{__name__}.{name}.{part}") is None:
        return None
    return _part(name, part)


def get_family(name: str, cfg: Any = None) -> ModelFamily:
    """The family's adapter for a run (``cfg``: its TrainConfig; None in unit tests that only need names)."""
    _known(name)
    return _part(name, "adapter").ADAPTER(cfg)


__all__ = ["FAMILIES", "SPECS", "FamilySpec", "get_family", "get_part", "get_signature", "get_spec"]
