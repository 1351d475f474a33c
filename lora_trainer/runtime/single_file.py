"""Base models whose transformer comes from a single .safetensors file (what most users have), for the families
with single-file converters (``families/<name>/convert.py``: today FLUX.1 and SD3/3.5).

The file supplies the transformer only, in its original layout (Black Forest Labs' for FLUX.1, Stability's MMDiT
layout for SD3/3.5), bare or under ``model.diffusion_model.``. Any other component such a file carries (ComfyUI
"all-in-one" checkpoints add text encoders and a VAE, under the prefixes the converters list) is not read: only the
transformer's tensors are loaded into memory, so a 17-23 GB all-in-one file costs the transformer's size.
Everything else -- the transformer's config, the VAE, the text encoders (weights), the tokenizers and the scheduler
config -- comes from ``config_source``, a local diffusers pipeline folder of the same model (a hub id is downloaded
to a local snapshot by the caller first, with ``config_source_patterns``: everything but the transformer's weights).

A family's convert module provides the hooks: ``to_diffusers(checkpoint, config)`` (the state-dict conversion,
widths from the config), ``config_checks(shapes, config, where)`` (what a header's shapes must agree on with the
config, before any tensor is read) and ``COMPONENT_PREFIXES``; the facts (transformer class, label, which
components and tokenizers config_source must hold) come from its spec. The converted state dict must then match
the config's model exactly (every tensor, every shape); it is put into an empty model as diffusers'
``from_single_file`` does (``init_empty_weights``). Every failure is a ``DiTSingleFileError`` that says what is
wrong and what to do; nothing here unpickles.

Import is torch-free (so are the convert modules at import): preflight may use ``single_file_problems`` (headers
and JSON only), ``config_source_patterns`` and ``download_command``; the model probe ``quantized_marker``.
"""
from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from ..families import FAMILIES, SPECS, get_part, get_signature
from ..preflight import probe as mp
from ..preflight.probe.headers import PIPELINE_INDEX_FILES

if TYPE_CHECKING:  # pragma: no cover
    import torch

DIT_PREFIX = "model.diffusion_model."
_SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"


class _Family(Protocol):
    """What load_components_single_file needs of a family adapter: its name and its folder loader."""

    name: str

    def _load_folder(self, source: Path, *, dtype, progress, load_denoiser) -> Any: ...


def _converter(name: str) -> ModuleType | None:
    """The family's convert module if it loads single-file transformers (it has ``to_diffusers``), else None."""
    conv = get_part(name, "convert") if name in SPECS else None
    return conv if hasattr(conv, "to_diffusers") else None


@functools.cache  # the registry is fixed; quantized_marker asks once per header key
def _single_file_families() -> tuple[str, ...]:
    return tuple(n for n in FAMILIES if _converter(n) is not None)


def _label(name: str | None) -> str:
    return SPECS[name].label if name in _single_file_families() else str(name)


def _transformer_class(name: str) -> str:
    (denoiser,) = SPECS[name].denoisers
    return SPECS[name].component_classes[denoiser]


def _weight_components(name: str) -> tuple[str, ...]:
    """The components whose weights config_source must hold (the file gives the transformer only)."""
    return ("vae", *SPECS[name].text_encoders, *SPECS[name].other_models)


def _tokenizers(name: str) -> tuple[str, ...]:
    return SPECS[name].tokenizers


@functools.cache
def _component_prefixes() -> tuple[str, ...]:
    """Other components of all-in-one checkpoints, as every single-file family's converter names them: never part
    of an unprefixed transformer."""
    out: dict[str, None] = {}
    for name in _single_file_families():
        out.update(dict.fromkeys(_converter(name).COMPONENT_PREFIXES))
    return tuple(out)


def _weight_names(comp: str) -> tuple[str, ...]:
    """The weight files from_pretrained(use_safetensors=True, no variant) reads: one file, or an index and its
    shards; diffusers names them diffusion_pytorch_model* (the VAE, a sampling-only transformer), transformers model*
    (the text encoders)."""
    stem = "model" if comp.startswith("text_encoder") else "diffusion_pytorch_model"
    return f"{stem}.safetensors", f"{stem}{_SHARD}", f"{stem}.safetensors.index.json"


# Quantised single files (their tensors are not weights as stored): ComfyUI scaled fp8 / mixed precision,
# bitsandbytes NF4/int8 (e.g. FLUX.1-dev's bnb-nf4 release), torchao. Markers without the model.diffusion_model.
# prefix.
_QUANT_KEYS = ("scaled_fp8",)
_QUANT_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant", ".absmax",
                   ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")
_QUANT_PARTS = (".quant_state.",)
_INT_DTYPES = ("U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")

Progress = Callable[[int, int, str], None]


class DiTSingleFileError(ValueError):
    """A single-file transformer checkpoint, or its config source, cannot be loaded; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None, kind: str = "invalid"):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # "incomplete": the config source lacks files that a download with config_source_patterns fetches;
        # "invalid": anything else (the file itself, or a config source of another model).
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


# ---------------------------------------------------------------------------------- config source (torch-free)

def default_config_repo(family_name: str, variant: str | None) -> str:
    """The hub repo diffusers would take configs from for this family/variant (DIFFUSERS_DEFAULT_PIPELINE_PATHS)."""
    repos = SPECS[family_name].single_file_config_repo
    return repos.get(variant, repos[None])


def config_source_patterns(family_name: str) -> list[str]:
    """allow_patterns for snapshot_download of a config source: model_index.json, the scheduler config, the
    transformer's config.json (not its weights: the single file has them), the VAE's and every text encoder's
    config.json and safetensors weights (single file or index + shards, no fp16/bf16 variants), the tokenizers."""
    _family(family_name)
    return [*PIPELINE_INDEX_FILES, "scheduler/*.json", "transformer/config.json",
            *(f"{comp}/{name}" for comp in _weight_components(family_name) for name in ("config.json", *_weight_names(comp))),
            *(f"{tok}/*" for tok in _tokenizers(family_name))]


def config_source_files_needed(family_name: str, files: list[str]) -> list[str]:
    """Of a repo's relative file names, those config_source_patterns selects (what a download would fetch)."""
    pats = config_source_patterns(family_name)
    return sorted(f for f in files if any(fnmatch.fnmatchcase(f, p) for p in pats))


def _config_source_issues(folder: Path, family_name: str) -> list[tuple[str, str]]:
    """(kind, message) per problem: "invalid" (another model's folder: a download does not help) or "incomplete"."""
    _family(family_name)
    folder = Path(folder)
    if not folder.is_dir():
        return [("incomplete", f"{folder} is not a folder")]
    problems: list[tuple[str, str]] = []
    index, err, index_name = mp.read_pipeline_index(folder)
    if index is None:
        return [("incomplete", f"{index_name} is {err}: not a diffusers pipeline folder")]
    cls = str(index.get("_class_name", ""))
    if cls not in get_signature(family_name).pipelines:
        known = ", ".join(sorted(get_signature(family_name).pipelines)[:2])
        problems.append(("invalid", (f"{index_name} names {cls or 'no pipeline class'}, not a "
                                    f"{_label(family_name)} pipeline ({known} ...)")))
    for rel in ("scheduler/scheduler_config.json", "transformer/config.json"):
        if not (folder / rel).is_file():
            problems.append(("incomplete", f"{rel} is missing"))
    for comp in _weight_components(family_name):
        sub = folder / comp
        if not (sub / "config.json").is_file():
            problems.append(("incomplete", f"{comp}/config.json is missing"))
        safe, pickles, probs = mp.component_weights(sub)
        names = _weight_names(comp)
        usable = [n for n in safe if any(fnmatch.fnmatchcase(n, p) for p in names)]
        indexed = sub.is_dir() and (sub / names[2]).is_file()
        if not usable and not indexed:
            found = f" (found only {', '.join(sorted(safe + pickles)[:3])})" if safe or pickles else ""
            problems.append(("incomplete", (f"{comp}/ has no safetensors weights ({names[0]}, or {names[2]} and its "
                                           f"shards){found}")))
        problems.extend(("incomplete", p["message"]) for p in probs)
    t5 = SPECS[family_name].t5_tokenizers
    for tok in _tokenizers(family_name):
        if not (folder / tok).is_dir():
            problems.append(("incomplete", f"{tok}/ is missing"))
            continue
        prob, _ = mp.tokenizer_problem(folder / tok, tok, t5=tok in t5)
        if prob:
            problems.append(("incomplete", prob["message"]))
    return problems


def config_source_problems(folder: Path, family_name: str) -> list[str]:
    """What a local config source lacks for a single-file checkpoint of family_name ([] if it is complete):
    model_index.json of a pipeline of the family, the scheduler and transformer configs, the VAE and text encoders
    with config.json and complete safetensors weights, the tokenizers. Reads JSON and safetensors headers only."""
    return [msg for _, msg in _config_source_issues(folder, family_name)]


def download_command(repo: str, family_name: str) -> str:
    """The hf command that fetches what a config source needs from a hub repo."""
    return f"hf download {repo} " + " ".join(f"--include '{p}'" for p in config_source_patterns(family_name))


def _config_source_hint(family_name: str, variant: str | None = None) -> str:
    return (f"a single-file {_label(family_name)} checkpoint holds the transformer only: base_model_config must be "
            "the model's diffusers folder with the VAE and text encoder weights (not just configs), e.g. "
            + download_command(default_config_repo(family_name, variant), family_name))


def resolve_config_source(config: str | os.PathLike | None, *, family_name: str, checkpoint: Path) -> Path:
    """config_source as a local folder: ``config`` if it is one, else the cached snapshot of the hub id ``config``
    or, when None, of diffusers' default repo for the checkpoint's variant. Never downloads (the caller does, with
    config_source_patterns); a hub id not in the cache is a DiTSingleFileError."""
    if config is not None and Path(config).expanduser().is_dir():
        return Path(config).expanduser()
    if config is not None and not mp.HUB_ID.match(str(config)):
        raise DiTSingleFileError(f"base_model_config {config} is neither a folder nor a hub id",
                                 hint="a diffusers pipeline folder of the same model, or a hub id (org/name)")
    repo = str(config) if config is not None else default_config_repo(
        family_name, mp.probe_single_file(Path(checkpoint), str(checkpoint)).variant)
    snap = mp.find_cached_snapshot(repo)
    if snap is None:
        raise DiTSingleFileError(
            f"{repo} (the components and configs for {Path(checkpoint).name}) is not in the local Hugging Face cache "
            f"({mp.hf_hub_cache_dir()})",
            hint=f"download it first: {download_command(repo, family_name)}, or set base_model_config to a local "
                 "diffusers folder of the same model")
    return snap


# ---------------------------------------------------------------------------------- the checkpoint file

def _family(name: str) -> None:
    if name not in _single_file_families():
        raise DiTSingleFileError(f"{name!r} is not a DiT family with single-file support; expected one of "
                                 f"{', '.join(_single_file_families())}")


def _check_path(path: Path) -> None:
    if path.suffix.lower() in mp.PICKLE_SUFFIXES:
        raise DiTSingleFileError(f"refusing to load the pickle checkpoint {path.name}",
                                 hint="pickle files can run code when loaded; use a .safetensors file")
    if not path.is_file():
        raise DiTSingleFileError(f"{path} does not exist or is not a file")
    if path.suffix.lower() != ".safetensors":
        raise DiTSingleFileError(f"{path.name} is not a .safetensors file",
                                 hint="single-file FLUX.1 / SD3 checkpoints are loaded from .safetensors only "
                                      "(GGUF and pickle files are not supported)")


def _transformer_keys(header: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
    """{file key: key without the prefix} of the transformer's tensors, and whether they are prefixed."""
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith(DIT_PREFIX) for k in keys):
        return {k: k[len(DIT_PREFIX):] for k in keys if k.startswith(DIT_PREFIX)}, True
    return {k: k for k in keys if not k.startswith(_component_prefixes())}, False


def quantized_marker(header: Mapping[str, Any]) -> str | None:
    """The first tensor name of a safetensors header that marks a quantised checkpoint (ComfyUI scaled fp8 /
    mixed quant, bitsandbytes NF4/int8, integer-typed weights), or None. Torch-free (the probe can use it)."""
    keys = [k for k in header if k != "__metadata__"]
    for k in keys:
        bare = k.removeprefix(DIT_PREFIX)
        if bare in _QUANT_KEYS or bare.endswith(_QUANT_SUFFIXES) or any(p in bare for p in _QUANT_PARTS):
            return k
    return next((k for k in keys if k.endswith(".weight") and isinstance(header[k], dict)
                 and str(header[k].get("dtype")) in _INT_DTYPES and not k.startswith(_component_prefixes())), None)


def _refuse_quantized(path: Path, header: Mapping[str, Any]) -> None:
    hit = quantized_marker(header)
    if hit is not None:
        raise DiTSingleFileError(
            f"{path.name} is a quantised checkpoint ({hit}: scaled-fp8, NF4/int8 or similar), whose tensors are not "
            "the model's weights as stored",
            hint="train from a bf16/fp16 (or plain fp8) release of the model, e.g. the original flux1-dev.safetensors "
                 "or sd3.5_large.safetensors, or a diffusers folder")


def _config_variant(family_name: str, config: Mapping) -> str | None:
    return get_signature(family_name).variant(dict(config))[0]


def _check_against_config(family_name: str, shapes: Mapping[str, list], config: Mapping, *, file_variant: str | None,
                          path: Path, config_source: Path) -> None:
    """The checks that name the likely mistake (another variant's config, then the family's config_checks: depth,
    widths), before any tensor is read; the exact key/shape comparison after conversion catches everything else."""
    where = f"{config_source}/transformer/config.json"
    label = _label(family_name)
    cfg_variant = _config_variant(family_name, config)
    hint = (f"set base_model_config to a diffusers folder or hub repo of the same model as the file "
            f"(for {file_variant}: {default_config_repo(family_name, file_variant)})")
    if file_variant and cfg_variant and file_variant != cfg_variant:
        raise DiTSingleFileError(f"{path.name} is {label} {file_variant} but the config source {config_source} is "
                                 f"{label} {cfg_variant} ({where})", hint=hint)
    refusal, figures = _converter(family_name).config_checks(shapes, config, where)
    if refusal:
        raise DiTSingleFileError(f"{path.name} {refusal}", hint=hint)
    diffs = [f"{what}: {in_file} in the file, {in_config} in the config" for what, in_file, in_config in figures
             if in_file is not None and in_config is not None and in_file != in_config]
    if diffs:
        raise DiTSingleFileError(f"{path.name} is not the model {where} describes: " + "; ".join(diffs), hint=hint)


# ---------------------------------------------------------------------------------- conversion
# The state-dict converters are the family's: families/<name>/convert.py to_diffusers.

def _convert(family_name: str, checkpoint: dict, config: Mapping, path: Path) -> dict:
    try:
        converted = _converter(family_name).to_diffusers(checkpoint, config)
    except KeyError as exc:
        raise DiTSingleFileError(f"{path.name} lacks the tensor {exc.args[0]} of a {_label(family_name)} transformer "
                                 "(a pruned, partial or differently laid out checkpoint)",
                                 hint="use the model's original single-file release or its diffusers folder") from None
    except RuntimeError as exc:  # torch.split/chunk on a tensor of another width
        raise DiTSingleFileError(f"{path.name}: a fused tensor does not have the widths of the config ({exc})") from None
    if checkpoint:
        left = sorted(checkpoint)
        raise DiTSingleFileError(f"{path.name} has {len(left)} tensor(s) a {_label(family_name)} transformer does not "
                                 f"have, e.g. {', '.join(left[:5])}",
                                 hint="this is another model, or a variant this trainer does not know")
    return converted


# ---------------------------------------------------------------------------------- loading

def _read_transformer(path: Path, keys: Mapping[str, str], dtype) -> dict:
    """The transformer's tensors only (an all-in-one file's text encoders and VAE are never read), cast to dtype."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        for key, short in keys.items():
            t = fh.get_tensor(key)
            out[short] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    return out


def _empty_model_matching(cls, config: Mapping, converted: Mapping, path: Path, config_source: Path):
    """An empty (meta) model of the config, after checking that the converted tensors are exactly its own: every
    name, every shape."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(dict(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    shapes = sorted(k for k in set(expected) & set(converted) if tuple(converted[k].shape) != expected[k])
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected, e.g. {', '.join(extra[:3])}")
        if shapes:
            parts.append("shapes differ: " + ", ".join(
                f"{k} {tuple(converted[k].shape)} vs {expected[k]}" for k in shapes[:3]))
        raise DiTSingleFileError(f"{path.name} does not match {config_source}/transformer/config.json: "
                                 + "; ".join(parts),
                                 hint="base_model_config must be a diffusers folder or repo of the same model as the file")
    return model


def _inspect(family_name: str, path: Path, config_source: Path) -> tuple[dict, dict]:
    """(transformer keys {file key: bare key}, transformer config) once the file and config_source/transformer
    are known to fit: headers and JSON only, no tensor read, no torch. Raises DiTSingleFileError."""
    _family(family_name)
    _check_path(path)
    cfg_file = config_source / "transformer" / "config.json"
    config, err = mp.read_json(cfg_file)
    if config is None:
        raise DiTSingleFileError(f"the config source {config_source}: transformer/config.json is {err}",
                                 hint="base_model_config must be a diffusers pipeline folder of the same model",
                                 kind="incomplete" if err == "missing" else "invalid")
    header, prob = mp.read_safetensors_header(path)
    if header is None:
        raise DiTSingleFileError(prob["message"], hint=prob.get("hint"))
    probe = mp.probe_single_file(path, str(path))
    if probe.problems:
        first = probe.problems[0]
        raise DiTSingleFileError(f"{path.name}: " + "; ".join(p["message"] for p in probe.problems), hint=first.get("hint"))
    if probe.family != family_name:
        raise DiTSingleFileError(
            f"{path.name} is a {_label(probe.family)} checkpoint ({probe.family_evidence}), "
            f"not {_label(family_name)}",
            hint=f"set model_type to {probe.family!r} (or 'auto'), or use a {_label(family_name)} checkpoint")
    keys, _ = _transformer_keys(header)
    _refuse_quantized(path, header)
    if config.get("_class_name") not in (None, _transformer_class(family_name)):
        raise DiTSingleFileError(f"{cfg_file} is for {config['_class_name']}, not {_transformer_class(family_name)}",
                                 hint=f"base_model_config must be a {_label(family_name)} pipeline folder")
    shapes = {short: header[k].get("shape") for k, short in keys.items()}
    _check_against_config(family_name, shapes, config, file_variant=probe.variant, path=path, config_source=config_source)
    return keys, config


def single_file_problems(family_name: str, path: Path, config_source: Path) -> list[DiTSingleFileError]:
    """Everything load_components_single_file would refuse that headers and JSON show ([] if none): the file
    (pickle, truncated, quantised, another family or layout), whether config_source's transformer config is the
    file's model (variant, depth, widths), and what config_source lacks (VAE / text encoder weights, tokenizers,
    scheduler). Torch-free and fast, for preflight; each error has .message, .hint and .kind ("incomplete": a
    download of config_source_patterns would fix it)."""
    path, config_source = Path(path), Path(config_source)
    out: list[DiTSingleFileError] = []
    if config_source.is_dir():
        try:
            _inspect(family_name, path, config_source)
        except DiTSingleFileError as exc:
            out.append(exc)
    for kind, msg in _config_source_issues(config_source, family_name):
        message = f"the config source {config_source}: {msg}"
        if all(e.message != message for e in out):  # transformer/config.json: _inspect may have said so
            out.append(DiTSingleFileError(message, hint=_config_source_hint(family_name), kind=kind))
    return out


def load_transformer_single_file(family_name: str, path: Path, *, config_source: Path, dtype) -> torch.nn.Module:
    """The transformer of a single .safetensors file (the family's original layout, with or without
    ``model.diffusion_model.``, transformer-only or all-in-one), configured by ``config_source/transformer``,
    in ``dtype``, in eval mode. No network, no pickle; a DiTSingleFileError says what does not fit."""
    import diffusers
    import torch

    path, config_source = Path(path), Path(config_source)
    dtype = torch.float32 if dtype is None else dtype
    keys, config = _inspect(family_name, path, config_source)
    cls = getattr(diffusers, _transformer_class(family_name))
    converted = _convert(family_name, _read_transformer(path, keys, dtype), config, path)
    model = _empty_model_matching(cls, config, converted, path, config_source)
    # What from_single_file does once converted (init_empty_weights, then the tensors put in place), without its
    # model.to(dtype): the tensors are already in dtype, and diffusers 0.42 warns on every such cast. The
    # transformer classes loaded this way (FLUX.1's, SD3's) have no _keep_in_fp32_modules.
    model.load_state_dict(converted, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - the state dict matched the model's exactly
        raise DiTSingleFileError(f"{path.name}: {len(left)} tensor(s) of the model were not loaded, e.g. {left[:3]}")
    return model.eval()


def load_components_single_file(family: _Family, path: Path, *, config_source: Path, dtype,
                                progress: Progress | None = None) -> Any:
    """The family's Components: the transformer from the single file, everything else (VAE, text encoders,
    tokenizers, scheduler config) loaded by the family's own folder loader from the diffusers folder
    ``config_source``."""
    _family(family.name)
    config_source = Path(config_source)
    problems = config_source_problems(config_source, family.name)
    if problems:
        raise DiTSingleFileError(
            f"the config source {config_source} cannot supply what {Path(path).name} lacks: " + "; ".join(problems),
            hint=_config_source_hint(family.name))
    return family._load_folder(config_source, dtype=dtype, progress=progress, load_denoiser=lambda name: (
        load_transformer_single_file(family.name, Path(path), config_source=config_source, dtype=dtype)))
