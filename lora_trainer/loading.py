"""Where the base model comes from: a local diffusers folder, a single .safetensors file, or the hub.

Hub models are downloaded with huggingface_hub (progress becomes events) into the normal HF cache and then
loaded like a local folder. Only safetensors weights are fetched or read: pickles can run code when loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "tokenizer*/*", "*.model"]


def _progress_tqdm(report: Callable[[int, int | None, str], None]):
    from tqdm.auto import tqdm

    class EventTqdm(tqdm):  # huggingface_hub drives a tqdm; we turn its updates into progress events
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - the bar itself is not wanted anywhere
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            report(int(self.n), int(self.total) if self.total else None, str(self.desc or "download"))
            return out

    return EventTqdm


def download_from_hub(repo_id: str, report: Callable[[int, int | None, str], None]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise ModelLoadError(f"huggingface_hub is not installed: {exc}") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, tqdm_class=_progress_tqdm(report))
    except Exception as exc:  # noqa: BLE001 - offline, 401/404, DNS: all mean "cannot get the model"
        name = type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = ("the machine is offline or HF_HUB_OFFLINE is set and the model is not in the local cache; "
                "download it where there is network (huggingface-cli download " + repo_id + ") or point "
                "base_model at a local folder or .safetensors file")
        if not offline and ("401" in str(exc) or "403" in str(exc) or "Gated" in name):
            hint = "the model is gated or private: accept its licence on huggingface.co and set HF_TOKEN"
        raise ModelLoadError(f"could not download '{repo_id}' from the Hugging Face hub ({name})", hint=hint,
                             details={"base_model": repo_id, "exception": name}) from None
    return Path(path)


def check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"refusing to load the pickle checkpoint {path.name}",
                             hint="pickle files can run arbitrary code when loaded; convert it to .safetensors "
                                  "(or use the model's diffusers folder) and point base_model at that",
                             details={"base_model": str(path)})
