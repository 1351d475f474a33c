"""The text-embedding cache: placement by budget, disk entries keyed by caption + encoder identity and reused
without the encoders, damaged entries recomputed, atomic writes, and batches that are bitwise what the encoder
produced, in caption order, on the training device, in the encoder's dtype."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.data import text_cache as tc
from lora_trainer.data.text_cache import (
    TextCache,
    TextCacheError,
    choose_placement,
    encoder_identity,
    estimate_bytes_per_entry,
    weight_files_identity,
)

SEQ, DIM, POOLED = 12, 16, 8  # FLUX-shaped, small: prompt_embeds [B, SEQ, DIM], pooled [B, POOLED]
CAPTIONS = ["a photo of ohwx", "ohwx, red hat", "", "ohwx on a beach", "ohwx, red hat", "a photo of ohwx"]


class FakeFlux:
    """encode_text like FLUX.1's: deterministic per caption, counts calls, remembers what it produced."""

    name = "flux1"

    def __init__(self, dtype: torch.dtype = torch.float32, salt: int = 0):
        self.dtype, self.salt = dtype, salt
        self.calls: list[list[str]] = []
        self.produced: dict[str, dict[str, torch.Tensor]] = {}

    def encode_text(self, comps, captions, device):
        self.calls.append(list(captions))
        rows = []
        for c in captions:
            seed = int(hashlib.sha256(c.encode()).hexdigest()[:12], 16) + self.salt
            rows.append(torch.randn(SEQ, DIM, generator=torch.Generator().manual_seed(seed)))
        embeds = torch.stack(rows)
        embeds[:, -1, 0] = -0.0  # bit patterns a value comparison would not see
        out = {"prompt_embeds": embeds.to(device, self.dtype), "pooled": embeds[:, 0, :POOLED].to(device, self.dtype)}
        for j, c in enumerate(captions):
            self.produced[c] = {k: v[j].clone() for k, v in out.items()}
        return out

    @property
    def encoded(self) -> list[str]:
        return [c for call in self.calls for c in call]


ENTRY_BYTES = (SEQ * DIM + POOLED) * 4  # fp32


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_exact(cache: TextCache, fam: FakeFlux, captions: list[str], dtype=torch.float32) -> None:
    out = cache.batch(captions)
    assert set(out) == {"prompt_embeds", "pooled"}
    for name, t in out.items():
        assert t.dtype == dtype and t.device.type == "cpu"
        assert t.shape[0] == len(captions)
        for j, c in enumerate(captions):
            assert bits(t[j]) == bits(fam.produced[c][name]), (name, j, c)


def entry_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (p.name.startswith(".") or "tmp" in p.name)]


def build(cache: TextCache, fam: FakeFlux, captions=CAPTIONS, batch_size: int = 2, progress=None):
    return cache.build(fam, None, captions, device=torch.device("cpu"), batch_size=batch_size, progress=progress)


# ------------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("total,device_budget,host_budget,to_disk,expected", [
    (100, 1000, 10, False, "device"),     # fits the device budget: device, whatever the host budget
    (1000, 1000, 10, False, "device"),    # the bound is inclusive
    (1001, 1000, 5000, False, "host"),
    (100, None, 1000, False, "host"),     # no CUDA device: never "device"
    (5001, 1000, 5000, False, "disk"),
    (100, 1000, 1000, True, "disk"),      # on request
    (0, None, 0, False, "host"),
])
def test_choose_placement(total, device_budget, host_budget, to_disk, expected):
    placement, why = choose_placement(total, device_budget_bytes=device_budget, host_budget_bytes=host_budget,
                                      to_disk=to_disk)
    assert placement == expected and why


def test_device_budget_is_a_fraction_of_free_cuda_memory_only():
    cache = TextCache("k", free_device_bytes=10_000, device_fraction=0.1)
    cache.device = torch.device("cuda", 0)
    assert cache._device_budget() == 1000
    cache.device = torch.device("cpu")
    assert cache._device_budget() is None


@pytest.mark.parametrize("host_budget,to_disk,expected", [
    (10 * ENTRY_BYTES, False, "host"),
    (4 * ENTRY_BYTES, False, "host"),  # 4 distinct captions, "" included
    (4 * ENTRY_BYTES - 1, False, "disk"),
    (10 * ENTRY_BYTES, True, "disk"),
])
def test_build_places_by_budget(tmp_path, host_budget, to_disk, expected):
    fam = FakeFlux()
    # free_device_bytes is ignored on the CPU: the CPU is the host.
    cache = TextCache("k", disk_dir=tmp_path, host_budget_bytes=host_budget, to_disk=to_disk, free_device_bytes=1 << 40)
    plan = build(cache, fam)
    assert plan["placement"] == expected == cache.placement
    assert plan["entries"] == len(cache) == 4
    assert plan["bytes_per_entry"] == ENTRY_BYTES
    assert plan["total_bytes"] == 4 * ENTRY_BYTES
    assert (plan["hits"], plan["encoded"]) == (0, 4)
    assert plan["device_budget_bytes"] is None and plan["reason"]
    json.dumps(plan)  # goes into run_started as is
    # Spilled to disk: every entry is a file. In memory without persist: nothing written.
    assert len(entry_files(tmp_path)) == (4 if expected == "disk" else 0)
    assert_exact(cache, fam, CAPTIONS)


def test_over_budget_without_a_folder_is_an_error():
    with pytest.raises(TextCacheError, match="no disk folder"):
        build(TextCache("k", host_budget_bytes=ENTRY_BYTES), FakeFlux())
    with pytest.raises(TextCacheError, match="to_disk"):
        build(TextCache("k", to_disk=True), FakeFlux())


def test_default_host_budget_is_capped_and_shared(monkeypatch):
    avail = tc.available_host_bytes()
    assert avail is None or avail > 0
    # Frozen for the comparisons below: on a shared box MemAvailable moves between two reads.
    import lora_trainer.preflight.cache_plan as cache_plan

    monkeypatch.setattr(cache_plan, "available_host_bytes", lambda: avail)
    budget = tc.default_host_budget()
    assert 0 < budget <= tc.DEFAULT_HOST_CAP
    assert tc.default_host_budget(share=4) == budget // 4
    assert tc.default_host_budget(cap=1000) == 1000


def test_static_size_estimates():
    assert estimate_bytes_per_entry("flux1") == (512 * 4096 + 768) * 2  # ~4 MiB in bf16
    assert estimate_bytes_per_entry("flux1", max_sequence_length=256) == (256 * 4096 + 768) * 2
    assert estimate_bytes_per_entry("sd15", dtype_bytes=4) == 77 * 768 * 4
    with pytest.raises(ValueError):
        estimate_bytes_per_entry("nope")


# ------------------------------------------------------------------------------------------------ disk tier
def test_disk_entries_are_reused_without_the_encoder(tmp_path):
    fam = FakeFlux()
    first = TextCache("enc-A", disk_dir=tmp_path, to_disk=True)
    plan = build(first, fam)
    assert (plan["hits"], plan["encoded"]) == (0, 4)
    assert sorted(fam.encoded) == sorted(set(CAPTIONS))  # each distinct caption encoded once
    assert len(entry_files(tmp_path)) == 4
    assert_exact(first, fam, CAPTIONS)

    again = FakeFlux()
    second = TextCache("enc-A", disk_dir=tmp_path, to_disk=True)
    ticks = []
    plan = build(second, again, progress=lambda d, t: ticks.append((d, t)))
    assert again.calls == [] and (plan["hits"], plan["encoded"]) == (4, 0)
    assert ticks == [(4, 4)]  # reused entries count as done
    again.produced = fam.produced
    assert_exact(second, again, CAPTIONS)

    # The same files serve an in-memory placement too: a rerun skips the encoders whatever the placement.
    third, fam3 = TextCache("enc-A", disk_dir=tmp_path), FakeFlux()
    assert build(third, fam3)["placement"] == "host" and fam3.calls == [] and third.hits == 4
    fam3.produced = fam.produced
    assert_exact(third, fam3, CAPTIONS)


def test_changed_encoder_identity_misses(tmp_path):
    build(TextCache("enc-A", disk_dir=tmp_path, to_disk=True), FakeFlux())
    fam = FakeFlux(salt=1)  # "another encoder"
    cache = TextCache("enc-B", disk_dir=tmp_path, to_disk=True)
    plan = build(cache, fam)
    assert (plan["hits"], plan["encoded"]) == (0, 4)
    assert len(entry_files(tmp_path)) == 8  # the old entries are left alone
    assert_exact(cache, fam, CAPTIONS)


def test_new_captions_are_encoded_and_old_ones_reused(tmp_path):
    build(TextCache("k", disk_dir=tmp_path, persist=True), FakeFlux())
    fam = FakeFlux()
    cache = TextCache("k", disk_dir=tmp_path, persist=True)
    ticks = []
    plan = build(cache, fam, CAPTIONS + ["brand new", "another"], progress=lambda d, t: ticks.append((d, t)))
    assert (plan["hits"], plan["encoded"]) == (4, 2)
    assert sorted(fam.encoded) == ["another", "brand new"]
    assert ticks[-1] == (6, 6) and all(a[0] <= b[0] for a, b in itertools.pairwise(ticks))


def _corrupt_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data: only the checksum notices
    path.write_bytes(bytes(raw))


# Disk placement reads only headers at build time (a 200 GB cache is not read at every start): damaged data there is
# caught by the checksum when a step reads the entry (next test). In-memory placements read, and check, everything.
@pytest.mark.parametrize("damage,to_disk", [(d, False) for d in ("truncate", "garbage", "data", "empty")]
                         + [(d, True) for d in ("truncate", "garbage", "empty")])
def test_damaged_entry_is_recomputed(tmp_path, damage, to_disk):
    build(TextCache("k", disk_dir=tmp_path, persist=True), FakeFlux())
    victim = TextCache("k", disk_dir=tmp_path).path_for("ohwx, red hat")
    good = victim.read_bytes()
    good_bits = {k: bits(v) for k, v in load_file(victim).items()}  # read before the damage (load_file maps the file)
    if damage == "truncate":
        victim.write_bytes(good[:-7])
    elif damage == "garbage":
        victim.write_bytes(b"\x00garbage" * 10)
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        _corrupt_data(victim)
    fam = FakeFlux()
    cache = TextCache("k", disk_dir=tmp_path, persist=True, to_disk=to_disk)
    plan = build(cache, fam)
    assert fam.encoded == ["ohwx, red hat"]
    assert (plan["hits"], plan["encoded"]) == (3, 1)
    rewritten = load_file(victim)  # rewritten, bit for bit (the encoder is deterministic; the metadata's order is not)
    assert {k: bits(v) for k, v in rewritten.items()} == good_bits
    ref = FakeFlux()  # what the encoder produces for every caption
    ref.encode_text(None, sorted(set(CAPTIONS)), "cpu")
    assert_exact(cache, ref, CAPTIONS)


def test_damaged_data_in_disk_placement_fails_loudly_at_step_time(tmp_path):
    cache = TextCache("k", disk_dir=tmp_path, to_disk=True, lru_bytes=0)
    build(cache, FakeFlux())
    _corrupt_data(cache.path_for("ohwx on a beach"))
    cache.batch(["a photo of ohwx"])
    with pytest.raises(TextCacheError, match="damaged"):
        cache.batch(["a photo of ohwx", "ohwx on a beach"])
    assert not cache.path_for("ohwx on a beach").exists()  # so the restart encodes it again
    fam = FakeFlux()
    assert build(TextCache("k", disk_dir=tmp_path, to_disk=True), fam)["encoded"] == 1
    assert fam.encoded == ["ohwx on a beach"]


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batch_is_bitwise_the_encoder_output(tmp_path, placement, dtype):
    fam = FakeFlux(dtype)
    cache = TextCache("k", disk_dir=tmp_path, to_disk=placement == "disk")
    build(cache, fam, batch_size=3)
    assert cache.placement == placement
    order = ["ohwx, red hat", "", "ohwx, red hat", "a photo of ohwx", "ohwx on a beach", "ohwx, red hat"]
    assert_exact(cache, fam, order, dtype)
    out = cache.batch(order)
    assert out["prompt_embeds"].shape == (6, SEQ, DIM) and out["pooled"].shape == (6, POOLED)
    out["prompt_embeds"].zero_()  # a caller writing into a batch must not change the cache
    assert_exact(cache, fam, order, dtype)


def test_disk_lru_reads_each_hot_entry_once(tmp_path):
    fam = FakeFlux()
    cache = TextCache("k", disk_dir=tmp_path, to_disk=True, lru_bytes=2 * ENTRY_BYTES)
    build(cache, fam)
    reads = cache.disk_reads
    cache.batch(["", "", ""])
    cache.batch(["", "ohwx, red hat"])
    assert cache.disk_reads - reads == 2  # a duplicate is read once, and "" stays in the LRU
    cache.batch(["a photo of ohwx", "ohwx on a beach"])  # evicts both
    cache.batch([""])
    assert cache.disk_reads - reads == 5
    assert cache._lru_used <= 2 * ENTRY_BYTES


def test_empty_caption_and_validation_prompts_are_entries(tmp_path):
    fam = FakeFlux()
    cache = TextCache("k")
    build(cache, fam, ["ohwx", "ohwx", ""] + ["a validation prompt"])
    assert "" in cache and "a validation prompt" in cache and len(cache) == 3
    assert "" in fam.encoded
    assert_exact(cache, fam, ["", "ohwx", "", "a validation prompt"])
    with pytest.raises(KeyError):
        cache.batch(["never cached"])


def test_build_again_adds_captions_and_keeps_placement():
    fam = FakeFlux()
    cache = TextCache("k")
    build(cache, fam, ["one", "two"])
    plan = build(cache, fam, ["two", "three"])
    assert fam.encoded == ["one", "two", "three"] and plan["entries"] == 3 and plan["placement"] == "host"
    assert plan["total_bytes"] == 3 * ENTRY_BYTES
    assert_exact(cache, fam, ["three", "one"])


def test_progress_counts_every_distinct_caption():
    ticks = []
    build(TextCache("k"), FakeFlux(), progress=lambda d, t: ticks.append((d, t)))
    assert ticks == [(2, 4), (4, 4)]  # the first chunk also sized the entries


# ------------------------------------------------------------------------------------------------ atomic writes
def test_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    build(TextCache("k", disk_dir=tmp_path, to_disk=True), FakeFlux())
    assert tmp_files(tmp_path) == []

    import safetensors.torch

    real = safetensors.torch.save_file

    def dies_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        build(TextCache("k2", disk_dir=tmp_path, to_disk=True), FakeFlux())
    assert tmp_files(tmp_path) == []
    assert len(entry_files(tmp_path)) == 4  # no half entry under a final name
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert build(TextCache("k2", disk_dir=tmp_path, to_disk=True), FakeFlux())["encoded"] == 4


def test_stale_temporary_file_of_a_dead_process_is_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    import socket

    stale = tmp_path / f"{tc._TMP_PREFIX}{socket.gethostname()}-{pid}-{'0' * 64}"
    alive = tmp_path / f"{tc._TMP_PREFIX}{socket.gethostname()}-{os.getppid()}-{'1' * 64}"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    build(TextCache("k", disk_dir=tmp_path, to_disk=True), FakeFlux())
    assert not stale.exists() and alive.exists()


def test_entry_file_layout(tmp_path):
    cache = TextCache("k", disk_dir=tmp_path, to_disk=True)
    build(cache, FakeFlux(torch.bfloat16))
    path = cache.path_for("")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    assert meta["caption"] == "" and meta["format"] == tc.FORMAT and path.stem == meta["key"]
    assert path.parent.name == meta["key"][:2]
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "prompt_embeds": ("BF16", [SEQ, DIM]), "pooled": ("BF16", [POOLED])}  # compact: no fp32 upcast, no stripping


def test_key_depends_on_caption_identity_and_device_type():
    k = tc._entry_key
    assert k("e", "cpu", "a") == k("e", "cpu", "a")
    assert len({k("e", "cpu", "a"), k("e", "cpu", "b"), k("f", "cpu", "a"), k("e", "cuda", "a")}) == 4


# ------------------------------------------------------------------------------------------------ identity
def _tiny_comps():
    from transformers import CLIPTextModel

    from lora_trainer.testing.tiny import _text_config, make_tiny_tokenizer

    torch.manual_seed(0)
    return SimpleNamespace(text_encoders={"text_encoder": CLIPTextModel(_text_config(32, "quick_gelu", 0))},
                           tokenizers={"text_encoder": make_tiny_tokenizer()}, variant=None)


def test_encoder_identity_tracks_config_tokenizer_weights_and_extra():
    fam = SimpleNamespace(name="sd15", variant=None)
    comps = _tiny_comps()
    base = encoder_identity(fam, comps, {"weights": [1, "abc"]})
    assert base == encoder_identity(fam, comps, {"weights": [1, "abc"]})  # stable
    assert len(base) == 64
    assert base != encoder_identity(fam, comps, {"weights": [2, "abc"]})
    assert base != encoder_identity(SimpleNamespace(name="sd15", variant=None, max_sequence_length=77), comps,
                                    {"weights": [1, "abc"]})

    te = comps.text_encoders["text_encoder"]
    te.config.layer_norm_eps = 1e-6
    changed_config = encoder_identity(fam, comps, {"weights": [1, "abc"]})
    assert changed_config != base

    comps.tokenizers["text_encoder"].model_max_length = 64
    changed_tok = encoder_identity(fam, comps, {"weights": [1, "abc"]})
    assert changed_tok != changed_config

    with torch.no_grad():  # a fine-tune moves every weight a little: the sampled ones differ
        for param in te.parameters():
            param.add_(1e-3 * torch.randn_like(param))
    assert encoder_identity(fam, comps, {"weights": [1, "abc"]}) != changed_tok

    te.to(torch.bfloat16)
    assert encoder_identity(fam, comps, {"weights": [1, "abc"]}) != changed_tok


def test_encoder_identity_ignores_where_the_model_was_saved():
    fam = SimpleNamespace(name="sd15", variant=None)
    comps = _tiny_comps()
    base = encoder_identity(fam, comps)
    comps.text_encoders["text_encoder"].config._name_or_path = "/somewhere/else"
    assert encoder_identity(fam, comps) == base


def test_weight_files_identity(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    first = weight_files_identity(folder)
    assert set(first) == {"text_encoder/model.safetensors", "text_encoder/config.json"}
    assert first == weight_files_identity(folder)
    save_file({"w": torch.zeros(5)}, str(folder / "model.safetensors"))  # another shape: another header
    assert weight_files_identity(folder) != first
    single = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(single))
    assert list(weight_files_identity(single)) == ["model.safetensors"]


# ------------------------------------------------------------------------------------------------ a real family
def _tiny_flux_comps():
    from transformers import CLIPTextModel

    from lora_trainer.testing import tiny
    from lora_trainer.families.flux1.tiny import FLUX_CLIP_HIDDEN
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer
    from lora_trainer.testing.t5 import t5_encoder as _t5_encoder

    torch.manual_seed(0)
    clip = CLIPTextModel(tiny._text_config(FLUX_CLIP_HIDDEN, "quick_gelu", tiny.VOCAB_SIZE - 1)).eval()
    return SimpleNamespace(text_encoders={"text_encoder": clip, "text_encoder_2": _t5_encoder().eval()},
                           tokenizers={"text_encoder": tiny.make_tiny_tokenizer(),
                                       "text_encoder_2": make_tiny_t5_tokenizer()}, variant=None)


def test_real_flux_family_round_trip(tmp_path):
    from lora_trainer.families import get_family

    fam, comps = get_family("flux1", None), _tiny_flux_comps()
    key = encoder_identity(fam, comps, {"weights": "tiny"})
    assert key != encoder_identity(get_family("flux1", SimpleNamespace(max_sequence_length=256)), comps,
                                   {"weights": "tiny"})
    captions = ["ohwx, red hat", "", "a photo of ohwx", "ohwx", "ohwx, red hat"]
    cache = TextCache(key, disk_dir=tmp_path, to_disk=True)
    plan = cache.build(fam, comps, captions, device=torch.device("cpu"), batch_size=2)
    assert plan["bytes_per_entry"] == (512 * 64 + 32) * 4  # T5 padded to max_sequence_length, fp32 on the CPU
    # The reference: the same chunks through encode_text (sorted distinct captions, two at a time).
    ref = {}
    distinct = sorted(set(captions))
    with torch.no_grad():
        for i in range(0, len(distinct), 2):
            out = fam.encode_text(comps, distinct[i:i + 2], torch.device("cpu"))
            for j, c in enumerate(distinct[i:i + 2]):
                ref[c] = {k: v[j] for k, v in out.items()}
    for warm in (cache, TextCache(key, disk_dir=tmp_path)):
        if warm is not cache:
            assert warm.build(fam, comps, captions, device="cpu", batch_size=2)["encoded"] == 0
        got = warm.batch(captions)
        for name in ("prompt_embeds", "pooled"):
            assert got[name].dtype == torch.float32
            for j, c in enumerate(captions):
                assert bits(got[name][j]) == bits(ref[c][name])


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("free,host,to_disk,expected", [(1 << 40, 1 << 40, False, "device"),
                                                        (0, 1 << 40, False, "host"), (1 << 40, 0, True, "disk")])
def test_cuda_placements_are_bitwise(tmp_path, free, host, to_disk, expected):
    fam = FakeFlux(torch.bfloat16)
    cache = TextCache("k", disk_dir=tmp_path, free_device_bytes=free, host_budget_bytes=host, to_disk=to_disk)
    cache.build(fam, None, CAPTIONS, device=torch.device("cuda"), batch_size=2)
    assert cache.placement == expected
    order = ["", "ohwx, red hat", "", "a photo of ohwx"]
    for _ in range(3):  # pinned staging buffers are reused: later batches must not see earlier ones
        out = cache.batch(order)
        for name, t in out.items():
            assert t.device.type == "cuda" and t.dtype == torch.bfloat16
            for j, c in enumerate(order):
                assert bits(t[j]) == bits(fam.produced[c][name])
        order = order[::-1]
