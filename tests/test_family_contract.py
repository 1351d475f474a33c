"""The contract every registered family keeps, run over the registry (``lora_trainer.families.FAMILIES``) on each
family's tiny random pipelines through the real CLI: a family added as a folder is covered here without an edit.

Per tiny model (every variant the family's tiny builder offers): the probe recognises its folder and its single
file, and ``--validate-only`` passes. Per family (its default tiny model): a short training with schema-valid
events (the NaN guard and a sample included), SIGTERM -> checkpoint -> resume ending bitwise equal to the
uninterrupted run, and the exported files: diffusers loads the PEFT file with the trained deltas and the image
changes; ComfyUI, Forge and A1111 (re-implemented in tests/tool_rules.py) load the tool file onto the trained
modules. A video family (``temporal_compression`` > 0: Wan) gets generated clips beside the images (an H.264 MP4 at
an odd fps and size, an animated GIF) and a broken clip, which every run reports and skips. Family quirks keep
their own tests.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _helpers import assert_report
from conftest import lora_deltas, run_cli, write_config
from tool_rules import DIFFUSERS_LOADS_TOOL_FILE, NO_GRADIENT, RULES
from lora_trainer.families import FAMILIES, SPECS, get_part
from lora_trainer.testing.single_file import write_tiny_single_file

RANK, ALPHA = 4, 8
VIDEO = {"video_frames": 5, "video_fps": 8, "validation_frames": 5}  # 2 latent frames a clip; 5-frame samples
CLIPS, BROKEN = ("clip_a.mp4", "clip_b.gif"), "clip_broken.mp4"


def _with_clips(family: str, data: Path) -> Path:
    """``data`` with generated clips and a broken one for a video family; as it is for an image family."""
    if not SPECS[family].temporal_compression or (data / BROKEN).exists():
        return data
    from lora_trainer.testing.video import write_animated, write_broken, write_clip

    ok = write_clip(data / CLIPS[0], frames=12, fps=12, width=72, height=56)  # 1 s: windows of 5 frames at 8 fps
    write_animated(data / CLIPS[1], frames=7, durations_ms=125, width=64, height=48)
    for clip in CLIPS:
        (data / clip).with_suffix(".txt").write_text("ohwx, a square moving right")
    write_broken(data / BROKEN, ok)
    return data


def _check_clips(family: str, res) -> None:
    """A video family's run trained its clips and reported the broken one (skipped, never a crash)."""
    if not SPECS[family].temporal_compression:
        return
    unreadable = [w for w in res.of_type("warning") if w["code"] == "video_unreadable"]
    assert unreadable and [f.split(":")[0] for f in unreadable[0]["files"]] == [BROKEN], unreadable
    assert res.last("run_started")["num_clips"] == len(CLIPS)


def tiny_names(family: str) -> list[str]:
    return list(get_part(family, "tiny").VARIANTS)


def default_tiny_name(family: str) -> str:
    return get_part(family, "tiny").DEFAULT


EVERY_TINY = [(family, name) for family in FAMILIES for name in tiny_names(family)]


def _id(pair) -> str:
    return pair[1]


def _expected(family: str, name: str, model: Path, *, single_file: bool = False) -> tuple[str | None, str]:
    """(variant, prediction type) of a tiny model, from its own files: the signature's rule on the denoiser's
    config (then on the pipeline's components, for a variant only the folder tells: Wan 2.2 A14B's second expert;
    then on the name, for a release whose files are another's) and the scheduler config, as the trainer reads
    them."""
    from lora_trainer.families import get_signature
    from lora_trainer.families.signature import FolderFacts

    spec, sig = SPECS[family], get_signature(family)
    config = json.loads((model / spec.denoisers[0] / "config.json").read_text())
    variant = sig.variant(config)[0]
    if not single_file and (model / "model_index.json").is_file():  # (a modular pipeline's folder has none: Anima)
        index = json.loads((model / "model_index.json").read_text())
        declared = frozenset(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None)
        variant = sig.folder_variant(FolderFacts(index.get("_class_name", ""), declared, lambda c: {}), variant)[0]
    variant = sig.named_variant(str(model), variant)
    if spec.is_flow:
        return variant, "flow"
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    return variant, sched.get("prediction_type", "epsilon")


@pytest.mark.parametrize("pair", EVERY_TINY, ids=_id)
def test_probe_knows_the_tiny_folder_and_its_single_file(tmp_path, tiny_models, pair):
    from lora_trainer.preflight.probe import probe_model

    family, name = pair
    model = tiny_models[name]
    variant, prediction = _expected(family, name, model)
    probe = probe_model(str(model))
    assert probe.ok, probe.problems
    assert (probe.family, probe.variant, probe.prediction_type) == (family, variant, prediction)
    spec = SPECS[family]
    experts = tuple(d for d in spec.denoisers_of(variant) if d not in spec.components)  # a second expert
    assert probe.components_found == (*spec.components, *experts) and probe.components_missing == ()

    single = write_tiny_single_file(model, tmp_path / f"{name}.safetensors")
    probe = probe_model(str(single))
    assert probe.problems == () or all(p["code"] != "model_unsupported" for p in probe.problems), probe.problems
    # a single file is one denoiser: a two-expert model's first expert reads as the one-denoiser variant
    assert (probe.family, probe.variant) == (family, _expected(family, name, model, single_file=True)[0]), \
        probe.family_evidence


@pytest.mark.parametrize("pair", EVERY_TINY, ids=_id)
def test_validate_only_passes_on_the_tiny_model(tmp_path, tiny_models, dataset, pair):
    family, name = pair
    video = VIDEO if SPECS[family].temporal_compression else {}
    cfg = write_config(tmp_path / "c.json", dataset_path=str(_with_clips(family, dataset)),
                       base_model=str(tiny_models[name]), output_path=str(tmp_path / "out"), trigger_words=["ohwx"],
                       resolution=64, **video)
    res = run_cli("--config", str(cfg), "--validate-only")
    assert res.returncode == 0, res.stderr[-3000:]
    validation = res.last("validation")
    assert validation["ok"] is True and validation["errors"] == []
    assert validation["summary"]["model"]["family"] == family
    if video:
        assert validation["summary"]["dataset"]["clips"] == len(CLIPS)
        assert [w["code"] for w in validation["warnings"] if w["code"] == "video_unreadable"] == ["video_unreadable"]
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def _config(tmp_path: Path, model: Path, dataset: Path, name: str, family: str, **params) -> Path:
    spec = SPECS[family]
    te = {"train_text_encoder": True, "text_encoder_lr": 1e-3} if spec.lora_text_encoders else {}
    seq = {"max_sequence_length": 32} if spec.max_sequence_length else {}
    video = VIDEO if SPECS[family].temporal_compression else {}
    cfg = {"dataset_path": str(_with_clips(family, dataset)), "base_model": str(model),
           "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": RANK, "lora_alpha": ALPHA,
           "learning_rate": 2e-3, **te, **seq, **video, **params}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _deltas(checkpoint: Path, component: str) -> dict[str, torch.Tensor]:
    state = load_file(checkpoint / f"lora_{component}.safetensors")
    return {k[: -len(".lora_A.weight")]: (ALPHA / RANK) * (state[k.replace("lora_A", "lora_B")].float() @ a.float())
            for k, a in state.items() if k.endswith("lora_A.weight")}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_stop_resume_and_export(tmp_path, tiny_models, dataset, family):
    from lora_trainer.testing.tiny import load_pipeline

    assert family in RULES, f"tests/tool_rules.py has no ComfyUI/Forge/A1111 rules for {family}"
    name = default_tiny_name(family)
    model = tiny_models[name]
    variant, prediction = _expected(family, name, model)
    spec = SPECS[family]
    nan = {"TRAIN_LORA_TEST_NAN_STEPS": "3"}  # both runs skip step 3's update: the NaN guard, still comparable

    full = run_cli("--config", str(_config(tmp_path, model, dataset, "full", family, validation_steps=4,
                                           validation_inference_steps=2)), env=nan)
    assert full.returncode == 0, full.stderr[-4000:]
    _check_clips(family, full)
    started = full.last("run_started")
    assert (started["family"], started["variant"], started["prediction_type"]) == (family, variant, prediction)
    assert started["objective"]["kind"] == spec.objective
    if get_part(family, "adapter").ADAPTER.samples_from_cache and not spec.lora_text_encoders:
        # Prompts are cached once, then the encoders leave for good (T5-XXL, umt5-xxl: ~10 GB never resident).
        assert started["text_cache"]["text_encoders_released"] is True
    assert [e["step"] for e in full.of_type("step")] == [1, 2, 3, 4]
    assert [e["details"]["step"] for e in full.of_type("warning") if e["code"] == "nonfinite_step_skipped"] == [3]
    assert 4 in {e["step"] for e in full.of_type("sample")}
    out = tmp_path / "full"
    done = full.last("completed")
    lora, peft_file = Path(done["outputs"]["lora"]), Path(done["outputs"]["peft_lora"])
    assert lora == out / "lora.safetensors" and peft_file == out / "pytorch_lora_weights.safetensors"
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert (manifest["family"], manifest["prediction_type"], manifest["steps"]) == (family, prediction, 4)
    assert manifest["versions"]["torch"] and manifest["config"]["keep_tokens"] == 1  # a count, not "<redacted>"
    assert_report(out, status="completed", step=4, total_steps=4)
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    names = spec.tool_names_for(variant, prediction)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.implementation"]) == \
        (names.base_model_version, f"{names.architecture}/lora", names.implementation)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["modelspec.trigger_phrase"]) == \
        (str(RANK), str(float(ALPHA)), "ohwx")

    # SIGTERM during step 2 -> exit 143 with a checkpoint at 2; --resume finishes the same run, bitwise.
    cfg = _config(tmp_path, model, dataset, "split", family)
    stopped = run_cli("--config", str(cfg), env={**nan, "TRAIN_LORA_TEST_SIGTERM_STEP": "2"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == 2
    resumed = run_cli("--config", str(cfg), "--resume", env=nan)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 2
    final = out / "checkpoints" / "step-000004"
    components = sorted(p.stem.removeprefix("lora_") for p in final.glob("lora_*.safetensors"))
    assert components == sorted((*spec.denoisers, *spec.lora_text_encoders))
    for component in components:
        a = load_file(final / f"lora_{component}.safetensors")
        b = load_file(tmp_path / "split" / "checkpoints" / "step-000004" / f"lora_{component}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{component}: resume not exact"
    assert [e["loss"] for e in resumed.of_type("step")] == [e["loss"] for e in full.of_type("step")][2:]

    # The denoiser's modules learned: those whose output nothing reads (the family's NO_GRADIENT) cannot, nor can a
    # self-attention's q/k over a single token (a tiny UNet's 1x1 mid block at 64 px); everything else must.
    (denoiser,) = spec.denoisers
    trained = _deltas(final, denoiser)
    zero = {n for n, d in trained.items() if not d.abs().max() > 0}
    assert NO_GRADIENT.get(family, lambda m: set())(model) <= zero
    assert trained and len(zero) <= len(trained) // 10, sorted(zero)

    # diffusers loads the PEFT file (and the tool file, where it reads that layout): every trained delta lands,
    # and the image changes.
    def image(p):
        # (Qwen-Image 2.1's pipeline has no max_sequence_length: it never truncates a prompt.)
        takes = "max_sequence_length" in inspect.signature(p.__call__).parameters
        kwargs = {"max_sequence_length": 32} if spec.max_sequence_length and takes else {}
        kwargs.update(getattr(get_part(family, "tiny"), "CALL_KWARGS", {}))  # Ideogram 4: a constant guidance
        # prompt= by name: the FLUX.2 pipelines take an image first (a positional prompt would be read as one)
        return p(prompt="ohwx, a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0), **kwargs).images[0]

    before = image(load_pipeline(model))
    for path in (lora, peft_file) if family in DIFFUSERS_LOADS_TOOL_FILE else (peft_file,):
        pipe = load_pipeline(model)
        pipe.load_lora_weights(str(path))
        for component in components:
            want, loaded = _deltas(final, component), lora_deltas(getattr(pipe, component))
            assert want and set(loaded) == set(want), f"{path.name} {component}: module sets differ"
            for module, delta in want.items():
                torch.testing.assert_close(loaded[module], delta, rtol=2e-2, atol=2e-4, msg=f"{path.name} {module}")
        assert abs(image(pipe) - before).max() > 0, f"loading {path.name} must change the image"

    # The tool file (ComfyUI, Forge, A1111) lands on the trained modules (``pipe`` holds the PEFT file's layers).
    RULES[family](pipe, lora, final)


@pytest.mark.parametrize("pair", [p for p in EVERY_TINY if p[1] != default_tiny_name(p[0])], ids=_id)
def test_every_other_variant_trains(tmp_path, tiny_models, dataset, pair):
    """The variants beside each family's default (FLUX.1-schnell, SD2 768-v ...): a short run, as detected."""
    family, name = pair
    model = tiny_models[name]
    res = run_cli("--config", str(_config(tmp_path, model, dataset, "run", family, max_train_steps=2)))
    assert res.returncode == 0, res.stderr[-3000:]
    _check_clips(family, res)
    started = res.last("run_started")
    assert (started["family"], started["variant"], started["prediction_type"]) == (family, *_expected(family, name, model))
    assert res.last("completed")["steps"] == 2
