"""train_text_encoder puts LoRA only on text-encoder layers whose output the conditioning reads.

SDXL conditions on CLIP-L's second-to-last hidden state: a LoRA on CLIP-L's last layer gets no gradient (DDP refuses
it; tests/test_multiprocess.py runs SDXL with the text encoder on two processes) and is dead weight in every file.
How deep each family reads each LoRA'd encoder is its spec's ``text_encoder_reads``; these tests hold that fact
against the families' own ``encode_text``, and check the trainer, the exported files, the memory plan and
``init_lora`` against it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, write_config
from lora_trainer.families import FAMILIES, get_family, get_part

CLIP_ALL = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _model(tiny_models, family: str) -> Path:
    return tiny_models[get_part(family, "tiny").DEFAULT]


def _load(tiny_models, family: str):
    fam = get_family(family)
    return fam, fam.load(_model(tiny_models, family), single_file=False, dtype=torch.float32)


def _under(name: str, prefixes) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _cfg(tmp_path: Path, family_model: Path, **extra):
    from lora_trainer.config.config import parse_config
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=2, trigger="ohwx")
    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(family_model),
                           "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], "lora_rank": 4,
                           "train_text_encoder": True, **extra})
    return cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_spec_says_how_deep_encode_text_reads(tiny_models, family):
    """LoRA on every Linear of every LoRA'd encoder, one encode_text and a backward through all it returns: the
    LoRA weights left without a gradient are exactly those of the layers the spec calls unread."""
    from lora_trainer.adapters.lora import add_lora

    fam, comps = _load(tiny_models, family)
    spec = fam.spec
    for name in spec.lora_text_encoders:
        add_lora(comps.text_encoders[name], rank=2, alpha=2, dropout=0.0, targets=CLIP_ALL, use_dora=False,
                 path="text_encoder_target_modules")
    cond = fam.encode_text(comps, ["ohwx, a photo of a cat"], torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    # random weights: a plain sum of a LayerNorm's output has zero gradient
    loss = sum((v.float() * torch.randn(v.shape, generator=gen)).sum() for v in cond.values())
    loss.backward()
    for name in spec.lora_text_encoders:
        te = comps.text_encoders[name]
        unread = spec.text_encoder_layers_unread(name, [n for n, _ in te.named_modules()])
        lora = {n: p for n, p in te.named_parameters() if "lora_" in n}
        assert lora
        assert {n for n, p in lora.items() if p.grad is None} == {n for n in lora if _under(n, unread)}, name
    if family == "sdxl":  # the case that broke DDP: CLIP-L's last layer, and only that
        layers = comps.text_encoders["text_encoder"].config.num_hidden_layers
        assert [p.rsplit(".", 1)[-1] for p in spec.text_encoder_layers_unread(
            "text_encoder", [n for n, _ in comps.text_encoders["text_encoder"].named_modules()])] == [str(layers - 1)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_trainer_adapts_every_read_layer_and_no_other(tmp_path, tiny_models, family):
    """attach_adapters (the trainer's own step): each LoRA'd encoder gets LoRA on every layer its targets select,
    except SDXL's CLIP-L last layer; for every other family and encoder that is every layer, as before."""
    from lora_trainer.training.attach import attach_adapters

    fam, comps = _load(tiny_models, family)
    cfg = _cfg(tmp_path, _model(tiny_models, family), text_encoder_target_modules=list(CLIP_ALL))
    attached = attach_adapters(cfg, fam, comps, torch.device("cpu"), None)
    for name in fam.spec.lora_text_encoders:
        te = comps.text_encoders[name]
        selected = {n for n, _ in te.named_modules() if n.endswith(tuple("." + t for t in CLIP_ALL))}
        adapted = {n for n, m in te.named_modules() if hasattr(m, "lora_A")}
        layers = te.config.num_hidden_layers
        last = {n for n in selected if f"layers.{layers - 1}." in n}
        if (family, name) == ("sdxl", "text_encoder"):
            assert last and adapted == selected - last
        else:
            assert last and adapted == selected, (family, name)
    te_numel = sum(p.numel() for p in attached.te_params)
    assert te_numel == sum(p.numel() for name in fam.spec.lora_text_encoders
                           for n, p in comps.text_encoders[name].named_parameters() if "lora_" in n)


def test_targets_only_on_unread_layers_are_a_config_error(tmp_path, tiny_models):
    """A name that selects only CLIP-L's last layer would train nothing there: refused, naming the key."""
    from lora_trainer.contract.errors import ConfigError
    from lora_trainer.training.attach import attach_adapters

    fam, comps = _load(tiny_models, "sdxl")
    last = comps.text_encoders["text_encoder"].config.num_hidden_layers - 1
    cfg = _cfg(tmp_path, tiny_models["sdxl"], text_encoder_target_modules=[f"layers.{last}.mlp.fc1"])
    with pytest.raises(ConfigError) as err:
        attach_adapters(cfg, fam, comps, torch.device("cpu"), None)
    assert [p["path"] for p in err.value.problems] == ["text_encoder_target_modules"]
    assert "never reads" in str(err.value)


def test_the_memory_plan_counts_the_text_encoder_lora_the_trainer_makes(tmp_path, tiny_models):
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.training.attach import attach_adapters

    probe = probe_model(str(tiny_models["sdxl"]), tmp_path)
    planned = {}
    for te in (False, True):
        cfg = _cfg(tmp_path, tiny_models["sdxl"], train_text_encoder=te)
        planned[te] = plan_memory(cfg, probe, "sdxl", 64, gpu=None)["lora_params"]
    fam, comps = _load(tiny_models, "sdxl")
    attached = attach_adapters(cfg, fam, comps, torch.device("cpu"), None)
    assert planned[True] - planned[False] == sum(p.numel() for p in attached.te_params)


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("sdxl_te")
    data = make_dataset(tmp / "data", n=2, trigger="ohwx")
    cfg = write_config(tmp / "c.json", dataset_path=str(data), base_model=str(tiny_models["sdxl"]),
                       output_path=str(tmp / "out"), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                       lora_alpha=8, max_train_steps=2, checkpointing_steps=None, train_text_encoder=True,
                       text_encoder_lr=1e-3)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, data


def _last_layers(model: Path) -> dict[str, int]:
    import json

    return {te: json.loads((model / te / "config.json").read_text())["num_hidden_layers"] - 1
            for te in ("text_encoder", "text_encoder_2")}


def test_sdxl_exports_no_lora_on_clip_l_last_layer(sdxl_run, tiny_models):
    tmp, _ = sdxl_run
    last = _last_layers(tiny_models["sdxl"])
    kohya = load_file(tmp / "out" / "lora.safetensors").keys()
    peft = load_file(tmp / "out" / "pytorch_lora_weights.safetensors").keys()
    for keys, clip_l, clip_g in ((kohya, "lora_te1_text_model_encoder_layers_{}_", "lora_te2_text_model_encoder_layers_{}_"),
                                 (peft, "text_encoder.text_model.encoder.layers.{}.", "text_encoder_2.text_model.encoder.layers.{}.")):
        assert any(k.startswith(clip_l.format(last["text_encoder"] - 1)) for k in keys)  # the penultimate: trained
        assert not any(k.startswith(clip_l.format(last["text_encoder"])) for k in keys)  # the last: none
        assert any(k.startswith(clip_g.format(last["text_encoder_2"])) for k in keys)  # CLIP-G's last: pooled output


@pytest.mark.parametrize("file", ["lora.safetensors", "pytorch_lora_weights.safetensors"])
def test_init_lora_leaves_out_modules_on_unread_layers(tmp_path, sdxl_run, tiny_models, file):
    """A file that has LoRA on CLIP-L's last layer (sd-scripts puts LoRA on every layer; so did this trainer before
    text_encoder_reads) continues training: those modules could not change an image and are left out, saying so."""
    tmp, data = sdxl_run
    last = _last_layers(tiny_models["sdxl"])["text_encoder"]
    src = load_file(tmp / "out" / file)
    at = {"lora.safetensors": "lora_te1_text_model_encoder_layers_{}_",
          "pytorch_lora_weights.safetensors": "text_encoder.text_model.encoder.layers.{}."}[file]
    extra = {k.replace(at.format(0), at.format(last)): v.clone() for k, v in src.items() if k.startswith(at.format(0))}
    assert extra
    save_file({**src, **extra}, str(tmp_path / "with_last.safetensors"), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.json", dataset_path=str(data), base_model=str(tiny_models["sdxl"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                       lora_alpha=8, max_train_steps=1, checkpointing_steps=None, train_text_encoder=True,
                       learning_rate=1e-12, weight_decay=0.0, init_lora=str(tmp_path / "with_last.safetensors"))
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    status = [e["message"] for e in res.of_type("status") if e.get("phase") == "init_lora"]
    assert len(status) == 1 and f"{len({k.rsplit('.', 2)[0] for k in extra})} module(s) on text-encoder layers" \
        in status[0], status
    assert not [e for e in res.of_type("warning") if e.get("code") == "init_lora_partial"]
    got = load_file(tmp_path / "out" / file)
    assert got.keys() == src.keys()
