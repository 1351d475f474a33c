"""FLUX.2 dev single files: the shared BFL FLUX.2 converters (_flux2/convert.py)."""
from .._flux2.convert import *  # noqa: F401,F403
from .._flux2.convert import __all__  # noqa: F401
