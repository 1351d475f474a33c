"""The final outputs: the kohya LoRA, the diffusers copy, and training_manifest.json."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import OutputError, TrainingError

if TYPE_CHECKING:
    from .trainer import Trainer

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


def kohya_for_checkpoint(t: "Trainer", states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return t.family.tool_state_dict(states, t.comps, alpha=t.cfg.alpha, rank=t.cfg.lora_rank,
                                    dtype=SAVE_DTYPES[t.cfg.save_precision])


def _metadata(t: "Trainer") -> dict[str, str]:
    from .captions import tag_frequency
    from .export import build_metadata

    cfg = t.cfg
    by_folder: dict[str, list] = {}
    for img in t.images:
        by_folder.setdefault(img.folder or "root", []).append(img.caption)
    training = {"steps": t.progress.global_step, "epochs": t.progress.epoch, "learning_rate": cfg.learning_rate,
                "text_encoder_lr": cfg.text_encoder_lr or cfg.learning_rate, "batch_size": cfg.batch_size,
                "optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "seed": cfg.seed,
                "mixed_precision": t.device_info.mixed_precision, "noise_offset": cfg.noise_offset,
                "num_train_images": len(t.images), "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "max_train_steps": t.total_steps, "base_model": Path(cfg.base_model).name or cfg.base_model}
    if cfg.min_snr_gamma:
        training["min_snr_gamma"] = cfg.min_snr_gamma
    return build_metadata(family=t.family.name, rank=cfg.lora_rank, alpha=cfg.alpha, output_name=cfg.output_name,
                          trigger_words=list(cfg.trigger_words), tag_frequency=tag_frequency(by_folder),
                          resolution=(t.resolution, t.resolution), training=training, title=cfg.output_name,
                          prediction_type=t.comps.prediction_type,
                          network_args={"train_text_encoder": cfg.train_text_encoder, "dropout": cfg.lora_dropout},
                          started_at=time.time() - (time.monotonic() - t.started), dora=cfg.use_dora,
                          variant=t.comps.variant)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_final(t: "Trainer") -> dict[str, str]:
    """Write the LoRA files and the manifest (main process); returns the paths for the completed event."""
    from .export import export_lora
    from .resume import _components
    from .lora import dora_row_scale, lora_state

    cfg = t.cfg
    paths: dict[str, str] = {}
    if t.accelerator.is_main_process:
        states = {name: lora_state(m) for name, m in _components(t).items()}
        check_finite(states, "final LoRA")
        try:
            res = export_lora(cfg.output_path, cfg.output_name, t.family.name, states, alpha=cfg.alpha,
                              rank=cfg.lora_rank, unet_config=None, metadata=_metadata(t),
                              dtype=SAVE_DTYPES[cfg.save_precision], kohya=kohya_for_checkpoint(t, states))
            paths = {"lora": res["kohya_path"], "peft_lora": res["peft_path"],
                     "manifest": str(cfg.output_path / MANIFEST_NAME)}
            extra = {"dora_comfyui_row_scale": dora_row_scale(_components(t))} if cfg.use_dora else {}
            _write_json_atomic(cfg.output_path / MANIFEST_NAME, {**manifest(t, res), **extra})
        except OSError as exc:
            raise OutputError(f"could not write the final LoRA to {cfg.output_path}: {exc.strerror or exc}",
                              hint="free disk space or fix permissions; the last checkpoint is intact and "
                                   "resume: \"auto\" continues from it") from None
    t.accelerator.wait_for_everyone()
    return paths


def manifest(t: "Trainer", export_result: dict) -> dict[str, Any]:
    import diffusers
    import peft
    import transformers

    return {
        "format": 1,
        "run_id": t.events.run_id,
        "config": t.cfg.to_dict(),
        "family": t.family.name,
        "prediction_type": t.comps.prediction_type,
        "resolution": t.resolution,
        "bucketing": t.bucketing,
        "dataset": {"fingerprint": t.scan.fingerprint, "images": len(t.images),
                    "samples_per_epoch": t.samples_per_epoch, "skipped": [r.rel_path for r in t.scan.bad]},
        "versions": {"train_lora": __import__("lora_trainer").__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "device": t.device_info.to_dict(),
        "world_size": t.world,
        "steps": t.progress.global_step,
        "epochs_completed": t.progress.epoch,
        "samples_seen": t.progress.samples_seen,
        "train_seconds": round(t.progress.elapsed_s, 3),
        "wall_seconds": round(time.monotonic() - t.started, 3),
        "final_loss": t.last_loss,
        "outputs": {"lora": export_result["kohya_path"], "peft_lora": export_result["peft_path"],
                    "lora_keys": export_result["kohya_keys"], "modules": export_result["modules"]},
    }
