"""FLUX.1 / SD3 LoRA key layouts against ComfyUI's and Forge's rules (tests/comfy_dit_rules.py) and against what the
installed diffusers loads (FluxPipeline / StableDiffusion3Pipeline.load_lora_weights), on tiny random models.

Background and sources: /work/notes/dit_loaders.md.
"""
from __future__ import annotations

import json
import os

import pytest
import torch


diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import comfy_dit_rules as rules  # noqa: E402  (tests/ is on sys.path, as for loader_rules)

from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
            guidance_embeds=True)
SD3 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
           qk_norm="rms_norm", dual_attention_layers=(0,))
CONFIGS = {"flux": FLUX, "sd3": SD3}
TRANSFORMERS = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}
CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
            projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5 = dict(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
CLIP_CONFIGS = {"flux": {"clip_l": CLIP, "t5xxl": T5}, "sd3": {"clip_l": CLIP, "clip_g": CLIP, "t5xxl": T5}}
RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a loader that ignores alpha is off by 2x
SCALE = ALPHA / RANK
DF_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _seeded(fn, seed):
    torch.manual_seed(seed)
    return fn()


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith(("transformer_blocks.", "single_transformer_blocks."))]


def _randomise_lora_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _transformer_lora(family, targets, seed=1):
    """A PEFT LoRA (rank 4, alpha 8, random nonzero B) on the tiny transformer: its get_peft_model_state_dict."""
    model = _seeded(lambda: TRANSFORMERS[family](**CONFIGS[family]), 0)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian"))
    _randomise_lora_b(model, seed)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _clip(cls):
    return _seeded(lambda: cls(CLIPTextConfig(**CLIP)), 2)


def _te_lora(cls, seed=3):
    model = _clip(cls)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS,
                                       init_lora_weights="gaussian"), model)
    _randomise_lora_b(model, seed)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    # transformers 5 flattened CLIPTextModel (no .text_model): PEFT names then lack "text_model.", which ComfyUI
    # and Forge need (text_encoder.text_model.encoder.layers.N...). diffusers accepts both.
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def _with_alpha(sd, prefix, alpha=ALPHA, dtype=torch.float32):
    out = {}
    for k, v in sd.items():
        out[prefix + k] = v.clone()
        if k.endswith(".lora_A.weight"):
            out[prefix + k[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def _modules(sd):
    return sorted(k[:-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))


def _expected_deltas(sd, scale=SCALE):
    return {m: scale * sd[m + ".lora_B.weight"] @ sd[m + ".lora_A.weight"] for m in _modules(sd)}


def _loaded_deltas(model):
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    out[name] = module.get_delta_weight(adapter).detach()
    return out


def _assert_deltas(model, expected, strip=""):
    got = {k.removeprefix(strip): v for k, v in _loaded_deltas(model).items()}
    assert sorted(got) == sorted(expected)
    for m, d in expected.items():
        torch.testing.assert_close(got[m], d, rtol=1e-5, atol=1e-6, msg=m)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def block_lora():
    """{family: PEFT state dict of a LoRA on every Linear of every block}."""
    return {f: _transformer_lora(f, _block_linears(_seeded(lambda f=f: TRANSFORMERS[f](**CONFIGS[f]), 0)))
            for f in rules.FAMILIES}


@pytest.fixture(scope="module")
def df_lora():
    """{family: PEFT state dict of a LoRA on the diffusers dreambooth default targets (attention + ff)}."""
    return {f: _transformer_lora(f, DF_TARGETS) for f in rules.FAMILIES}


def _pipe(family):
    transformer = _seeded(lambda: TRANSFORMERS[family](**CONFIGS[family]), 0)
    if family == "flux":
        return FluxPipeline(scheduler=None, vae=None, text_encoder=_clip(CLIPTextModel), tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return StableDiffusion3Pipeline(scheduler=None, vae=None, text_encoder=_clip(CLIPTextModelWithProjection),
                                    tokenizer=None, text_encoder_2=_clip(CLIPTextModelWithProjection),
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer)


def _save(tmp_path, tensors, name="lora.safetensors", metadata=None):
    path = os.path.join(tmp_path, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


# --------------------------------------------------------------------------- (i) ComfyUI consumes transformer.*

@pytest.mark.parametrize("family", rules.FAMILIES)
def test_rules_cover_every_diffusers_weight(family):
    assert rules.unmapped_diffusers_keys(family, CONFIGS[family]) == []


@pytest.mark.parametrize("family", rules.FAMILIES)
def test_transformer_prefixed_block_lora_is_fully_consumed(family, block_lora):
    sd = block_lora[family]
    assert len(_modules(sd)) == len(_block_linears(TRANSFORMERS[family](**CONFIGS[family])))
    for tensors in (_with_alpha(sd, "transformer."), {"transformer." + k: v for k, v in sd.items()}):
        assert rules.unloaded_keys(tensors, family, CONFIGS[family]) == []
        assert rules.missing_targets(tensors, family, CONFIGS[family]) == []
    patches = rules.comfy_patches(_with_alpha(sd, "transformer."), family, CONFIGS[family])
    assert sorted(patches) == ["transformer." + m for m in _modules(sd)]


@pytest.mark.parametrize("family", rules.FAMILIES)
def test_every_linear_including_embedders_is_consumed(family):
    model = TRANSFORMERS[family](**CONFIGS[family])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    keys = [f"transformer.{n}.{t}" for n in names for t in ("lora_A.weight", "lora_B.weight", "alpha")]
    assert rules.unloaded_keys(keys, family, CONFIGS[family]) == []
    patches = rules.comfy_patches(keys, family, CONFIGS[family])
    key, offset, fn = rules.split_target(patches["transformer.norm_out.linear"])
    assert key == "diffusion_model.final_layer.adaLN_modulation.1.weight" and offset is None
    assert fn is rules.swap_scale_shift
    if family == "sd3":  # the last block's context_pre_only modulation is swapped too
        last = CONFIGS["sd3"]["num_layers"] - 1
        assert rules.split_target(patches[f"transformer.transformer_blocks.{last}.norm1_context.linear"])[2] \
            is rules.swap_scale_shift


@pytest.mark.parametrize("family", rules.FAMILIES)
def test_fused_qkv_offsets(family, block_lora):
    """q/k/v (and Flux single-block proj_mlp) patch slices of the fused weight: they must tile it exactly, each slice
    as long as the diffusers module's output, in q, k, v(, mlp) order."""
    cfg, h = CONFIGS[family], rules.inner_dim(CONFIGS[family])
    sd = _with_alpha(block_lora[family], "transformer.")
    patches = rules.comfy_patches(sd, family, cfg)
    fused = {}
    for prefix, target in patches.items():
        key, offset, _ = rules.split_target(target)
        out_features = sd[prefix + ".lora_B.weight"].shape[0]
        if offset is None:
            continue
        dim, start, length = offset
        assert dim == 0 and length == out_features, (prefix, offset, out_features)
        fused.setdefault(key, []).append((start, length, prefix.rsplit(".", 1)[1]))
    assert fused
    for key, parts in fused.items():
        parts.sort()
        assert [p[0] for p in parts] == [sum(q[1] for q in parts[:i]) for i in range(len(parts))], key
        names = [p[2] for p in parts]
        assert names in (["to_q", "to_k", "to_v"], ["add_q_proj", "add_k_proj", "add_v_proj"],
                         ["to_q", "to_k", "to_v", "proj_mlp"]), (key, names)
    p = "transformer.transformer_blocks.0.attn."
    if family == "flux":
        q = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
        assert patches[p + "to_k"] == (q, (0, h, h)) and patches[p + "to_v"] == (q, (0, 2 * h, h))
        assert patches[p + "add_q_proj"] == ("diffusion_model.double_blocks.0.txt_attn.qkv.weight", (0, 0, h))
        assert patches["transformer.single_transformer_blocks.1.proj_mlp"] == \
            ("diffusion_model.single_blocks.1.linear1.weight", (0, 3 * h, 4 * h))
        assert patches["transformer.single_transformer_blocks.1.proj_out"] == \
            "diffusion_model.single_blocks.1.linear2.weight"
    else:
        q = "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
        assert patches[p + "to_k"] == (q, (0, h, h)) and patches[p + "to_v"] == (q, (0, 2 * h, h))
        assert patches[p + "add_v_proj"] == ("diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
                                             (0, 2 * h, h))
        assert patches["transformer.transformer_blocks.0.attn2.to_k"] == \
            ("diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight", (0, h, h))


def test_derived_configs_equal_comfyui_detection_for_real_models():
    """For the real checkpoints ComfyUI's own unet_config (3072 hardcoded; depth = hidden // 64) gives the same map
    as the config-derived one; for a 32-wide tiny SD3 it would map no block at all (depth 0)."""
    real_flux = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24)
    assert rules.comfy_unet_config("flux", real_flux) == rules.comfy_unet_config("flux", real_flux, literal=True)
    for layers in (24, 38):  # SD3(.5) medium, SD3.5 large: heads == layers, head_dim 64
        real_sd3 = dict(num_layers=layers, attention_head_dim=64, num_attention_heads=layers)
        assert rules.mmdit_to_diffusers(rules.comfy_unet_config("sd3", real_sd3)) == \
            rules.mmdit_to_diffusers(rules.comfy_unet_config("sd3", real_sd3, literal=True))
    keys = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert rules.unloaded_keys(keys, "sd3", SD3) == []
    assert rules.unloaded_keys(keys, "sd3", SD3, literal=True) == keys


@pytest.mark.parametrize("family", rules.FAMILIES)
def test_text_encoder_keys_consumed_with_clip_only(family, df_lora):
    te = _te_lora(CLIPTextModelWithProjection)
    tensors = _with_alpha(df_lora[family], "transformer.")
    tensors.update(_with_alpha(te, "text_encoder."))
    if family == "sd3":
        tensors.update(_with_alpha(te, "text_encoder_2."))
    te_keys = sorted(k for k in tensors if k.startswith("text_encoder"))
    assert rules.unloaded_keys(tensors, family, CONFIGS[family], CLIP_CONFIGS[family]) == []
    assert rules.missing_targets(tensors, family, CONFIGS[family], CLIP_CONFIGS[family]) == []
    # LoraLoaderModelOnly (no CLIP): the text-encoder keys are reported
    assert rules.unloaded_keys(tensors, family, CONFIGS[family]) == te_keys
    patches = rules.comfy_patches(tensors, family, CONFIGS[family], CLIP_CONFIGS[family])
    assert patches["text_encoder.text_model.encoder.layers.1.self_attn.q_proj"] == \
        "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    if family == "sd3":
        assert patches["text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"] == \
            "clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight"


def test_kohya_bfl_and_t5_names():
    keys = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1",
            "diffusion_model.double_blocks.1.txt_mlp.0",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
            "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0"]
    tensors = [f"{k}.{t}" for k in keys for t in ("lora_down.weight", "lora_up.weight", "alpha")]
    assert rules.unloaded_keys(tensors, "flux", FLUX, CLIP_CONFIGS["flux"]) == []
    sd3 = ["lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
           "lora_te3_encoder_block_0_layer_0_SelfAttention_o"]
    tensors = [f"{k}.{t}" for k in sd3 for t in ("lora_down.weight", "lora_up.weight")]
    assert rules.unloaded_keys(tensors, "sd3", SD3, CLIP_CONFIGS["sd3"]) == []
    # Flux has no clip_g: lora_te2_ is the T5 there (OneTrainer), never CLIP
    assert rules.unloaded_keys(["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"],
                               "flux", FLUX, CLIP_CONFIGS["flux"])


# --------------------------------------------------------------------------- (ii) negative controls

@pytest.mark.parametrize("family", rules.FAMILIES)
def test_unprefixed_and_wrongly_prefixed_keys_are_not_consumed(family, block_lora):
    sd = _with_alpha(block_lora[family], "")
    cfg = CONFIGS[family]
    assert rules.unloaded_keys(sd, family, cfg) == sorted(sd)  # raw get_peft_model_state_dict
    dm = {"diffusion_model." + k: v for k, v in sd.items()}  # diffusers names behind the BFL/SAI prefix
    assert rules.unloaded_keys(dm, family, cfg) == sorted(dm)
    peft_raw = {"base_model.model." + k: v for k, v in sd.items()}  # PEFT save_pretrained
    nested = {"transformer.base_model.model." + k: v for k, v in sd.items()}  # ComfyUI #4347
    assert rules.unloaded_keys(nested, family, cfg) == sorted(nested)
    if family == "flux":
        assert rules.unloaded_keys(peft_raw, family, cfg) == sorted(peft_raw)
    else:  # comfy/lora.py maps base_model.model. for SD3 ("flash-sd3 lora and others?")
        assert rules.unloaded_keys(peft_raw, family, cfg) == []
    # tensor suffixes LoRAAdapter does not know: not consumed; an up without its down makes ComfyUI raise
    odd = {k.replace(".lora_A.weight", ".down").replace(".lora_B.weight", ".up"): v
           for k, v in _with_alpha(block_lora[family], "transformer.").items()}
    assert [k for k in rules.unloaded_keys(odd, family, cfg) if not k.endswith(".alpha")] == \
        sorted(k for k in odd if not k.endswith(".alpha"))
    no_down = {k: v for k, v in _with_alpha(block_lora[family], "transformer.").items() if ".lora_A." not in k}
    with pytest.raises(KeyError, match="lora_A"):
        rules.unloaded_keys(no_down, family, cfg)


def test_text_encoder_keys_without_text_model_are_not_consumed():
    """diffusers + transformers 5 save Flux CLIP-L LoRAs as text_encoder.encoder.layers.N... (CLIPTextModel has no
    text_model level any more): ComfyUI maps only text_encoder.text_model.encoder.layers.N..."""
    keys = [f"text_encoder.encoder.layers.0.self_attn.q_proj.{t}" for t in ("lora_A.weight", "lora_B.weight")]
    assert rules.unloaded_keys(keys, "flux", FLUX, CLIP_CONFIGS["flux"]) == keys
    assert rules.forge_unmatched_keys(keys, "flux", FLUX, CLIP_CONFIGS["flux"]) == keys


# --------------------------------------------------------------------------- Forge

@pytest.mark.parametrize("family", rules.FAMILIES)
def test_forge_layouts(family, df_lora):
    cfg = CONFIGS[family]
    te = _with_alpha(_te_lora(CLIPTextModelWithProjection), "text_encoder.")
    diffusers_file = {**_with_alpha(df_lora[family], "transformer."), **te}
    kohya = {}
    for prefix, target in rules.comfy_patches(diffusers_file, family, cfg).items():
        if prefix.startswith("transformer."):
            name = rules.split_target(target)[0][len("diffusion_model."):-len(".weight")]
            for t in ("lora_down.weight", "lora_up.weight", "alpha"):
                kohya[f"lora_unet_{name.replace('.', '_')}.{t}"] = torch.zeros(1)
    assert kohya
    clips = CLIP_CONFIGS[family]
    assert rules.unloaded_keys(kohya, family, cfg, clips) == []
    assert rules.forge_unmatched_keys(kohya, family, cfg, clips) == []
    if family == "flux":  # Forge maps transformer.* for FLUX.1 (huggingface_repo contains "flux")
        assert rules.forge_unmatched_keys(diffusers_file, family, cfg, clips) == []
    else:  # ... but its SD3 transformer.* block is commented out: every transformer key is unmatched
        unmatched = rules.forge_unmatched_keys(diffusers_file, family, cfg, clips)
        assert unmatched == sorted(k for k in diffusers_file if k.startswith("transformer."))
        assert len(unmatched) > rules.FORGE_UNMATCHED_LIMIT  # -> Forge skips the whole file
    mochi = ["transformer.transformer_blocks.0.attn.to_q.lora_A", "transformer.transformer_blocks.0.attn.to_q.lora_B"]
    assert rules.unloaded_keys(mochi, family, cfg) == []
    if family == "flux":
        assert rules.forge_unmatched_keys(mochi, family, cfg) == mochi


# --------------------------------------------------------------------------- (iii) what diffusers 0.42 loads

def test_diffusers_flux_applies_alpha_tensors_for_transformer_and_clip(tmp_path, df_lora):
    """FluxLoraLoaderMixin.lora_state_dict pops every '*alpha*' float tensor into network_alphas;
    load_lora_into_transformer -> load_lora_adapter -> get_peft_kwargs turns them into lora_alpha. The CLIP-L keys
    with text_encoder.text_model. load through load_lora_into_text_encoder with the same alphas. ComfyUI consumes
    the whole file."""
    te = _te_lora(CLIPTextModel)
    tensors = {**_with_alpha(df_lora["flux"], "transformer."), **_with_alpha(te, "text_encoder.")}
    pipe = _pipe("flux")
    pipe.load_lora_weights(_save(tmp_path, tensors))
    _assert_deltas(pipe.transformer, _expected_deltas(df_lora["flux"]))
    te_expected = {k.removeprefix("text_model."): v for k, v in _expected_deltas(te).items()}
    _assert_deltas(pipe.text_encoder, te_expected, strip="text_model.")
    assert rules.unloaded_keys(tensors, "flux", FLUX, CLIP_CONFIGS["flux"]) == []
    assert rules.forge_unmatched_keys(tensors, "flux", FLUX, CLIP_CONFIGS["flux"]) == []


def test_diffusers_flux_alpha_edge_cases(tmp_path, df_lora):
    sd = df_lora["flux"]
    pipe = _pipe("flux")  # no alpha tensors, no metadata: scale 1 (alpha taken = rank)
    pipe.load_lora_weights(_save(tmp_path, {"transformer." + k: v for k, v in sd.items()}, "a.safetensors"))
    _assert_deltas(pipe.transformer, _expected_deltas(sd, 1.0))
    with pytest.raises(ValueError, match="alpha key"):  # integer alpha tensors are rejected
        _pipe("flux").load_lora_weights(_save(tmp_path, _with_alpha(sd, "transformer.", dtype=torch.int64), "b.st"))
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": DF_TARGETS})}
    with pytest.raises(ValueError, match="network_alphas.*metadata"):  # alpha tensors + adapter metadata
        _pipe("flux").load_lora_weights(_save(tmp_path, _with_alpha(sd, "transformer."), "c.st", metadata=meta))
    pipe = _pipe("flux")  # kohya CLIP names with lora_A/lora_B (no lora_down anywhere): silently not loaded
    te = {"lora_te1_" + k.removeprefix("text_model.").rsplit(".lora_", 1)[0].replace(".", "_") + ".lora_"
          + k.rsplit(".lora_", 1)[1]: v for k, v in _te_lora(CLIPTextModel).items()}
    pipe.load_lora_weights(_save(tmp_path, {**{"transformer." + k: v for k, v in sd.items()}, **te}, "d.st"))
    assert _loaded_deltas(pipe.text_encoder) == {}
    pipe = _pipe("flux")  # unprefixed PEFT keys: nothing loads, no error
    pipe.load_lora_weights(_save(tmp_path, dict(sd), "e.st"))
    assert _loaded_deltas(pipe.transformer) == {}


def test_diffusers_sd3_rejects_alpha_tensors(tmp_path, df_lora):
    """SD3LoraLoaderMixin.load_lora_weights requires 'lora' in every key: a '.alpha' key raises."""
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        _pipe("sd3").load_lora_weights(_save(tmp_path, _with_alpha(df_lora["sd3"], "transformer.")))


def test_diffusers_sd3_alpha_from_adapter_metadata_only(tmp_path, df_lora):
    """SD3 takes alpha only from the header's lora_adapter_metadata (save_lora_weights(...,
    transformer_lora_adapter_metadata=..., text_encoder[_2]_lora_adapter_metadata=...)); ComfyUI ignores that header
    and would apply scale 1.0."""
    sd, te = df_lora["sd3"], _te_lora(CLIPTextModelWithProjection)

    def meta(targets):
        d = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets).to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}

    out = tmp_path / "meta"
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=sd, text_encoder_lora_layers=te,
        text_encoder_2_lora_layers={k: v.clone() for k, v in te.items()},
        transformer_lora_adapter_metadata=meta(DF_TARGETS), text_encoder_lora_adapter_metadata=meta(TE_TARGETS),
        text_encoder_2_lora_adapter_metadata=meta(TE_TARGETS))
    pipe = _pipe("sd3")
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    _assert_deltas(pipe.transformer, _expected_deltas(sd))
    _assert_deltas(pipe.text_encoder, _expected_deltas(te))
    _assert_deltas(pipe.text_encoder_2, _expected_deltas(te))
    pipe = _pipe("sd3")  # same tensors, no metadata: scale 1.0
    pipe.load_lora_weights(_save(tmp_path, {"transformer." + k: v for k, v in sd.items()}))
    _assert_deltas(pipe.transformer, _expected_deltas(sd, 1.0))


@pytest.mark.parametrize("family", rules.FAMILIES)
def test_baked_scale_is_right_everywhere(tmp_path, family, df_lora):
    """lora_B pre-multiplied by alpha/rank, no .alpha tensors, no adapter metadata: diffusers (alpha defaults to
    rank), ComfyUI (no alpha -> 1.0) and Forge (same) all apply alpha/rank * B @ A."""
    sd = df_lora[family]
    te = _te_lora(CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)

    def bake(d, p):
        return {p + k: (v * SCALE if ".lora_B." in k else v) for k, v in d.items()}

    tensors = {**bake(sd, "transformer."), **bake(te, "text_encoder.")}
    pipe = _pipe(family)
    pipe.load_lora_weights(_save(tmp_path, tensors))
    _assert_deltas(pipe.transformer, _expected_deltas(sd))
    te_expected = {k.removeprefix("text_model."): v for k, v in _expected_deltas(te).items()}
    _assert_deltas(pipe.text_encoder, te_expected, strip="text_model.")
    assert rules.unloaded_keys(tensors, family, CONFIGS[family], CLIP_CONFIGS[family]) == []
