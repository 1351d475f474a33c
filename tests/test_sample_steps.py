"""Sample images take the loaded model's step count unless validation_inference_steps sets one: 25, or a
step-distilled release's own few (what its model card samples with); an explicit value always wins."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_trainer.families import get_family


def _family(name: str, steps=None, **state):
    fam = get_family(name, SimpleNamespace(validation_inference_steps=steps, validation_guidance_scale=None,
                                           base_model="x"))
    for k, v in state.items():
        setattr(fam, k, v)
    return fam


@pytest.mark.parametrize("name,state,want", [
    ("flux1", {"variant": "dev"}, 25), ("flux1", {"variant": "schnell"}, 4),
    ("flux2_klein", {"is_distilled": False}, 25), ("flux2_klein", {"is_distilled": True}, 4),
    ("zimage", {"turbo": False}, 25), ("zimage", {"turbo": True}, 9),
    ("sdxl", {}, 25), ("qwen_image", {}, 25)])
def test_the_models_own_step_count(name, state, want):
    assert _family(name, **state).sample_steps() == want
    assert _family(name, steps=7, **state).sample_steps() == 7  # explicit wins


def test_the_config_default_is_the_models(tmp_path):
    from lora_trainer.config.config import parse_config

    cfg = parse_config({"dataset_path": str(tmp_path / "d"), "base_model": "org/model",
                        "output_path": str(tmp_path / "o"), "trigger_words": ["ohwx"]})[0]
    assert cfg.validation_inference_steps is None
