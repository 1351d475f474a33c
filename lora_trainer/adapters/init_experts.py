"""``init_lora`` for a model with experts (Wan 2.2 T2V-A14B): each trained expert starts from its own file.

Our export writes a file pair per expert, ``<name>_high_noise.safetensors`` / ``<name>_low_noise.safetensors``
(ComfyUI) and ``pytorch_lora_weights_high_noise.safetensors`` / ``..._low_noise`` (PEFT); ai-toolkit names its
A14B files the same way. ``init_lora`` names either file of such a pair (or the PEFT one): the file of each trained
expert is that name with the expert's suffix, each loaded into its own expert (as ``transformer``, the name our
files use for both). A file without an expert's suffix is refused: one LoRA for two experts would put the
high-noise LoRA on the low-noise model or the reverse, which the file cannot tell (copy it to both names to mean
that). Every file is checked (exists, header, rank, DoRA) before any is loaded, by --validate-only too. Torch-free
here; the loading is init_from_file's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..families import get_spec


def expert_files(path: Path, family: str, variant: str | None, train_experts: str
                 ) -> tuple[dict[str, Path] | None, list[dict]]:
    """({trained expert component: its file}, problems) for a variant with experts; (None, []) for any other
    model (init_lora is then the one file)."""
    experts = get_spec(family).experts.get(variant or "")
    if not experts:
        return None, []
    suffixes = tuple(f"_{name}" for name in experts.names)
    stem = path.stem
    base = next((stem[: -len(s)] for s in suffixes if stem.endswith(s)), None)
    if base is None or path.is_dir():
        pair = " / ".join(f"<name>{s}{path.suffix or '.safetensors'}" for s in suffixes)
        return {}, [{"path": "init_lora", "value": str(path), "allowed": f"one file of a per-expert pair ({pair})",
                     "message": f"this model has experts ({', '.join(experts.names)}), each starting from its own "
                                "file: name one file of the pair this trainer (or ai-toolkit) wrote; to start both "
                                "experts from one LoRA, copy it to both names"}]
    files = {comp: path.with_name(f"{base}_{name}{path.suffix}") for name, comp in experts.groups
             if comp in experts.trained(train_experts)}
    missing = [p for p in files.values() if not p.is_file()]
    return files, [{"path": "init_lora", "value": str(p), "allowed": "the trained experts' files side by side",
                    "message": f"{p.name} (this run's {comp} file, beside {path.name}) does not exist"}
                   for comp, p in files.items() if p in missing]


def file_problems(cfg: Any, path: Path, family: str | None) -> list[dict]:
    """One init_lora file's header checks, by the run's network type: a LoRA's rank, DoRA and layout
    (init_from_file), a LoKr / LoHa file's (init_lycoris). --validate-only and the trainer both ask here."""
    from .init_from_file import header_problems
    from .init_lycoris import header_problems as lycoris_header_problems

    if cfg.network_type == "lora":
        return header_problems(path, rank=cfg.lora_rank, use_dora=cfg.use_dora, family=family)
    return lycoris_header_problems(path, network_type=cfg.network_type)


def init_experts(cfg: Any, family: Any, comps: Any, modules: dict, events: Any) -> bool:
    """Load each trained expert's file into its LoRA (training/attach.py, right after injection); False where the
    model has no experts (the caller loads the one file)."""
    import dataclasses

    from ..contract.errors import ConfigError
    from .init_from_file import init_from_file

    path = cfg.resolve(cfg.init_lora)
    files, problems = expert_files(path, family.name, comps.variant, getattr(cfg, "train_experts", None) or "both")
    if files is None:
        return False
    for p in files.values():
        problems += [] if problems else file_problems(cfg, p, family.name)
    if problems:  # before anything is loaded: no expert starts from its file while another starts from zero
        raise ConfigError(f"init_lora: {problems[0]['message']}", problems)
    first = family.spec.denoisers[0]  # the name both experts' files use
    for comp, p in files.items():
        init_from_file(cfg, family.name, dataclasses.replace(comps, denoisers={first: comps.denoisers[comp]}),
                       {first: modules[comp]}, events, path=p)
    return True
