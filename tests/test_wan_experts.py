"""Wan 2.2 T2V-A14B's two experts (families/wan/experts.py, objectives/sigma_range.py): each sample goes to the expert
of its sigma (a straddling batch is split and put back in order), one expert alone trains only on its own sigmas,
and through the real CLI on the tiny two-expert pipeline: both experts or one, a file pair per trained expert that
WanPipeline loads onto the right transformer (and the ComfyUI files by the tests' Wan rules), SIGTERM -> resume
bitwise on both experts, and train_experts refused for a model without experts."""
from __future__ import annotations

import html

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import lora_deltas, run_cli, write_config
from tool_rules import _wan_rules
from lora_trainer.families.wan import tiny
from lora_trainer.families.wan.adapter import Wan
from lora_trainer.families.wan.experts import EXPERTS
from lora_trainer.families.wan.spec import SPEC
from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings

RANK, ALPHA = 4, 8
HIGH, LOW = (comp for _, comp in EXPERTS.groups)


@pytest.fixture(scope="module")
def pipe():
    return tiny.build("t2v-a14b")


def _family(boundary: float = 0.875) -> Wan:
    fam = Wan()
    fam.variant, fam.boundary = "t2v-a14b", boundary
    return fam


def test_a_straddling_batch_goes_to_each_samples_expert_in_order(pipe):
    fam = _family()
    seen = {HIGH: [], LOW: []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(
        lambda m, args, kw, name=name: seen[name].append(kw["timestep"].tolist()), with_kwargs=True)
        for name in (HIGH, LOW)]
    below = torch.nextafter(torch.tensor(0.875), torch.tensor(0.0))  # the largest float32 sigma of the low expert
    t = torch.stack([torch.tensor(0.9), torch.tensor(0.3), torch.tensor(0.875), below])
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, 16, 2, 4, 6, generator=gen)
    cond = {"prompt_embeds": torch.randn(4, 8, tiny.WAN_TEXT_DIM, generator=gen)}
    denoisers = {HIGH: pipe.transformer, LOW: pipe.transformer_2}
    try:
        out = fam.predict(denoisers, noisy, t, cond, None)
    finally:
        for h in hooks:
            h.remove()
    # The pipeline's rule: t = sigma x 1000 >= boundary_ratio x 1000 -> transformer (high noise).
    assert [round(x, 3) for x in seen[HIGH][0]] == [900.0, 875.0]
    assert [round(x, 3) for x in seen[LOW][0]] == [300.0, round(float(below) * 1000, 3)]
    assert float(below) * 1000 < 875
    for i, name in enumerate((HIGH, LOW, HIGH, LOW)):  # each row is its own expert's output, in the batch's order
        alone = denoisers[name](hidden_states=noisy[i:i + 1], timestep=t[i:i + 1] * 1000,
                                encoder_hidden_states=cond["prompt_embeds"][i:i + 1], return_dict=False)[0]
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # One expert's sigmas only: no split, and an untrained expert's sigma is an error, not a silent wrong model.
    assert fam.route(torch.tensor([0.95, 0.99])) == [HIGH, HIGH]
    with pytest.raises(RuntimeError, match="transformer_2"):
        fam.predict({HIGH: pipe.transformer}, noisy[:2], t[:2], {"prompt_embeds": cond["prompt_embeds"][:2]}, None)


@pytest.mark.parametrize("sampling", ["sigmoid", "logit_normal", "uniform", "mode"])
def test_one_experts_sigmas_stay_in_its_range_with_the_configured_shape(sampling):
    settings = FlowSettings(sigma_sampling=sampling, shift="static", shift_value=3.0)
    full = FlowMatchingObjective(settings).sample_sigmas(100_000, 64, "cpu", torch.Generator().manual_seed(0))
    fam = _family()
    for name, comp in EXPERTS.groups:
        low, high = EXPERTS.sigma_range(name, 0.875)
        obj = FlowMatchingObjective(settings, sigma_range=(low, high))
        draw = obj.sample_sigmas(100_000, 64, "cpu", torch.Generator().manual_seed(1))
        assert draw.dtype == torch.float32 and low <= draw.min() and draw.max() <= high
        assert set(fam.route(draw[:2000])) == {comp}
        # The unrestricted distribution conditioned on the range (what rejection sampling would give): same
        # quantiles, not a clamp (mass piled on the boundary) nor a linear squeeze.
        inside = full[(full >= low) & (full <= high)]
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        torch.testing.assert_close(draw.quantile(q), inside.quantile(q), rtol=0, atol=6e-3)
        # one uniform draw per sample from the run's generator: the same stream gives the same sigmas (resume)
        gen = torch.Generator().manual_seed(5)
        first = obj.sample_sigmas(8, 64, "cpu", gen)
        assert torch.equal(first, obj.sample_sigmas(8, 64, "cpu", torch.Generator().manual_seed(5)))
        assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())  # it advanced
    # the validation loss's fixed sigmas follow the range too
    assert FlowMatchingObjective(settings, sigma_range=EXPERTS.sigma_range("high_noise", 0.875)) \
        .default_eval_levels == (1.0,)
    assert FlowMatchingObjective(settings, sigma_range=EXPERTS.sigma_range("low_noise", 0.875)) \
        .default_eval_levels == (0.75, 0.5, 0.25)


# -------------------------------------------------------------------------------------------------- the CLI
def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **params) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": RANK, "lora_alpha": ALPHA,
           "learning_rate": 2e-3, "max_sequence_length": 32, "batch_size": 4, **params}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(path)
    return {k[: -len(".lora_A.weight")]: (ALPHA / RANK) * (state[k.replace("lora_A", "lora_B")].float() @ a.float())
            for k, a in state.items() if k.endswith("lora_A.weight")}


def _loads_onto(model: Path, path: Path, checkpoint_file: Path, expert: str) -> None:
    """diffusers' WanPipeline puts ``path``'s deltas on ``expert`` and nothing on the other transformer."""
    from lora_trainer.testing.tiny import load_pipeline

    pipe = load_pipeline(model)
    pipe.load_lora_weights(str(path), **({"load_into_transformer_2": True} if expert == LOW else {}))
    want, loaded = _deltas(checkpoint_file), lora_deltas(getattr(pipe, expert))
    assert want and set(loaded) == set(want), f"{path.name}: module sets differ on {expert}"
    for module, delta in want.items():
        torch.testing.assert_close(loaded[module], delta, rtol=2e-2, atol=2e-4, msg=f"{path.name} {module}")
    other = LOW if expert == HIGH else HIGH
    assert not lora_deltas(getattr(pipe, other)), f"{path.name} also landed on {other}"
    return pipe


def _tool_file_rules(pipe, lora: Path, checkpoint_file: Path, tmp_path: Path) -> None:
    """tests/tool_rules.py's Wan rules (ComfyUI's names) against the expert's own trained modules."""
    fake = tmp_path / f"rules-{lora.stem}"
    fake.mkdir()
    shutil.copy(checkpoint_file, fake / "lora_transformer.safetensors")
    _wan_rules(pipe, lora, fake)


def test_both_experts_train_export_and_resume_bitwise(tmp_path, tiny_models, dataset):
    model = tiny_models["wan22-a14b"]
    full = run_cli("--config", str(_config(tmp_path, model, dataset, "full")))
    assert full.returncode == 0, full.stderr[-4000:]
    assert full.last("run_started")["variant"] == "t2v-a14b"
    out, done = tmp_path / "full", full.last("completed")["outputs"]
    files = {f"{kind}_{name}": Path(done[f"{kind}_{name}"]) for kind in ("lora", "peft_lora")
             for name in EXPERTS.names}
    assert files == {"lora_high_noise": out / "lora_high_noise.safetensors",
                     "lora_low_noise": out / "lora_low_noise.safetensors",
                     "peft_lora_high_noise": out / "pytorch_lora_weights_high_noise.safetensors",
                     "peft_lora_low_noise": out / "pytorch_lora_weights_low_noise.safetensors"}
    assert Path(done["lora"]) == files["lora_high_noise"] and not (out / "lora.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "pytorch_lora_weights_low_noise.safetensors\", load_into_transformer_2=True" in card
    # The report names the release, lists each expert's pair and loads each on its own model; no lora.safetensors.
    report = html.unescape((out / "report.html").read_text())
    assert "A Wan 2.2 T2V-A14B" in report and "LoraLoaderModelOnly" in report
    assert 'pytorch_lora_weights_low_noise.safetensors", load_into_transformer_2=True)' in report
    assert all(f"<code>{p.name}</code>" in report for p in files.values())
    assert str(out / "lora.safetensors") not in report
    # The tool files: Wan 2.2's names (ai-toolkit's ss_base_model_version, the Wan2.2 repo) and each expert's
    # timesteps (musubi-tuner's modelspec.timestep_range); the card calls it Wan 2.2 and tags it so.
    names = SPEC.tool_names_for("t2v-a14b")
    assert (names.base_model_version, names.architecture) == ("wan_2.2_14b", "wan2.2-t2v-a14b")
    for name, timesteps in zip(EXPERTS.names, ("875,1000", "0,875")):
        with safe_open(str(files[f"lora_{name}"]), "pt") as fh:
            meta = fh.metadata()
        assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.implementation"],
                meta["modelspec.timestep_range"]) == \
            (names.base_model_version, f"{names.architecture}/lora", names.implementation, timesteps), name
    tags = card.split("---")[1]
    assert "Wan 2.2 T2V-A14B" in card and "- wan2.2" in tags and "wan2.1" not in card

    # SIGTERM during step 2 -> a checkpoint at 2; --resume ends bitwise equal on both experts.
    cfg = _config(tmp_path, model, dataset, "split")
    stopped = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": "2"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = run_cli("--config", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = out / "checkpoints" / "step-000004"
    assert sorted(p.stem for p in final.glob("lora_*.safetensors")) == \
        ["lora_high_noise", "lora_low_noise", f"lora_{HIGH}", f"lora_{LOW}"]
    for expert in (HIGH, LOW):
        a = load_file(final / f"lora_{expert}.safetensors")
        b = load_file(tmp_path / "split" / "checkpoints" / "step-000004" / f"lora_{expert}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{expert}: resume not exact"
        assert max(d.abs().max() for d in _deltas(final / f"lora_{expert}.safetensors").values()) > 0, \
            f"{expert} learned nothing: its samples were not routed to it"
    assert [e["loss"] for e in resumed.of_type("step")] == [e["loss"] for e in full.of_type("step")][2:]

    # Each expert's files load onto its own transformer (the ComfyUI file through diffusers' Wan converter too).
    for name, expert in EXPERTS.groups:
        trained = final / f"lora_{expert}.safetensors"
        for path in (files[f"peft_lora_{name}"], files[f"lora_{name}"]):
            pipe = _loads_onto(model, path, trained, expert)
        _tool_file_rules(pipe, files[f"lora_{name}"], trained, tmp_path)


def test_one_expert_trains_alone_and_a_model_without_experts_refuses_it(tmp_path, tiny_models, dataset):
    model = tiny_models["wan22-a14b"]
    # high_noise: a fifth of the configured sigmas are its own (sigmoid, shift 3: sigma >= 0.875), so a draw that
    # ignored the restriction would route a sample to the frozen low-noise expert within these 8 and fail the run.
    res = run_cli("--config", str(_config(tmp_path, model, dataset, "high", train_experts="high_noise",
                                          max_train_steps=2, validation_steps=2, validation_inference_steps=2)))
    assert res.returncode == 0, res.stderr[-4000:]
    out, done = tmp_path / "high", res.last("completed")["outputs"]
    assert {k for k in done if "lora" in k} == {"lora", "peft_lora", "lora_high_noise", "peft_lora_high_noise"}
    assert 2 in {e["step"] for e in res.of_type("sample")}  # sampled with the frozen low-noise expert beside it
    final = out / "checkpoints" / "step-000002"
    assert sorted(p.stem for p in final.glob("lora_*.safetensors")) == ["lora_high_noise", f"lora_{HIGH}"]
    trained = final / f"lora_{HIGH}.safetensors"
    pipe = _loads_onto(model, out / "pytorch_lora_weights_high_noise.safetensors", trained, HIGH)
    _tool_file_rules(pipe, out / "lora_high_noise.safetensors", trained, tmp_path)

    # A model with one denoiser: a config error naming the key, from --validate-only.
    cfg = _config(tmp_path, tiny_models["wan21"], dataset, "one", train_experts="high_noise")
    bad = run_cli("--config", str(cfg), "--validate-only")
    assert bad.returncode != 0
    errors = bad.last("validation")["errors"]
    assert [(e["path"], e["value"]) for e in errors] == [("train_experts", "high_noise")], errors
    assert errors[0]["allowed"] == '"both"'


def test_methods_on_two_experts(tmp_path, tiny_models):
    """test_family_methods' mix (LoKr, EMA, masks, a regularisation set, the held-out loss at fixed sigmas on both
    sides of the boundary) on the two experts: a LoKr file pair per expert, each with its raw (non-EMA) copy."""
    from _helpers import train_and_class_sets

    sets = train_and_class_sets(tmp_path / "sets", 5, 2)
    cfg = write_config(
        tmp_path / "c.json", base_model=str(tiny_models["wan22-a14b"]), output_path=str(tmp_path / "out"),
        trigger_words=["ohwx"], resolution=64, min_bucket_resolution=64, max_train_steps=2, log_every_n_steps=1,
        datasets=[{"path": str(sets / "train"), "mask_path": str(sets / "masks"), "require_masks": True},
                  {"path": str(sets / "reg"), "role": "regularization", "class_prompt": "a photo of a shape",
                   "loss_weight": 0.5, "require_masks": False}],
        lora_rank=4, lora_alpha=4, learning_rate=2e-3, network_type="lokr", ema_decay=0.9, masked_loss=True,
        eval_split=0.2, eval_steps=2, max_sequence_length=32)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-4000:]
    evals = res.of_type("eval_loss")
    assert [e["step"] for e in evals] == [0, 2] and all(len(e["losses"]) == 4 for e in evals)
    out = res.last("completed")["outputs"]
    for name in EXPERTS.names:
        for key in (f"lora_{name}", f"peft_lora_{name}", f"raw_lora_{name}", f"raw_peft_lora_{name}"):
            assert Path(out[key]).is_file(), key
        state = load_file(out[f"lora_{name}"])
        assert any(k.endswith(".lokr_w1") for k in state) and all(k.startswith("diffusion_model.") for k in state)


def test_memory_plan_counts_the_experts_on_the_device(tmp_path, tiny_models, dataset):
    """Both experts trained: both on the device with their LoRA; one: its weights and LoRA, the other frozen one
    joining only for samples (sampling_models)."""
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model

    model = tiny_models["wan22-a14b"]
    probe = probe_model(str(model))
    assert probe.weight_files.get(LOW), "the probe lists the second expert's weights"

    def plan(**kw):
        cfg, _ = parse_config({"dataset_path": str(dataset), "base_model": str(model), "trigger_words": ["ohwx"],
                               "output_path": str(tmp_path / "out"), "validation_steps": 2, **kw})
        return plan_memory(cfg, probe, "wan", 64, gpu=None)

    both, high = plan(), plan(train_experts="high_noise")
    assert both["denoiser_params"] == 2 * high["denoiser_params"] > 0
    assert both["lora_params"] == 2 * high["lora_params"] > 0
    assert "sampling_models" not in both["parts_gib"] and "sampling_models" in high["parts_gib"]


def test_a_single_expert_file_is_refused_naming_the_folder_to_pass(tmp_path, tiny_models):
    """ComfyUI ships A14B's experts as two Wan 2.1 14B-shaped files: one is half the model, told by its name only."""
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.single_file import write_tiny_single_file

    plain = write_tiny_single_file(tiny_models["wan21"], tmp_path / "wan21.safetensors")
    assert probe_model(str(plain)).family == "wan"
    expert = tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    shutil.copy(plain, expert)
    probe = probe_model(str(expert))
    assert probe.family is None and [p["code"] for p in probe.problems] == ["model_unsupported"]
    assert "Wan2.2-T2V-A14B-Diffusers" in probe.problems[0]["hint"] and "train_experts" in probe.problems[0]["hint"]
