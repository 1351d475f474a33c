"""What the base model is, from its files alone: no weights loaded, no torch, no network.

The public API other modules use (the layout inside this package is free to change): ``probe_model`` and
``ModelProbe``; ``probe_single_file``; the header readers; JSON and component helpers the single-file loader
shares; the hub cache lookup."""
from .core import (HUB_ID, PICKLE_MESSAGE, PICKLE_SUFFIXES, ModelProbe, find_cached_snapshot, hf_hub_cache_dir,
                   hub_offline, probe_diffusers_dir, probe_hub, probe_model, read_safetensors_header, weight_headers,
                   weight_shapes)
from .core import _component_weights as component_weights
from .core import _read_json as read_json
from .core import _tokenizer_problem as tokenizer_problem
from .single_file import probe_single_file

__all__ = ["HUB_ID", "PICKLE_MESSAGE", "PICKLE_SUFFIXES", "ModelProbe", "component_weights", "find_cached_snapshot",
           "hf_hub_cache_dir", "hub_offline", "probe_diffusers_dir", "probe_hub", "probe_model", "probe_single_file",
           "read_json", "read_safetensors_header", "tokenizer_problem", "weight_headers", "weight_shapes"]
