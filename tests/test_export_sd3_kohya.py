"""The kohya/SAI SD3 LoRA file (lora_trainer/families/sd3/export.py) against ComfyUI's and Forge's key maps
(tests/comfy_dit_rules.py), and numerically: the patches ComfyUI would add to its fused SAI weights must equal the
PEFT model's per-module deltas, mapped into those weights by ComfyUI's own diffusers map (mmdit_to_diffusers).
Tiny random SD3.5-medium-like pipeline: block 0 has attn2, block 1 (the last) is context_pre_only."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import comfy_dit_rules as rules  # tests/ is on sys.path
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from lora_trainer.families.sd3.export import sd3_kohya_state_dict, sd3_sai_module_map
from lora_trainer.families._unet.kohya_names import te_path
from lora_trainer.testing.tiny import make_tiny_pipeline

RANK, ALPHA = 4, 8.0  # alpha != rank: a loader (or exporter) that drops alpha is off by 2x
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The saved tiny SD3 pipeline's transformer and CLIP-L/G, loaded back (configs as a real checkpoint gives
    them: FrozenDict, lists), plus ComfyUI's CLIP object configs."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config

    out = make_tiny_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", "sd3")
    transformer = SD3Transformer2DModel.from_pretrained(out / "transformer")
    te1 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    clip_configs = {"clip_l": te1.config, "clip_g": te2.config,
                    "t5xxl": T5Config.from_pretrained(out / "text_encoder_3")}
    return transformer, te1, te2, clip_configs


def _lora(model, targets, seed):
    model = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                       init_lora_weights="gaussian"), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _deltas(model):
    return {n: m.get_delta_weight("default").detach().float() for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("transformer_blocks.")]


def _all_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


CASES = {"attention": lambda t: ATTENTION, "all_block_linears": _block_linears, "only_to_q": lambda t: ["to_q"],
         "every_layer": _all_layers}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, base):
    """(name, states, reference fused deltas {comfy key: tensor}, comfy weight shapes) for one target set."""
    transformer, te1, te2, _ = base
    t = _lora(transformer, CASES[request.param](transformer), seed=1)
    c1, c2 = _lora(te1, CLIP_TARGETS, seed=2), _lora(te2, CLIP_TARGETS, seed=3)
    states = {"transformer": get_peft_model_state_dict(t), "text_encoder": get_peft_model_state_dict(c1),
              "text_encoder_2": get_peft_model_state_dict(c2)}
    shapes = _comfy_shapes(transformer, te1, te2)
    ref = _reference(transformer.config, shapes, _deltas(t), _deltas(c1), _deltas(c2))
    return request.param, states, ref, shapes


# --------------------------------------------------------------------------- oracle: ComfyUI's diffusers map


def _diffusers_map(cfg):
    return rules.mmdit_to_diffusers(rules.comfy_unet_config("sd3", cfg), output_prefix="diffusion_model.")


def _comfy_shapes(transformer, te1, te2):
    """Shapes of ComfyUI's weights (fused qkv: rows = the sum of the q/k/v slices)."""
    mm = _diffusers_map(transformer.config)
    shapes = {}
    for k, w in transformer.state_dict().items():
        if k not in mm or not k.endswith(".weight"):
            continue
        key, offset, _ = rules.split_target(mm[k])
        if offset is None:
            shapes[key] = tuple(w.shape)
        else:
            rows = max(shapes.get(key, (0,))[0], offset[1] + offset[2])
            shapes[key] = (rows, *w.shape[1:])
    for slot, te in (("clip_l", te1), ("clip_g", te2)):
        for k, w in te.state_dict().items():
            if k.endswith(".weight"):
                shapes[f"{slot}.transformer.{k}"] = tuple(w.shape)
    return shapes


def _place(acc, shapes, key, offset, fn, delta):
    w = acc.setdefault(key, torch.zeros(shapes[key]))
    view = w if offset is None else w.narrow(*offset)
    delta = delta.reshape(view.shape)
    view += fn(delta) if fn is not None else delta


def _reference(cfg, shapes, t_deltas, c1_deltas, c2_deltas):
    """The PEFT deltas placed into ComfyUI's weights the way ComfyUI places a ``transformer.<diffusers>`` LoRA:
    q/k/v at their qkv row offsets (qkv delta = cat(dq, dk, dv)), swap_scale_shift where its map says so."""
    mm, acc = _diffusers_map(cfg), {}
    for name, d in t_deltas.items():
        key, offset, fn = rules.split_target(mm[name + ".weight"])
        _place(acc, shapes, key, offset, fn, d)
    for slot, deltas in (("clip_l", c1_deltas), ("clip_g", c2_deltas)):
        for name, d in deltas.items():
            _place(acc, shapes, f"{slot}.transformer.{te_path(name)}.weight", None, None, d)
    return acc


def _comfy_apply(sd, cfg, clip_configs, shapes):
    """What ComfyUI's LoraLoader adds to each weight for this file: per patch alpha / rank * up @ down (rank =
    down's rows; scale 1 without .alpha), function applied, added at the patch's offset."""
    patches = rules.comfy_patches(sd.keys(), "sd3", cfg, clip_configs)
    assert len(patches) == sum(k.endswith(".lora_down.weight") for k in sd)
    acc = {}
    for prefix, target in patches.items():
        key, offset, fn = rules.split_target(target)
        up, down = sd[prefix + ".lora_up.weight"].float(), sd[prefix + ".lora_down.weight"].float()
        alpha = sd[prefix + ".alpha"].item() if prefix + ".alpha" in sd else down.shape[0]
        _place(acc, shapes, key, offset, fn, alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)))
    return acc


def _assert_same(got, ref):
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- tests


def test_every_tool_maps_every_key(trained, base):
    _, states, _, _ = trained
    transformer, _, _, clip_configs = base
    cfg = transformer.config
    sd = sd3_kohya_state_dict(states, cfg, alpha=ALPHA, rank=RANK)
    assert sd and all(k.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for k in sd)
    assert rules.unloaded_keys(sd, "sd3", cfg, clip_configs) == []
    assert rules.missing_targets(sd, "sd3", cfg, clip_configs) == []
    assert rules.forge_unmatched_keys(sd, "sd3", cfg, clip_configs) == []  # Forge loads it too
    # Unlike the transformer.* file, SAI names do not depend on ComfyUI's depth = hidden // 64 detection.
    assert rules.unloaded_keys(sd, "sd3", cfg, clip_configs, literal=True) == []
    for k, v in sd.items():
        assert v.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16), k


def test_comfy_patches_equal_peft_deltas(trained, base):
    _, states, ref, shapes = trained
    transformer, _, _, clip_configs = base
    sd = sd3_kohya_state_dict(states, transformer.config, alpha=ALPHA, rank=RANK, dtype=torch.float32)
    _assert_same(_comfy_apply(sd, transformer.config, clip_configs, shapes), ref)
    # The shipped fp16 file: only the save's own rounding.
    sd16 = sd3_kohya_state_dict(states, transformer.config, alpha=ALPHA, rank=RANK)
    got16 = _comfy_apply(sd16, transformer.config, clip_configs, shapes)
    for k in ref:
        torch.testing.assert_close(got16[k], ref[k], rtol=5e-3, atol=5e-4, msg=k)


def test_fused_layout(trained, base):
    name, states, _, _ = trained
    sd = sd3_kohya_state_dict(states, base[0].config, alpha=ALPHA, rank=RANK, dtype=torch.float32)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    parts = 1 if name == "only_to_q" else 3
    assert sd[f"{qkv}.lora_down.weight"].shape == (parts * RANK, 32)
    assert sd[f"{qkv}.lora_up.weight"].shape == (96, parts * RANK)
    assert sd[f"{qkv}.alpha"].item() == parts * RANK  # alpha == fused rank: scale 1, alpha folded into up
    if name == "only_to_q":
        assert not sd[f"{qkv}.lora_up.weight"][32:].any()  # k, v untrained: zero rows
        assert "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight" not in sd
    else:
        assert "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha" in sd  # pre_only block keeps its qkv
    assert all(v.item() == RANK for k, v in sd.items() if k.endswith(".alpha") and "_qkv" not in k)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in sd


def _rows_swapped(sd, name):
    k = f"{name}.lora_up.weight"
    sd[k] = torch.cat(sd[k].chunk(2, dim=0)[::-1], dim=0)


@pytest.mark.parametrize("break_it", ["alpha_kept", "sd_scripts_2204", "no_swap"])
def test_negative_controls_fail(break_it, base):
    """The numeric check catches the classic mistakes (on the every-layer LoRA)."""
    transformer, te1, te2, _ = base
    t = _lora(transformer, _all_layers(transformer), seed=1)
    states = {"transformer": get_peft_model_state_dict(t)}
    shapes = _comfy_shapes(transformer, te1, te2)
    ref = _reference(transformer.config, shapes, _deltas(t), {}, {})
    sd = sd3_kohya_state_dict(states, transformer.config, alpha=ALPHA, rank=RANK, dtype=torch.float32)
    _assert_same(_comfy_apply(sd, transformer.config, None, shapes), ref)  # the intact file passes
    qkv = [k[:-len(".alpha")] for k in sd if k.endswith("_qkv.alpha")]
    if break_it == "alpha_kept":  # alpha/rank folded, but the trained alpha written anyway
        for m in qkv:
            sd[f"{m}.alpha"] = torch.tensor(ALPHA)
    elif break_it == "sd_scripts_2204":  # not folded, alpha unchanged while the rank triples
        for m in qkv:
            sd[f"{m}.lora_up.weight"] /= ALPHA / RANK
            sd[f"{m}.alpha"] = torch.tensor(ALPHA)
    else:  # no swap_scale_shift for norm_out.linear and the last block's context modulation
        _rows_swapped(sd, "lora_unet_final_layer_adaLN_modulation_1")
        _rows_swapped(sd, "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1")
    with pytest.raises(AssertionError):
        _assert_same(_comfy_apply(sd, transformer.config, None, shapes), ref)


def test_map_covers_every_layer_comfy_knows(base):
    """Our SAI targets are exactly ComfyUI's mmdit_to_diffusers targets for every Linear/Conv of the model."""
    transformer = base[0]
    ours = sd3_sai_module_map(transformer.config)
    mm = _diffusers_map(transformer.config)
    assert sorted(ours) == sorted(_all_layers(transformer))
    for path, target in ours.items():
        key, offset, fn = rules.split_target(mm[path + ".weight"])
        assert key == f"diffusion_model.{target.module}.weight", path
        assert (offset is None) == (target.part is None), path
        if offset is not None:
            assert offset == (0, target.part * target.width, target.width), path
        assert (fn is rules.swap_scale_shift) == target.swap, path


def test_refusals(base):
    transformer = base[0]
    cfg = transformer.config
    dora = copy.deepcopy(transformer)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q"], use_dora=True), dora)
    with pytest.raises(ValueError, match="DoRA"):
        sd3_kohya_state_dict({"transformer": get_peft_model_state_dict(dora)}, cfg, alpha=ALPHA, rank=RANK)
    a, b = torch.zeros(RANK, 32), torch.zeros(32, RANK)
    for bad in ("transformer_blocks.1.attn2.to_q",  # block 1 has no attn2
                "transformer_blocks.1.attn.to_add_out",  # context_pre_only block
                "transformer_blocks.2.attn.to_q"):  # only 2 blocks
        with pytest.raises(ValueError, match="no SAI"):
            sd3_kohya_state_dict({"transformer": {f"{bad}.lora_A.weight": a, f"{bad}.lora_B.weight": b}}, cfg,
                                 alpha=ALPHA, rank=RANK)
    with pytest.raises(ValueError, match="rank"):
        sd3_kohya_state_dict({"transformer": {"proj_out.lora_A.weight": torch.zeros(2, 32),
                                              "proj_out.lora_B.weight": torch.zeros(64, 2)}}, cfg,
                             alpha=ALPHA, rank=RANK)
    with pytest.raises(ValueError, match="text_encoder_3"):
        sd3_kohya_state_dict({"text_encoder_3": {}}, cfg, alpha=ALPHA, rank=RANK)
