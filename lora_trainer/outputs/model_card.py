"""The model card: README.md beside the LoRA, in the form the Hugging Face Hub and diffusers' training scripts use
(YAML front matter read by the Hub: base model, tags, trigger words, sample widget; then how to use it).

Built with huggingface_hub's ModelCard/ModelCardData, so the front matter is what the Hub parses. The license is a
placeholder ("other") the author must set: a LoRA inherits its base model's terms (FLUX.1-dev's are
non-commercial), which a trainer cannot decide.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..families import SPECS

CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def family_name(family: str, variant: str | None = None) -> str:
    """How the card and the report name the family ("Stable Diffusion 1.x"), or a variant that is its own release
    (ToolNames.display_name: "Wan 2.2 T2V-A14B ..."); an unknown one by its model_type."""
    spec = SPECS.get(family)
    return (spec.tool_names_for(variant).display_name or spec.display_name) if spec else family


def family_tags(family: str, variant: str | None = None) -> list[str]:
    spec = SPECS.get(family)
    return [*spec.hub_tags, *spec.tool_names_for(variant).hub_tags] if spec else []


def _latest_samples(out_dir: Path, limit: int = 4) -> list[tuple[str, str]]:
    """(relative path, prompt index) of the newest validation round's first image per prompt."""
    rounds = sorted((out_dir / "samples").glob("step-*")) if (out_dir / "samples").is_dir() else []
    if not rounds:
        return []
    files = sorted(rounds[-1].glob("p*_00_seed*.png"))[:limit]
    return [(f.relative_to(out_dir).as_posix(), f.name[1:3]) for f in files]


def _datasets_md(datasets: list[dict] | None) -> str:
    """The datasets section: every dataset with its role and counts (data.datasets.describe)."""
    if not datasets:
        return ""
    rows = "\n".join(f"| `{Path(d['path']).name}` | {d['role']} | {d['images']} | {d['samples_per_epoch']} | "
                     f"{d['loss_weight']:g} | {d['class_prompt'] or ''} |" for d in datasets)
    return ("\n## Datasets\n\n| folder | role | images | samples per epoch | loss weight | class prompt |\n"
            f"| --- | --- | --- | --- | --- | --- |\n{rows}\n")


def group_label(suffix: str) -> str:
    """A file pair's group as people name it: "_high_noise" -> "high-noise"."""
    return suffix.strip("_").replace("_", "-")


def group_load_calls(folder: str, groups: list[tuple[str, str]]) -> str:
    """The diffusers calls that load each group's PEFT file onto its own denoiser (the card's and the report's)."""
    return "\n".join(f'pipe.load_lora_weights("{folder}", weight_name="pytorch_lora_weights{suffix}.safetensors"'
                     f'{", " + kwargs if kwargs else ""})' for suffix, kwargs in groups)


def _groups_md(cfg: Any, groups: list[tuple[str, str]]) -> str:
    """How to load a LoRA written as a file pair per denoiser group (Wan 2.2 A14B's experts)."""
    calls = group_load_calls("path/to/this/folder", groups)
    files = ", ".join(f"`{cfg.output_name}{suffix}.safetensors` on the {group_label(suffix)} model"
                      for suffix, _ in groups)
    return f"""**diffusers** (`pytorch_lora_weights_*.safetensors`, the exact PEFT weights; one file per expert):

```python
{calls}
```

**ComfyUI**: copy the files to `models/loras/` and add one *LoraLoaderModelOnly* node per expert model: {files}
(a file loaded on the other expert's model applies to the wrong noise levels).
"""


def write_model_card(cfg: Any, *, family: str, steps: int, base_is_hub: bool, datasets: list[dict] | None = None,
                     groups: list[tuple[str, str]] | None = None, variant: str | None = None) -> Path:
    """``groups``: (file-name suffix, extra load_lora_weights arguments) per file pair where the family writes one per
    denoiser group (ModelFamily.export_groups); None: the one pair."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..data.captions import prompts_for

    out_dir = Path(cfg.output_path)
    lora_name = f"{cfg.output_name}.safetensors"
    triggers = ", ".join(cfg.trigger_words)
    prompts = prompts_for(cfg)
    widget = [{"text": prompts[int(i)] if int(i) < len(prompts) else triggers, "output": {"url": rel}}
              for rel, i in _latest_samples(out_dir)]
    base = str(cfg.base_model)
    data = ModelCardData(
        base_model=base if base_is_hub and _HUB_ID.match(base) else None, library_name="diffusers",
        # A base model under its own licence names it (modelspec.license in the family's metadata): the LoRA inherits it.
        license="other", license_name=SPECS[family].extra_metadata.get("modelspec.license") if family in SPECS else None,
        instance_prompt=triggers or None, widget=widget or None,
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", "train_lora", *family_tags(family, variant)])
    fam = family_name(family, variant)
    base_line = f"[{base}](https://huggingface.co/{base})" if data.base_model else f"`{Path(base).name or base}` (a local model)"
    samples_md = "\n".join(f"![{prompts[int(i)] if int(i) < len(prompts) else triggers}]({rel})"
                           for rel, i in _latest_samples(out_dir)) or "_No samples were generated (validation_steps)._"
    merged = "" if not getattr(cfg, "merge_lora", None) else (
        f"\nTrained with `{Path(cfg.merge_lora).name}` fused into the base at scale {cfg.merge_lora_scale:g} (not part "
        "of this LoRA): use it on the model that file de-distils, without that file.")
    use = _groups_md(cfg, groups) if groups else f"""**diffusers** (`pytorch_lora_weights.safetensors`, the exact PEFT weights):

```python
pipe.load_lora_weights("path/to/this/folder")
image = pipe("{triggers}, ...").images[0]
```

**ComfyUI**: copy `{lora_name}` to `models/loras/` and add a *LoraLoader* node.

**A1111 / Forge**: copy `{lora_name}` to `models/Lora/` and prompt with `<lora:{cfg.output_name}:1> {triggers}`.
"""
    body = f"""
# {cfg.output_name}

A {fam} LoRA trained with train_lora on {base_line}: {steps} steps, rank {cfg.lora_rank},
alpha {cfg.alpha:g}{", DoRA" if cfg.use_dora else ""}{_network(cfg)}, learning rate {cfg.learning_rate:g}.{merged}

## Trigger words

Use `{triggers}` in the prompt.
{_datasets_md(datasets)}
## Samples

{samples_md}

## Use it

{use}
## License

Set the license in the front matter above (it says `other` until you do). A LoRA is used with its base model,
whose license applies to it too.

`training_manifest.json` beside this file holds every setting, the dataset fingerprint and the library versions.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = out_dir / CARD_NAME
    from .export import write_text_atomic

    write_text_atomic(path, str(card))
    return path


def _network(cfg) -> str:
    """LoKr / LoHa runs say so (the ComfyUI / Forge / A1111 file is a LyCORIS one)."""
    net = getattr(cfg, "network_type", "lora")
    return {"lokr": f", LoKr (factor {getattr(cfg, 'lokr_factor', -1)})", "loha": ", LoHa"}.get(net, "")
