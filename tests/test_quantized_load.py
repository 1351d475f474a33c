"""Converting a base whose file holds another dtype than the compute one (an fp32 file trained in bf16, a bf16 file
on an fp16 card) without holding the whole model at the compute dtype on the host: the component loads at its
file's dtype (memory-mapped views, no copy) and quantize_module casts one layer at a time just before converting
it. Checked in fresh processes that sample their anonymous RSS: the same converted weights, bit for bit, as
casting the whole model first, at a lower peak; and through the CLI (bf16 on the CPU, fp32 tiny files)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, write_config

LOAD = r"""
import hashlib, json, sys, threading, time
import torch
from diffusers import FluxTransformer2DModel
from lora_trainer.runtime.quantize import quantize_module

path, mode = sys.argv[1], sys.argv[2]

def anon():  # private memory: what a full cast copy costs (the file's mapped pages are page cache, not this)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

base = anon()
threading.Thread(target=sample, daemon=True).start()
if mode == "whole_model_cast_first":
    model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    info = quantize_module(model, "int8")
else:
    model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    info = quantize_module(model, "int8", torch.bfloat16)
done.append(1)
time.sleep(0.01)
h = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    parts = [getattr(p, a) for a in p.__tensor_flatten__()[0]] if hasattr(p, "__tensor_flatten__") else [p]
    for t in parts:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"peak": peak[0] - base, "sha": h.hexdigest(), "layers": info["layers"],
                  "dtypes": sorted({str(getattr(p, "dtype", "")) for p in model.parameters()})}))
"""


@pytest.fixture(scope="module")
def fp32_transformer(tmp_path_factory):
    """A FLUX-shaped transformer of 61 M parameters (width 768, 1 double + 4 single blocks) saved in fp32: 0.24 GiB
    on disk, 0.12 GiB at bf16, about 0.06 GiB once its block Linears are int8."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=4,
                                   attention_head_dim=128, num_attention_heads=6, joint_attention_dim=512,
                                   pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    path = tmp_path_factory.mktemp("fp32") / "transformer"
    model.save_pretrained(path, safe_serialization=True)
    return path, sum(p.numel() for p in model.parameters())


def _load(path, mode) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_layer_by_layer_cast_converts_the_same_at_a_lower_peak(fp32_transformer):
    path, params = fp32_transformer
    whole, layered = _load(path, "whole_model_cast_first"), _load(path, "layer_by_layer")
    assert layered["sha"] == whole["sha"], "casting per layer must give the same converted model"
    assert layered["layers"] == whole["layers"] > 0 and "torch.float32" not in layered["dtypes"]
    bf16 = 2 * params
    assert whole["peak"] > 0.9 * bf16, whole  # the old way holds the whole model at bf16 before converting
    # the new way: the int8 layers + the rest at bf16 + one layer in flight, about half of it
    assert layered["peak"] < 0.7 * whole["peak"], (layered, whole)


def test_the_cli_loads_an_fp32_file_for_a_bf16_int8_run(tmp_path, tiny_models, dataset):
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["flux1-dev"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       min_bucket_resolution=64, max_train_steps=2, checkpointing_steps=None, lora_rank=4,
                       mixed_precision="bf16", base_quantization="int8", text_encoder_quantization="nf4",
                       max_sequence_length=32, device="cpu")
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    cast = {e["message"].split(":")[0] for e in res.of_type("status") if "layer by layer" in e["message"]}
    assert cast == {"transformer", "text_encoder", "text_encoder_2"}
    assert all(e["loss"] is not None for e in res.of_type("step"))
