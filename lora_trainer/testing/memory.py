"""What autograd keeps for a LoRA step over a quantised base, measured through the trainer's own path: the memory
plan's ``weight_copies`` part is checked against it (tests/test_memory_plan.py on the CPU, bench/device_check.py on
a card).

fp8 (layerwise casting) and int8 (torchao's weight-only linear) hand each matmul a compute-precision tensor made from
the stored weight; when the layer's input needs a gradient autograd keeps that tensor until the backward. NF4
(bitsandbytes' MatMul4Bit) keeps its packed weight. ``autograd_held`` counts every tensor saved for the backward
that is not one of the module's own stored weights, in total and per gradient-checkpointing unit, so the difference
to a plain bf16 base is what a format adds (without checkpointing: the total; with it: the largest unit, which is
what one block's recompute keeps).
"""
from __future__ import annotations

from pathlib import Path

import torch


def autograd_held(module: torch.nn.Module, units: tuple[str, ...], inputs: dict,
                  device_type: str = "cpu") -> tuple[int, dict[str, int]]:
    """Bytes of the tensors autograd keeps from one forward of ``module(**inputs)`` under bf16 autocast, other than
    the module's own stored weights (plain, fp8, torchao or bitsandbytes tensors): (total, {unit: bytes}), a unit
    being an item of one of the ``units`` ModuleLists ("" for the rest). Runs the backward too, so the step is a
    whole one."""
    from torch.autograd.graph import saved_tensors_hooks

    stored = []
    for p in [*module.parameters(), *module.buffers()]:
        parts = [getattr(p, n) for n in p.__tensor_flatten__()[0]] if hasattr(p, "__tensor_flatten__") else [p]
        stored += [t.untyped_storage() for t in parts if isinstance(t, torch.Tensor)]
    own = {s.data_ptr() for s in stored}  # ``stored`` keeps them alive: no later tensor reuses their addresses
    current, by_unit, seen = [""], {}, set()
    hooks = []
    for name, sub in module.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent in units:
            hooks.append(sub.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
            hooks.append(sub.register_forward_hook(lambda m, a, o: current.__setitem__(0, "")))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            by_unit[current[0]] = by_unit.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    try:
        with torch.autocast(device_type, dtype=torch.bfloat16), saved_tensors_hooks(pack, lambda t: t):
            out = module(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
    return sum(by_unit.values()), by_unit


def flux_held(folder: Path, fmt: str, device: str = "cpu") -> tuple[int, dict[str, int]]:
    """``autograd_held`` for a FLUX.1 transformer folder stored as ``fmt`` (none / fp8 / int8 / nf4) the way the
    trainer does it (quantize_module, add_lora with the default targets, cast_fp8), r4, on ``device``."""
    from diffusers import FluxTransformer2DModel

    from ..adapters.lora import add_lora
    from ..families import SPECS
    from ..runtime import quantize

    spec = SPECS["flux1"]
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    if fmt in ("int8", "nf4"):
        quantize.quantize_module(model, fmt)
    add_lora(model, rank=4, alpha=4, dropout=0.0, targets=spec.targets("auto"), use_dora=False, path="target_modules")
    if fmt == "fp8":
        quantize.cast_fp8(model)
    model.to(device)
    c = model.config
    g = torch.Generator().manual_seed(0)
    image, text = 36, 10  # token counts unlike any weight dimension of the tiny model
    inputs = dict(hidden_states=torch.randn(1, image, c.in_channels, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g).bfloat16(),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).bfloat16(),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3),
                  guidance=torch.tensor([1.0]) if c.guidance_embeds else None)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return autograd_held(model, spec.activations.checkpoint_units, inputs, torch.device(device).type)


def copies_against_plan(folder: Path, device: str = "cpu", formats=("fp8", "int8", "nf4")) -> list[dict]:
    """For each format: what it adds over a bf16 base (without checkpointing: in total; with it: the largest block)
    beside the memory plan's weight_copies for the same transformer headers."""
    from ..families import SPECS
    from ..preflight.memory_plan import _weight_copies
    from ..preflight.probe import weight_shapes

    spec = SPECS["flux1"]
    shapes = weight_shapes(folder, [p.name for p in Path(folder).glob("*.safetensors")])
    held = {fmt: flux_held(folder, fmt, device) for fmt in ("none", *formats)}
    rows = []
    for fmt in formats:
        units = [u for u in held["none"][1] if u]
        for checkpointing in (False, True):
            measured = (max(held[fmt][1].get(u, 0) - held["none"][1].get(u, 0) for u in units) if checkpointing
                        else held[fmt][0] - held["none"][0])
            plan = {f: _weight_copies(shapes, f, 2, keep=None, conditioning=spec.activations.conditioning_inputs,
                                      units=spec.activations.checkpoint_units if checkpointing else None)
                    for f in (fmt, "fp8")}
            rows.append({"format": fmt, "checkpointing": checkpointing, "measured": measured, "planned": plan[fmt],
                         "fp8_planned": plan["fp8"]})
    return rows
