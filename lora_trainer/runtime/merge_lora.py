"""merge_lora: a LoRA fused into the frozen base before training, and never part of what the run exports.

What ai-toolkit does to train on a step-distilled model (its "training adapter" for Z-Image Turbo): a de-distilling
LoRA is merged into the base while training, so the new LoRA learns the concept without undoing the distillation,
and the exported LoRA is then used on the distilled model alone. Any LoRA the family's diffusers pipeline reads
(``load_lora_weights``: PEFT, kohya, ai-toolkit's ``diffusion_model.`` layouts, through diffusers' converters) can be
merged; only the denoiser's layers are fused (cached text embeddings stay valid), at ``merge_lora_scale``.

Preflight checks the file's header (``header_problems``, torch-free); the merge runs once per load, before
quantisation, offloading or sharding, so a resumed run merges the same weights again and stays exact.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

ADAPTER_NAME = "merge_lora"


def header_problems(path: Path) -> list[dict]:
    """Readable, and a LoRA (kohya or PEFT / diffusers / ai-toolkit names): torch-free."""
    from ..adapters.init_from_file import _part
    from ..preflight.probe import read_safetensors_header

    allowed = "a LoRA .safetensors file (PEFT, kohya or ai-toolkit layout)"
    if not path.is_file():
        return [{"path": "merge_lora", "value": str(path), "message": "no such file", "allowed": allowed}]
    header, problem = read_safetensors_header(path)
    if header is None:
        return [{"path": "merge_lora", "value": str(path), "message": (problem or {}).get("message", "unreadable"),
                 "allowed": allowed}]
    keys = [k for k in header if k != "__metadata__"]
    if not keys or any(_part(k) is None for k in keys):
        bad = next((k for k in keys if _part(k) is None), "(no tensors)")
        return [{"path": "merge_lora", "value": bad, "message": f"{path.name} is not a LoRA file", "allowed": allowed}]
    return []


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def merge_into_base(family, comps, path: Path, scale: float) -> dict[str, Any]:
    """Fuse ``path`` into ``comps``' denoiser(s) with the family pipeline's own LoRA loader, then drop the adapter
    layers: the weights change, the modules stay plain Linears for the run's own LoRA. Returns what the events and
    the manifest record."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..contract.errors import ConfigError

    pipe = family.pipeline(comps)
    denoisers = list(family.spec.denoisers)
    try:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    except Exception as exc:  # noqa: BLE001 - a file of another family or layout: the operator's to fix
        raise ConfigError(f"merge_lora: {family.spec.label}'s loader cannot read {path.name}: {exc}",
                          [{"path": "merge_lora", "value": str(path), "message": str(exc)[:300],
                            "allowed": f"a LoRA for {family.spec.label}"}]) from None
    # The layers the file reached, counted while they carry the adapter (not by comparing weights: a copy of a 20 B
    # denoiser to compare against would double the host memory of the load).
    changed = {n: sum(isinstance(m, BaseTunerLayer) for m in comps.denoisers[n].modules()) for n in denoisers}
    pipe.fuse_lora(components=denoisers, lora_scale=scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    if not any(changed.values()):
        raise ConfigError(f"merge_lora: {path.name} changes no weight of the {family.spec.label} denoiser",
                          [{"path": "merge_lora", "value": str(path), "message": "no layer of the file matched",
                            "allowed": f"a LoRA for {family.spec.label}"}])
    return {"path": str(path), "scale": scale, "sha256": file_digest(path), "weights_changed": changed}
