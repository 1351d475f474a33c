"""End-to-end preflight on generated datasets and stand-in models (lora_trainer.preflight.run)."""
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from lora_trainer.preflight import run as pf
from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import EXIT_CONFIG, EXIT_DATASET, EXIT_IO, EXIT_MODEL_LOAD, EXIT_OK
from lora_trainer.preflight.run import run_preflight
from lora_trainer.testing.tiny import make_dataset

ROOT = Path(__file__).resolve().parent.parent


def empty_safetensors(path: Path) -> None:
    header = b'{"__metadata__":{"format":"pt"}}'
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def standin_model(root: Path, family: str = "sd15", prediction: str = "epsilon") -> Path:
    """A diffusers folder the probe accepts: configs plus weight files with valid (empty) headers."""
    sdxl = family == "sdxl"
    comps = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (["text_encoder_2", "tokenizer_2"] if sdxl else [])
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline", **{c: ["x", "Y"] for c in comps}}))
    for c in comps:
        (root / c).mkdir()
        if c.startswith("tokenizer"):
            (root / c / "tokenizer.json").write_text("{}")
        elif c == "scheduler":
            (root / c / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
        else:
            cad = {"sd15": 768, "sd2": 1024, "sdxl": 2048}[family]
            (root / c / "config.json").write_text(json.dumps({"cross_attention_dim": cad} if c == "unet" else {}))
            empty_safetensors(root / c / "model.safetensors")
    return root


@pytest.fixture()
def env(tmp_path):
    data = make_dataset(tmp_path / "data", n=8, sizes=[(96, 64), (64, 96)])
    model = standin_model(tmp_path / "model")
    return tmp_path, Path(data), model


def cfg_of(tmp_path, data, model, **kw):
    kw.setdefault("min_bucket_resolution", 64)  # lets the tests train at 64-96 px
    raw = {"dataset_path": str(data), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], **kw}
    return parse_config(raw, base_dir=tmp_path, config_path=tmp_path / "c.json")[0]


def codes(items):
    return [i["code"] for i in items]


def test_ok_end_to_end(env):
    tmp_path, data, model = env
    r = run_preflight(cfg_of(tmp_path, data, model, batch_size=3, num_epochs=4, resolution=64))
    assert r.ok and r.errors == [] and r.exit_code == EXIT_OK
    assert codes(r.warnings) == []
    s = r.summary
    d = s["dataset"]
    assert (d["images"], d["usable"], d["bad"], d["without_caption"], d["samples_per_epoch"]) == (8, 8, 0, 0, 8)
    assert (d["batches_per_epoch"], d["steps_per_epoch"], d["num_epochs"], d["total_steps"]) == (3, 3, 4, 12)
    assert d["bucketing"] is False and d["bucket_plan"] is None and d["resolution"] == 64
    assert s["model"]["kind"] == "diffusers_dir" and s["model"]["family"] == "sd15"
    assert s["output"]["writable"] and not s["output"]["exists"] and s["output"]["free_bytes"] > 0
    assert s["resume"] == {"mode": "off"}
    assert isinstance(s["duration_s"], float)
    json.dumps(r.to_dict())  # JSON-ready
    assert r.scan is not None and r.probe is not None


def test_steps_from_max_train_steps_and_accumulation(env):
    tmp_path, data, model = env
    d = run_preflight(cfg_of(tmp_path, data, model, batch_size=2, gradient_accumulation_steps=3,
                             max_train_steps=10, resolution=64)).summary["dataset"]
    # 8 samples / 2 = 4 batches; ceil(4 / 3) = 2 optimizer steps per epoch; 10 steps -> 5 epochs
    assert (d["batches_per_epoch"], d["steps_per_epoch"], d["total_steps"], d["num_epochs"]) == (4, 2, 10, 5)


def test_family_defaults_and_bucket_plan(tmp_path):
    data = make_dataset(tmp_path / "data", n=6, sizes=[(96, 64), (64, 96), (64, 64)])
    for family, pred, res, buckets in [("sd15", "epsilon", 512, False), ("sd2", "v_prediction", 768, False),
                                       ("sd2", "epsilon", 512, False), ("sdxl", "epsilon", 1024, True)]:
        model = standin_model(tmp_path / f"m_{family}_{pred}", family, pred)
        r = run_preflight(cfg_of(tmp_path, data, model, batch_size=2))
        d = r.summary["dataset"]
        assert (d["resolution"], d["bucketing"]) == (res, buckets), family
        assert d["resolution_source"] == f"{family} default"
        assert "image_too_small" in codes(r.warnings)  # 96 px images at 512+
    plan = d["bucket_plan"]
    assert plan["total_images"] == 6 and plan["used_buckets"] == 3
    assert [b["batches"] for b in plan["buckets"]] == [1, 1, 1] and d["batches_per_epoch"] == 3
    forced = run_preflight(cfg_of(tmp_path, data, model, enable_bucketing=False)).summary["dataset"]
    assert forced["bucketing"] is False and forced["bucket_plan"] is None


def test_dataset_errors(tmp_path):
    model = standin_model(tmp_path / "model")
    r = run_preflight(cfg_of(tmp_path, tmp_path / "missing", model))
    assert codes(r.errors) == ["dataset_missing"] and r.errors[0]["path"] == "dataset_path"
    assert r.exit_code == EXIT_DATASET
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    (empty / "sub" / "a.png").write_bytes(b"")
    r = run_preflight(cfg_of(tmp_path, empty, model, recursive=False))
    assert codes(r.errors) == ["dataset_empty"] and "recursive" in r.errors[0]["hint"]
    r = run_preflight(cfg_of(tmp_path, empty, model))  # recursive: one image, zero bytes
    assert codes(r.errors) == ["no_usable_images"] and codes(r.warnings) == ["image_unreadable"]
    assert r.warnings[0]["files"] == ["sub/a.png: file is empty (0 bytes)"]


def test_image_warnings_and_file_cap(env):
    tmp_path, data, model = env
    (data / "bad.png").write_text("not an image")
    for i in range(25):
        (data / f"nocap_{i:02d}.png").write_bytes((data / "img_0000.png").read_bytes())
    (data / "img_0002.txt").write_text("a caption without the trigger")
    cfg = cfg_of(tmp_path, data, model, resolution=64)
    r = run_preflight(cfg)
    assert r.ok and codes(r.warnings) == ["image_unreadable", "caption_missing"]  # trigger prepended: no warning
    unreadable, nocap = r.warnings
    assert unreadable["files"] == ["bad.png: not an image PIL can read, despite the extension"]
    assert nocap["count"] == 25 and len(nocap["files"]) == 20 and nocap["files"][0] == "nocap_00.png"
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64, prepend_trigger_words=False))
    trig = next(w for w in r.warnings if w["code"] == "trigger_missing")
    assert trig["files"] == ["img_0002.png: missing ohwx"] and trig["path"] == "prepend_trigger_words"
    assert r.summary["dataset"]["missing_trigger"] == 1 and r.summary["dataset"]["bad"] == 1


def test_too_small_warning(env):
    tmp_path, data, model = env
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=96))
    w = next(w for w in r.warnings if w["code"] == "image_too_small")
    assert w["count"] == 8 and w["files"][0].endswith(": 96x64") and w["path"] == "resolution"
    assert "image_too_small" not in codes(run_preflight(cfg_of(tmp_path, data, model, resolution=64)).warnings)


def test_model_errors_are_reported_with_their_config_key(env):
    tmp_path, data, model = env
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    r = run_preflight(cfg_of(tmp_path, data, ckpt, resolution=64))
    assert codes(r.errors) == ["model_pickle_refused"] and r.errors[0]["path"] == "base_model"
    assert r.exit_code == EXIT_MODEL_LOAD
    r = run_preflight(cfg_of(tmp_path, data, model, model_type="sdxl"))
    assert codes(r.errors) == ["model_type_mismatch"] and r.errors[0]["path"] == "model_type"
    assert r.exit_code == EXIT_CONFIG
    (model / "vae" / "model.safetensors").unlink()
    assert codes(run_preflight(cfg_of(tmp_path, data, model, resolution=64)).errors) == ["model_incomplete"]


def test_hub_id_not_cached(env, monkeypatch):
    tmp_path, data, _ = env
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = run_preflight(cfg_of(tmp_path, data, "org/some-model"))
    assert r.ok and codes(r.warnings) == ["image_too_small", "hub_not_cached"]  # 96 px at the assumed 512
    assert r.summary["model"]["in_cache"] is False
    assert r.summary["dataset"]["resolution_source"] == "assumed (model family unknown)"
    r = run_preflight(cfg_of(tmp_path, data, "org/some-model", model_type="sdxl"))
    assert r.summary["dataset"]["resolution"] == 1024 and r.summary["dataset"]["bucketing"] is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert codes(run_preflight(cfg_of(tmp_path, data, "org/some-model")).errors) == ["model_not_found"]


def test_sd2_single_file_prediction_type_and_config_source(env, tiny_models, monkeypatch):
    """An SD2 single file does not record its prediction type: a warning, silenced by an explicit prediction_type,
    which also sets the default resolution (epsilon = the 512 base). Its configs come from diffusers' default repo:
    offline and uncached that is an error naming base_model_config; online, a download warning."""
    from lora_trainer.testing.tiny import make_single_file_checkpoint

    tmp_path, data, _ = env
    ckpt = make_single_file_checkpoint(tiny_models["sd2-v"], tmp_path / "sd2.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_preflight(cfg_of(tmp_path, data, ckpt))
    assert r.summary["model"]["family"] == "sd2" and "prediction_type_unknown" in codes(r.warnings)
    assert codes(r.errors) == ["model_config_missing"] and r.exit_code == EXIT_MODEL_LOAD
    assert r.summary["dataset"]["resolution"] == 768
    monkeypatch.delenv("HF_HUB_OFFLINE")
    r = run_preflight(cfg_of(tmp_path, data, ckpt, prediction_type="epsilon"))
    assert r.ok and "prediction_type_unknown" not in codes(r.warnings)
    assert "single_file_config_download" in codes(r.warnings) and r.summary["dataset"]["resolution"] == 512
    r = run_preflight(cfg_of(tmp_path, data, ckpt, base_model_config=str(tmp_path / "data")))
    assert codes(r.errors) == ["model_config_missing"]  # a folder without model_index.json


def test_target_modules_checked_from_weight_headers(env, tiny_models):
    """A typo, a norm or an embedding in target_modules fails preflight (no model loaded), naming the key; the
    trainer's own check at load time refuses the same embedding, so nothing trains into an unexportable LoRA."""
    tmp_path, data, _ = env
    model = tiny_models["sd15"]
    assert run_preflight(cfg_of(tmp_path, data, model, train_text_encoder=True)).ok
    r = run_preflight(cfg_of(tmp_path, data, model, target_modules=["to_q", "to_qq", "norm1"]))
    assert [(e["code"], e["path"], e["value"]) for e in r.errors] == [
        ("target_modules_unknown", "target_modules", ["to_qq"]),
        ("target_modules_unsupported", "target_modules", ["norm1"])]
    r = run_preflight(cfg_of(tmp_path, data, model, train_text_encoder=True,
                             text_encoder_target_modules=["q_proj", "token_embedding"]))
    assert [(e["code"], e["path"], e["value"]) for e in r.errors] == [
        ("target_modules_unsupported", "text_encoder_target_modules", ["token_embedding"])]
    assert r.exit_code == EXIT_CONFIG

    from transformers import CLIPTextModel

    from lora_trainer.contract.errors import ConfigError
    from lora_trainer.adapters.lora import add_lora

    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    with pytest.raises(ConfigError, match="token_embedding .Embedding. are not Linear or Conv2d"):
        add_lora(te, rank=4, alpha=4, dropout=0.0, targets=("q_proj", "token_embedding"), use_dora=False,
                 path="text_encoder_target_modules")


def test_output_checks(env, monkeypatch):
    tmp_path, data, model = env
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"x")
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64))
    assert codes(r.errors) == ["output_exists"] and r.exit_code == EXIT_CONFIG
    assert run_preflight(cfg_of(tmp_path, data, model, resolution=64, overwrite_output=True)).ok
    assert run_preflight(cfg_of(tmp_path, data, model, resolution=64, output_name="other")).ok
    before = sorted(os.listdir(out))
    run_preflight(cfg_of(tmp_path, data, model, resolution=64, output_name="other"))
    assert sorted(os.listdir(out)) == before  # the write test leaves nothing behind
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    raw = {"dataset_path": str(data), "base_model": str(model), "output_path": str(blocker / "sub"),
           "trigger_words": ["ohwx"], "resolution": 64, "enable_bucketing": False}
    r = run_preflight(parse_config(raw, base_dir=tmp_path)[0])
    assert codes(r.errors) == ["output_not_writable"] and r.exit_code == EXIT_IO
    raw["output_path"] = str(blocker)
    assert codes(run_preflight(parse_config(raw, base_dir=tmp_path)[0]).errors) == ["output_not_writable"]


def test_output_write_failure_and_low_disk(env, monkeypatch):
    tmp_path, data, model = env

    def no_write(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pf.tempfile, "mkstemp", no_write)
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64))
    assert codes(r.errors) == ["output_not_writable"] and "Permission denied" in r.errors[0]["message"]
    monkeypatch.undo()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 9 * 2**30, 2**30))
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64))
    assert r.ok and codes(r.warnings) == ["low_disk_space"] and r.summary["output"]["free_gib"] == 1.0


def make_checkpoint(out: Path, step: int, complete: bool) -> Path:
    d = out / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    if complete:
        # What the trainer's manifest says (preflight and the trainer read it with one function).
        (d / "manifest.json").write_text(json.dumps({"format": "lora_trainer.training.checkpoint", "format_version": 1,
                                                     "creator": "train_lora", "step": step, "files": {}}))
    return d


def test_resume_checks(env):
    tmp_path, data, model = env
    out = tmp_path / "out"
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64, resume="auto"))
    assert r.ok and r.summary["resume"]["found"] is False and r.summary["resume"]["action"] == "fresh start"
    make_checkpoint(out, 100, True)
    make_checkpoint(out, 1000, True)
    make_checkpoint(out, 1200, False)  # interrupted while saving
    res = run_preflight(cfg_of(tmp_path, data, model, resolution=64, resume="auto")).summary["resume"]
    assert (res["found"], res["step"], res["incomplete"]) == (True, 1000, 1)
    assert res["checkpoint"].endswith("step-001000")
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64, resume="out/checkpoints/step-000100"))
    assert r.ok and r.summary["resume"]["step"] == 100  # relative to the config's folder
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64, resume=str(out / "checkpoints" / "step-000999")))
    assert codes(r.errors) == ["resume_not_found"] and r.errors[0]["path"] == "resume"
    r = run_preflight(cfg_of(tmp_path, data, model, resolution=64, resume=str(out / "checkpoints" / "step-001200")))
    assert codes(r.errors) == ["resume_not_found"] and "manifest" in r.errors[0]["message"]


def test_config_warnings_pass_through_and_errors_accumulate(env):
    tmp_path, data, model = env
    cw = [{"code": "unused_setting", "path": "text_encoder_lr", "message": "m"}]
    r = run_preflight(cfg_of(tmp_path, tmp_path / "nope", tmp_path / "nomodel.safetensors", resume="/no/such"), cw)
    assert codes(r.warnings)[0] == "unused_setting"
    assert codes(r.errors) == ["dataset_missing", "model_not_found", "resume_not_found"]


def test_no_heavy_imports(env):
    tmp_path, data, model = env
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    code = (
        "import json, sys\n"
        "from lora_trainer.config.config import load_config\n"
        "from lora_trainer.preflight.run import run_preflight\n"
        "cfg, w = load_config(sys.argv[1])\n"
        "r = run_preflight(cfg, w)\n"
        "heavy = ['torch', 'diffusers', 'transformers', 'safetensors', 'accelerate']\n"
        "print(json.dumps({'ok': r.ok, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"ok": True, "loaded": []}
