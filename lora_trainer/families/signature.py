"""How a family is recognised from its files (torch-free): each family folder's ``signature.py`` holds one
``Signature`` (``SIGNATURE``). The probe (preflight/probe) reads JSON and safetensors headers and asks the
signatures; the adapter asks the same ``variant`` rule of the loaded model's config, so the two cannot disagree.

The probe asks them in this order, first match wins (FAMILIES order within a step, so the rules of one step must
not overlap; families that share an architecture decide between themselves in one shared rule, as
``_unet/signature.py`` and ``_mmdit/signature.py`` do):

diffusers folder: ``pipelines`` (the model_index ``_class_name``), then the probe's table of pipelines it cannot
train, then ``match_folder``; the family's ``variant`` rule reads its denoiser's config.json; the folder must hold
``spec.components``.

single .safetensors file (header only): the probe's LoRA refusal (naming the first ``lora_layout`` its keys have,
the DiT families' first), then ``match_file`` of the families whose files are whole checkpoints (``file_layout``
"checkpoint"), then the probe's table of DiT models it cannot train, then ``match_file`` of the DiT families
(``file_layout`` "dit"; FLUX.1, Chroma and FLUX.2 files share BFL's double blocks: _mmdit/signature.py decides).
The components a file holds: ``file_components``; its prediction type: ``file_prediction``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# (variant, evidence appended to the family's, refusal) from the denoiser's config (config.json as a dict, or the
# loaded model's .config): a refusal is (what, which model it is, hint) for a model of the family's pipeline that
# cannot be trained (FLUX.1 Fill), else None.
Unsupported = tuple[str, str, str]
VariantRule = Callable[[Mapping], tuple["str | None", str, "Unsupported | None"]]

# Whole checkpoints (ldm / sgm layout, ComfyUI) keep the denoiser under this prefix; DiT releases have it or not.
DENOISER_PREFIX = "model.diffusion_model."
CHECKPOINT = "checkpoint"  # a whole pipeline in one file (ldm / sgm key layout): every file component required
DIT = "dit"  # the denoiser, maybe with its VAE and text encoders: what it lacks comes from a config repo


def no_variant(config: Mapping) -> tuple[None, str, None]:
    return None, "", None


@dataclass(frozen=True)
class FolderFacts:
    """What ``match_folder`` may read of a diffusers folder."""

    pipeline_class: str  # model_index.json _class_name ("" if none)
    components: frozenset[str]  # what model_index.json declares with a class
    config: Callable[[str], Mapping]  # a component's config.json ({} if missing or unreadable)


@dataclass(frozen=True)
class FileKeys:
    """What ``match_file`` may read of a .safetensors header: tensor names and their entries, never data."""

    keys: frozenset[str]  # tensor names as stored
    header: Mapping[str, Any]  # name -> {dtype, shape, data_offsets}

    @cached_property
    def dit(self) -> frozenset[str]:
        """The names without DENOISER_PREFIX: DiT rules match both spellings."""
        return frozenset(k.removeprefix(DENOISER_PREFIX) for k in self.keys)

    @cached_property
    def prefixed(self) -> bool:
        return any(k.startswith(DENOISER_PREFIX) for k in self.keys)

    @property
    def where(self) -> str:
        """For evidence: where the DiT keys were found."""
        return f" under {DENOISER_PREFIX}" if self.prefixed else ""

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def dit_has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.dit)

    def dit_entry(self, name: str) -> Any:
        """The header entry of a DiT tensor, spelled as this file spells its keys (None if absent)."""
        return self.header.get((DENOISER_PREFIX if self.prefixed else "") + name)


@dataclass(frozen=True)
class Match:
    evidence: str  # the rule that decided, for people
    variant: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A file of the family's layout that cannot be trained. The probe says "this is a {model} checkpoint
    ({evidence}); {model} is not supported; supported: ..." with ``hint`` (None: its usual one), or, when
    ``message`` is set, that message alone."""

    model: str
    evidence: str
    hint: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class DistillFacts:
    """What ``distilled`` may read of a recognised model: the name it was given by, and its configs."""

    name: str  # base_model as written: a hub id, a folder or a file path
    pipeline_config: Mapping  # model_index.json ({} for a single file or a hub id not downloaded yet)
    denoiser_config: Mapping  # the denoiser's config.json (same)
    metadata: Mapping  # a single file's safetensors __metadata__ ({} otherwise)
    # scheduler/scheduler_config.json of a folder ({} otherwise): Z-Image-Turbo differs from its base only there
    scheduler_config: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Distilled:
    """A step- or guidance-distilled checkpoint of the family (Z-Image Turbo, FLUX.2 klein): a LoRA trained on it
    directly degrades the distillation. The probe warns (``model_distilled``) naming ``base``, the checkpoint to
    train on instead, and ``why``."""

    model: str  # for people: "FLUX.2 klein 9B (distilled)"
    evidence: str  # what told: "model_index.json is_distilled: true"
    base: str  # "black-forest-labs/FLUX.2-klein-base-9B"
    why: str


FolderRule = Callable[[FolderFacts], "str | None"]  # -> evidence, or None: not this family
DistillRule = Callable[[DistillFacts], "Distilled | None"]


def not_distilled(facts: DistillFacts) -> None:
    return None  # a family without distilled releases


NamedVariant = Callable[[str, "str | None"], "str | None"]


def variant_as_configured(name: str, variant: str | None) -> str | None:
    return variant  # the files tell every variant of the family apart
FileRule = Callable[[FileKeys], "Match | Refusal | None"]
# (folder facts, the variant its denoiser's config tells) -> (variant, evidence appended): for a variant only the
# pipeline tells (Wan 2.2 A14B: a second expert, transformer_2, beside a Wan 2.1 14B transformer).
FolderVariant = Callable[[FolderFacts, "str | None"], tuple["str | None", str]]


def variant_of_denoiser(facts: FolderFacts, variant: str | None) -> tuple[str | None, str]:
    return variant, ""


def no_folder_rule(facts: FolderFacts) -> None:
    return None  # known by its pipeline classes alone


@dataclass(frozen=True)
class Signature:
    pipelines: frozenset[str]  # model_index.json _class_name values trained as this family
    variant: VariantRule
    match_folder: FolderRule  # for a folder whose pipeline class is in no family's ``pipelines``
    file_layout: str  # CHECKPOINT | DIT: when ``match_file`` is asked and what a file must hold
    match_file: FileRule
    # component -> key prefixes, in the order the probe reports them. CHECKPOINT: every one must be there; DIT:
    # the denoiser is what match_file found, these may be there (ComfyUI full checkpoints).
    file_components: tuple[tuple[str, tuple[str, ...]], ...]
    # What its single files are trained as when neither a v_pred key nor modelspec metadata says; None: unknown,
    # with file_prediction_note saying why.
    file_prediction: str | None
    file_prediction_note: str | None
    # (layout name, key substrings) by which a LoRA file of this family is named in the refusal of a LoRA given
    # as base model; None: none of its own.
    lora_layout: tuple[str, tuple[str, ...]] | None
    # Whether a recognised model is a distilled release that should not be trained on directly (a warning).
    distilled: DistillRule = not_distilled
    # (base_model as written, the variant its files tell) -> the variant: for a release whose files are another
    # variant's (Qwen-Image-2512's are Qwen-Image's), told by its name alone. Probe and adapter both apply it.
    named_variant: NamedVariant = variant_as_configured
    folder_variant: FolderVariant = variant_of_denoiser
