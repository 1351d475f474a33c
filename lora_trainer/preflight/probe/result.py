"""What a probe returns (``ModelProbe``), its problem entries, and how a refusal is worded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...families import SPECS
from ...families.signature import Refusal

SUPPORTED = ", ".join(spec.label for spec in SPECS.values())
_LABELS = [spec.label for spec in SPECS.values()]
_SUPPORTED_HINT = f"use a base model of a supported family ({', '.join(_LABELS[:-1])} or {_LABELS[-1]})"


@dataclass(frozen=True)
class ModelProbe:
    kind: str  # "diffusers_dir" | "single_file" | "hub" | "invalid"
    source: str  # base_model as written in the config
    path: Path | None  # resolved local folder/file, or the cached hub snapshot
    family: str | None  # a name in families.FAMILIES, or None
    prediction_type: str | None  # "epsilon" | "v_prediction" | "flow" (flow families) | None (unknown)
    pipeline_class: str | None = None
    family_evidence: str | None = None  # the rule that decided the family
    components_found: tuple[str, ...] = ()
    components_missing: tuple[str, ...] = ()
    weight_files: dict | None = None  # component -> relative weight files (shows fp16-only variants)
    problems: tuple[dict, ...] = ()  # errors: {code, message, hint?, files?}
    warnings: tuple[dict, ...] = ()
    in_cache: bool | None = None  # hub ids only
    notes: tuple[str, ...] = ()
    variant: str | None = None  # by the family's signature (FLUX.1 dev / schnell, ...); None if it has none

    @property
    def ok(self) -> bool:
        return not self.problems


def problem(code: str, message: str, hint: str | None = None, files: list | None = None) -> dict:
    d = {"code": code, "message": message}
    if hint:
        d["hint"] = hint
    if files:
        d["files"] = [str(f) for f in files]
    return d


def unsupported(what: str, family_name: str | None = None, hint: str | None = None) -> dict:
    named = f" ({family_name})" if family_name else ""
    return problem("model_unsupported", f"{what}{named} is not supported; supported: {SUPPORTED}",
                   hint or _SUPPORTED_HINT)


def unsupported_file(name: str, evidence: str, hint: str | None = None) -> dict:
    return problem("model_unsupported", f"this is a {name} checkpoint ({evidence}); {name} is not supported; "
                   f"supported: {SUPPORTED}", hint or _SUPPORTED_HINT)


def refused(r: Refusal) -> dict:
    """A signature's refusal as a problem entry."""
    if r.message is not None:
        return problem("model_unsupported", r.message, r.hint)
    return unsupported_file(r.model, r.evidence, r.hint)
