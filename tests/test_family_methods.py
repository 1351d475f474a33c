"""The training methods of issue 24 over the whole registry (``lora_trainer.families.FAMILIES``): they belong to the
adapters, the objective and the data, never to a family folder, so each family's default tiny model trains with all
of them at once through the real CLI: LoKr or LoHa (LoRA where the family's tool file fuses q/k/v and refuses them),
EMA, masks from a mask folder, a train + a regularisation dataset and a held-out split measured at fixed noise.
The methods' own behaviour (exact maths, resume, reconstruction) has its own tests; this one catches a family whose
latents, modules or files do not fit them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from _helpers import train_and_class_sets
from conftest import run_cli, write_config
from lora_trainer.families import FAMILIES, SPECS, get_part

SUFFIX = {"lokr": (".lokr_w1",), "loha": (".hada_w1_a",), "lora": (".lora_down.weight", ".lora_A.weight")}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    return train_and_class_sets(tmp_path_factory.mktemp("sets"), 5, 2)


def _network(family: str) -> str:
    if not SPECS[family].tool_file_dora:  # q/k/v fused in its tool file: a Kronecker factor cannot be fused exactly
        return "lora"
    return ("lokr", "loha")[FAMILIES.index(family) % 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_with_every_method(sets, tiny_models, tmp_path, family):
    spec, network = SPECS[family], _network(family)
    model = tiny_models[get_part(family, "tiny").DEFAULT]
    cfg = write_config(
        tmp_path / "c.json", base_model=str(model), output_path=str(tmp_path / "out"), trigger_words=["ohwx"],
        datasets=[{"path": str(sets / "train"), "mask_path": str(sets / "masks"), "require_masks": True},
                  {"path": str(sets / "reg"), "role": "regularization", "class_prompt": "a photo of a shape",
                   "loss_weight": 0.5, "require_masks": False}],
        resolution=64, min_bucket_resolution=64, max_train_steps=2, log_every_n_steps=1, lora_rank=4, lora_alpha=4,
        learning_rate=2e-3, network_type=network, ema_decay=0.9, masked_loss=True, eval_split=0.2, eval_steps=2,
        **({"max_sequence_length": 32} if spec.max_sequence_length else {}))
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-4000:]
    started = res.last("run_started")
    assert [(d["role"], d["images"]) for d in started["datasets"]] == [("train", 4), ("regularization", 2)]
    evals = res.of_type("eval_loss")
    assert [e["step"] for e in evals] == [0, 2] and all(e["images"] == 1 for e in evals)
    assert all(l is not None for e in evals for l in e["losses"])
    losses = [e["loss"] for e in res.of_type("step")]
    assert len(losses) == 2 and all(l is not None for l in losses)
    out = res.last("completed")["outputs"]
    with safe_open(out["lora"], "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.endswith(SUFFIX[network]) for k in keys), keys[:5]  # kohya or native LoRA names
    assert "ss_ema" in meta and Path(out["raw_lora"]).is_file()
    manifest = json.loads((tmp_path / "out" / "training_manifest.json").read_text())
    assert [d["role"] for d in manifest["datasets"]] == ["train", "regularization"]
