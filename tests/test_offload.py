"""Block streaming (offload_blocks): the streamed blocks' frozen weights live in host memory and come to the
accelerator one block at a time, for the forward pass and again for the backward pass. An offloaded weight is an
empty tensor (offload.py), so a schedule that used one would fail here on the CPU too; the LoRA a streamed run
trains is bitwise the one of a run without streaming, through the real CLI and across SIGTERM + resume.

"One block at a time" is counted on the weight memory really alive, not on the parameters' ``.data``: weak
references to the storage of every copy a streamed weight had (the streamer's loads, layerwise casting's upcasts),
so a copy that autograd saved for the backward pass, or that the streamer forgot, keeps its block counted."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from conftest import run_cli, write_config
from lora_trainer.config.config import ConfigError, parse_config

STEPS = 2


def _inputs(family: str, model, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if family == "flux1-dev":
        return dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                    guidance=torch.tensor([1.0]))
    if family == "sd3":
        return dict(hidden_states=torch.randn(1, c.in_channels, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([500.0]))
    text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(1, c.in_channels, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, c.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, text, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)})


class Resident(TorchFunctionMode):
    """How many streamed blocks hold weight memory outside the streamer's two slots at once (``most``). A block counts
    while any storage that one of its frozen weights held since it was loaded is alive: noted at every load (all
    blocks' current data) and at every torch call that takes a streamed weight (layerwise casting's upcast lives only
    inside the layer's forward). The slots (``slot_storages``: every one seen) are the streamer's fixed buffers."""

    def __init__(self, streamer):
        super().__init__()
        self.streamer, self.most = streamer, 0
        self.block_of = {id(p): i for i, params in enumerate(streamer.params) for p in params}
        self.alive: list[dict[int, StorageWeakRef]] = [{} for _ in streamer.params]
        self.slot_storages: set[int] = set()
        load = streamer.load  # wrapped on the instance: the streamer's hooks call self.load

        def counted_load(i):
            load(i)
            for j, params in enumerate(streamer.params):
                for p in params:
                    self._note(j, p)
            self._count()
        streamer.load = counted_load

    def _note(self, i: int, t: torch.Tensor) -> None:
        if t.numel():  # not an offloaded weight's placeholder
            storage = t.untyped_storage()
            slots = {slot.untyped_storage().data_ptr() for slot in self.streamer.slots}
            self.slot_storages |= slots
            if storage.data_ptr() in slots:
                return
            ref = self.alive[i].get(storage._cdata)
            if ref is None or ref.expired():  # an address is reused once its storage is freed
                self.alive[i][storage._cdata] = StorageWeakRef(storage)

    def _count(self) -> None:
        for refs in self.alive:
            for key in [k for k, ref in refs.items() if ref.expired()]:
                del refs[key]
        self.most = max(self.most, sum(bool(refs) for refs in self.alive))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        used = [(self.block_of[id(a)], a) for a in (*args, *kwargs.values()) if id(a) in self.block_of]
        if used:
            for i, a in used:
                self._note(i, a)
            self._count()
        return out


def _train(tiny_models, family: str, *, offload: float, checkpointing: bool, fp8: bool = False):
    """Two SGD steps of LoRA on every block Linear; (LoRA tensors, streamer, most streamed blocks whose weight memory
    was alive at once)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from lora_trainer.families import SPECS
    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.runtime.offload import stream_blocks
    from lora_trainer.runtime.quantize import after_lora

    cls, sub, spec = {"flux1-dev": (FluxTransformer2DModel, "transformer", SPECS["flux1"]),
                      "sd3": (SD3Transformer2DModel, "transformer", SPECS["sd3"]),
                      "sdxl": (UNet2DConditionModel, "unet", SPECS["sdxl"])}[family]
    model = cls.from_pretrained(tiny_models[family], subfolder=sub)
    for p in model.parameters():  # at the streamer's copies' alignment: CPU kernels round by address alignment
        p.data = p.data.clone()
    if checkpointing:
        model.enable_gradient_checkpointing()
    torch.manual_seed(0)
    params = add_lora(model, rank=4, alpha=4, dropout=0.0, targets=spec.targets("all_linear"), use_dora=False,
                      path="target_modules")
    if fp8:
        cfg = type("C", (), {"base_quantization": "fp8", "text_encoder_quantization": "none"})()
        after_lora(cfg, type("K", (), {"denoisers": {sub: model}})(), {sub: model})
    model.train()
    streamer = stream_blocks(model, spec.blocks, offload, torch.device("cpu")) if offload else None
    resident = Resident(streamer) if streamer else None
    for step in range(STEPS):
        with resident or contextlib.nullcontext():
            out = model(**_inputs(family, model, step)).sample
            out.float().pow(2).mean().backward()
        with torch.no_grad():
            for p in params:
                p -= 0.5 * p.grad
                p.grad = None
    if streamer:
        streamer.slot_storages_seen = resident.slot_storages
    return [p.detach().clone() for p in params], streamer, resident.most if resident else 0


@pytest.mark.parametrize("family,fp8", [("flux1-dev", False), ("flux1-dev", True), ("sd3", False), ("sdxl", False)])
def test_streaming_trains_the_same_lora_with_two_slots_and_prefetch(tiny_models, family, fp8, monkeypatch):
    from lora_trainer.runtime import offload

    monkeypatch.setattr(offload, "_TEST_COPY", True)  # the accelerator's path on the CPU: packed buffers, slots
    plain, _, _ = _train(tiny_models, family, offload=0, checkpointing=True, fp8=fp8)
    for checkpointing in (True, False):  # without checkpointing only the gradient hooks bring blocks back
        streamed, streamer, most = _train(tiny_models, family, offload=0.99, checkpointing=checkpointing, fp8=fp8)
        n = len(streamer.blocks)
        assert n >= 2 and streamer.total == n, "every streamable block streamed (0.99 of them, rounded up)"
        assert all(torch.equal(a, b) for a, b in zip(plain, streamed)), f"{family}: streaming changed the LoRA"
        # the weights live in the two slots, allocated once, whatever the steps; outside them only layerwise
        # casting's upcast of the running block (fp8), and nothing autograd saved (offload.py)
        assert len(streamer.slots) == offload.SLOTS and len(streamer.slot_storages_seen) == offload.SLOTS
        assert most == (1 if fp8 else 0), f"{family}, checkpointing {checkpointing}: {most} blocks outside the slots"
        # every load but the first was prefetched while the block before it (forward) or after it (backward) ran,
        # into the slot that block did not hold
        copies = [(i, slot) for why, i, slot in streamer.trace if why == "copy"]
        assert copies == [(0, 0)], f"{family}: blocks loaded without a prefetch: {copies}"
        order = [i for _, i, _ in streamer.trace]
        forward, backward = list(range(n)), list(range(n - 2, -1, -1))
        assert order == forward + backward + forward[1:] + backward, f"{family}: prefetch order {order}"
        assert all(a[2] != b[2] for a, b in zip(streamer.trace, streamer.trace[1:])), "consecutive copies share a slot"
        assert streamer.loads == len(streamer.trace) <= STEPS * 2 * n, "no thrashing"
        assert all(p.numel() == 0 for ps in streamer.params[1:] for p in ps), "the blocks left are offloaded"
        if fp8:
            assert {t.dtype for t in streamer.host.values()} >= {torch.float8_e4m3fn}, "host copies are the fp8 ones"


def test_a_weight_used_while_offloaded_fails_loudly(tiny_models, monkeypatch):
    """What gives the test above its teeth: without the gradient hooks the backward pass reaches a block whose
    weights are gone, and the empty placeholder makes that an error instead of a silent host computation."""
    from lora_trainer.runtime.offload import BlockStreamer

    monkeypatch.setattr(BlockStreamer, "_post_hook", lambda self, i: (lambda module, args, output: None))
    with pytest.raises(RuntimeError) as err:
        _train(tiny_models, "flux1-dev", offload=0.99, checkpointing=False)
    # a weight itself, or a view of it that autograd saved and the backward rebuilds from the placeholder
    assert any(words in str(err.value) for words in ("size of tensor", "dimension", "shape", "storage of size 0"))


def test_block_counts_and_refusals(tmp_path, dataset):
    from lora_trainer.runtime.offload import resolve_count

    assert [resolve_count(v, 57) for v in (0, 0.5, 0.01, 0.999, 1, 20, 57, 99)] == [0, 29, 1, 57, 1, 20, 57, 57]
    base = {"dataset_path": str(dataset), "base_model": str(tmp_path), "output_path": str(tmp_path / "out"),
            "trigger_words": ["ohwx"], "gradient_checkpointing": True}
    cfg, _ = parse_config({**base, "offload_blocks": 0.5, "base_quantization": "fp8"})
    assert cfg.offload_blocks == 0.5
    for extra, words in (({"offload_blocks": 2.5}, "whole number"),
                         ({"offload_blocks": 4, "gradient_checkpointing": False}, "gradient_checkpointing"),
                         ({"offload_blocks": 4, "base_quantization": "int8"}, "int8"),
                         ({"offload_blocks": 4, "base_quantization": "nf4"}, "nf4"),
                         ({"offload_blocks": 4, "use_dora": True}, "use_dora"),
                         ({"offload_blocks": -1}, "minimum")):
        with pytest.raises(ConfigError) as err:
            parse_config({**base, **extra})
        (problem,) = err.value.problems
        assert problem["path"] == "offload_blocks" and words in json.dumps(problem), problem


@pytest.fixture(scope="module")
def cli_runs(tiny_models, tmp_path_factory):
    """FLUX.1-dev through the CLI: 4 plain steps, and 4 streamed steps (half the blocks) stopped by SIGTERM after
    step 2 and resumed; both sample at step 4, so streaming also serves the no-grad sampling pass."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("offload")
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx"))

    def cfg(name, **extra):
        return str(write_config(
            tmp / f"{name}.json", dataset_path=str(data), base_model=str(tiny_models["flux1-dev"]),
            output_path=str(tmp / name), trigger_words=["ohwx"], resolution=64, min_bucket_resolution=64,
            max_train_steps=4, checkpointing_steps=2, log_every_n_steps=1, lora_rank=4, learning_rate=2e-3,
            gradient_checkpointing=True, max_sequence_length=32, validation_steps=4, validation_inference_steps=2,
            validation_prompts=["ohwx, a cat"], **extra))

    streamed = cfg("streamed", offload_blocks=0.5)
    return {"tmp": tmp, "plain": run_cli("--config", cfg("plain")),
            "stopped": run_cli("--config", streamed, env={"TRAIN_LORA_TEST_SIGTERM_STEP": "2"}),
            "resumed": run_cli("--config", streamed, "--resume"), "validate": cfg("validate", offload_blocks=0.5)}


def test_streamed_cli_run_resumes_to_the_plain_runs_lora(cli_runs):
    plain, stopped, resumed = cli_runs["plain"], cli_runs["stopped"], cli_runs["resumed"]
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert plain.last("run_started")["offload"] is None
    for res in (stopped, resumed):
        started = res.last("run_started")
        assert started["offload"]["transformer"]["blocks"] == 2 and started["offload"]["transformer"]["of"] == 4
        # the plan's host bytes are what the streamer really holds (fp32 on the CPU)
        assert started["memory_plan"]["offload"]["host_bytes"] == started["offload"]["transformer"]["host_bytes"]
    assert {e["step"] for e in resumed.of_type("sample")} == {4}
    a, b = (load_file(cli_runs["tmp"] / n / "lora.safetensors") for n in ("plain", "streamed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "streaming or resume changed the LoRA"
    assert [e["loss"] for e in resumed.of_type("step")] == [e["loss"] for e in plain.of_type("step")][2:]


def test_validate_only_plans_the_streamed_blocks(cli_runs):
    from lora_trainer.config.config import load_config
    from lora_trainer.preflight.run import run_preflight

    report = run_preflight(*load_config(cli_runs["validate"]))
    assert report.ok, report.errors
    memory = report.summary["memory"]
    assert memory["assumes"]["offload_blocks"] == 0.5
    assert memory["offload"]["blocks"] == 2 and memory["offload"]["of"] == 4
    # two single blocks of one size stream: both slots, each one block's size, are on the device
    assert memory["offload"]["device_bytes"] == 2 * (memory["offload"]["host_bytes"] // 2) > 0


def test_validate_only_warns_when_the_streamed_blocks_outgrow_host_memory(cli_runs, monkeypatch):
    """Pinned memory cannot be swapped: the same streamed config on a machine with 256 KiB available warns (the tiny blocks hold 0.5 MiB)."""
    from lora_trainer.preflight import cache_plan
    from lora_trainer.config.config import load_config
    from lora_trainer.preflight.run import run_preflight

    cfg, warnings = load_config(cli_runs["validate"])
    assert not [w for w in run_preflight(cfg, warnings).warnings if w["code"] == "offload_host_memory"]
    monkeypatch.setattr(cache_plan, "available_host_bytes", lambda: 2 ** 18)
    (warning,) = [w for w in run_preflight(cfg, warnings).warnings if w["code"] == "offload_host_memory"]
    assert warning["path"] == "offload_blocks" and "pinned host memory" in warning["message"]
