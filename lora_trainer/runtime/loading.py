"""Where the base model comes from: a local diffusers folder, a single .safetensors file, or the hub.

Hub models are downloaded with huggingface_hub (progress becomes events) into the normal HF cache and then
loaded like a local folder. Only safetensors weights are fetched or read: pickles can run code when loaded.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from ..contract.errors import ModelLoadError
from ..families import SPECS
from ..preflight.probe import hub_offline
from ..preflight.probe.headers import PIPELINE_INDEX_FILES
from .signals import hold

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Exactly what the family adapters load from a pipeline folder (from_pretrained(..., use_safetensors=True), no
# variant), for every registered family: model_index.json, the scheduler config, each model component's config and
# its non-variant safetensors weights (single file or shards + index), and the tokenizer folders (a T5 tokenizer's
# holds spiece.model and tokenizer.json). Real repos also hold root-level single-file checkpoints
# (v1-5-pruned.safetensors, sd_xl_base_1.0.safetensors, flux1-dev.safetensors + ae.safetensors,
# sd3.5_large.safetensors and text_encoders/*.safetensors: 4-24 GB each), fp16/bf16/non_ema variants
# (model.fp16-00001-of-00002.safetensors) and a safety_checker: a bare "*.safetensors" would download all of them for
# nothing. Shard names are matched digit by digit (save_pretrained writes -00001-of-00002), so a variant's shards
# never match. One list for all families: the family of a hub id is known only once model_index.json is here.
_SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"


def _hub_patterns() -> list[str]:
    """The patterns above from the registered specs' components: denoisers, then the other models (the VAE), then
    text encoders, then their tokenizers; each group in registry order, so the list is stable."""
    specs = SPECS.values()
    encoders = [e for s in specs for e in s.text_encoders]
    tokenizers = [t for s in specs for t in s.tokenizers]
    others = [c for s in specs for c in s.components
              if c != "scheduler" and c not in s.denoisers and c not in encoders and c not in tokenizers]
    models = list(dict.fromkeys([d for s in specs for d in s.denoisers] + others + encoders))
    return [*PIPELINE_INDEX_FILES, "scheduler/*.json",
            *(f"{comp}/{name}" for comp in models for name in (
                "config.json",
                "diffusion_pytorch_model.safetensors", f"diffusion_pytorch_model{_SHARD}",
                "diffusion_pytorch_model.safetensors.index.json",
                "model.safetensors", f"model{_SHARD}", "model.safetensors.index.json")),
            *(f"{tok}/*" for tok in dict.fromkeys(tokenizers))]


HUB_PATTERNS = _hub_patterns()
HUB_IGNORE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]  # never fetched, whatever the folder


def _progress_tqdm(report: Callable[[int, int | None, str], None], *, unit: str, total: int | None):
    from tqdm.auto import tqdm

    lock = threading.Lock()  # files download in parallel threads: one update and its event at a time

    class EventTqdm(tqdm):  # huggingface_hub drives a tqdm; we turn its updates into progress events
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            self._devnull = kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - the bar itself is not wanted
            super().__init__(*args, **kwargs)
            # snapshot_download drives several bars through this class. huggingface_hub 2.x: a file counter
            # ("Fetching N files"), network bytes ("Downloading bytes": under Xet, compressed bytes against a
            # guessed total) and bytes written to the cache (the files' real sizes): only the last is reported,
            # so events are one series in bytes. 1.x has only the file counter: that series is in files.
            if unit == "B":
                self._reported = self.unit == "B" and not str(self.desc or "").startswith("Downloading bytes")
            else:
                self._reported = self.unit != "B"

        def update(self, n=1):
            with lock:
                out = super().update(n)
                if self._reported:
                    bar_total = int(self.total) if self.total else None
                    # The cache bar's own total grows as each parallel download starts (a bar near 100% before
                    # the big files begin); the dry run's sum is the real one.
                    best = total if total is not None and total >= self.n else bar_total
                    report(int(self.n), best, unit)
            return out

        def close(self):
            super().close()
            self._devnull.close()

    return EventTqdm


def _planned_bytes(snapshot_download, repo_id: str, allow_patterns: list[str]) -> int | None:
    """Bytes still to download, from huggingface_hub's dry run (one listing request); None where unavailable."""
    try:
        plan = snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=HUB_IGNORE_PATTERNS,
                                 dry_run=True)
        return sum(int(f.file_size or 0) for f in plan if f.will_download)
    except Exception:  # noqa: BLE001 - older huggingface_hub (no dry_run), or the real call will report the error
        return None


def download_from_hub(repo_id: str, report: Callable[[int, int | None, str], None],
                      allow_patterns: list[str] | None = None) -> Path:
    """Download (or complete) a pipeline snapshot into the HF cache; ``report(current, total, unit)`` gets the
    progress, unit "B" (huggingface_hub 2.x) or "files" (1.x)."""
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise ModelLoadError(f"huggingface_hub is not installed: {exc}") from None
    unit = "B" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "files"
    allow_patterns = allow_patterns or HUB_PATTERNS
    total = _planned_bytes(snapshot_download, repo_id, allow_patterns) if unit == "B" and not hub_offline() else None
    try:
        path = snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=HUB_IGNORE_PATTERNS,
                                 tqdm_class=_progress_tqdm(report, unit=unit, total=total))
    except Exception as exc:  # noqa: BLE001 - offline, 401/404, DNS: all mean "cannot get the model"
        name = type(exc).__name__
        offline = hub_offline()
        # (`huggingface-cli` is gone since huggingface_hub 1.0: its command is `hf`.)
        hint = ("the machine is offline or HF_HUB_OFFLINE is set and the model is not in the local cache; "
                "download it where there is network (hf download " + repo_id + ") or point "
                "base_model at a local folder or .safetensors file")
        if not offline and ("401" in str(exc) or "403" in str(exc) or "Gated" in name):
            hint = "the model is gated or private: accept its licence on huggingface.co and set HF_TOKEN"
            if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
                hint += " (HF_TOKEN is set: check that its account has been granted access and that it can read)"
        raise ModelLoadError(f"could not download '{repo_id}' from the Hugging Face hub ({name})", hint=hint,
                             details={"base_model": repo_id, "exception": name}) from None
    return Path(path)


def _emit_warnings(ev, warnings, already=()) -> None:
    for w in warnings:
        if w not in already:
            ev.emit("warning", **{k: v for k, v in w.items() if k in ("code", "message", "path", "files")})


def download_with_events(repo_id: str, ev, allow_patterns: list[str] | None = None) -> Path:
    """download_from_hub with its progress as ``progress`` events (phase "downloading")."""
    ev.set_phase("downloading")
    ev.emit("status", phase="downloading", message=f"downloading {repo_id} from the Hugging Face hub")
    message = f"downloading {repo_id}"
    return download_from_hub(repo_id, lambda n, total, unit: ev.emit(
        "progress", phase="downloading", current=n, total=total, unit=unit, message=message), allow_patterns)


def preflight_for_training(cfg, ev) -> tuple:
    """The same checks as --validate-only, so a run never starts on a config that preflight rejects; its model
    probe and dataset scan (for the detected family's resolution) are what training uses. Raises on errors.
    Returns (preflight result, the snapshot it downloaded or None).

    A hub id not in the cache has no family at that point, and the family decides the loader, resolution and
    buckets: it is downloaded first, then checked again on the cached snapshot (probed like a local folder, the
    dataset rescanned for that family). Every rank downloads; huggingface_hub's file locks make that safe, and
    only rank 0 emits events.
    """
    from ..preflight.run import raise_for_preflight, run_preflight

    ev.set_phase("preflight")
    pre = run_preflight(cfg, [])
    _emit_warnings(ev, pre.warnings)
    snapshot = None
    if pre.ok and pre.probe.kind == "hub" and pre.probe.family is None:
        snapshot = download_with_events(cfg.base_model, ev)
        first = pre.warnings
        pre = run_preflight(cfg, [])
        _emit_warnings(ev, pre.warnings, first)
    if not pre.ok:
        raise_for_preflight(pre)
    return pre, snapshot


def check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"refusing to load the pickle checkpoint {path.name}",
                             hint="pickle files can run arbitrary code when loaded; convert it to .safetensors "
                                  "(or use the model's diffusers folder) and point base_model at that",
                             details={"base_model": str(path)})


def load_components(cfg, family, probe, ev, *, downloaded: Path | None, dtype):
    """The family's components from base_model (downloading a hub id first when preflight has not), frozen and in
    eval mode, with an explicit prediction_type applied. Loader failures become ModelLoadError (exit 4)."""
    from .single_file import DiTSingleFileError
    from ..contract.errors import Interrupted

    ev.set_phase("loading_model")
    ev.emit("status", phase="loading_model", message=f"loading {family.name} model from {cfg.base_model}")
    hold("loading_model")  # test hook (runtime/signals.py): a signal here is a signal during loading, not after it
    source = Path(probe.path) if probe.path else None
    if probe.kind == "hub":
        # A cached snapshot may be partial (an interrupted download): snapshot_download completes it, and costs
        # one metadata request when it is complete (none with HF_HUB_OFFLINE). Not again when preflight has just
        # downloaded it.
        source = downloaded or download_with_events(cfg.base_model, ev)
    check_not_pickle(source)
    try:
        config_src = cfg.base_model_config  # a hub id, or a folder relative to the config file
        if config_src and cfg.resolve(config_src).exists():
            config_src = str(cfg.resolve(config_src).resolve())
        elif probe.kind == "single_file" and family.spec.is_flow:
            # A transformer-only file: VAE and text-encoder weights come from the config repo (snapshot_download
            # costs one metadata request when it is cached, none offline).
            from .single_file import config_source_patterns, default_config_repo

            repo = config_src or default_config_repo(probe.family, probe.variant)
            config_src = str(download_with_events(repo, ev, allow_patterns=config_source_patterns(probe.family)))
        loaded_at = _load_dtypes(cfg, family, probe, source, dtype)
        comps = family.load(source, single_file=probe.kind == "single_file", dtype=dtype, single_file_config=config_src,
                            load_dtypes=loaded_at,
                            progress=lambda i, n, what: ev.emit("progress", phase="loading_model", current=i, total=n,
                                                                unit="components", message=what))
    except (Interrupted, KeyboardInterrupt, ModelLoadError):
        raise
    except DiTSingleFileError as exc:
        raise ModelLoadError(exc.message, hint=exc.hint, details={"base_model": cfg.base_model}) from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model problem for the operator
        raise ModelLoadError(f"could not load the base model: {type(exc).__name__}: {exc}",
                             hint="check that base_model is a complete diffusers folder or a .safetensors "
                                  "checkpoint of the family it claims", details={"base_model": cfg.base_model}) from None
    wanted = cfg.prediction_type
    if wanted != "auto" and wanted != comps.prediction_type:
        ev.emit("warning", code="prediction_type_override", path="prediction_type",
                message=f"the model's scheduler config says {comps.prediction_type}; training for {wanted} "
                        "as prediction_type asks (the LoRA's metadata says so too)")
        comps = family.with_prediction_type(comps, wanted)
    for module in comps.modules():
        module.requires_grad_(False)
        module.eval()
    if cfg.merge_lora:  # into the full-precision weights, before any quantisation, streaming or sharding
        from .merge_lora import merge_into_base

        path = cfg.resolve(cfg.merge_lora)
        ev.emit("status", phase="merge_lora", message=f"fusing {path.name} into the base model at scale "
                                                      f"{cfg.merge_lora_scale} (not part of the exported LoRA)")
        comps.merged_lora = merge_into_base(family, comps, path, cfg.merge_lora_scale)
    if cfg.base_quantization != "none" or cfg.text_encoder_quantization != "none":
        _quantize(cfg, family, comps, ev, loaded_at, dtype)
    return comps


def _load_dtypes(cfg, family, probe, source: Path | None, dtype) -> dict:
    """quantize.load_dtypes for a diffusers folder: which converted components load at their file's dtype."""
    if cfg.base_quantization not in ("int8", "nf4") and cfg.text_encoder_quantization not in ("int8", "nf4"):
        return {}
    if probe.kind == "single_file" or source is None or not probe.weight_files:
        return {}
    from ..preflight.probe import weight_headers
    from .quantize import file_dtype, load_dtypes

    stored = {comp: file_dtype({k: v.get("dtype") for k, v in weight_headers(Path(source), files).items()
                                if len(v.get("shape") or ()) == 2})
              for comp, files in probe.weight_files.items()}
    return load_dtypes(cfg, family.spec, stored, dtype)


def _quantize(cfg, family, comps, ev, loaded_at: dict, dtype) -> None:
    """The frozen base's storage format (quantize.py), on the host before anything moves to the accelerator, so the
    accelerator only ever holds the small copy. Preflight has checked the backends; a failure here is still a
    config error naming the key, not a traceback."""
    from ..contract.errors import ConfigError, TrainerError
    from .quantize import quantize_at_load

    try:
        done = quantize_at_load(cfg, family.spec, comps, loaded_at, dtype)
    except TrainerError:  # Interrupted (SIGTERM while converting) keeps its own exit code
        raise
    except Exception as exc:  # noqa: BLE001 - a backend's own error, reported against the setting that chose it
        key = "base_quantization" if cfg.base_quantization != "none" else "text_encoder_quantization"
        raise ConfigError(f"{key} {getattr(cfg, key)}: the backend failed: {type(exc).__name__}: {exc}",
                          [{"path": key, "value": getattr(cfg, key), "message": str(exc)[:300],
                            "allowed": "another format, or \"none\""}]) from None
    for d in done:
        ev.emit("status", phase="loading_model", message=f"{d['component']}: {d['layers']} Linear layers "
                f"({d['params']:,} weights) stored as {d['format']}"
                + (f", cast from the file's {loaded_at[d['component']]} layer by layer"
                   if d["component"] in loaded_at else ""))
