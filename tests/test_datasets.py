"""Several datasets and regularisation images (`datasets`): config errors per entry, the mixing rule, the
fingerprint, --validate-only per entry, and training runs (sd15 with SIGTERM + bitwise resume; a flow family)."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, parse_events, run_cli, write_config
from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import ConfigError
from lora_trainer.data.datasets import REG, TRAIN, PlanItem, epoch_counts, plan_epoch
from lora_trainer.testing.dataset import make_dataset

BASE = {"base_model": "org/model", "output_path": "out", "trigger_words": ["ohwx"]}
CLASS = "a photo of a shape"


def _problems(raw: dict, tmp_path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, base_dir=tmp_path)
    return {p["path"]: p["message"] for p in exc.value.problems}


@pytest.mark.parametrize("entries,extra,path,words", [
    ([{"path": "a"}, {"pathh": "b"}], {}, "datasets[1].pathh", "did you mean 'path'"),
    ([{"path": "a"}, {"repeats": 2}], {}, "datasets[1].path", "required"),
    ([{"path": "a"}, {"path": "b", "role": "prior"}], {}, "datasets[1].role", "not one of"),
    ([{"path": "a"}, {"path": "b", "repeats": 0}], {}, "datasets[1].repeats", "minimum"),
    ([{"path": "a"}, {"path": "b", "loss_weight": 0}], {}, "datasets[1].loss_weight", "minimum"),
    ([{"path": "a"}, {"path": "b", "resolution": 100}], {}, "datasets[1].resolution", "multiple of 8"),
    ([{"path": "a"}, {"path": "out/reg"}], {}, "datasets[1].path", "output_path"),
    ([{"path": "a"}, {"path": "a", "role": "regularization"}], {}, "datasets[1].path", "same folder"),
    ([{"path": "a", "role": "regularization"}], {}, "datasets", "no train entry"),
    ([{"path": "a"}], {"dataset_path": "a"}, "datasets", "not both"),
    ([], {}, "dataset_path", "required"),
])
def test_each_bad_entry_is_a_config_error_naming_it(tmp_path, entries, extra, path, words):
    raw = {**BASE, **extra, **({"datasets": entries} if entries else {})}
    problems = _problems(raw, tmp_path)
    assert path in problems and words in problems[path], problems


def test_entries_inherit_the_top_level_and_dataset_path_is_unchanged(tmp_path):
    cfg, warnings = parse_config({**BASE, "repeats": 3, "batch_size": 2, "datasets": [
        {"path": "a"}, {"path": "b", "role": "regularization", "repeats": 5, "class_prompt": " woman ",
                        "loss_weight": 0.5}]}, base_dir=tmp_path)
    a, b = cfg.datasets
    assert (a.path, a.setting(cfg, "repeats"), a.setting(cfg, "batch_size")) == (tmp_path / "a", 3, 2)
    assert (b.role, b.setting(cfg, "repeats"), b.class_prompt, b.loss_weight) == (REG, 5, "woman", 0.5)
    assert cfg.dataset_path is None and warnings == []
    assert json.loads(json.dumps(cfg.to_dict()))["datasets"][1]["repeats"] == 5
    plain, _ = parse_config({**BASE, "dataset_path": "d"}, base_dir=tmp_path)
    assert plain.dataset_path == tmp_path / "d" and plain.datasets == ()
    _, warnings = parse_config({**BASE, "datasets": [{"path": "a", "class_prompt": "x"}]}, base_dir=tmp_path)
    assert [w["path"] for w in warnings] == ["datasets[0].class_prompt"]


def _items(rng: random.Random, n: int, dataset: int = 0, role: str = TRAIN, start: int = 0) -> list[PlanItem]:
    buckets = [(64, 64), (64, 128), (128, 64)]
    return [PlanItem(start + i, rng.choice(buckets), rng.randint(1, 3), dataset, role) for i in range(n)]


def _old_plan(images, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch plan as data/images.py had it before `datasets` (one bucket per batch, buckets sorted, shuffled):
    the reference a dataset_path run's plan must keep matching."""
    rng = random.Random(f"plan:{seed}:{epoch}")
    by_bucket: dict = {}
    for img in images:
        by_bucket.setdefault(img.bucket, []).extend([img.index] * img.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    rng.shuffle(batches)
    return batches


def test_plan_of_one_dataset_is_the_old_plan_epoch():
    """A dataset_path run's epoch plan (and so its checkpoints' positions) must not change."""
    old_plan = _old_plan
    rng = random.Random(0)
    for trial in range(20):
        items = _items(rng, rng.randint(1, 30))
        for epoch in range(3):
            bs = rng.randint(1, 4)
            assert plan_epoch(items, bs, trial, epoch) == old_plan(items, bs, trial, epoch)
            assert epoch_counts(items, bs, epoch)[0] == len(old_plan(items, bs, trial, epoch))


def test_regularisation_is_balanced_to_the_train_samples_and_cycles():
    rng = random.Random(1)
    train = _items(rng, 5)
    reg = [PlanItem(5 + i, (64, 64), 1, 1, REG) for i in range(7)] + [PlanItem(12, (64, 128), 2, 2, REG)]
    wanted = sum(i.repeats for i in train)
    by_index = {i.index: i for i in train + reg}
    seen_reg: set[int] = set()
    for epoch in range(4):
        batches = plan_epoch(train + reg, {0: 3, 1: 2, 2: 1}, 7, epoch)
        assert batches == plan_epoch(train + reg, {0: 3, 1: 2, 2: 1}, 7, epoch)  # a pure function
        counted, samples = epoch_counts(train + reg, {0: 3, 1: 2, 2: 1}, epoch)  # --validate-only's counts
        assert counted == len(batches)
        assert samples == dict(Counter(by_index[i].dataset for b in batches for i in b))
        for b in batches:  # one bucket of one dataset, at most that dataset's batch size
            assert len({(by_index[i].dataset, by_index[i].bucket) for i in b}) == 1
            assert len(b) <= {0: 3, 1: 2, 2: 1}[by_index[b[0]].dataset]
        flat = [i for b in batches for i in b]
        assert sorted(i for i in flat if i < 5) == sorted(i.index for i in train for _ in range(i.repeats))
        regs = [i for i in flat if i >= 5]
        assert len(regs) == wanted
        seen_reg |= set(regs)
    assert seen_reg == {i.index for i in reg}  # a pool larger than one epoch's share is used in turn


def _run_until_step(config: Path, stop_after: int):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    lines, sent = [], False
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        if not sent and ev["type"] == "step" and ev["step"] >= stop_after:
            proc.send_signal(signal.SIGTERM)
            sent = True
    return proc.wait(timeout=300), parse_events("".join(lines)), proc.stderr.read()


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_sets")
    make_dataset(root / "train", n=4, trigger="ohwx")
    make_dataset(root / "reg", n=3, trigger=None, seed=5, with_captions=False)  # captions: the class prompt
    return root


def _config(root: Path, model: Path, out: str, **extra) -> Path:
    cfg = {"datasets": [{"path": str(root / "train"), "repeats": 2},
                        {"path": str(root / "reg"), "role": "regularization", "class_prompt": CLASS,
                         "loss_weight": 0.5, "batch_size": 1}],
           "base_model": str(model), "output_path": str(root / out), "trigger_words": ["ohwx"], "resolution": 64,
           "max_train_steps": 6, "log_every_n_steps": 1, "checkpointing_steps": 3, "lora_rank": 4,
           "learning_rate": 1e-3, "batch_size": 2, "cache_text_embeddings_to_disk": True, **extra}
    return write_config(root / f"{out}.json", **cfg)


def test_validate_only_names_each_bad_entry(tmp_path, tiny_models):
    make_dataset(tmp_path / "train", n=2, trigger="ohwx")
    make_dataset(tmp_path / "nocap", n=2, trigger=None, with_captions=False)
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path / "c.json", base_model=str(tiny_models["sd15"]), output_path=str(tmp_path / "out"),
                       trigger_words=["ohwx"], resolution=64, datasets=[
                           {"path": "train"}, {"path": "missing", "role": "regularization", "class_prompt": "x"},
                           {"path": "nocap", "role": "regularization"}, {"path": "empty"}])
    res = run_cli("--config", str(cfg), "--validate-only")
    assert res.returncode == 2  # --validate-only with errors
    errors = {e["path"]: e for e in res.last("validation")["errors"]}
    assert set(errors) == {"datasets[1].path", "datasets[2].class_prompt", "datasets[3].path"}, errors
    assert errors["datasets[1].path"]["code"] == "dataset_missing"
    assert errors["datasets[2].class_prompt"]["code"] == "class_prompt_missing"
    assert errors["datasets[3].path"]["code"] == "dataset_empty"
    info = res.last("validation")["summary"]["dataset"]["datasets"]
    assert [(d["role"], d["path"]) for d in info] == [
        (TRAIN, str(tmp_path / n)) for n in ["train"]] + [(REG, str(tmp_path / "missing")),
                                                         (REG, str(tmp_path / "nocap")), (TRAIN, str(tmp_path / "empty"))]


def test_fingerprint_covers_every_dataset_and_dataset_path_keeps_its_own(tmp_path, two_sets, tiny_models):
    from lora_trainer.preflight.dataset_scan import scan_dataset
    from lora_trainer.preflight.run import run_preflight

    model = tiny_models["sd15"]

    def fp(**extra):
        cfg, _ = parse_config(json.loads(_config(two_sets, model, "fp", **extra).read_text()))
        return run_preflight(cfg).summary["dataset"]["fingerprint"]

    first = fp()
    assert fp() == first
    reg = json.loads(_config(two_sets, model, "fp").read_text())["datasets"]
    reg[1]["loss_weight"] = 1.0
    assert fp(datasets=reg) != first  # an entry's loss weight changes the steps a resume would take
    (two_sets / "reg" / "img_0001.txt").write_text("a caption now")
    try:
        assert fp() != first  # a file of the regularisation set
    finally:
        (two_sets / "reg" / "img_0001.txt").unlink()
    plain, _ = parse_config({**BASE, "dataset_path": str(two_sets / "train"), "base_model": str(model),
                             "output_path": str(tmp_path / "o"), "resolution": 64})
    assert run_preflight(plain).summary["dataset"]["fingerprint"] == scan_dataset(plain).fingerprint


def _captions_cached(out: Path) -> set[str]:
    found = set()
    for f in (out / "cache" / "text_embeddings").rglob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            found.add(h.metadata()["caption"])
    return found


def test_train_and_regularisation_run_lists_both_and_resumes_bitwise(two_sets, tiny_models):
    model = tiny_models["sd15"]
    ref = run_cli("--config", str(_config(two_sets, model, "ref")))
    assert ref.returncode == 0, ref.stderr[-3000:]
    started = ref.last("run_started")
    listed = [(d["role"], d["images"], d["samples_per_epoch"], d["loss_weight"]) for d in started["datasets"]]
    assert listed == [(TRAIN, 4, 8, 1.0), (REG, 3, 8, 0.5)]  # 4 images x 2 repeats; reg balanced to 8
    assert started["num_images"] == 7 and started["samples_per_epoch"] == 16
    manifest = json.loads((two_sets / "ref" / "training_manifest.json").read_text())
    assert [(d["path"], d["role"], d["images"]) for d in manifest["datasets"]] == [
        (str(two_sets / "train"), TRAIN, 4), (str(two_sets / "reg"), REG, 3)]
    card = (two_sets / "ref" / "README.md").read_text()
    assert "## Datasets" in card and f"| `reg` | regularization | 3 | 8 | 0.5 | {CLASS} |" in card
    captions = _captions_cached(two_sets / "ref")
    assert CLASS in captions  # reg images without a caption file train on the class prompt, no trigger word
    assert all(c.startswith("ohwx") for c in captions - {CLASS}) and len(captions) == 5

    cfg = _config(two_sets, model, "run", resume="auto")
    rc, events, stderr = _run_until_step(cfg, 2)
    assert rc == 128 + signal.SIGTERM, stderr[-3000:]
    assert [e for e in events if e["type"] == "interrupted"]
    final = run_cli("--config", str(cfg))
    assert final.returncode == 0, final.stderr[-3000:]
    start = final.last("resumed")["step"]
    ref_steps = {e["step"]: e["loss"] for e in ref.of_type("step")}
    assert [(e["step"], e["loss"]) for e in final.of_type("step")] == [(s, ref_steps[s]) for s in range(start + 1, 7)]
    a, b = load_file(two_sets / "ref" / "lora.safetensors"), load_file(two_sets / "run" / "lora.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)



def test_flow_family_trains_with_a_weighted_regularisation_set(two_sets, tiny_models):
    model = tiny_models["flux1-dev"]
    runs = {}
    for weight in (0.5, 1.0):
        entries = json.loads(_config(two_sets, model, "x").read_text())["datasets"]
        entries[1]["loss_weight"] = weight
        res = run_cli("--config", str(_config(two_sets, model, f"flux{weight}", max_train_steps=3,
                                              checkpointing_steps=None, datasets=entries)))
        assert res.returncode == 0, res.stderr[-3000:]
        assert [d["role"] for d in res.last("run_started")["datasets"]] == [TRAIN, REG]
        assert CLASS in _captions_cached(two_sets / f"flux{weight}")
        runs[weight] = [e["loss"] for e in res.of_type("step")]
    # Same plan, noise and timesteps: train batches agree until the first regularisation batch, whose loss the
    # entry's loss_weight scales (exactly: 0.5 is a power of two).
    first = next(i for i, (a, b) in enumerate(zip(runs[0.5], runs[1.0])) if a != b)
    assert runs[0.5][first] == 0.5 * runs[1.0][first]


def test_memory_plan_hints_reparse_a_datasets_config(tmp_path):
    """The memory plan offers a setting change only where the config, rewritten with it, still parses."""
    from lora_trainer.preflight.model_checks import settings_problems

    cfg, _ = parse_config({**BASE, "datasets": [{"path": "a"}, {"path": "b", "role": "regularization",
                                                                "class_prompt": "woman", "batch_size": 1}]},
                          base_dir=tmp_path)
    assert settings_problems(cfg, {"gradient_checkpointing": True}, "sd15", None) == []
    assert [p["path"] for p in settings_problems(cfg, {"resolution": 100}, "sd15", None)] == ["resolution"]
