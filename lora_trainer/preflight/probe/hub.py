"""A Hugging Face hub id: looked up in the local cache as huggingface_hub lays it out (without importing it or
going online); a cached snapshot is probed as a diffusers folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .folder import probe_diffusers_dir
from .headers import has_pipeline_index
from .result import ModelProbe, problem

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hf_hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, resolved as it does (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot refs/main points at if it has a pipeline index (model_index.json or a modular pipeline's
    modular_model_index.json), else the newest one that has one."""
    repo = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        if ref and has_pipeline_index(snaps / ref):
            return snaps / ref
    except OSError:
        pass
    try:
        cands = [p for p in snaps.iterdir() if has_pipeline_index(p)]
    except OSError:
        return None
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def probe_hub(repo_id: str) -> ModelProbe:
    snap = find_cached_snapshot(repo_id)
    offline = hub_offline()
    if snap is None:
        if offline:
            return ModelProbe("hub", repo_id, None, None, None, in_cache=False, problems=(
                problem("model_not_found", f"{repo_id} is not in the local Hugging Face cache ({hf_hub_cache_dir()}) and HF_HUB_OFFLINE is set",
                        "download it first, or unset HF_HUB_OFFLINE"),))
        return ModelProbe("hub", repo_id, None, None, None, in_cache=False, warnings=(
            problem("hub_not_cached", f"{repo_id} is not in the local Hugging Face cache ({hf_hub_cache_dir()}); it will be downloaded at the start of training",
                    "the family and completeness could not be checked"),))
    inner = probe_diffusers_dir(snap, repo_id)
    problems, warns = list(inner.problems), []
    if problems and not offline:
        # A partial snapshot is completed by from_pretrained online: not fatal yet.
        warns = [dict(p, code="hub_not_cached", message="cached snapshot incomplete (" + p["message"] + "); the rest will be downloaded")
                 for p in problems]
        problems = []
    return ModelProbe("hub", repo_id, snap, inner.family, inner.prediction_type, pipeline_class=inner.pipeline_class,
                      family_evidence=inner.family_evidence, components_found=inner.components_found,
                      components_missing=inner.components_missing, weight_files=inner.weight_files,
                      problems=tuple(problems), warnings=tuple(warns), in_cache=True, notes=inner.notes,
                      variant=inner.variant)
