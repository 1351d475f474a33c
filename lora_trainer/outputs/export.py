"""The shared LoRA writers: the diffusers/PEFT file, the kohya/modelspec metadata, sd-scripts' hashes, atomic saves.

Two files are written per export (``export_lora``):

* ``<output_name>.safetensors`` -- the file ComfyUI, Forge and A1111 load, in the layout its family's adapter builds
  (``ModelFamily.tool_state_dict``: the kohya SD layout of families/_unet/export.py, SD3's kohya/SAI names, the
  diffusers-named file of lora_files.py), plus ``ss_*``, ``modelspec.*`` and ``sshs_*`` header metadata.
* ``pytorch_lora_weights.safetensors`` -- the diffusers/PEFT layout (``unet.<module>.lora_A.weight`` ...) with the
  LoraConfig per component in the ``lora_adapter_metadata`` header entry, which newer diffusers (0.42 here) reads
  so that alpha != rank keeps its scale (without it diffusers assumes alpha == rank).

DoRA (PEFT ``use_dora``) adds one magnitude vector per module: W' = m * (W + s*B@A) / ||W + s*B@A||, the norm taken
per output channel. The PEFT file keeps PEFT's ``lora_magnitude_vector`` (shape [out], or [1, out, 1, 1] for convs),
which diffusers loads exactly. The tool files store it as ``.dora_scale`` shaped [out, 1] / [out, 1, 1, 1]
(``magnitude_fp32``, reshaped): the LyCORIS ``wd_on_out`` layout, which ComfyUI and Forge recognise as output-axis
decomposition by its first dimension (a flat [out] vector would broadcast to [out, out] there). diffusers drops
``dora_scale`` from kohya files, so its users load the PEFT file.

Public API::

    iter_modules(states) -> (component, module path, {"lora_A.weight": A, "lora_B.weight": B[, MAGNITUDE: m]}), ...
    peft_state_dict(states, dtype=None) -> dict[str, Tensor]
    adapter_metadata(states, *, alpha, rank, lora_configs=None) -> dict[str, str]
    build_metadata(*, family, rank, alpha, output_name, trigger_words, tag_frequency, resolution, training,
                   title=None, prediction_type="epsilon", network_args=None, started_at=None,
                   dora=False, variant=None, ...) -> dict[str, str]
    add_hashes(state_dict, metadata) -> dict[str, str]
    save_safetensors_atomic(tensors, path, metadata=None) -> None
    export_lora(out_dir, output_name, family, states, *, alpha, rank, unet_config, metadata,
                lora_configs=None, dtype=torch.float16, kohya=None) -> dict

``states`` maps component name ("unet", "transformer", "text_encoder", "text_encoder_2") to
``peft.get_peft_model_state_dict(...)`` of that component; ``family`` is a registered family name
(families.FAMILIES): its spec gives the metadata's names, its adapter the tool file's layout.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..adapters.lora import MAGNITUDE
from ..families import FAMILIES, get_family, get_spec
from ..families._unet.kohya_names import te_path
from ..adapters.lora import config_value
from .lycoris import adapter_metadata as lycoris_adapter_metadata, is_lycoris
from .lycoris import peft_state_dict as lycoris_peft_state_dict, tool_state_dict as lycoris_tool_state_dict

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
PEFT_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py

# The PEFT tensors a LoRA file carries. Anything else (lora_B bias, embedding LoRA) has no form in the tool files
# that every loader reads, so it is refused rather than silently dropped.
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight")


# --------------------------------------------------------------------------------------------------- PEFT parsing
def peft_modules(state: Mapping[str, torch.Tensor], component: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group one component's PEFT state dict into {module path: {"lora_A.weight": A, "lora_B.weight": B
    [, "lora_magnitude_vector": m]}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        k = key.removeprefix("base_model.model.")  # a PeftModel wrapper adds this level
        for suffix in (*LORA_SUFFIXES, MAGNITUDE):
            if k.endswith("." + suffix):
                modules.setdefault(k[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            raise ValueError(
                f"{component}: unsupported PEFT key {key!r}; only LoRA and DoRA (lora_A/lora_B weights and "
                "magnitude vectors; no lora bias, no embedding LoRA) can be exported")
    for path, parts in modules.items():
        if not {"lora_A.weight", "lora_B.weight"} <= set(parts):
            raise ValueError(f"{component}: module {path!r} has {sorted(parts)} but needs both lora_A and lora_B")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{component}: {path!r} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} ranks differ")
        if MAGNITUDE in parts and parts[MAGNITUDE].numel() != b.shape[0]:
            raise ValueError(f"{component}: {path!r} magnitude {tuple(parts[MAGNITUDE].shape)} does not have one "
                             f"entry per output channel ({b.shape[0]})")
    return modules


def _is_text_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def is_dora(states: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    return any(k.endswith("." + MAGNITUDE) for state in states.values() for k in state)


# ----------------------------------------------------------------------------------------------- state dicts
def iter_modules(states: Mapping[str, Mapping[str, torch.Tensor]]):
    """(component, module path, its tensors as peft_modules groups them) for every LoRA module of every component:
    what each tool file's layout is built from."""
    for component, state in states.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}: expected one of {COMPONENTS}")
        for path, parts in peft_modules(state, component).items():
            yield component, path, parts


def magnitude_fp32(t: torch.Tensor) -> torch.Tensor:
    # Always fp32: the magnitude rescales every output of the layer, not just the low-rank delta, so fp16/bf16
    # rounding here would move the whole layer by up to 5e-4 / 4e-3 relative; it costs 4 bytes per channel.
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def peft_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT states -> diffusers ``pytorch_lora_weights`` layout (``<component>.<path>.lora_A.weight``; DoRA
    magnitudes in PEFT's shape, fp32, named ``lora_magnitude_vector`` for the UNet and
    ``lora_magnitude_vector.weight`` for text encoders).

    Text-encoder paths get the ``text_model.`` level: diffusers 0.42 strips it again when the loaded CLIPTextModel
    lacks it, older diffusers/transformers need it, and ComfyUI maps ``text_encoder.text_model.encoder...`` only.
    """
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if _is_text_encoder(component):
            path = te_path(path)
        for suffix, tensor in parts.items():
            if suffix == MAGNITUDE:
                # diffusers loads UNet adapters through PEFT, which takes PEFT's key as is, but text encoders
                # through transformers' adapter loader (5.x), which matches parameter names and silently leaves
                # a magnitude without ".weight" at its initial value (PEFT accepts that form too).
                key = f"{component}.{path}.{suffix}" + (".weight" if _is_text_encoder(component) else "")
                out[key] = magnitude_fp32(tensor)
                continue
            t = tensor.detach().to("cpu")
            out[f"{component}.{path}.{suffix}"] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    return out


def adapter_metadata(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     lora_configs: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``lora_adapter_metadata`` header entry diffusers reads (``_load_sft_state_dict_metadata``): one JSON
    object whose keys are ``<component>.<LoraConfig field>`` (diffusers ``_pack_dict_with_prefix``); diffusers
    strips the prefix and calls ``LoraConfig(**fields)``.

    ``lora_configs`` (component -> peft LoraConfig or its dict) is used when given, as diffusers'
    ``save_lora_weights`` does; otherwise a minimal config is built from the weights. Its ``target_modules`` are the
    exact module paths (text encoders without ``text_model.``: PEFT matches a target as a ``.``-suffix, so the
    shorter path matches both the flattened transformers 5.x CLIPTextModel and the older nested one).
    """
    packed: dict[str, Any] = {}
    for component, state in states.items():
        cfg = (lora_configs or {}).get(component)
        if cfg is not None:
            fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
            if float(fields.get("lora_alpha", alpha)) != float(alpha) or int(fields.get("r", rank)) != int(rank):
                raise ValueError(f"{component}: LoraConfig r/lora_alpha disagree with rank={rank}, alpha={alpha}")
            targets = fields.get("target_modules")
            if _is_text_encoder(component) and isinstance(targets, (list, set, tuple)):
                fields["target_modules"] = sorted(str(t).removeprefix("text_model.") for t in targets)
        else:
            modules = peft_modules(state, component)
            paths = sorted(modules)
            if _is_text_encoder(component):
                paths = [p.removeprefix("text_model.") for p in paths]
            fields = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": paths,
                      "init_lora_weights": True, "use_dora": any(MAGNITUDE in m for m in modules.values()),
                      "lora_bias": False}
        packed.update({f"{component}.{key}": config_value(value) for key, value in fields.items()})
    return {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}


# --------------------------------------------------------------------------------------------------- metadata
_TRAINING_ALIASES = {  # friendly training-dict names -> sd-scripts train_network.py metadata keys
    "steps": "ss_steps", "epoch": "ss_epoch", "epochs": "ss_num_epochs", "lr": "ss_learning_rate",
    "learning_rate": "ss_learning_rate", "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr",
    "batch_size": "ss_batch_size_per_device", "optimizer": "ss_optimizer", "lr_scheduler": "ss_lr_scheduler",
    "seed": "ss_seed", "mixed_precision": "ss_mixed_precision", "clip_skip": "ss_clip_skip",
    "noise_offset": "ss_noise_offset", "num_train_images": "ss_num_train_images",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps", "max_train_steps": "ss_max_train_steps",
    "min_snr_gamma": "ss_min_snr_gamma", "base_model": "ss_sd_model_name", "sd_model_name": "ss_sd_model_name",
}


def _meta_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)  # bools become "True"/"False" and numbers str(), as sd-scripts writes them


def build_metadata(*, family: str, rank: int, alpha: float, output_name: str, trigger_words: list[str],
                   tag_frequency: Mapping[str, Mapping[str, int]], resolution: tuple[int, int],
                   training: Mapping[str, Any], title: str | None = None, prediction_type: str = "epsilon",
                   network_args: Mapping[str, Any] | None = None, started_at: float | None = None,
                   dora: bool = False, variant: str | None = None, finished_at: float | None = None,
                   session_id: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` keys (what A1111 reads to classify and alias the LoRA, and Civitai for tags) and modelspec keys
    (as sd-scripts ``library/sai_model_spec.py`` writes them). All values are strings, as safetensors requires.
    ``started_at``/``finished_at``/``session_id`` default to now and a random id; a caller that passes them gets the
    same metadata (and so the same file) every time it exports the same weights.

    The family's names come from its spec: ``tool_names`` (ss_base_model_version and the modelspec architecture and
    implementation, per variant or v-prediction), ``kohya_v2`` and ``extra_metadata``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    spec = get_spec(family)
    pred = {"v_prediction": "v", "v": "v", "epsilon": "epsilon", "flow": "flow"}.get(prediction_type)
    if pred is None:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    v_pred = pred == "v"
    started = time.time() if started_at is None else float(started_at)
    args = dict(network_args or {})
    if dora:
        # How LyCORIS (the sd-scripts network that writes dora_scale) records output-axis DoRA, so tools that
        # continue training or classify the file (Civitai, sd-scripts --network_weights) read it as such.
        args.update(algo="lora", dora_wd="True", wd_on_out="True")
    width, height = (int(resolution[0]), int(resolution[1]))
    names = spec.tool_names_for(variant, pred)

    md: dict[str, str] = {
        "ss_session_id": str(random.randint(0, 2**32 - 1) if session_id is None else int(session_id)),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time() if finished_at is None else float(finished_at)),
        "ss_output_name": output_name,  # A1111 shows this as the LoRA's alias
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora", "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)), "ss_network_args": json.dumps(args),
        # A1111 network.py detect_version: ss_base_model_version "sdxl_*" -> SDXL, else ss_v2 == "True" -> SD2,
        # else SD1; a LoRA judged incompatible with the loaded checkpoint is hidden.
        "ss_base_model_version": names.base_model_version, "ss_v2": str(spec.kohya_v2),
        "ss_v_parameterization": str(v_pred),
        "ss_resolution": str((width, height)),  # sd-scripts writes str(tuple): "(1024, 1024)"
        "ss_tag_frequency": json.dumps({d: dict(t) for d, t in tag_frequency.items()}, ensure_ascii=False),
    }
    for key, value in training.items():
        if value is not None:
            md[key if key.startswith("ss_") else _TRAINING_ALIASES.get(key, f"ss_{key}")] = _meta_str(value)
    md.update({
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{names.architecture}/lora",
        "modelspec.implementation": names.implementation, "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),  # training start, as sd-scripts
    })
    if pred != "flow":  # sd-scripts writes none for FLUX.1 (and "epsilon" for SD3, which would mislead)
        md["modelspec.prediction_type"] = pred
    md.update(spec.extra_metadata)
    words = [w.strip() for w in trigger_words if w and w.strip()]
    if words:
        md["modelspec.trigger_phrase"] = ", ".join(words)
    md.update(extra or {})
    return md


def add_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """Add ``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts ``precalculate_safetensors_hashes`` does, so
    A1111 (sd-webui-additional-networks hashing) need not rehash: serialize with only the ``ss_*`` metadata,
    model hash = sha256 of everything after the header, legacy hash = sha256 of 64 KiB at offset 1 MiB, first 8
    hex digits. The tensor bytes do not depend on the metadata, so the model hash matches the written file."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = safetensors.torch.save(dict(state_dict), ss_only)
    header_len = int.from_bytes(buf[:8], "little")
    out = dict(metadata)
    out["sshs_model_hash"] = hashlib.sha256(buf[8 + header_len:]).hexdigest()
    out["sshs_legacy_hash"] = hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]
    return out


# ------------------------------------------------------------------------------------------------------ writing
def _check_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} is not a tensor")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {key!r} has non-finite values (NaN/Inf); refusing to write")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata {key!r} must map str to str, got {type(value).__name__}")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


_UMASK = _umask()


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give a temp file (mkstemp makes it 0600) the mode any new file gets (0666 less the umask), before it is
    renamed into place: ComfyUI, a web server or a container running as another user must be able to read it."""
    os.chmod(path, 0o666 & ~_UMASK)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """safetensors bytes whose header lists its keys sorted. safetensors writes the metadata from a hash map, so
    its order (and the file's bytes) changes from process to process; sorted, the same weights and metadata make
    the same file, which is what lets a retry rewrite a finished run's outputs bitwise. The tensor bytes are
    safetensors' own; the header is re-encoded as JSON and space-padded to 8 bytes, as the format allows."""
    buf = safetensors.torch.save(dict(tensors), dict(metadata) if metadata else None)
    n = int.from_bytes(buf[:8], "little")
    header = json.dumps(json.loads(buf[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raw = header.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + buf[8 + n:]


def _replace_atomic(path: Path, data: bytes) -> None:
    """Temp file in ``path``'s directory (same filesystem, so ``os.replace`` is an atomic rename), fsync the data,
    the umask's mode, rename: ``path`` is the old file or the complete new one, and a failure leaves no temp file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        ordinary_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """A text output (manifest, model card) written like the LoRA (UTF-8)."""
    _replace_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one, never a torn
    write (a crash, full disk or kill mid-write leaves at most a hidden temp file, which is removed on error):
    temp file in the same directory (same filesystem, so ``os.replace`` is an atomic rename), fsync the data,
    rename, fsync the directory so the rename itself survives a power loss. Non-finite tensors are refused
    before anything is written."""
    _check_tensors(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomic(path, canonical_safetensors(tensors, metadata))
    _fsync_dir(path.parent)


def tool_tensors(fam, states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any], *,
                 alpha: float, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ComfyUI / Forge / A1111 file's tensors from PEFT states: the family's LoRA layout, or LoKr / LoHa under
    the names that layout gives each module (outputs/lycoris.py)."""
    if is_lycoris(states):
        return lycoris_tool_state_dict(fam, states, configs, alpha=alpha, rank=rank, dtype=dtype)
    return fam.tool_state_dict(states, configs, alpha=alpha, rank=rank, dtype=dtype)


def export_lora(out_dir: str | os.PathLike, output_name: str, family: str,
                states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int, unet_config: Any,
                metadata: Mapping[str, str], lora_configs: Mapping[str, Any] | None = None,
                dtype: torch.dtype = torch.float16, kohya: Mapping[str, torch.Tensor] | None = None,
                peft_suffix: str = "") -> dict[str, Any]:
    """Write ``<out_dir>/<output_name>.safetensors`` (the tool file, with ``metadata`` + sshs hashes) and
    ``<out_dir>/pytorch_lora_weights<peft_suffix>.safetensors`` (PEFT/diffusers, with ``lora_adapter_metadata``;
    the suffix names a denoiser group's file, ModelFamily.export_groups).

    ``kohya``: the tool file's state dict (the trainer's, outputs.final.tool_file); by default the family's adapter
    builds it, ``unet_config`` being its denoiser's config. Both state dicts are built and checked before either
    file is written, so a bad tensor leaves no half export.
    Returns ``{"kohya_path", "peft_path", "kohya_keys", "peft_keys", "modules"}``.
    """
    if not output_name or "/" in output_name or "\\" in output_name or output_name.startswith("."):
        raise ValueError(f"output_name {output_name!r} must be a plain file name")
    out = Path(out_dir)
    kohya_path = out / f"{output_name}.safetensors"
    peft_path = out / PEFT_WEIGHTS_NAME.replace(".safetensors", f"{peft_suffix}.safetensors")
    if kohya_path == peft_path:
        raise ValueError(f"output_name {output_name!r} collides with {PEFT_WEIGHTS_NAME}")
    lycoris = is_lycoris(states)  # LoKr / LoHa: outputs/lycoris.py writes both layouts
    if kohya is None:
        configs = dict.fromkeys(get_spec(family).denoisers, unet_config)
        kohya = tool_tensors(get_family(family), states, configs, alpha=alpha, rank=rank, dtype=dtype)
    peft = (lycoris_peft_state_dict(states, alpha=alpha, rank=rank, dtype=dtype) if lycoris
            else peft_state_dict(states, dtype=dtype))
    _check_tensors(kohya, metadata)  # after the cast: an fp32 value beyond fp16 range is Inf now
    _check_tensors(peft, None)
    kohya_md = add_hashes(kohya, metadata)
    peft_md = (lycoris_adapter_metadata(states, lora_configs) if lycoris
               else adapter_metadata(states, alpha=alpha, rank=rank, lora_configs=lora_configs))
    save_safetensors_atomic(kohya, kohya_path, kohya_md)
    save_safetensors_atomic(peft, peft_path, peft_md)
    return {"kohya_path": str(kohya_path), "peft_path": str(peft_path), "kohya_keys": len(kohya),
            "peft_keys": len(peft), "modules": sum(1 for k in kohya if k.endswith(".alpha"))}


__all__ = [
    "COMPONENTS", "PEFT_WEIGHTS_NAME", "LORA_ADAPTER_METADATA_KEY", "LORA_SUFFIXES", "iter_modules", "peft_modules",
    "magnitude_fp32", "peft_state_dict", "is_dora", "MAGNITUDE", "adapter_metadata", "build_metadata",
    "add_hashes", "save_safetensors_atomic", "export_lora",
]
