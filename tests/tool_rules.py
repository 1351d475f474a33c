"""For each registered family: do ComfyUI, Forge and A1111 load the final LoRA file of a run onto the modules it was
trained on? Dispatches to the re-implemented loaders (tests/loader_rules.py for the kohya SD layout,
tests/comfy_dit_rules.py for the transformer families). A family added to the registry needs its entry here (the
contract suite fails until it has one): how the UIs map its keys is the one thing the trainer cannot tell itself.
"""
from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path

from safetensors.torch import load_file


def _unet_rules(family: str) -> Callable:
    def check(pipe, lora: Path, checkpoint: Path) -> None:
        """``pipe`` has the run's PEFT file loaded (its modules wrapped, base weights kept as base_layer)."""
        from loader_rules import (a1111_layer_mapping, a1111_lookup, assert_landed_on_trained, check_comfy_unet,
                                  comfy_clip_key_map, comfy_not_loaded)

        sd = load_file(lora)
        states = {p.stem.removeprefix("lora_"): load_file(p) for p in checkpoint.glob("lora_*.safetensors")}
        check_comfy_unet(pipe.unet, sd, states["unet"])
        tes = {c: getattr(pipe, c) for c in states if c != "unet"}
        te_sd = {k: v for k, v in sd.items() if not k.startswith("lora_unet_")}
        if tes:
            key_map = comfy_clip_key_map(family, tes)
            assert te_sd and comfy_not_loaded(te_sd, key_map) == []
            for name in {k.split(".", 1)[0] for k in te_sd}:
                component, path = key_map[name]
                assert_landed_on_trained(te_sd, name, states[component], path)
        mapping = a1111_layer_mapping(family, pipe.unet, tes)
        unmatched = [n for n in {k.split(".", 1)[0] for k in sd} if a1111_lookup(n, mapping, family == "sd2") is None]
        assert unmatched == [], f"A1111 finds no module for {unmatched[:5]}"

    return check


def _dit_rules(comfy_family: str, clip_slots: tuple[str, ...]) -> Callable:
    def check(pipe, lora: Path, checkpoint: Path) -> None:
        from comfy_dit_rules import forge_unmatched_keys, missing_targets, unloaded_keys

        keys = list(load_file(lora))
        encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(pipe, n)]
        clips = {slot: te.config for slot, te in zip(clip_slots, encoders)}
        cfg = dict(pipe.transformer.config)
        assert unloaded_keys(keys, comfy_family, cfg, clips) == [], "ComfyUI leaves keys unloaded"
        assert missing_targets(keys, comfy_family, cfg, clips) == [], "ComfyUI maps keys onto missing weights"
        assert forge_unmatched_keys(keys, comfy_family, cfg, clips) == [], "Forge matches no module for some keys"
        renamed = [k.replace("transformer.", "diffusion_model.", 1).replace("lora_unet_", "lora_dit_", 1) for k in keys]
        assert unloaded_keys(renamed, comfy_family, cfg, clips), "negative control: renamed keys must not load"

    return check


def _zimage_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 has no Z-Image; later ComfyUI loads it as Lumina 2's NextDiT with the original names (fused
    attention.qkv, attention.out). The file is ai-toolkit's layout, diffusers names under ``diffusion_model.`` with
    ``.alpha``: each key must name a trained module of the transformer, carry its alpha, and have an original-layout
    target (q/k/v -> a third of attention.qkv, to_out.0 -> attention.out) that such a loader can patch."""
    from lora_trainer.families.zimage.convert import from_diffusers

    sd = load_file(lora)
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in sd}
    assert all(k.startswith("diffusion_model.") for k in sd), "keys outside diffusion_model."
    assert modules == trained, sorted(modules ^ trained)[:5]
    assert all(f"diffusion_model.{m}.alpha" in sd for m in modules), "a module without .alpha"
    base = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    base = {k.replace(".base_layer.", "."): v for k, v in base.items()}
    native = from_diffusers(base, dict(pipe.transformer.config))
    for m in modules:
        orig = m.replace("attention.to_out.0", "attention.out")
        for p in ("to_q", "to_k", "to_v"):
            orig = orig.replace(f"attention.{p}", "attention.qkv")
        assert f"{orig}.weight" in native, f"{m}: no {orig}.weight in the original layout"


def _qwen_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI (the only UI with a Qwen-Image model; Forge and A1111 have none) loads every key, with its alpha,
    onto exactly the modules the run trained."""
    from comfy_qwen_rules import comfy_load, missing_targets, patched_modules

    sd = load_file(lora)
    keys = list(sd)
    cfg = dict(pipe.transformer.config)
    _, unloaded = comfy_load(keys, cfg)
    assert unloaded == [], f"ComfyUI leaves keys unloaded: {unloaded[:5]}"
    assert missing_targets(keys, cfg) == [], "ComfyUI maps keys onto missing weights"
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    assert patched_modules(keys, cfg) == trained, "ComfyUI patches other modules than the trained ones"
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert len(alphas) == len(trained), "every module needs its .alpha (ComfyUI ignores metadata)"
    renamed = [k.replace("diffusion_model.", "diffusion_model.model.", 1) for k in keys]
    assert comfy_load(renamed, cfg)[1], "negative control: renamed keys must not load"


def _qwen21_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """No UI's Qwen-Image 2.1 loader was in the code we read: the file is Qwen-Image's layout (diffusion_model. +
    diffusers names + .alpha), which diffusers' Qwen converter reads (DIFFUSERS_LOADS_TOOL_FILE). ComfyUI's generic
    map over 2.1's native names (tests/comfy_qwen21_rules.py, inferred) lands every attention key of the file on the
    trained modules; the shared modulation is never in it."""
    from comfy_qwen21_rules import comfy_load, patched_modules

    sd = load_file(lora)
    keys = list(sd)
    cfg = dict(pipe.transformer.config)
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    assert all(".img_mlp." not in m for m in trained), "the contract trains the attention preset"
    _, unloaded = comfy_load(keys, cfg)
    assert unloaded == [], f"ComfyUI's generic map leaves keys unloaded: {unloaded[:5]}"
    assert patched_modules(keys, cfg) == trained, "ComfyUI patches other modules than the trained ones"
    assert len([k for k in keys if k.endswith(".alpha")]) == len(trained), "every module needs its .alpha"
    assert not any(k.startswith("diffusion_model.modulation.") for k in keys)


def _chroma_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 loads Chroma as a FLUX model (model_base.Chroma subclasses model_base.Flux): its diffusers
    map takes ``transformer.<diffusers name>`` keys, q/k/v and proj_mlp as offsets into the fused BFL tensors, over
    Chroma's own (pruned) weights. Every key must load onto a weight Chroma has, and onto exactly the trained
    modules. Forge's and A1111's Chroma loaders were not in the code we read: not checked."""
    from comfy_dit_rules import comfy_patches, missing_targets, unloaded_keys

    keys = list(load_file(lora))
    cfg = dict(pipe.transformer.config)
    assert unloaded_keys(keys, "chroma", cfg) == [], "ComfyUI leaves keys unloaded"
    assert missing_targets(keys, "chroma", cfg) == [], "ComfyUI maps keys onto weights Chroma does not have"
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    named = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    assert named == trained, sorted(named ^ trained)[:5]
    assert comfy_patches(keys, "chroma", cfg), "ComfyUI patches nothing"
    renamed = [k.replace("transformer.", "diffusion_model.", 1) for k in keys]
    assert unloaded_keys(renamed, "chroma", cfg), "negative control: diffusion_model. + diffusers names must not load"


def _anima_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 has Cosmos-Predict2 (comfy/ldm/cosmos/predict2.py, the original MiniTrainDIT names) but not
    Anima's llm_adapter; a loader that maps ``diffusion_model.<name>`` onto ``<name>.weight`` of that model (what
    ComfyUI's model_lora_keys_unet does for every weight of a diffusion model) must find every key's module in the
    original layout. The file has no ``.alpha`` (diffusers' Anima loader refuses keys without "lora"; alpha / rank is
    folded into lora_B), so such a loader's scale is 1 and diffusers' converter reads it to the trained deltas (the
    contract test loads it, DIFFUSERS_LOADS_TOOL_FILE)."""
    from lora_trainer.families.anima.convert import from_diffusers

    sd = load_file(lora)
    assert all(k.startswith("diffusion_model.") for k in sd), "keys outside diffusion_model."
    assert not any(k.endswith(".alpha") for k in sd), "diffusers' Anima loader refuses .alpha keys"
    base = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    native = from_diffusers(base, dict(pipe.transformer.config))
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in sd}
    missing = sorted(m for m in modules if f"{m}.weight" not in native)
    assert missing == [], f"no original-layout weight for {missing[:5]}"
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    assert len(modules) == len(trained), "one tool-file module per trained module"
    renamed = {m.replace("self_attn", "attn1") for m in modules}
    assert any(f"{m}.weight" not in native for m in renamed), "negative control: diffusers names must not load"


def _krea2_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 has no Krea 2; peers write ``diffusion_model.`` + the original names (ai-toolkit, musubi's
    convert_lora.py) with alpha folded in. A loader that keeps Krea's own names (re-implemented here) patches
    ``<native>.weight`` of the original layout with lora_B @ lora_A at scale 1 (no ``.alpha``): every key must name
    an original-layout Linear, carry no alpha, and give exactly the trained delta of the module it came from."""
    import torch

    from lora_trainer.families.krea2.convert import from_diffusers, native_name

    sd = load_file(lora)
    peft = load_file(checkpoint / "lora_transformer.safetensors")
    trained = {k[: -len(".lora_A.weight")] for k in peft if k.endswith(".lora_A.weight")}
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd), \
        "keys outside diffusion_model.<native>.lora_A/B (an .alpha would make diffusers' Krea 2 converter raise)"
    base = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    native = from_diffusers(base, dict(pipe.transformer.config))
    by_native = {native_name(m): m for m in trained}
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in sd}
    assert modules == set(by_native), sorted(modules ^ set(by_native))[:5]
    scale = float(json.loads(_meta(lora))["ss_network_alpha"]) / next(
        v.shape[0] for k, v in peft.items() if k.endswith("lora_A.weight"))
    for m in modules:
        assert f"{m}.weight" in native, f"{m}: no {m}.weight in the original layout"
        got = sd[f"diffusion_model.{m}.lora_B.weight"].float() @ sd[f"diffusion_model.{m}.lora_A.weight"].float()
        p = by_native[m]
        want = scale * peft[f"{p}.lora_B.weight"].float() @ peft[f"{p}.lora_A.weight"].float()
        assert got.shape == native[f"{m}.weight"].shape
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4, msg=m)
    renamed = {k.replace("diffusion_model.", "diffusion_model.model.", 1) for k in sd}
    assert not {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] + ".weight" for k in renamed} <= set(native), \
        "negative control: renamed keys must not land"


def _meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.dumps(f.metadata())


def _ideogram4_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 has no Ideogram model, and its later loader was not in the code we read. The file is the
    peers' layout (ai-toolkit, SimpleTuner): ``diffusion_model.`` + the original names (fused attention.qkv,
    attention.o) with ``.alpha``. A loader that patches ``diffusion_model.<module>.weight`` must find each module in
    the original layout with the LoRA's shape, every module carries its alpha, and the modules cover exactly the
    trained ones (q/k/v through their fused qkv)."""
    from lora_trainer.families.ideogram4.convert import from_diffusers
    from lora_trainer.families.ideogram4.export import native_target

    sd = load_file(lora)
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    assert all(k.startswith("diffusion_model.") for k in sd), "keys outside diffusion_model."
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in sd}
    assert modules == {native_target(m)[0] for m in trained}, sorted(modules)[:5]
    assert all(f"diffusion_model.{m}.alpha" in sd for m in modules), "a module without .alpha"
    base = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    native = from_diffusers(base, dict(pipe.transformer.config))
    for m in modules:
        weight = native.get(f"{m}.weight")
        assert weight is not None, f"{m}: no {m}.weight in the original layout"
        a, b = sd[f"diffusion_model.{m}.lora_A.weight"], sd[f"diffusion_model.{m}.lora_B.weight"]
        assert (b.shape[0], a.shape[1]) == tuple(weight.shape), f"{m}: LoRA {b.shape[0]}x{a.shape[1]} on {tuple(weight.shape)}"


def _wan_rules(pipe, lora: Path, checkpoint: Path) -> None:
    """ComfyUI a125cd84 maps nothing but its generic ``diffusion_model.<module>`` names for Wan (reference 5.3:
    diffusers names load 0 of 40): every module of the file must be a Linear of the original layout, found by running
    its name through diffusers' single-file converter (convert_wan_transformer_to_diffusers, original -> diffusers),
    which must land on exactly the trained modules with the LoRA's shape; every module carries its .alpha.
    ComfyUI's own Wan loader postdates the code we read (WAN21 there has no extra map): not run."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = load_file(lora)
    trained = {k[: -len(".lora_A.weight")] for k in load_file(checkpoint / "lora_transformer.safetensors")
               if k.endswith(".lora_A.weight")}
    assert all(k.startswith("diffusion_model.") for k in sd), "keys outside diffusion_model."
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in sd}
    assert all(".attn1." not in m and ".to_q" not in m and ".net." not in m for m in modules), "diffusers names"
    as_diffusers = {m: next(iter(convert_wan_transformer_to_diffusers({f"{m}.weight": 0})))[: -len(".weight")]
                    for m in modules}
    assert set(as_diffusers.values()) == trained, sorted(set(as_diffusers.values()) ^ trained)[:5]
    assert all(f"diffusion_model.{m}.alpha" in sd for m in modules), "a module without .alpha"
    base = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    for m, d in as_diffusers.items():
        a, b = sd[f"diffusion_model.{m}.lora_A.weight"], sd[f"diffusion_model.{m}.lora_B.weight"]
        assert (b.shape[0], a.shape[1]) == tuple(base[f"{d}.weight"].shape), m


RULES: dict[str, Callable] = {
    "sd15": _unet_rules("sd15"), "sd2": _unet_rules("sd2"), "sdxl": _unet_rules("sdxl"),
    "flux1": _dit_rules("flux", ("clip_l", "t5xxl")), "sd3": _dit_rules("sd3", ("clip_l", "clip_g", "t5xxl")),
    # FLUX.2: ComfyUI's generic diffusion_model. / lora_unet_ maps over BFL's names (no text-encoder LoRA)
    "flux2": _dit_rules("flux2", ()), "flux2_klein": _dit_rules("flux2", ()),
    "zimage": _zimage_rules,
    "qwen_image": _qwen_rules,
    "qwen_image21": _qwen21_rules,
    "chroma": _chroma_rules,
    "anima": _anima_rules,
    "krea2": _krea2_rules,
    "ideogram4": _ideogram4_rules,
    "wan": _wan_rules,
}


# Families whose tool file diffusers' load_lora_weights also reads (kohya SD names, FLUX.1's diffusers names,
# FLUX.2's kohya BFL names through _convert_kohya_flux2_lora_to_diffusers, Z-Image's diffusion_model. + .alpha
# and Qwen-Image's (and 2.1's) diffusion_model. names through their converters; Chroma's transformer. names, as
# FLUX.1's, through FluxLoraLoaderMixin; Anima's Cosmos names, Krea 2's diffusion_model. + original names and Ideogram
# 4's fused original names through their converters); SD3's kohya/SAI file with fused q/k/v it does not: its users
# take the PEFT file.
DIFFUSERS_LOADS_TOOL_FILE = {"sd15", "sd2", "sdxl", "flux1", "flux2", "flux2_klein", "zimage", "qwen_image",
                             "qwen_image21", "chroma", "anima", "krea2", "ideogram4", "wan"}


def _sd3_last_block_text_queries(model: Path) -> set[str]:
    """SD3's last block is context_pre_only: the text stream's queries there feed no output, so no gradient."""
    import json

    n = json.loads((Path(model) / "transformer" / "config.json").read_text())["num_layers"]
    return {f"transformer_blocks.{n - 1}.attn.add_q_proj"}


def _qwen_last_block_text_stream(model: Path) -> set[str]:
    """Qwen-Image's output is the image stream's alone: the last block's text-stream outputs (its text queries'
    attention output and what follows) are computed and never read."""
    import json

    n = json.loads((Path(model) / "transformer" / "config.json").read_text())["num_layers"]
    return {f"transformer_blocks.{n - 1}.attn.add_q_proj", f"transformer_blocks.{n - 1}.attn.to_add_out"}


# Denoiser modules a family's LoRA cannot train (their output is never read), by the tiny model's folder.
NO_GRADIENT: dict[str, Callable[[Path], set[str]]] = {"sd3": _sd3_last_block_text_queries,
                                                      "qwen_image": _qwen_last_block_text_stream}
