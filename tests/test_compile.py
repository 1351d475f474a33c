"""Regional compilation (config ``compile``, runtime/compile.py) through the real CLI on the tiny FLUX.1: the blocks
diffusers lists as repeated are compiled with the LoRA inside; a run stopped by SIGTERM and resumed, with half its
blocks streamed, trains bitwise the LoRA of an uninterrupted compiled run (static shapes: both compile the same
graphs); samples run eagerly and compile nothing; the step events count the graphs. Compiled and eager blocks agree
to rounding (inductor fuses differently), not bitwise.

The first compile on a fresh machine takes a minute or two of CPU (inductor writes and builds C++); later processes
reuse inductor's on-disk cache, so the three compiled runs cost about one compile."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("compile")
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx"))

    def cfg(name, **extra):
        return str(write_config(
            tmp / f"{name}.json", dataset_path=str(data), base_model=str(tiny_models["flux1-dev"]),
            output_path=str(tmp / name), trigger_words=["ohwx"], resolution=64, min_bucket_resolution=64,
            max_train_steps=4, checkpointing_steps=2, log_every_n_steps=1, lora_rank=4, learning_rate=2e-3,
            gradient_checkpointing=True, max_sequence_length=32, validation_steps=2, validation_inference_steps=2,
            validation_prompts=["ohwx, a cat"], **extra))

    resumed = cfg("resumed", compile=True, offload_blocks=0.5)
    return {"tmp": tmp, "compiled": run_cli("--config", cfg("compiled", compile=True)),
            "stopped": run_cli("--config", resumed, env={"TRAIN_LORA_TEST_SIGTERM_STEP": "2"}),
            "resumed": run_cli("--config", resumed, "--resume")}


def _lora(runs, name):
    return load_file(runs["tmp"] / name / "lora.safetensors")


def test_compiled_run_resumes_bitwise_and_counts_its_graphs(runs):
    compiled, stopped, resumed = runs["compiled"], runs["stopped"], runs["resumed"]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    started = compiled.last("run_started")["compile"]
    assert started["blocks"] == 4 and started["classes"] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    # the compiled blocks trace the lean LoRA forward (adapters/fused.py), every LoRA layer of the run on it
    forward = compiled.last("run_started")["lora_forward"]
    assert forward["fused"] > 0 and forward["peft"] == 0, forward
    graphs = [e["compile"]["graphs"] for e in compiled.of_type("step")]
    # compiled at the first step (forward and backward of each class); samples at steps 0, 2, 4 run eagerly and
    # the later steps reuse the graphs: no recompilation
    assert graphs[0] > 0 and len(set(graphs)) == 1, graphs
    assert {e["step"] for e in compiled.of_type("sample")} == {0, 2, 4}
    assert not [w for w in compiled.of_type("warning") if w["code"] == "recompilation"]
    assert resumed.last("run_started")["compile"]["blocks"] == 4 and resumed.last("run_started")["offload"]
    a, b = _lora(runs, "compiled"), _lora(runs, "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume or streaming changed the LoRA"


def test_regions_and_eager_samples(tiny_models):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from lora_trainer.families import SPECS
    from lora_trainer.runtime import compile as comp

    flux = FluxTransformer2DModel.from_pretrained(tiny_models["flux1-dev"], subfolder="transformer")
    assert {type(m).__name__ for m in comp.regions(flux, SPECS["flux1"].blocks)} == set(flux._repeated_blocks)
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet")
    found = comp.regions(unet, SPECS["sd15"].blocks)
    assert found and {type(m).__name__ for m in found} == {"BasicTransformerBlock"}  # diffusers' list for UNets
    unet._repeated_blocks = []  # without one: the family's block lists
    assert comp.regions(unet, SPECS["sd15"].blocks) == [*unet.down_blocks, *unet.up_blocks]

    c = flux.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]))
    with torch.no_grad():
        reference = flux(**inputs).sample
    stats = comp.compile_denoisers({"transformer": flux}, SPECS["flux1"].blocks)
    with torch.no_grad(), comp.eager():
        assert torch.equal(flux(**inputs).sample, reference)
    assert stats.blocks == 4 and stats.graphs == 0, "a forward inside eager() compiled a graph"
    with torch.no_grad():  # compiled: the same function to rounding (inductor fuses differently), graphs counted
        assert torch.allclose(flux(**inputs).sample, reference, rtol=1e-4, atol=1e-5)
    assert stats.graphs > 0


def test_recompilation_warning_once_after_warmup():
    from lora_trainer.runtime.compile import CompileStats

    stats = CompileStats(blocks=2)
    reports = []
    for step, graphs in enumerate([4, 4, 4, 6, 8, 9, 12, 14], start=5):  # a resumed run's steps start past 1
        stats.graphs = graphs
        reports.append(stats.step_report(step))
    assert [r[0]["graphs"] for r in reports] == [4, 4, 4, 6, 8, 9, 12, 14]
    warned = [step for step, (_, w) in enumerate(reports, start=5) if w]
    assert warned == [10], "once, when the graphs after warm-up (9 - 4) outnumber those during it (4)"
    assert reports[5][1]["code"] == "recompilation"


def test_compile_over_an_int8_or_fp8_base_is_a_config_error(tmp_path, dataset):
    from lora_trainer.config.config import ConfigError, parse_config

    base = {"dataset_path": str(dataset), "base_model": str(tmp_path), "output_path": str(tmp_path / "out"),
            "trigger_words": ["ohwx"], "compile": True}
    for quant in ("none", "nf4"):
        assert parse_config({**base, "base_quantization": quant})[0].compile
    for quant in ("int8", "fp8"):
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "base_quantization": quant})
        (problem,) = err.value.problems
        assert problem["path"] == "compile" and quant in problem["message"]
