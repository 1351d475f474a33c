"""The issue-24 methods together: several datasets with per-dataset masks, a held-out split, EMA and LoKr in one
run, and the rules that tie them (a mask folder mirrors one dataset; the held-out split comes from train sets only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import train_and_class_sets
from conftest import run_cli, write_config
from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import ConfigError


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    return train_and_class_sets(tmp_path_factory.mktemp("sets"), 6, 3)


def _config(root: Path, model: Path, out: str, **extra) -> Path:
    cfg = {"datasets": [{"path": "train", "mask_path": "masks", "require_masks": True},
                        {"path": "reg", "role": "regularization", "class_prompt": "a photo of a shape",
                         "require_masks": False}],
           "base_model": str(model), "output_path": str(root / out), "trigger_words": ["ohwx"], "resolution": 64,
           "masked_loss": True, "eval_split": 0.34, "eval_steps": 2, "max_train_steps": 4, "log_every_n_steps": 1,
           "lora_rank": 4, "learning_rate": 1e-3, **extra}
    return write_config(root / f"{out}.json", **cfg)


def test_a_top_level_mask_folder_with_datasets_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse_config({"datasets": [{"path": "a"}], "mask_path": "m", "masked_loss": True, "base_model": "x",
                      "output_path": "o", "trigger_words": ["t"]}, base_dir=tmp_path)
    assert any(p["path"] == "mask_path" and "each dataset" in p["message"] for p in exc.value.problems)


def test_masks_and_held_out_images_follow_their_dataset(sets, tiny_models):
    """Each entry's masks are found in its own folder and reach its own images (rel paths repeat across sets);
    the held-out split is taken from the train set only."""
    from lora_trainer.data.datasets import build_run_images
    from lora_trainer.data.masks import MaskSet
    from lora_trainer.preflight.run import run_preflight

    from lora_trainer.config.config import load_config

    cfg, _ = load_config(_config(sets, tiny_models["sd15"], "unit"))
    pre = run_preflight(cfg)
    assert pre.ok, pre.errors
    scan = pre.scan
    held = {r.path for r in scan.held_out}
    assert len(held) == 2 and all("/train/" in p for p in held)  # round(0.34 * 6); none from the reg set
    images = build_run_images(cfg, scan, 64, False)
    assert not {str(i.path) for i in images} & held  # never trained on
    masks = MaskSet.for_run(cfg, scan, images)
    for img in images:
        src = masks.sources[img.index]
        if img.role == "train":
            assert src is not None and Path(src).parent == sets / "masks" and Path(src).stem == Path(img.path).stem
        else:
            assert src is None, (img.rel, src)  # reg images share names with train ones: never their masks


def test_lokr_ema_masks_eval_and_regularisation_train_together(sets, tiny_models):
    res = run_cli("--config", str(_config(sets, tiny_models["sd15"], "all", network_type="lokr", ema_decay=0.9)))
    assert res.returncode == 0, res.stderr[-3000:]
    started = res.last("run_started")
    assert [(d["role"], d["images"]) for d in started["datasets"]] == [("train", 4), ("regularization", 3)]
    assert [e["step"] for e in res.of_type("eval_loss")] == [0, 2, 4]
    assert all(e["images"] == 2 for e in res.of_type("eval_loss"))
    out = res.last("completed")["outputs"]
    assert {"lora", "peft_lora", "raw_lora", "raw_peft_lora"} <= set(out)
    from safetensors import safe_open

    with safe_open(out["lora"], "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.endswith(".lokr_w1") for k in keys) and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert "ss_ema" in meta
