"""The final outputs: the kohya LoRA, the diffusers copy, and training_manifest.json."""
from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from ..data.datasets import describe
from ..adapters.lora import dora_row_scale
from ..contract.errors import OutputError, TrainingError
from ..distributed.shard import is_sharded, lora_state
from ..runtime.run_lock import LINEAGE_KEY
from ..runtime.signals import hold as test_hold
from .export import build_metadata, export_lora, tool_tensors, write_text_atomic
from .lycoris import lycoris_metadata, peft_configs

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MANIFEST_NAME = "training_manifest.json"


def check_finite(states: dict[str, dict[str, torch.Tensor]], what: str) -> None:
    """A NaN in a LoRA ruins every image it touches; refuse to write one (sd-scripts #201, #2137)."""
    for comp, state in states.items():
        for key, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise TrainingError(f"refusing to write the {what}: {comp}.{key} holds NaN or inf",
                                    hint="the run diverged; lower learning_rate, use bf16 instead of fp16, or "
                                         "resume from an earlier checkpoint", details={"tensor": f"{comp}.{key}"})


@dataclass
class RunRecord:
    """The facts of a run that its outputs record (LoRA metadata, manifest); built by the recipe after setup."""

    cfg: Any
    family: Any  # families.ModelFamily
    comps: Any  # families.Components
    run_id: str
    device_info: Any
    world: int
    started: float  # time.monotonic() at the start
    images: list  # data.TrainImage
    scan: Any  # dataset_scan.DatasetScan
    resolution: int
    bucketing: bool
    samples_per_epoch: int
    total_steps: int
    lineage: dict  # resume.TrainState.lineage


def _groups(record: RunRecord, components) -> list[tuple[str, dict[str, str]]]:
    return record.family.export_groups(list(components))


def _renamed(names: dict[str, str], by_component: Any) -> Any:
    """``by_component`` (states, configs) with a file group's names: {name in the file: its trained component's}."""
    return None if by_component is None else {name: by_component[comp] for name, comp in names.items()}


def _group_tool_file(record: RunRecord, names: dict[str, str], states: dict) -> dict[str, torch.Tensor]:
    cfg = record.cfg
    configs = {name: denoiser.config for name, denoiser in {**record.comps.sampling_only,
                                                             **record.comps.denoisers}.items()}
    return tool_tensors(record.family, _renamed(names, states),
                        {n: configs.get(c) for n, c in names.items() if c in configs},
                        alpha=cfg.alpha, rank=cfg.lora_rank, dtype=SAVE_DTYPES[cfg.save_precision])


def tool_file(record: RunRecord, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The ComfyUI / Forge / A1111 files' tensors (the family's layout) from PEFT states, by checkpoint file name:
    ``lora`` (+ the group's suffix where the family writes a file per denoiser group: ``lora_high_noise``)."""
    return {f"lora{suffix}": _group_tool_file(record, names, states) for suffix, names in _groups(record, states)}


def _metadata(record: RunRecord, progress, ema: dict | None = None) -> dict[str, str]:
    from ..data.captions import tag_frequency

    cfg = record.cfg
    by_folder: dict[str, list] = {}
    for img in record.images:
        by_folder.setdefault(img.folder or "root", []).append(img.caption)
    training = {"steps": progress.global_step, "epochs": progress.epoch, "learning_rate": cfg.learning_rate,
                "text_encoder_lr": cfg.text_encoder_lr or cfg.learning_rate, "batch_size": cfg.batch_size,
                "optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "seed": cfg.seed,
                "mixed_precision": record.device_info.mixed_precision, "noise_offset": cfg.noise_offset,
                "num_train_images": len(record.images), "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "max_train_steps": record.total_steps, "base_model": Path(cfg.base_model).name or cfg.base_model}
    if cfg.min_snr_gamma:
        training["min_snr_gamma"] = cfg.min_snr_gamma
    # The frozen base's storage format (quantize.py): a LoRA trained on a quantised base partly learns its
    # rounding, so users load it best on the same format. ss_fp8_base is the key kohya's sd-scripts writes.
    training["base_quantization"] = cfg.base_quantization
    training["text_encoder_quantization"] = cfg.text_encoder_quantization
    if cfg.base_quantization == "fp8":
        training["ss_fp8_base"] = True
    training["ema"] = ema  # ss_ema: these are EMA weights (decay, warm-up, updates averaged); absent on raw weights
    return build_metadata(family=record.family.name, rank=cfg.lora_rank, alpha=cfg.alpha, output_name=cfg.output_name,
                          trigger_words=list(cfg.trigger_words), tag_frequency=tag_frequency(by_folder),
                          resolution=(record.resolution, record.resolution), training=training, title=cfg.output_name,
                          prediction_type=record.comps.prediction_type,
                          network_args={"train_text_encoder": cfg.train_text_encoder, "dropout": cfg.lora_dropout},
                          started_at=record.lineage["started_at"], finished_at=record.lineage["finished_at"],
                          session_id=int(record.lineage["id"][:8], 16),
                          extra={LINEAGE_KEY: record.lineage["id"], **lycoris_metadata(cfg)},
                          dora=cfg.use_dora, variant=record.comps.variant)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def export_final(record: RunRecord, *, modules: dict[str, torch.nn.Module], progress, last_loss: float | None,
                 is_main: bool, ema: Any = None) -> dict[str, str]:
    """Write the LoRA files and the manifest (main process); returns the paths for the completed event. The caller
    waits for the other ranks. ``ema`` (training/ema.py, with ema_decay): the LoRA files hold its weights and the
    raw weights go to ``raw/`` beside them, in the same two files."""
    from ..training.ema import summary as ema_summary

    cfg = record.cfg
    paths: dict[str, str] = {}
    if is_main or any(is_sharded(m) for m in modules.values()):  # sharded: lora_state is a collective
        states = {name: lora_state(m) for name, m in modules.items()}
    if is_main:
        check_finite(states, "final LoRA")
        ema_info, raw_states = ema_summary(cfg, ema), None
        if ema is not None:
            raw_states, states = states, ema.states()
            check_finite(states, "final EMA LoRA")
        datasets = describe(cfg, record.scan, record.images)  # the manifest's and the model card's
        try:
            results, metadata = {}, _metadata(record, progress, ema_info)
            for suffix, names in _groups(record, states):
                res = results[suffix] = export_lora(
                    cfg.output_path, cfg.output_name + suffix, record.family.name, _renamed(names, states),
                    alpha=cfg.alpha, rank=cfg.lora_rank, unet_config=None,
                    metadata={**metadata, **record.family.group_metadata(suffix)},
                    dtype=SAVE_DTYPES[cfg.save_precision],
                    kohya=_group_tool_file(record, names, states),
                    lora_configs=_renamed(names, peft_configs(cfg, modules)), peft_suffix=suffix)
                paths.update({f"lora{suffix}": res["kohya_path"], f"peft_lora{suffix}": res["peft_path"]})
                if raw_states is not None:
                    (cfg.output_path / "raw").mkdir(exist_ok=True)
                    raw = export_lora(cfg.output_path / "raw", cfg.output_name + suffix, record.family.name,
                                      _renamed(names, raw_states), alpha=cfg.alpha, rank=cfg.lora_rank,
                                      unet_config=None, metadata={**_metadata(record, progress),
                                                                  **record.family.group_metadata(suffix)},
                                      dtype=SAVE_DTYPES[cfg.save_precision],
                                      kohya=_group_tool_file(record, names, raw_states),
                                      lora_configs=_renamed(names, peft_configs(cfg, modules)), peft_suffix=suffix)
                    paths.update({f"raw_lora{suffix}": raw["kohya_path"], f"raw_peft_lora{suffix}": raw["peft_path"]})
                    ema_info = {**ema_info, f"raw_lora{suffix}": raw["kohya_path"],
                                f"raw_peft_lora{suffix}": raw["peft_path"]}
            # The first group's files are also "lora" / "peft_lora": what every client reads.
            first = next(iter(results))
            for key in ("lora", "peft_lora", "raw_lora", "raw_peft_lora"):
                if f"{key}{first}" in paths:
                    paths[key] = paths[f"{key}{first}"]
            paths["manifest"] = str(cfg.output_path / MANIFEST_NAME)
            res = results[first]
            test_hold("export_lora")  # a kill here: the LoRA files written, the manifest and model card not yet
            with ema.applied() if ema is not None else contextlib.nullcontext():  # the exported weights' figure
                extra = {"dora_comfyui_row_scale": dora_row_scale(modules)} if cfg.use_dora else {}
            extra.update({"ema": ema_info} if ema_info else {})
            _write_json_atomic(cfg.output_path / MANIFEST_NAME,
                               {**manifest(record, res, progress=progress, last_loss=last_loss, datasets=datasets,
                                           groups=results), **extra})
            test_hold("export_manifest")
            from .model_card import write_model_card

            local = cfg.resolve(str(cfg.base_model)).exists()
            groups = None if "" in results else [(suffix, record.family.load_kwargs(suffix)) for suffix in results]
            paths["model_card"] = str(write_model_card(cfg, family=record.family.name, steps=progress.global_step,
                                                       base_is_hub=not local, datasets=datasets, groups=groups,
                                                       variant=record.comps.variant))
        except OSError as exc:
            raise OutputError(f"could not write the final LoRA to {cfg.output_path}: {exc.strerror or exc}",
                              hint="free disk space or fix permissions; the last checkpoint is intact and "
                                   "resume: \"auto\" continues from it") from None
    return paths


def manifest(record: RunRecord, export_result: dict, *, progress, last_loss: float | None,
             datasets: list[dict], groups: dict[str, dict] | None = None) -> dict[str, Any]:
    """``groups``: export_lora's result per file-name suffix where the family writes a file pair per denoiser group
    (listed under outputs.groups)."""
    import diffusers
    import peft
    import transformers

    r = record
    return {
        "format": 1,
        "run_id": r.run_id,
        "lineage": r.lineage["id"],
        "config": r.cfg.to_dict(),
        "family": r.family.name,
        "network_type": r.cfg.network_type,
        "variant": r.comps.variant,
        "prediction_type": r.comps.prediction_type,
        "resolution": r.resolution,
        "bucketing": r.bucketing,
        "dataset": {"fingerprint": r.scan.fingerprint, "images": len(r.images),
                    "samples_per_epoch": r.samples_per_epoch, "skipped": [x.rel_path for x in r.scan.bad]},
        "datasets": datasets,
        "versions": {"train_lora": __import__("lora_trainer").__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "device": r.device_info.to_dict(),
        "world_size": r.world,
        "steps": progress.global_step,
        "epochs_completed": progress.epoch,
        "samples_seen": progress.samples_seen,
        "train_seconds": round(progress.elapsed_s, 3),
        "wall_seconds": round(time.monotonic() - r.started, 3),
        "final_loss": last_loss,
        "quantization": _quantization(r.cfg, r.comps),
        "merged_lora": r.comps.merged_lora,  # fused into the base while training, not in the outputs
        "outputs": {"lora": export_result["kohya_path"], "peft_lora": export_result["peft_path"],
                    "lora_keys": export_result["kohya_keys"], "modules": export_result["modules"],
                    **({"groups": {suffix.lstrip("_"): {"lora": g["kohya_path"], "peft_lora": g["peft_path"],
                                                        "lora_keys": g["kohya_keys"], "modules": g["modules"]}
                                   for suffix, g in groups.items()}} if groups and "" not in groups else {})},
    }


def _quantization(cfg: Any, comps: Any) -> dict[str, Any]:
    """The frozen base's formats, the layers each component really holds in them, and the backend versions that
    produced them (a LoRA's numbers depend on all three)."""
    import importlib.metadata

    from ..runtime.quantize import BACKENDS, stored_small

    versions = {}
    for fmt in {cfg.base_quantization, cfg.text_encoder_quantization}:
        backend = BACKENDS.get(fmt)
        if backend is not None:
            try:
                versions[backend.dist] = importlib.metadata.version(backend.dist)
            except importlib.metadata.PackageNotFoundError:
                versions[backend.dist] = None
    modules = {**comps.denoisers, **comps.text_encoders}  # released text encoders are gone: not listed
    return {"base": cfg.base_quantization, "text_encoders": cfg.text_encoder_quantization,
            "layers": {name: stored_small(m) for name, m in modules.items()}, "lora_dtype": "float32",
            "backends": versions}
