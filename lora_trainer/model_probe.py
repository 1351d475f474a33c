"""What the base model is, from its files alone: no weights loaded, no torch, no network.

Family detection rules (first match wins), written so that tiny test models, whose widths are not the
real ones, are classified by the same structural facts as the real checkpoints:

diffusers folder (model_index.json):
  1. ``_class_name`` containing "XL", a non-null ``text_encoder_2`` component, or
     unet ``addition_embed_type == "text_time"``                              -> sdxl
  2. other ``StableDiffusion*Pipeline`` classes: unet ``cross_attention_dim`` 768 -> sd15, 1024 -> sd2
     (the real models' widths); otherwise text_encoder ``hidden_act`` "gelu" (OpenCLIP) -> sd2,
     "quick_gelu" (OpenAI CLIP) -> sd15; otherwise unet ``use_linear_projection`` or a per-block
     ``attention_head_dim`` list -> sd2, else sd15
  3. any other pipeline class (SD3, Flux, ...)                               -> unsupported
  prediction type: scheduler/scheduler_config.json ``prediction_type`` (diffusers' default: epsilon).

single-file .safetensors (header only; marker prefixes as in diffusers' single_file_utils
CHECKPOINT_KEY_NAMES):
  ``conditioner.embedders.1.model.``  (OpenCLIP-G next to CLIP-L)  -> sdxl
  ``conditioner.embedders.0.model.`` alone                         -> SDXL refiner: unsupported
  ``cond_stage_model.model.``         (OpenCLIP-H)                 -> sd2
  ``cond_stage_model.transformer.``   (OpenAI CLIP-L)              -> sd15
  else the UNet's attn2.to_k width (1024 -> sd2, 768 -> sd15), ``label_emb`` -> sdxl.
  prediction type: a ``v_pred`` key or modelspec metadata; SD1/SDXL default to epsilon; SD2 files do
  not say (768-v and 512-base share the layout), so it stays None.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
PICKLE_MESSAGE = "pickle checkpoints can run code when loaded; convert to .safetensors"
BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = BASE_COMPONENTS + ("text_encoder_2", "tokenizer_2")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_V2_TO_K = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class ModelProbe:
    kind: str  # "diffusers_dir" | "single_file" | "hub" | "invalid"
    source: str  # base_model as written in the config
    path: Path | None  # resolved local folder/file, or the cached hub snapshot
    family: str | None  # "sd15" | "sd2" | "sdxl" | None
    prediction_type: str | None  # "epsilon" | "v_prediction" | None (unknown)
    pipeline_class: str | None = None
    family_evidence: str | None = None  # the rule that decided the family
    components_found: tuple[str, ...] = ()
    components_missing: tuple[str, ...] = ()
    weight_files: dict | None = None  # component -> relative weight files (shows fp16-only variants)
    problems: tuple[dict, ...] = ()  # errors: {code, message, hint?, files?}
    warnings: tuple[dict, ...] = ()
    in_cache: bool | None = None  # hub ids only
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _p(code: str, message: str, hint: str | None = None, files: list | None = None) -> dict:
    d = {"code": code, "message": message}
    if hint:
        d["hint"] = hint
    if files:
        d["files"] = [str(f) for f in files]
    return d


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {exc}"
    return (obj, None) if isinstance(obj, dict) else (None, "not a JSON object")


def read_safetensors_header(path: Path) -> tuple[dict | None, dict | None]:
    """(header, problem). Reads 8 + N bytes; checks that the data the header describes fits in the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None, _p("model_incomplete", f"{path.name}: {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return None, _p("model_incomplete", f"{path.name}: header length {n} is beyond the file size {size} (truncated download?)")
            if n > MAX_HEADER_BYTES:
                return None, _p("model_corrupt", f"{path.name}: header length {n} is implausible; not a safetensors file")
            raw = fh.read(n)
    except PermissionError:
        return None, _p("model_not_found", f"{path}: permission denied")
    except OSError as exc:
        return None, _p("model_not_found", f"{path}: cannot read ({exc.strerror or exc})")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        return None, _p("model_corrupt", f"{path.name}: invalid safetensors header ({exc})")
    if 8 + n + data_end > size:
        return None, _p("model_incomplete", f"{path.name}: tensors need {8 + n + data_end} bytes but the file has {size} (truncated download?)")
    return header, None


# ---------------------------------------------------------------------------------- diffusers folder

def _component_weights(folder: Path) -> tuple[list[str], list[str], list[dict]]:
    """(safetensors files, pickle files, problems) of one model component folder."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return [], [], []
    safe = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if os.path.splitext(n)[1] in PICKLE_SUFFIXES]
    problems: list[dict] = []
    for idx in (n for n in names if n.endswith(".safetensors.index.json")):
        index, err = _read_json(folder / idx)
        shards = sorted(set((index or {}).get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if err or not shards:
            problems.append(_p("model_corrupt", f"{folder.name}/{idx}: {err or 'no weight_map'}"))
        elif missing:
            problems.append(_p("model_incomplete", f"{folder.name}: {len(missing)} shard(s) listed in {idx} are missing",
                               files=[f"{folder.name}/{m}" for m in missing]))
    for n in safe:
        _, prob = read_safetensors_header(folder / n)
        if prob:
            prob["message"] = f"{folder.name}/{prob['message']}"
            problems.append(prob)
    return safe, pickles, problems


def _sd_family(unet_cfg: dict, te_cfg: dict) -> tuple[str, str]:
    cad = unet_cfg.get("cross_attention_dim")
    if cad == 768:
        return "sd15", "unet cross_attention_dim 768"
    if cad == 1024:
        return "sd2", "unet cross_attention_dim 1024"
    act = te_cfg.get("hidden_act")
    if act == "gelu":
        return "sd2", "text_encoder hidden_act gelu (OpenCLIP)"
    if act == "quick_gelu":
        return "sd15", "text_encoder hidden_act quick_gelu (OpenAI CLIP)"
    if unet_cfg.get("use_linear_projection") or isinstance(unet_cfg.get("attention_head_dim"), list):
        return "sd2", "unet use_linear_projection / per-block attention_head_dim"
    return "sd15", "unet layout of SD1.x"


def probe_diffusers_dir(path: Path, source: str) -> ModelProbe:
    index, err = _read_json(path / "model_index.json")
    if index is None:
        hint = None
        singles = sorted(p.name for p in path.glob("*.safetensors"))
        if singles:
            hint = f"for a single-file checkpoint set base_model to the file, e.g. {path / singles[0]}"
        msg = "no model_index.json: not a diffusers pipeline folder" if err == "missing" else f"model_index.json is {err}"
        return ModelProbe("diffusers_dir", source, path, None, None,
                          problems=(_p("model_incomplete" if err == "missing" else "model_corrupt", msg, hint),))
    cls = str(index.get("_class_name", ""))
    declared = {k for k, v in index.items()
                if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}
    unet_cfg = _read_json(path / "unet" / "config.json")[0] or {}
    te_cfg = _read_json(path / "text_encoder" / "config.json")[0] or {}
    problems: list[dict] = []
    notes: list[str] = []
    family: str | None
    if "XL" in cls or "text_encoder_2" in declared or unet_cfg.get("addition_embed_type") == "text_time":
        family = "sdxl"
        evidence = ("model_index _class_name " + cls) if "XL" in cls else (
            "text_encoder_2 component" if "text_encoder_2" in declared else "unet addition_embed_type text_time")
    elif cls.startswith("StableDiffusion") and not cls.startswith("StableDiffusion3"):
        family, evidence = _sd_family(unet_cfg, te_cfg)
    else:
        family, evidence = None, None
        problems.append(_p("model_unsupported", f"pipeline class {cls or '(none)'} is not Stable Diffusion 1.x/2.x/XL",
                           "use an SD1.5, SD2.x or SDXL base model"))
    required = SDXL_COMPONENTS if family == "sdxl" else BASE_COMPONENTS
    found, missing, weight_files = [], [], {}
    pickles_only: list[str] = []
    explained: set[str] = set()  # missing components that already have a specific problem
    for comp in required:
        folder = path / comp
        if comp not in declared or not folder.is_dir():
            missing.append(comp)
            continue
        if comp in WEIGHT_COMPONENTS:
            if not (folder / "config.json").is_file():
                missing.append(comp)
                explained.add(comp)
                problems.append(_p("model_incomplete", f"{comp}/config.json is missing"))
                continue
            safe, pickles, probs = _component_weights(folder)
            problems.extend(probs)
            weight_files[comp] = tuple(f"{comp}/{n}" for n in (safe or pickles))
            if not safe:
                missing.append(comp)
                explained.add(comp)
                if pickles:
                    pickles_only.extend(f"{comp}/{n}" for n in pickles)
                else:
                    problems.append(_p("model_incomplete", f"{comp}/ has no weight files"))
                continue
            if all(".fp16." in n or ".bf16." in n for n in safe if not n.endswith(".index.json")):
                notes.append(f"{comp} has only variant weights ({', '.join(safe)})")
        elif comp.startswith("tokenizer"):
            names = set(os.listdir(folder))
            if not ({"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names):
                missing.append(comp)
                explained.add(comp)
                problems.append(_p("model_incomplete", f"{comp}/ has neither vocab.json+merges.txt nor tokenizer.json"))
                continue
        elif comp == "scheduler" and not (folder / "scheduler_config.json").is_file():
            missing.append(comp)
            explained.add(comp)
            problems.append(_p("model_incomplete", "scheduler/scheduler_config.json is missing"))
            continue
        found.append(comp)
    if pickles_only:
        problems.append(_p("model_pickle_refused", f"weights only as pickle files: {PICKLE_MESSAGE}",
                           "re-save the pipeline with save_pretrained(..., safe_serialization=True)", files=pickles_only))
    plain_missing = [c for c in missing if c not in explained]
    if plain_missing:
        problems.append(_p("model_incomplete", f"missing component(s): {', '.join(plain_missing)}"))
    sched, _ = _read_json(path / "scheduler" / "scheduler_config.json")
    prediction = sched.get("prediction_type", "epsilon") if sched is not None else None
    return ModelProbe("diffusers_dir", source, path, family, prediction, pipeline_class=cls or None,
                      family_evidence=evidence, components_found=tuple(found), components_missing=tuple(missing),
                      weight_files=weight_files, problems=tuple(problems), notes=tuple(notes))


# ---------------------------------------------------------------------------------- single file

def _family_from_keys(keys: set[str], header: dict) -> tuple[str | None, str | None, dict | None]:
    """(family, evidence, unsupported-problem)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return None, None, _p("model_unsupported", "this file is a LoRA, not a base model", "set base_model to a full SD checkpoint")
    if has("conditioner.embedders.1.model."):
        return "sdxl", "conditioner.embedders.1.model.* (OpenCLIP-G of SDXL)", None
    if has("conditioner.embedders.0.model."):
        return None, None, _p("model_unsupported", "this is an SDXL refiner checkpoint; LoRA training needs the SDXL base")
    if has("cond_stage_model.model."):
        return "sd2", "cond_stage_model.model.* (OpenCLIP-H of SD2)", None
    if has("cond_stage_model.transformer."):
        return "sd15", "cond_stage_model.transformer.* (CLIP-L of SD1)", None
    to_k = header.get(_V2_TO_K)
    if isinstance(to_k, dict) and to_k.get("shape"):
        width = to_k["shape"][-1]
        if width == 1024:
            return "sd2", "UNet attn2.to_k width 1024", None
        if width == 768:
            return "sd15", "UNet attn2.to_k width 768", None
    if has("model.diffusion_model.label_emb."):
        return "sdxl", "UNet label_emb (SDXL add-embedding)", None
    if "conv_in.weight" in keys or has("down_blocks."):
        return None, None, _p("model_unsupported", "this looks like a single diffusers component (e.g. a UNet), not a full checkpoint",
                              "use a full single-file checkpoint or a diffusers pipeline folder")
    return None, None, _p("model_unsupported", "no Stable Diffusion 1.x/2.x/XL tensor names found in this file")


def probe_single_file(path: Path, source: str) -> ModelProbe:
    header, prob = read_safetensors_header(path)
    if header is None:
        return ModelProbe("single_file", source, path, None, None, problems=(prob,))
    meta = header.get("__metadata__") or {}
    keys = {k for k in header if k != "__metadata__"}
    family, evidence, unsupported = _family_from_keys(keys, header)
    problems: list[dict] = [unsupported] if unsupported else []
    found, missing = [], []
    if family:
        te = "conditioner.embedders." if family == "sdxl" else "cond_stage_model."
        for comp, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("text_encoder", te)):
            (found if any(k.startswith(prefix) for k in keys) else missing).append(comp)
        if missing:
            problems.append(_p("model_incomplete", f"checkpoint lacks the {', '.join(missing)} weights"))
    spec_pred = str(meta.get("modelspec.prediction_type", "")).lower()
    notes: list[str] = []
    if "v_pred" in keys or spec_pred in ("v", "v_prediction", "v-prediction"):
        prediction = "v_prediction"
    elif spec_pred == "epsilon" or family in ("sd15", "sdxl"):
        prediction = "epsilon"
    else:
        prediction = None
        if family == "sd2":
            notes.append("SD2 single files do not record their prediction type (768-v or 512-base epsilon)")
    return ModelProbe("single_file", source, path, family, prediction, family_evidence=evidence,
                      components_found=tuple(found), components_missing=tuple(missing),
                      problems=tuple(problems), notes=tuple(notes))


# ---------------------------------------------------------------------------------- hub cache

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
    """The snapshot refs/main points at if it has model_index.json, else the newest one that has it."""
    repo = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        if ref and (snaps / ref / "model_index.json").is_file():
            return snaps / ref
    except OSError:
        pass
    try:
        cands = [p for p in snaps.iterdir() if (p / "model_index.json").is_file()]
    except OSError:
        return None
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def probe_hub(repo_id: str) -> ModelProbe:
    snap = find_cached_snapshot(repo_id)
    offline = hub_offline()
    if snap is None:
        if offline:
            return ModelProbe("hub", repo_id, None, None, None, in_cache=False, problems=(
                _p("model_not_found", f"{repo_id} is not in the local Hugging Face cache ({hf_hub_cache_dir()}) and HF_HUB_OFFLINE is set",
                   "download it first, or unset HF_HUB_OFFLINE"),))
        return ModelProbe("hub", repo_id, None, None, None, in_cache=False, warnings=(
            _p("hub_not_cached", f"{repo_id} is not in the local Hugging Face cache ({hf_hub_cache_dir()}); it will be downloaded at the start of training",
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
                      problems=tuple(problems), warnings=tuple(warns), in_cache=True, notes=inner.notes)


# ---------------------------------------------------------------------------------- entry point

def _probe(base_model: str, base_dir: Path) -> ModelProbe:
    raw = base_model.strip()
    p = Path(os.path.expanduser(raw))
    if not p.is_absolute():
        p = Path(base_dir) / p
    suffix = p.suffix.lower()
    if p.is_dir():
        return probe_diffusers_dir(p, base_model)
    if p.exists():
        if suffix in PICKLE_SUFFIXES:
            return ModelProbe("invalid", base_model, p, None, None, problems=(
                _p("model_pickle_refused", f"{p.name}: {PICKLE_MESSAGE}",
                   "convert it, e.g. with diffusers' scripts or safetensors.torch.save_file"),))
        if suffix == ".safetensors":
            return probe_single_file(p, base_model)
        return ModelProbe("invalid", base_model, p, None, None, problems=(
            _p("model_unsupported", f"{p.name}: not a .safetensors file or a diffusers folder"),))
    if suffix in PICKLE_SUFFIXES:  # missing, but refused anyway: say both
        return ModelProbe("invalid", base_model, p, None, None, problems=(
            _p("model_not_found", f"{p} does not exist"), _p("model_pickle_refused", PICKLE_MESSAGE)))
    if suffix != ".safetensors" and HUB_ID.match(raw) and ".." not in raw:
        probe = probe_hub(raw)
        if p.parent.is_dir() and not probe.in_cache:
            # "models/sd15" may be a mistyped local folder rather than a hub id: say both readings.
            probe = dataclasses.replace(probe, notes=probe.notes + (f"there is no local folder {p} either",),
                                        warnings=tuple(dict(w, message=w["message"] + f"; there is no local folder {p} either")
                                                       for w in probe.warnings))
        return probe
    return ModelProbe("invalid", base_model, p, None, None, problems=(
        _p("model_not_found", f"{p} does not exist and '{raw}' is not a hub id (org/name)",
           "a diffusers folder, a .safetensors file or a Hugging Face id like stabilityai/stable-diffusion-xl-base-1.0"),))


def probe_model(base_model: str, base_dir: Path | str = ".", *, model_type: str = "auto") -> ModelProbe:
    """Inspect base_model; with an explicit model_type a different detected family is a problem."""
    probe = _probe(base_model, Path(base_dir))
    if model_type != "auto" and probe.family is not None and probe.family != model_type:
        mismatch = _p("model_type_mismatch",
                      f"model_type is '{model_type}' but the base model is {probe.family} ({probe.family_evidence})",
                      f"set model_type to '{probe.family}' or 'auto'")
        probe = dataclasses.replace(probe, problems=probe.problems + (mismatch,))
    return probe
