"""What the base model is, from its files alone: no weights loaded, no torch, no network.

Family detection rules (first match wins), written so that tiny test models, whose widths are not the
real ones, are classified by the same structural facts as the real checkpoints:

diffusers folder (model_index.json):
  0. ``_class_name`` of another family (FLUX.2, Qwen-Image, Z-Image, Chroma, Wan, Kandinsky, PixArt, ...,
     and the FLUX.1 Fill / Canny-Depth control / Kontext / Redux pipelines, whose transformer is not the
     text-to-image one)                                                      -> unsupported, family named
  1. ``FluxPipeline`` (also FluxImg2Img/Inpaint/ControlNet*: same components, same transformer; the
     pipeline class is not what training loads)                             -> flux1
     variant: transformer ``guidance_embeds`` true -> "dev", else "schnell". A transformer whose
     ``out_channels`` differs from ``in_channels`` is image-conditioned (Fill, Canny/Depth)  -> unsupported
  2. ``StableDiffusion3Pipeline`` (also its Img2Img/Inpaint/PAG/ControlNet* classes)         -> sd3
     variant, by structure: transformer ``dual_attention_layers`` non-empty (MMDiT-X attn2 blocks)
     -> "sd3.5-medium"; else ``qk_norm`` set (SD3.5 added RMS q/k norms; SD3 medium has none) or
     ``num_layers`` >= 38 (the real 3.5 large depth) -> "sd3.5-large"; else -> "sd3-medium".
  3. ``_class_name`` containing "XL", a non-null ``text_encoder_2`` component, or
     unet ``addition_embed_type == "text_time"``                              -> sdxl
  4. other ``StableDiffusion*Pipeline`` classes: unet ``cross_attention_dim`` 768 -> sd15, 1024 -> sd2
     (the real models' widths); otherwise text_encoder ``hidden_act`` "gelu" (OpenCLIP) -> sd2,
     "quick_gelu" (OpenAI CLIP) -> sd15; otherwise unet ``use_linear_projection`` or a per-block
     ``attention_head_dim`` list -> sd2, else sd15
  5. any other pipeline class                                                 -> unsupported
  prediction type: flux1/sd3 are rectified-flow models -> "flow"; SD: scheduler/scheduler_config.json
  ``prediction_type`` (diffusers' default: epsilon).
  components: flux1 needs transformer, vae, text_encoder + tokenizer (CLIP-L), text_encoder_2 +
  tokenizer_2 (T5), scheduler; sd3 also text_encoder_2 + tokenizer_2 (CLIP-G) and text_encoder_3 +
  tokenizer_3 (T5). Sharded weights need their index and every shard it (or the shard names) lists. A T5
  tokenizer folder needs tokenizer.json, or spiece.model where the sentencepiece package is installed
  (transformers 5 converts spiece.model only with it).

single-file .safetensors (header only; marker keys as in diffusers' single_file_utils
CHECKPOINT_KEY_NAMES / infer_diffusers_model_type, ComfyUI's model_detection; transformer keys are
matched with or without the ``model.diffusion_model.`` prefix):
  LoRA key names (``lora_unet_*``, ``*.lora_A.*``, ``*.lora_down.*``, LyCORIS ...)     -> a LoRA: unsupported
  ``conditioner.embedders.1.model.``  (OpenCLIP-G next to CLIP-L)  -> sdxl
  ``conditioner.embedders.0.model.`` alone                         -> SDXL refiner: unsupported
  ``cond_stage_model.model.``         (OpenCLIP-H)                 -> sd2
  ``cond_stage_model.transformer.``   (OpenAI CLIP-L)              -> sd15
  else the UNet's attn2.to_k width (1024 -> sd2, 768 -> sd15), ``label_emb`` -> sdxl.
  another family's distinctive keys: FLUX.2 ``single_stream_modulation.lin.weight`` /
  ``double_stream_modulation_img.lin.weight``, Chroma ``distilled_guidance_layer.*``, Qwen-Image
  ``txt_norm.weight`` / ``txt_in.text_norm.weight``, Z-Image ``layers.0.adaLN_modulation.0.weight``, Wan
  ``head.modulation``, HunyuanVideo, Lumina 2, AuraFlow, ... (``_UNSUPPORTED_FILE_MARKERS``) -> unsupported, named
  ``joint_blocks.N.{x,context}_block.*`` (SAI MMDiT)               -> sd3; variant: ``x_block.attn2.*``
     -> "sd3.5-medium"; ``attn.ln_q.*`` (RMS q/k norm) or ``joint_blocks.37.*`` -> "sd3.5-large";
     else "sd3-medium"
  ``double_blocks.N.img_attn.*`` + ``img_in.weight`` (BFL FLUX layout) with ``vector_in.*`` -> flux1;
     variant: ``guidance_in.*`` -> "dev" (``img_in`` input width 384 -> Fill, 128 -> Canny/Depth:
     unsupported), else "schnell". Without ``vector_in`` it is another FLUX-like model: unsupported.
  else one component on its own (a diffusers UNet/transformer, a VAE such as ae.safetensors, a T5/CLIP
  text encoder)                                                    -> unsupported, said so
  prediction type: flux1/sd3 -> "flow"; a ``v_pred`` key or modelspec metadata; SD1/SDXL default to
  epsilon; SD2 files do not say (768-v and 512-base share the layout), so it stays None.
  components: SD files must hold unet, vae and text encoder. A flux1/sd3 file usually holds the
  transformer only (ComfyUI full checkpoints add ``text_encoders.clip_l/clip_g/t5xxl.*`` and
  ``vae.*``/``first_stage_model.*``): what it lacks is listed in components_missing and taken from
  base_model_config or the family's default repo (``family_spec`` single_file_config_repo), not a problem.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ...families import get_signature

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
PICKLE_MESSAGE = "pickle checkpoints can run code when loaded; convert to .safetensors"
BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = BASE_COMPONENTS + ("text_encoder_2", "tokenizer_2")
FLUX1_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3", "scheduler")
WEIGHT_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
T5_TOKENIZERS = {"flux1": "tokenizer_2", "sd3": "tokenizer_3"}  # the others are CLIP tokenizers
FLOW_FAMILIES = frozenset({"flux1", "sd3"})
SUPPORTED = "SD1.x, SD2.x, SDXL, FLUX.1, SD3/3.5"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_V2_TO_K = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_DIT_PREFIX = "model.diffusion_model."

# Pipeline classes trained as flux1 / sd3: the same components and the same text-to-image transformer (the
# trainer loads components, not the pipeline class; a ControlNet pipeline's controlnet is not used).
FLUX1_PIPELINES = get_signature("flux1").pipelines
SD3_PIPELINES = get_signature("sd3").pipelines
# (class name prefix, family) of pipelines we cannot train; first match wins, so longer prefixes come first.
_UNSUPPORTED_PIPELINES = (
    ("Flux2Klein", "FLUX.2 klein"), ("Flux2", "FLUX.2"), ("Flux3", "FLUX.3"),
    ("FluxFill", "FLUX.1 Fill, an inpainting transformer"),
    ("FluxControlNet", "FLUX.1 ControlNet"),  # only the classes not in FLUX1_PIPELINES reach this
    ("FluxControl", "FLUX.1 Canny/Depth, an image-conditioned transformer"),
    ("FluxKontext", "FLUX.1 Kontext, an image-editing model"), ("FluxPriorRedux", "FLUX.1 Redux, an image adapter"),
    ("QwenImage", "Qwen-Image"), ("ZImage", "Z-Image"), ("Chroma", "Chroma"), ("Wan", "Wan"),
    ("Kandinsky", "Kandinsky"), ("PixArt", "PixArt"), ("Sana", "Sana"), ("Lumina", "Lumina"),
    ("HiDream", "HiDream"), ("AuraFlow", "AuraFlow"), ("Cosmos", "Cosmos"), ("HunyuanDiT", "Hunyuan-DiT"),
    ("Hunyuan", "Hunyuan"), ("LTX", "LTX-Video"), ("Krea", "Krea"), ("CogVideoX", "CogVideoX"),
    ("CogView", "CogView"), ("Kolors", "Kolors"), ("StableCascade", "Stable Cascade"), ("Mochi", "Mochi"),
    ("Allegro", "Allegro"), ("Latte", "Latte"), ("OmniGen", "OmniGen"), ("StableAudio", "Stable Audio"),
    ("StableDiffusion3", "SD3"),  # an SD3 class not in SD3_PIPELINES (e.g. a modular pipeline)
    ("Flux", "a FLUX pipeline this trainer does not know"),  # not FLUX1_PIPELINES: never guessed to be SDXL
)
# component -> key prefixes of a single-file flow checkpoint (ComfyUI / SAI full checkpoints); the
# transformer is what the family was detected by.
_FILE_COMPONENTS = {
    "flux1": (("vae", ("vae.", "first_stage_model.")), ("text_encoder", ("text_encoders.clip_l.",)),
              ("text_encoder_2", ("text_encoders.t5xxl.",))),
    "sd3": (("vae", ("vae.", "first_stage_model.")), ("text_encoder", ("text_encoders.clip_l.",)),
            ("text_encoder_2", ("text_encoders.clip_g.",)), ("text_encoder_3", ("text_encoders.t5xxl.",))),
}
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
_VARIANT = re.compile(r"\.(fp16|bf16)[.-]")
_MMDIT = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.")
_BFL_DOUBLE = re.compile(r"^double_blocks\.\d+\.img_attn\.")


@dataclass(frozen=True)
class ModelProbe:
    kind: str  # "diffusers_dir" | "single_file" | "hub" | "invalid"
    source: str  # base_model as written in the config
    path: Path | None  # resolved local folder/file, or the cached hub snapshot
    family: str | None  # "sd15" | "sd2" | "sdxl" | "flux1" | "sd3" | None
    prediction_type: str | None  # "epsilon" | "v_prediction" | "flow" (flux1, sd3) | None (unknown)
    pipeline_class: str | None = None
    family_evidence: str | None = None  # the rule that decided the family
    components_found: tuple[str, ...] = ()
    components_missing: tuple[str, ...] = ()
    weight_files: dict | None = None  # component -> relative weight files (shows fp16-only variants)
    problems: tuple[dict, ...] = ()  # errors: {code, message, hint?, files?}
    warnings: tuple[dict, ...] = ()
    in_cache: bool | None = None  # hub ids only
    notes: tuple[str, ...] = ()
    # flux1: "dev" | "schnell"; sd3: "sd3-medium" | "sd3.5-medium" | "sd3.5-large"; None for SD or unknown
    variant: str | None = None

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
    except PermissionError:  # the caller names the folder: the file's name completes it
        return None, _p("model_unreadable", f"{path.name}: permission denied")
    except OSError as exc:
        return None, _p("model_unreadable", f"{path.name}: cannot read ({exc.strerror or exc})")
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


def weight_headers(root: Path, files) -> dict[str, dict]:
    """tensor name -> its header entry (dtype, shape, offsets) over a component's safetensors files, from their
    headers only (no tensor data read)."""
    entries: dict[str, dict] = {}
    for rel in files or ():
        if str(rel).endswith(".safetensors"):
            header, _ = read_safetensors_header(root / rel)
            entries.update({k: v for k, v in (header or {}).items() if k != "__metadata__" and isinstance(v, dict)})
    return entries


def weight_shapes(root: Path, files) -> dict[str, list[int]]:
    """tensor name -> shape over a component's safetensors files, from their headers only (no tensor data read)."""
    return {k: list(v.get("shape") or ()) for k, v in weight_headers(root, files).items()}


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
    indexed: set[str] = set()  # stems that have an index: "model" for model.safetensors.index.json
    for idx in (n for n in names if n.endswith(".safetensors.index.json")):
        indexed.add(idx[: -len(".safetensors.index.json")])
        index, err = _read_json(folder / idx)
        shards = sorted(set((index or {}).get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if err or not shards:
            problems.append(_p("model_corrupt", f"{folder.name}/{idx}: {err or 'no weight_map'}"))
        elif missing:
            problems.append(_p("model_incomplete", f"{folder.name}: {len(missing)} shard(s) listed in {idx} are missing",
                               files=[f"{folder.name}/{m}" for m in missing]))
    # Shards without their index (from_pretrained finds them only through it), or fewer than "-of-N" says.
    groups: dict[tuple[str, int], set[int]] = {}
    for n in safe:
        m = _SHARD.match(n)
        if m:
            groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    for (stem, total), have in sorted(groups.items()):
        if stem not in indexed:
            problems.append(_p("model_incomplete", f"{folder.name}: sharded weights {stem}-*-of-{total:05d}.safetensors "
                               f"have no {stem}.safetensors.index.json",
                               "download the index file of the sharded weights too"))
            lost = [f"{folder.name}/{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in have]
            if lost:
                problems.append(_p("model_incomplete", f"{folder.name}: {len(lost)} of {total} shard(s) are missing", files=lost))
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


def _unsupported(what: str, family_name: str | None = None, hint: str | None = None) -> dict:
    named = f" ({family_name})" if family_name else ""
    return _p("model_unsupported", f"{what}{named} is not supported; supported: {SUPPORTED}",
              hint or "use an SD1.5, SD2.x, SDXL, FLUX.1 (dev or schnell) or SD3/SD3.5 base model")


def _unsupported_file(name: str, evidence: str, hint: str | None = None) -> dict:
    return _p("model_unsupported", f"this is a {name} checkpoint ({evidence}); {name} is not supported; "
              f"supported: {SUPPORTED}", hint or "use an SD1.5, SD2.x, SDXL, FLUX.1 (dev or schnell) or SD3/SD3.5 base model")


def _unsupported_pipeline_family(cls: str) -> str | None:
    return next((name for prefix, name in _UNSUPPORTED_PIPELINES if cls.startswith(prefix)), None)


def _variant(family: str, tcfg: dict) -> tuple[str | None, str, dict | None]:
    """(variant, evidence, unsupported-problem) by the family's one variant rule (its signature)."""
    variant, more, bad = get_signature(family).variant(tcfg)
    return variant, more, (_unsupported(*bad) if bad else None)


def _have_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None  # looked up, not imported


def _tokenizer_problem(folder: Path, comp: str, t5: bool) -> tuple[dict | None, str | None]:
    """(problem, note) for a tokenizer folder: CLIP needs vocab.json+merges.txt or tokenizer.json; T5 needs
    tokenizer.json, or spiece.model with sentencepiece installed (transformers 5 converts it only with that)."""
    names = set(os.listdir(folder))
    if "tokenizer.json" in names:
        return None, None
    if not t5:
        if {"vocab.json", "merges.txt"} <= names:
            return None, None
        return _p("model_incomplete", f"{comp}/ has neither vocab.json+merges.txt nor tokenizer.json"), None
    if "spiece.model" not in names:
        return _p("model_incomplete", f"{comp}/ (T5 tokenizer) has neither tokenizer.json nor spiece.model"), None
    if _have_sentencepiece():
        return None, f"{comp} has only spiece.model: converted with sentencepiece when loaded"
    return _p("model_incomplete", f"{comp}/ (T5 tokenizer) has only spiece.model, which transformers can read only "
              "with the sentencepiece package (not installed)",
              f"pip install sentencepiece, or add the tokenizer.json of the model's repo to {comp}/"), None


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
    family: str | None = None
    evidence: str | None = None
    variant: str | None = None
    named = None if cls in FLUX1_PIPELINES or cls in SD3_PIPELINES else _unsupported_pipeline_family(cls)
    if named:
        problems.append(_unsupported(f"pipeline class {cls}", named))
    elif cls in FLUX1_PIPELINES or cls in SD3_PIPELINES:
        tcfg = _read_json(path / "transformer" / "config.json")[0] or {}
        if cls in FLUX1_PIPELINES:
            variant, more, bad = _variant("flux1", tcfg)
            if bad:
                problems.append(bad)
            else:
                family = "flux1"
        else:
            family = "sd3"
            variant, more, _ = _variant("sd3", tcfg)
        evidence = f"model_index _class_name {cls}{more}"
        base_cls = "FluxPipeline" if cls in FLUX1_PIPELINES else "StableDiffusion3Pipeline"
        if family and cls != base_cls:
            extra = sorted(declared - set(FLUX1_COMPONENTS if family == "flux1" else SD3_COMPONENTS))
            notes.append(f"pipeline class {cls}: trained as {base_cls} (text-to-image)"
                         + (f"; not used: {', '.join(extra)}" if extra else ""))
    elif "XL" in cls or "text_encoder_2" in declared or unet_cfg.get("addition_embed_type") == "text_time":
        family = "sdxl"
        evidence = ("model_index _class_name " + cls) if "XL" in cls else (
            "text_encoder_2 component" if "text_encoder_2" in declared else "unet addition_embed_type text_time")
    elif cls.startswith("StableDiffusion"):
        family, evidence = _sd_family(unet_cfg, te_cfg)
    else:
        problems.append(_unsupported(f"pipeline class {cls or '(none)'}"))
    if family is None:  # nothing to train: listing "missing unet" for a Qwen-Image folder would only mislead
        return ModelProbe("diffusers_dir", source, path, None, None, pipeline_class=cls or None,
                          problems=tuple(problems), notes=tuple(notes))
    required = {"sdxl": SDXL_COMPONENTS, "flux1": FLUX1_COMPONENTS, "sd3": SD3_COMPONENTS}.get(family, BASE_COMPONENTS)
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
            if all(_VARIANT.search(n) for n in safe):
                notes.append(f"{comp} has only variant weights ({', '.join(safe)})")
        elif comp.startswith("tokenizer"):
            prob, note = _tokenizer_problem(folder, comp, T5_TOKENIZERS.get(family) == comp)
            if note:
                notes.append(note)
            if prob:
                missing.append(comp)
                explained.add(comp)
                problems.append(prob)
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
    if family in FLOW_FAMILIES:
        prediction = "flow"
        sched_cls = str((sched or {}).get("_class_name", ""))
        if sched is not None and sched_cls and not sched_cls.startswith("FlowMatch"):
            notes.append(f"scheduler {sched_cls} is not a flow-matching scheduler; {family} is trained as a flow model")
    else:
        prediction = sched.get("prediction_type", "epsilon") if sched is not None else None
    return ModelProbe("diffusers_dir", source, path, family, prediction, pipeline_class=cls or None,
                      family_evidence=evidence, components_found=tuple(found), components_missing=tuple(missing),
                      weight_files=weight_files, problems=tuple(problems), notes=tuple(notes), variant=variant)


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
                      problems=tuple(problems), warnings=tuple(warns), in_cache=True, notes=inner.notes,
                      variant=inner.variant)


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


# The single-file rules live in model_probe_file (imported last: it reads this module's helpers).
from .single_file import (_LORA_PARTS, _LORA_PREFIXES, _component_file_problem, _family_from_keys, _flow_family_from_keys, _lora_problem, probe_single_file)  # noqa: E402,F401
