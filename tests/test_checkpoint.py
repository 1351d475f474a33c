"""Tests for lora_trainer.training.checkpoint: pickle-free state round trips, atomic saves under SIGKILL,
write-error handling, pruning safety and corruption detection, all against real files."""

import errno
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_trainer.training import checkpoint as ckpt
from lora_trainer.training.checkpoint import (
    TrainingProgress, find_latest_checkpoint, flatten_state, load_checkpoint, save_checkpoint,
    unflatten_state, verify_checkpoint,
)
from lora_trainer.contract.errors import EXIT_IO, OutputError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def assert_same(a, b, path="root"):
    """Exact equality: same types (tuple is not list, bool is not int), float bits, tensor dtype/shape/bits, key order."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert b.is_contiguous(), path
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), path
    elif isinstance(a, dict):
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb, f"{path}.key")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def roundtrip_memory(obj, prefix="p/"):
    """Through JSON text (strict, no NaN) and safetensors bytes, exactly as a checkpoint stores them."""
    tensors, skeleton = flatten_state(obj, prefix)
    text = json.dumps(skeleton, allow_nan=False)
    loaded = safetensors.torch.load(safetensors.torch.save(tensors))
    return unflatten_state(json.loads(text), loaded)


def roundtrip_disk(root, obj, step=1):
    tensors, skeleton = flatten_state(obj, "s/")
    path = save_checkpoint(root, step, {"state": tensors}, {"state": skeleton}, keep_last=None)
    t, j = load_checkpoint(path)
    return unflatten_state(j["state"], t["state"])


def scratch_dirs(root):
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith((".tmp-", ".trash-")))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def payload(step):
    return ({"model": {"w": torch.full((64, 64), float(step)), "i": torch.arange(10) + step}},
            {"progress": TrainingProgress(global_step=step, elapsed_s=step / 10).to_json()})


def check_payload(path, step):
    tensors, js = load_checkpoint(path)
    assert TrainingProgress.from_json(js["progress"]).global_step == step
    assert torch.equal(tensors["model"]["w"], torch.full((64, 64), float(step)))
    assert torch.equal(tensors["model"]["i"], torch.arange(10) + step)


def save(root, step, keep_last=None, **kw):
    return save_checkpoint(root, step, *payload(step), keep_last=keep_last, **kw)


# ------------------------------------------------------------------------------------ optimizer/scheduler
def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def make_optimizer(model, lr_scale=1.0):
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return torch.optim.AdamW([
        {"params": first, "lr": 1e-2 * lr_scale, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {"params": second, "lr": 3e-3 * lr_scale, "amsgrad": True, "weight_decay": 0.0},
    ], eps=1e-7)


def train_step(model, opt, sched, gen):
    x = torch.randn(5, 6, generator=gen)
    loss = (model(x) - 0.5).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_adamw_and_cosine_scheduler_resume_bitwise(tmp_path):
    model, gen = make_model(0), torch.Generator().manual_seed(1)
    opt = make_optimizer(model)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=20)
    for _ in range(5):
        train_step(model, opt, sched, gen)

    opt_t, opt_s = flatten_state(opt.state_dict(), "optimizer/")
    sch_t, sch_s = flatten_state(sched.state_dict(), "scheduler/")
    gen_t, gen_s = flatten_state(gen.get_state(), "generator")
    path = save_checkpoint(tmp_path, 5, {"model": model.state_dict(), "training": {**opt_t, **sch_t, **gen_t}},
                           {"optimizer": opt_s, "scheduler": sch_s, "generator": gen_s}, keep_last=2)

    tensors, js = load_checkpoint(path)
    model2 = make_model(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(tensors["model"])
    opt2 = make_optimizer(model2, lr_scale=7.0)
    sched2 = get_cosine_schedule_with_warmup(opt2, num_warmup_steps=3, num_training_steps=20)
    opt2.load_state_dict(unflatten_state(js["optimizer"], tensors["training"]))
    sched2.load_state_dict(unflatten_state(js["scheduler"], tensors["training"]))
    gen2 = torch.Generator()
    gen2.set_state(unflatten_state(js["generator"], tensors["training"]))
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(sched.state_dict(), sched2.state_dict())

    # Sensitivity: a resume that lost the optimizer state would diverge on the very next step.
    model3 = make_model(99)
    model3.load_state_dict(tensors["model"])
    opt3 = make_optimizer(model3)
    sched3 = get_cosine_schedule_with_warmup(opt3, num_warmup_steps=3, num_training_steps=20)
    train_step(model3, opt3, sched3, torch.Generator().manual_seed(1))

    for _ in range(3):
        train_step(model, opt, sched, gen)
        train_step(model2, opt2, sched2, gen2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert any(not torch.equal(p, p3) for p, p3 in zip(model.parameters(), model3.parameters()))


def test_adamw_state_keeps_int_keys_tuples_and_tensor_steps():
    model = make_model(0)
    opt = make_optimizer(model)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    train_step(model, opt, sched, torch.Generator().manual_seed(0))
    sd = opt.state_dict()
    back = roundtrip_memory(sd)
    assert_same(sd, back)
    assert all(type(k) is int for k in back["state"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and isinstance(back["param_groups"][0]["betas"], tuple)


def test_lambda_and_torch_schedulers_round_trip():
    for make in (lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 0.9 ** s]),
                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=1e-5)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
        sched = make(opt)
        for _ in range(4):
            opt.step()
            sched.step()
        back = roundtrip_memory(sched.state_dict())
        assert_same(sched.state_dict(), back)
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
        sched2 = make(opt2)
        opt2.load_state_dict(roundtrip_memory(opt.state_dict()))
        sched2.load_state_dict(back)
        for _ in range(5):
            opt.step(), sched.step(), opt2.step(), sched2.step()
            assert sched.get_last_lr() == sched2.get_last_lr()


def test_grad_scaler_round_trip():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    sd = scaler.state_dict()
    assert sd["_growth_tracker"] == 3
    back = roundtrip_memory(sd)
    assert_same(sd, back)
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(back)
    assert_same(scaler2.state_dict(), sd)


def test_rng_states_restore_the_same_draws(tmp_path):
    gen = torch.Generator().manual_seed(123)
    np_gen = np.random.default_rng(5)
    random.seed(7), np.random.seed(8), torch.manual_seed(9)
    for _ in range(3):  # move away from the seeded states, and leave a cached gaussian in numpy's legacy state
        random.random(), np.random.standard_normal(), torch.rand(1), torch.rand(1, generator=gen), np_gen.random()
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "numpy_gen": np_gen.bit_generator.state,
              "torch": torch.get_rng_state(), "generator": gen.get_state()}
    draws = lambda: (random.random(), random.getrandbits(64), np.random.standard_normal(3).tolist(),  # noqa: E731
                     np.random.randint(0, 2**31, 3).tolist(), torch.rand(3).tolist(), torch.rand(3, generator=gen).tolist(),
                     np_gen.random(3).tolist())
    expected = draws()
    back = roundtrip_disk(tmp_path, states)
    assert isinstance(back["python"], tuple) and isinstance(back["python"][1], tuple)
    assert back["numpy"][1].dtype == np.uint32
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    np_gen.bit_generator.state = back["numpy_gen"]
    torch.set_rng_state(back["torch"])
    gen.set_state(back["generator"])
    assert draws() == expected


# ---------------------------------------------------------------------------------------- property tests
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape)
    if dtype is torch.bool:
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    elif n == 0:
        t = torch.empty(shape, dtype=dtype)
    else:  # arbitrary bit patterns: NaN payloads, subnormals, -0.0 in every float format
        size = n * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
        t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()
    layout = draw(st.sampled_from(["plain", "transposed", "shared"]))
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1)
    if layout == "shared" and n:
        return [t, t.reshape(-1)[: max(1, n // 2)], t]  # three tensors on one storage
    return t


leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=10), tensors())
keys = st.one_of(st.integers(), st.text(max_size=6), st.sampled_from(["$tuple", "$dict", "$float", "$tensor", "0"]),
                 st.none(), st.floats(allow_nan=False), st.tuples(st.integers(), st.text(max_size=3)))
structures = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(structures)
def test_property_nested_structures_round_trip_exactly(obj):
    assert_same(obj, roundtrip_memory(obj))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures)
def test_property_round_trip_through_checkpoint_files(obj):
    with tempfile.TemporaryDirectory() as tmp:
        assert_same(obj, roundtrip_disk(Path(tmp), obj))


def test_special_floats_and_unsupported_types():
    values = [float("inf"), float("-inf"), float("nan"), -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2,
              struct.unpack("<d", bytes.fromhex("0100000000f8ffff"))[0]]  # a negative NaN with a payload
    assert_same(values, roundtrip_memory(values))
    _, skeleton = flatten_state({"x": float("nan")})
    json.dumps(skeleton, allow_nan=False)  # must not need JSON's non-standard NaN
    with pytest.raises(TypeError, match="set"):
        flatten_state({"a": [{1, 2}]})
    with pytest.raises(ValueError):
        unflatten_state({"$tensor": "missing"}, {})


def test_tensor_names_are_namespaced_by_prefix():
    state = {"state": {0: {"exp_avg": torch.zeros(2)}}, "t": torch.ones(1)}
    assert sorted(flatten_state(state, "optimizer")[0]) == ["optimizer/state/0/exp_avg", "optimizer/t"]
    assert sorted(flatten_state(state, "optimizer/")[0]) == ["optimizer/state/0/exp_avg", "optimizer/t"]
    tensors, skeleton = flatten_state({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}, "")
    assert len(tensors) == 2  # two paths spelling the same name must not overwrite each other
    assert_same(unflatten_state(skeleton, tensors), {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}})


def test_storage_sharing_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"base": base, "t": base.t(), "row": base[1], "every_other": base[:, ::2], "again": base}
    back = roundtrip_disk(tmp_path, obj)
    assert_same(obj, back)
    assert len({t.untyped_storage().data_ptr() for t in back.values()}) == 5


# ---------------------------------------------------------------------------------------------- progress
def test_training_progress_round_trip_and_validation():
    p = TrainingProgress(global_step=40, epoch=2, batch_in_epoch=3, samples_seen=321, micro_step=1,
                         loss_ema=float("nan"), elapsed_s=0.1 + 0.2)
    data = json.loads(json.dumps(p.to_json(), allow_nan=False))
    back = TrainingProgress.from_json(data)
    assert math.isnan(back.loss_ema) and back.elapsed_s == 0.1 + 0.2 and back.global_step == 40
    assert TrainingProgress.from_json(TrainingProgress(loss_ema=0.25).to_json()) == TrainingProgress(loss_ema=0.25)
    for bad in ({**data, "schema": 2}, {**data, "global_step": True}, {**data, "epoch": -1},
                {k: v for k, v in data.items() if k != "samples_seen"}, {**data, "extra": 1}, [data]):
        with pytest.raises(ValueError):
            TrainingProgress.from_json(bad)


# -------------------------------------------------------------------------------------------- atomicity
CHILD = r"""
import sys, torch
from pathlib import Path
from lora_trainer.training.checkpoint import save_checkpoint, find_latest_checkpoint, load_checkpoint, TrainingProgress
root = Path(sys.argv[1])
def payload(step):
    return ({"model": {"w": torch.full((256, 1024), float(step)), "i": torch.arange(1000) + step}},
            {"progress": TrainingProgress(global_step=step).to_json()})
latest = find_latest_checkpoint(root)
step = 0 if latest is None else TrainingProgress.from_json(load_checkpoint(latest)[1]["progress"]).global_step
print("ready", flush=True)
if step:
    save_checkpoint(root, step, *payload(step), keep_last=3)  # re-save the resumed step: replace in place
while True:
    step += 1
    save_checkpoint(root, step, *payload(step), keep_last=3)
"""


def test_sigkill_at_random_moments_never_leaves_an_invalid_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    rng = random.Random(20240611)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prev_step, kills_mid_save = 0, 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.communicate()[1].decode()
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()  # it was still saving, not crashed
        kills_mid_save += bool(scratch_dirs(root))

        step_dirs = [p for p in root.iterdir() if p.name.startswith("step-")]
        for p in step_dirs:
            assert verify_checkpoint(p) == (True, "ok"), p
        latest = find_latest_checkpoint(root)
        assert (latest is None) == (not step_dirs)
        if latest is not None:
            step = json.loads((latest / "manifest.json").read_text())["step"]
            tensors, js = load_checkpoint(latest)
            assert TrainingProgress.from_json(js["progress"]).global_step == step
            assert torch.equal(tensors["model"]["w"], torch.full((256, 1024), float(step)))
            # Only the instant between moving an old step-N aside and publishing its re-save may show N-1.
            assert step >= prev_step - 1
            prev_step = step
    assert prev_step >= 6, "the children barely saved anything: the kills did not exercise saving"
    assert kills_mid_save >= 1, "no kill landed inside a save: the test did not exercise the crash window"
    # Leftovers of the killed saves belong to dead pids and go with the next save.
    save_checkpoint(root, prev_step + 1, *payload(prev_step + 1), keep_last=3)
    assert scratch_dirs(root) == []
    assert len([p for p in root.iterdir() if p.name.startswith("step-")]) == 3


# ------------------------------------------------------------------------------------------ write errors
def _failing(real, errnum, when):
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if when(calls["n"], args):
            raise OSError(errnum, os.strerror(errnum))
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("target,errnum,when,message", [
    ("write", errno.ENOSPC, lambda n, a: n == 1, "disk full"),
    ("write", errno.ENOSPC, lambda n, a: n == 3, "disk full"),  # third file: progress.json
    ("write", errno.ENOSPC, lambda n, a: n == 4, "disk full"),  # the manifest itself
    ("fsync", errno.EIO, lambda n, a: n == 2, "error (Input/output error) while saving"),
    ("mkdir", errno.EACCES, lambda n, a: True, "permission denied"),
    ("rename", errno.ENOSPC, lambda n, a: Path(a[0]).name.startswith(".tmp-"), "disk full"),
])
def test_write_error_raises_output_error_and_keeps_previous(tmp_path, monkeypatch, target, errnum, when, message):
    save(tmp_path, 10, keep_last=1)
    files = {"model": payload(20)[0]["model"], "optimizer": {"x": torch.ones(3)}}
    with monkeypatch.context() as m:
        m.setattr(os, target, _failing(getattr(os, target), errnum, when))
        with pytest.raises(OutputError) as info:
            save_checkpoint(tmp_path, 20, files, payload(20)[1], keep_last=1)
    assert message in info.value.message and "previous checkpoint is intact" in info.value.message
    assert info.value.exit_code == EXIT_IO and info.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]  # no temp dir, no step-000020
    assert verify_checkpoint(tmp_path / "step-000010") == (True, "ok")
    check_payload(tmp_path / "step-000010", 10)


def test_resave_same_step_replaces_it_and_a_failed_resave_keeps_the_old(tmp_path, monkeypatch):
    save(tmp_path, 10)
    files, js = payload(10)
    files["model"]["w"] = files["model"]["w"] + 1
    with monkeypatch.context() as m:
        m.setattr(os, "rename", _failing(os.rename, errno.ENOSPC, lambda n, a: Path(a[0]).name.startswith(".tmp-")))
        with pytest.raises(OutputError):
            save_checkpoint(tmp_path, 10, files, js, keep_last=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]
    check_payload(tmp_path / "step-000010", 10)  # the old content, moved aside and back

    save_checkpoint(tmp_path, 10, files, js, keep_last=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]
    assert torch.equal(load_checkpoint(tmp_path / "step-000010")[0]["model"]["w"], files["model"]["w"])


def test_save_refuses_to_replace_a_foreign_step_directory(tmp_path):
    user = tmp_path / "step-000005"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "step-000006").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for step in (5, 6):
        with pytest.raises(OutputError, match="not a checkpoint"):
            save(tmp_path, step)
    assert (user / "notes.txt").read_text() == "mine" and (tmp_path / "step-000006").is_symlink()
    assert names(tmp_path) == ["elsewhere", "step-000005", "step-000006"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    save(tmp_path, 1)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            save(tmp_path, 2)
    finally:
        tmp_path.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]


def test_unserialisable_state_touches_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "out", 1, {}, {"x": {1, 2}}, keep_last=None)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "out", 1, {}, {"manifest": {}}, keep_last=None)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "out", 1, {"../evil": {}}, {}, keep_last=None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ pruning
def names(root):
    return sorted(p.name for p in Path(root).iterdir())


def test_prune_keeps_newest_by_manifest_step(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert names(tmp_path) == ["step-000004", "step-000005"]

    other = tmp_path / "big"
    save(other, 999_999, keep_last=1)
    save(other, 1_000_000, keep_last=1)  # "step-1000000" < "step-999999" as text
    assert names(other) == ["step-1000000"]
    assert find_latest_checkpoint(other) == other / "step-1000000"

    third = tmp_path / "renamed"
    save(third, 10)
    save(third, 20)
    (third / "step-000020").rename(third / "step-000005")  # the name is for humans only
    assert find_latest_checkpoint(third) == third / "step-000005"
    save(third, 15, keep_last=2)
    assert names(third) == ["step-000005", "step-000015"]
    check_payload(third / "step-000005", 20)

    # Resumed from an older checkpoint while newer ones exist: the checkpoint just saved is never pruned.
    fourth = tmp_path / "rewound"
    for step in (10, 20, 30):
        save(fourth, step)
    save(fourth, 15, keep_last=2)
    assert names(fourth) == ["step-000015", "step-000030"]
    save(fourth, 16, keep_last=1)
    assert names(fourth) == ["step-000016"]


def test_prune_never_touches_symlinks_or_foreign_directories(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    target = save(outside, 999)
    root.mkdir()
    (root / "step-000001").symlink_to(target, target_is_directory=True)
    tmp_link = root / f".tmp-step-000002-{dead_pid()}-abcd"
    tmp_link.symlink_to(outside, target_is_directory=True)
    user = root / "step-000003"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    foreign = root / "step-000004"
    shutil.copytree(save(tmp_path / "x", 4), foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "creator": "someone_else"}))

    assert find_latest_checkpoint(root) is None  # the symlinked step 999 is not ours to resume from
    for step in range(5, 9):
        save(root, step, keep_last=1)
    assert (root / "step-000001").is_symlink() and verify_checkpoint(target) == (True, "ok")
    assert tmp_link.is_symlink()
    assert names(outside) == ["step-000999"]
    assert (user / "notes.txt").read_text() == "mine"
    assert verify_checkpoint(foreign, creator="someone_else") == (True, "ok")
    assert [n for n in names(root) if n.startswith("step-")] == [
        "step-000001", "step-000003", "step-000004", "step-000008"]


class Crash(BaseException):
    """Stands in for the process dying: nothing after it runs, no except-OSError cleanup catches it."""


def test_a_crash_while_pruning_never_exposes_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)

    def dying_rmtree(path, *args, **kwargs):
        sorted(Path(path).iterdir())[0].unlink()  # deleted one file, then died
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", dying_rmtree)
        with pytest.raises(Crash):
            save(tmp_path, 3, keep_last=1)
    for p in tmp_path.glob("step-*"):
        assert verify_checkpoint(p) == (True, "ok"), p
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    save(tmp_path, 4, keep_last=1)
    assert names(tmp_path) == ["step-000004"]  # the half-deleted leftover went with the next save


def test_corrupt_checkpoints_are_skipped_and_do_not_count_for_keep_last(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    with open(tmp_path / "step-000003" / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    save(tmp_path, 4, keep_last=2)
    assert names(tmp_path) == ["step-000002", "step-000004"]


def test_stale_scratch_dirs_are_removed_only_when_ours_and_orphaned(tmp_path):
    save(tmp_path, 1)
    dead = dead_pid()
    partial = tmp_path / f".tmp-step-000007-{dead}-ab12"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    half_manifest = tmp_path / f".tmp-step-000008-{dead}-ab13"
    half_manifest.mkdir()
    (half_manifest / "manifest.json").write_text('{"format": "lora_trainer.check')
    complete = tmp_path / f".tmp-step-000009-{dead}-ab14"
    shutil.copytree(save(tmp_path / "x", 9), complete)  # killed just before its rename
    foreign = tmp_path / f".tmp-step-000010-{dead}-ab15"
    shutil.copytree(complete, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "creator": "other"}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".tmp-step-000011-{sleeper.pid}-ab16"
        live.mkdir()
        (tmp_path / ".tmp-unrelated").mkdir()
        orphan = tmp_path / f".trash-step-000005-{dead}-ab17"  # killed between move-aside and publish
        shutil.copytree(save(tmp_path / "y", 5), orphan)

        assert find_latest_checkpoint(tmp_path) == tmp_path / "step-000001"  # temp dirs are never candidates
        save(tmp_path, 2)
        assert names(tmp_path) == sorted([foreign.name, live.name, ".tmp-unrelated", "step-000001", "step-000002",
                                          "step-000005", "x", "y"])
        check_payload(tmp_path / "step-000005", 5)
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------------------- verification
def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda p: _flip(p / "model.safetensors", 20),
    lambda p: _flip(p / "model.safetensors", -1),
    lambda p: _flip(p / "progress.json", 5),
    lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-10]),
    lambda p: (p / "progress.json").write_bytes(b""),
    lambda p: (p / "model.safetensors").unlink(),
    lambda p: (p / "manifest.json").unlink(),
    lambda p: (p / "manifest.json").write_bytes((p / "manifest.json").read_bytes()[:-3]),
    lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text().replace("train_lora", "other")),
    lambda p: ((p / "model.safetensors").rename(p / "real"), (p / "model.safetensors").symlink_to(p / "real")),
])
def test_verify_detects_damage(tmp_path, damage):
    path = save(tmp_path, 3)
    assert verify_checkpoint(path) == (True, "ok")
    damage(path)
    ok, reason = verify_checkpoint(path)
    assert not ok and reason
    with pytest.raises(OutputError, match="unusable"):
        load_checkpoint(path)
    assert find_latest_checkpoint(tmp_path) is None


def test_layout_on_disk(tmp_path):
    path = save(tmp_path, 42)
    assert path == tmp_path / "step-000042"
    assert names(path) == ["manifest.json", "model.safetensors", "progress.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["creator"] == "train_lora" and manifest["step"] == 42
    assert manifest["format"] == ckpt.FORMAT and manifest["format_version"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "progress.json"}
    assert manifest["files"]["progress.json"]["size"] == (path / "progress.json").stat().st_size
    check_payload(path, 42)
