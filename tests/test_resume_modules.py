"""A checkpoint holding LoRA on modules the run does not train is refused as a config error naming them (a
checkpoint from before LoRA left out SDXL CLIP-L's unread last layer), not as an internal error inside PEFT."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.adapters.lora import add_lora, plain_lora_state
from lora_trainer.contract.errors import ConfigError
from lora_trainer.training.resume import check_lora_modules


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)


def _lora(targets):
    torch.manual_seed(0)
    model = _Two()
    add_lora(model, rank=2, alpha=2, dropout=0.0, targets=tuple(targets), use_dora=False, path="unet")
    return model


def test_matching_checkpoint_passes():
    model = _lora(["a"])
    check_lora_modules(Path("ckpt"), {"lora_unet": plain_lora_state(model)}, {"unet": model})


def test_extra_modules_are_a_config_error_naming_them():
    saved = plain_lora_state(_lora(["a", "b"]))  # trained on both layers
    model = _lora(["a"])  # this run trains one
    with pytest.raises(ConfigError) as err:
        check_lora_modules(Path("ckpt"), {"lora_unet": saved}, {"unet": model})
    assert "unet: 2 tensor(s), e.g. b.lora_A" in str(err.value)
    assert err.value.problems[0]["path"] == "resume"
