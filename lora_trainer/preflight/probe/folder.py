"""What a diffusers pipeline folder holds: its family (asked of the families' signatures), whether every component
the family needs is there and loadable, and its prediction type. Reads JSON and safetensors headers only."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ...families import FAMILIES, SPECS, get_signature
from ...families.signature import FolderFacts
from .headers import PICKLE_MESSAGE, PICKLE_SUFFIXES, read_json, read_pipeline_index, read_safetensors_header
from .result import ModelProbe, problem, unsupported

# (class name prefix, model) of pipelines we cannot train; first match wins, so longer prefixes come first. A class
# that a family's signature lists never gets here (the FLUX.1 and SD3 classes it does not list do).
_UNSUPPORTED_PIPELINES = (
    ("Flux3", "FLUX.3"),
    ("FluxFill", "FLUX.1 Fill, an inpainting transformer"),
    ("FluxControlNet", "FLUX.1 ControlNet"),
    ("FluxControl", "FLUX.1 Canny/Depth, an image-conditioned transformer"),
    ("FluxKontext", "FLUX.1 Kontext, an image-editing model"), ("FluxPriorRedux", "FLUX.1 Redux, an image adapter"),
    ("QwenImage", "Qwen-Image"), ("ZImage", "Z-Image"), ("Wan", "Wan"),
    ("Chroma", "a Chroma pipeline this trainer does not know"),  # ChromaPipeline & co. are the chroma family's
    ("Kandinsky", "Kandinsky"), ("PixArt", "PixArt"), ("Sana", "Sana"), ("Lumina", "Lumina"),
    ("HiDream", "HiDream"), ("AuraFlow", "AuraFlow"), ("Cosmos", "Cosmos"), ("HunyuanDiT", "Hunyuan-DiT"),
    ("Hunyuan", "Hunyuan"), ("LTX", "LTX-Video"), ("Krea", "Krea"), ("CogVideoX", "CogVideoX"),
    ("CogView", "CogView"), ("Kolors", "Kolors"), ("StableCascade", "Stable Cascade"), ("Mochi", "Mochi"),
    ("Allegro", "Allegro"), ("Latte", "Latte"), ("OmniGen", "OmniGen"), ("StableAudio", "Stable Audio"),
    ("StableDiffusion3", "SD3"),  # e.g. a modular pipeline
    ("Flux", "a FLUX pipeline this trainer does not know"),  # never guessed to be a UNet family
)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
_VARIANT = re.compile(r"\.(fp16|bf16)[.-]")


def component_weights(folder: Path) -> tuple[list[str], list[str], list[dict]]:
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
        index, err = read_json(folder / idx)
        shards = sorted(set((index or {}).get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if err or not shards:
            problems.append(problem("model_corrupt", f"{folder.name}/{idx}: {err or 'no weight_map'}"))
        elif missing:
            problems.append(problem("model_incomplete", f"{folder.name}: {len(missing)} shard(s) listed in {idx} are missing",
                                    files=[f"{folder.name}/{m}" for m in missing]))
    # Shards without their index (from_pretrained finds them only through it), or fewer than "-of-N" says.
    groups: dict[tuple[str, int], set[int]] = {}
    for n in safe:
        m = _SHARD.match(n)
        if m:
            groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    for (stem, total), have in sorted(groups.items()):
        if stem not in indexed:
            problems.append(problem("model_incomplete", f"{folder.name}: sharded weights {stem}-*-of-{total:05d}.safetensors "
                                    f"have no {stem}.safetensors.index.json",
                                    "download the index file of the sharded weights too"))
            lost = [f"{folder.name}/{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in have]
            if lost:
                problems.append(problem("model_incomplete", f"{folder.name}: {len(lost)} of {total} shard(s) are missing", files=lost))
    for n in safe:
        _, prob = read_safetensors_header(folder / n)
        if prob:
            prob["message"] = f"{folder.name}/{prob['message']}"
            problems.append(prob)
    return safe, pickles, problems


def _have_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None  # looked up, not imported


def tokenizer_problem(folder: Path, comp: str, t5: bool) -> tuple[dict | None, str | None]:
    """(problem, note) for a tokenizer folder: CLIP needs vocab.json+merges.txt or tokenizer.json; T5 needs
    tokenizer.json, or spiece.model with sentencepiece installed (transformers 5 converts it only with that)."""
    names = set(os.listdir(folder))
    if "tokenizer.json" in names:
        return None, None
    if not t5:
        if {"vocab.json", "merges.txt"} <= names:
            return None, None
        return problem("model_incomplete", f"{comp}/ has neither vocab.json+merges.txt nor tokenizer.json"), None
    if "spiece.model" not in names:
        return problem("model_incomplete", f"{comp}/ (T5 tokenizer) has neither tokenizer.json nor spiece.model"), None
    if _have_sentencepiece():
        return None, f"{comp} has only spiece.model: converted with sentencepiece when loaded"
    return problem("model_incomplete", f"{comp}/ (T5 tokenizer) has only spiece.model, which transformers can read only "
                   "with the sentencepiece package (not installed)",
                   f"pip install sentencepiece, or add the tokenizer.json of the model's repo to {comp}/"), None


def _unsupported_pipeline_family(cls: str) -> str | None:
    return next((name for prefix, name in _UNSUPPORTED_PIPELINES if cls.startswith(prefix)), None)


def _family(facts: FolderFacts) -> tuple[str | None, str | None, str | None, list[dict], list[str]]:
    """(family, evidence, variant, problems, notes): by pipeline class, then the refusals, then the folder rules."""
    cls = facts.pipeline_class
    by_class = next((name for name in FAMILIES if cls in get_signature(name).pipelines), None)
    named = None if by_class else _unsupported_pipeline_family(cls)
    if named:
        return None, None, None, [unsupported(f"pipeline class {cls}", named)], []
    if by_class:
        family, evidence = by_class, f"model_index _class_name {cls}"
    else:
        family, evidence = next(((name, ev) for name in FAMILIES
                                 if (ev := get_signature(name).match_folder(facts)) is not None), (None, None))
        if family is None:
            return None, None, None, [unsupported(f"pipeline class {cls or '(none)'}")], []
    spec = SPECS[family]
    variant, more, bad = get_signature(family).variant(facts.config(spec.denoisers[0]))
    if bad:
        return None, None, None, [unsupported(*bad)], []
    variant, pipeline_evidence = get_signature(family).folder_variant(facts, variant)
    more += pipeline_evidence
    notes = []
    if by_class and cls != spec.pipeline_class:
        extra = sorted(facts.components - set(spec.components))
        notes.append(f"pipeline class {cls}: trained as {spec.pipeline_class} (text-to-image)"
                     + (f"; not used: {', '.join(extra)}" if extra else ""))
    return family, evidence + more, variant, [], notes


def probe_diffusers_dir(path: Path, source: str) -> ModelProbe:
    index, err, index_name = read_pipeline_index(path)
    if index is None:
        hint = None
        singles = sorted(p.name for p in path.glob("*.safetensors"))
        if singles:
            hint = f"for a single-file checkpoint set base_model to the file, e.g. {path / singles[0]}"
        msg = ("no model_index.json (or modular_model_index.json): not a diffusers pipeline folder" if err == "missing"
               else f"{index_name} is {err}")
        return ModelProbe("diffusers_dir", source, path, None, None,
                          problems=(problem("model_incomplete" if err == "missing" else "model_corrupt", msg, hint),))
    cls = str(index.get("_class_name", ""))
    declared = {k for k, v in index.items()
                if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}
    configs: dict[str, dict] = {}

    def config(comp: str) -> dict:
        if comp not in configs:
            configs[comp] = read_json(path / comp / "config.json")[0] or {}
        return configs[comp]

    family, evidence, variant, problems, notes = _family(FolderFacts(cls, frozenset(declared), config))
    if family is None:  # nothing to train: listing "missing unet" for a Qwen-Image folder would only mislead
        return ModelProbe("diffusers_dir", source, path, None, None, pipeline_class=cls or None,
                          problems=tuple(problems), notes=tuple(notes))
    spec = SPECS[family]
    denoisers = spec.denoisers_of(variant)  # a two-expert variant's second expert too
    with_weights = {*denoisers, "vae", *spec.text_encoders, *spec.other_models}
    found, missing, weight_files = [], [], {}
    pickles_only: list[str] = []
    explained: set[str] = set()  # missing components that already have a specific problem
    for comp in (*spec.components, *(d for d in denoisers if d not in spec.components)):
        folder = path / comp
        if comp not in declared or not folder.is_dir():
            missing.append(comp)
            continue
        if comp in with_weights:
            if not (folder / "config.json").is_file():
                missing.append(comp)
                explained.add(comp)
                problems.append(problem("model_incomplete", f"{comp}/config.json is missing"))
                continue
            safe, pickles, probs = component_weights(folder)
            problems.extend(probs)
            weight_files[comp] = tuple(f"{comp}/{n}" for n in (safe or pickles))
            if not safe:
                missing.append(comp)
                explained.add(comp)
                if pickles:
                    pickles_only.extend(f"{comp}/{n}" for n in pickles)
                else:
                    problems.append(problem("model_incomplete", f"{comp}/ has no weight files"))
                continue
            if all(_VARIANT.search(n) for n in safe):
                notes.append(f"{comp} has only variant weights ({', '.join(safe)})")
        elif comp.startswith("tokenizer") or comp in spec.tokenizers:
            prob, note = tokenizer_problem(folder, comp, comp in spec.t5_tokenizers)
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
            problems.append(problem("model_incomplete", "scheduler/scheduler_config.json is missing"))
            continue
        found.append(comp)
    if pickles_only:
        problems.append(problem("model_pickle_refused", f"weights only as pickle files: {PICKLE_MESSAGE}",
                                "re-save the pipeline with save_pretrained(..., safe_serialization=True)", files=pickles_only))
    plain_missing = [c for c in missing if c not in explained]
    if plain_missing:
        problems.append(problem("model_incomplete", f"missing component(s): {', '.join(plain_missing)}"))
    sched, _ = read_json(path / "scheduler" / "scheduler_config.json")
    if spec.is_flow:
        prediction = "flow"
        sched_cls = str((sched or {}).get("_class_name", ""))
        if sched is not None and sched_cls and not sched_cls.startswith("FlowMatch"):
            notes.append(f"scheduler {sched_cls} is not a flow-matching scheduler; {family} is trained as a flow model")
    else:
        prediction = sched.get("prediction_type", "epsilon") if sched is not None else None
    return ModelProbe("diffusers_dir", source, path, family, prediction, pipeline_class=cls or None,
                      family_evidence=evidence, components_found=tuple(found), components_missing=tuple(missing),
                      weight_files=weight_files, problems=tuple(problems), notes=tuple(notes), variant=variant)
