"""In-process checks of the code paths that only a CUDA card executes, for bench/device_check.py (issue 21).

The CPU suite trains every one of these features, but in fp32 without autocast, on the CPU's kernels: what a card
runs instead is never executed there. Each check here is a few seconds on lora_trainer.testing.tiny's FLUX.1
transformer (4 blocks), through the trainer's own functions (quantize_module / cast_fp8, add_lora, shard_denoisers,
stream_blocks), with two optimizer steps against an unquantised / unsharded / unstreamed reference:

* ``quantized_autocast``: a bf16 base stored as fp8 (layerwise casting), int8 (torchao) and NF4 (bitsandbytes), on
  the card under bf16 autocast: finite outputs close to the bf16 base's, LoRA gradients in fp32 that train, the
  weights still stored small on the card after the steps.
* ``fsdp_bf16_lora``: FSDP2 (fully_shard) with a bf16 base and fp32 LoRA in one unit, under bf16 autocast, in one
  process over NCCL (two processes need two cards; one card runs the unit's all-gather / reduce-scatter, dtypes and
  autocast, with a world of one). On the CPU it runs the same over gloo.
* ``pinned_streaming``: offload_blocks' host copies in page-locked memory, prefetched into two slots on a side
  stream: the LoRA of the unstreamed run, less peak GPU memory than it, every load but the first prefetched.

Where a path cannot run on the CPU, ``--device cpu`` runs the check's code on the CPU in fp32 as a stand-in (so the
dry run catches a broken check) and reports the check "skipped: needs CUDA".
"""
from __future__ import annotations

import copy
import math
import socket
import time

import torch

STEPS = 2
NEEDS_CUDA = "needs CUDA"
# Relative error of the quantised base's first output against the unquantised base's (LoRA B is zero then, so that is
# the base alone). Measured on the CPU stand-in (fp32, the tiny transformer's random weights): fp8 0.0036, int8
# 0.0005, NF4 0.012; about ten times that is allowed (bf16 rounding adds ~0.004 on a card); a wrong scale, layout or
# dtype gives ~1.
QUANT_REL_TOL = {"fp8": 0.05, "int8": 0.02, "nf4": 0.1}


def _model(dtype: torch.dtype):
    """The tiny FLUX.1 transformer (fp32 weights from a fixed seed), at ``dtype``, on the CPU, and its spec."""
    from lora_trainer.families import SPECS
    from lora_trainer.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline("flux1-dev").transformer.to(dtype), SPECS["flux1"]


def _inputs(model, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = dict(hidden_states=torch.randn(2, 16, c.in_channels, generator=g),
             encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
             timestep=torch.tensor([0.5, 0.25]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
             guidance=torch.tensor([1.0, 1.0]))
    return {k: v.to(device) for k, v in x.items()}


def _add_lora(model, spec) -> None:
    from lora_trainer.adapters.lora import add_lora

    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=4, dropout=0.0, targets=spec.targets("all_linear"), use_dora=False,
             path="target_modules")


def _autocast(device: torch.device, bf16: bool):
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _train(model, device: torch.device, bf16: bool) -> tuple[list[float], torch.Tensor]:
    """STEPS AdamW steps on the LoRA (loss: the output's mean square); (losses, the first step's output)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, first = [], None
    for step in range(STEPS):
        with _autocast(device, bf16):
            out = model(**_inputs(model, device, step)).sample
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        first = out.detach().float() if first is None else first
    return losses, first


def _lora(model) -> dict[str, torch.Tensor]:
    from lora_trainer.distributed.shard import lora_state

    return {k: v.detach().float().cpu() for k, v in lora_state(model).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _compare_lora(c, got: dict, want: dict, label: str, tol: float) -> None:
    if not c.require(got.keys() == want.keys(), f"{label}: LoRA keys differ"):
        return
    worst = max(_rel(got[k], want[k]) for k in want)
    bitwise = all(torch.equal(got[k], want[k]) for k in want)
    trained = sum(1 for k in want if "lora_B" in k and want[k].abs().max() > 0)
    c.numbers.update({f"{label}_lora_bitwise": bitwise, f"{label}_lora_rel_diff": worst})
    c.require(trained, f"{label}: the reference LoRA did not train (every lora_B is zero)")
    c.require(worst <= tol, f"{label}: LoRA differs from the reference by {worst:.3g} (relative) > {tol}")


def _stand_in(ctx, c, what: str) -> bool:
    """On the CPU: say why the CUDA path is skipped; the check then runs its code on the CPU in fp32."""
    if ctx.cuda:
        return False
    c.details["skipped_because"] = f"{NEEDS_CUDA} ({what}); the CPU stand-in ran the check's code in fp32"
    return True


# ------------------------------------------------------------------------------------------------------ checks
def check_quantized_autocast(ctx, c) -> None:
    """fp8 / int8 / NF4 bases under bf16 autocast on the card (module docstring)."""
    from lora_trainer.runtime.quantize import backend_problem, cast_fp8, check_lora_fp32, quantize_module, stored_small

    stand_in = _stand_in(ctx, c, "bf16 autocast over fp8 / int8 / NF4 weights on CUDA kernels")
    device = torch.device(ctx.device)
    dtype, bf16 = (torch.float32, False) if stand_in else (torch.bfloat16, True)
    ref_model, spec = _model(dtype)
    _add_lora(ref_model, spec)
    ref_losses, ref_out = _train(ref_model.to(device), device, bf16)
    c.numbers["base_loss"] = round(ref_losses[0], 5)
    for fmt in ("fp8", "int8", "nf4"):
        problem = backend_problem(fmt)
        if problem is not None:
            c.problems.append(f"{fmt}: backend unavailable: {problem[0]}")
            continue
        t = time.monotonic()
        model, _ = _model(dtype)
        if fmt != "fp8":
            quantize_module(model, fmt)  # at load, before LoRA, as the trainer does
        _add_lora(model, spec)
        if fmt == "fp8":
            cast_fp8(model)  # after LoRA (quantize.py)
        check_lora_fp32({"transformer": model})
        layers = stored_small(model).get(fmt, 0)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, out = _train(model.to(device), device, bf16)
        err = _rel(out, ref_out)
        n = c.numbers
        n[f"{fmt}_rel_err"], n[f"{fmt}_loss_last"], n[f"{fmt}_s"] = err, round(losses[-1], 5), time.monotonic() - t
        if ctx.cuda:
            n[f"{fmt}_gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
        c.require(layers > 0 and stored_small(model).get(fmt) == layers,
                  f"{fmt}: {layers} layers stored as {fmt} before the steps, {stored_small(model)} after")
        lora = [p for n_, p in model.named_parameters() if "lora_" in n_]
        c.require(lora and all(p.dtype == torch.float32 and p.device.type == device.type for p in lora),
                  f"{fmt}: LoRA weights not fp32 on {device.type}")
        c.require(all(math.isfinite(v) for v in losses) and bool(out.isfinite().all()), f"{fmt}: non-finite output")
        c.require(err <= QUANT_REL_TOL[fmt], f"{fmt}: output differs from the base's by {err:.3g} > "
                                             f"{QUANT_REL_TOL[fmt]} (relative)")
        trained = any(p.abs().max() > 0 for n_, p in model.named_parameters() if "lora_B" in n_)
        c.require(trained and losses[-1] < losses[0] * 1.5, f"{fmt}: the LoRA did not train, or diverged")
        if fmt == "nf4":  # quantisation state on the device too, not only the packed weight
            q = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
            c.require(q and all(m.weight.device.type == device.type and m.weight.quant_state.absmax.device.type ==
                                device.type for m in q), "nf4: packed weights or absmax not on the device")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_fsdp_bf16_lora(ctx, c) -> None:
    """FSDP2 with a bf16 base and fp32 LoRA in one unit under bf16 autocast, one process (module docstring)."""
    import torch.distributed as dist

    from lora_trainer.distributed.shard import shard_denoisers

    device = torch.device(ctx.device)
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(0)
    c.numbers.update(backend=backend, processes=1)
    # A world of one on a private port, without RANK / WORLD_SIZE in the environment: the CLI runs this script
    # starts afterwards must not see a process group.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model, spec = _model(torch.bfloat16)
        model.enable_gradient_checkpointing()
        _add_lora(model, spec)
        ref = copy.deepcopy(model).to(device)
        shard = shard_denoisers({"transformer": model}, spec.blocks, device, 1)["transformer"]
        c.numbers.update(units=shard["units"], frozen_bytes=shard["frozen_bytes"])
        from lora_trainer.runtime.offload import block_lists

        block = block_lists(model, spec.blocks)[0]
        dtypes = {p.dtype for p in block.parameters()}
        c.require(dtypes == {torch.bfloat16, torch.float32}, f"the first unit holds {dtypes}, expected bf16 + fp32")
        c.require(all(type(p).__name__ == "DTensor" or hasattr(p, "to_local") for p in block.parameters()),
                  "the first unit's parameters are not sharded (DTensor)")
        losses, _ = _train(model, device, bf16=True)
        ref_losses, _ = _train(ref, device, bf16=True)
        c.numbers.update(loss_last=round(losses[-1], 5), ref_loss_last=round(ref_losses[-1], 5))
        c.require(all(math.isfinite(v) for v in losses), f"non-finite losses {losses}")
        grads_fp32 = all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
        c.require(grads_fp32, "LoRA parameters are not fp32 after the steps")
        _compare_lora(c, _lora(model), _lora(ref), "fsdp", tol=1e-3)
    finally:
        dist.destroy_process_group()


def check_pinned_streaming(ctx, c) -> None:
    """offload_blocks on the card: pinned host copies, non-blocking copies (module docstring)."""
    from lora_trainer.runtime.offload import stream_blocks

    stand_in = _stand_in(ctx, c, "page-locked host memory and non-blocking host-to-device copies")
    device = torch.device(ctx.device)
    dtype, bf16 = (torch.float32, False) if stand_in else (torch.bfloat16, True)
    peaks, loras = {}, {}
    for streamed in (False, True):
        model, spec = _model(dtype)
        model.enable_gradient_checkpointing()
        _add_lora(model, spec)
        streamer = stream_blocks(model, spec.blocks, 0.99 if streamed else 0, device)  # 0.99: all, rounded up
        model.to(device)
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses, _ = _train(model, device, bf16)
        if ctx.cuda:
            torch.cuda.synchronize()
            peaks[streamed] = torch.cuda.max_memory_allocated()
        loras[streamed] = _lora(model)
        c.require(all(math.isfinite(v) for v in losses), f"streamed={streamed}: non-finite losses {losses}")
        if streamer is not None:
            n = len(streamer.blocks)
            unprefetched = sum(why == "copy" for why, _, _ in streamer.trace)
            c.numbers.update(blocks=n, host_mib=round(streamer.host_bytes / 2**20, 3), loads=streamer.loads,
                             pinned=streamer.pin, unprefetched_loads=unprefetched, slots=len(streamer.slots))
            c.require(STEPS * n <= streamer.loads <= 2 * STEPS * n, f"{streamer.loads} block loads for {n} blocks")
            c.require(not ctx.cuda or unprefetched == 1, f"{unprefetched} block loads were not prefetched (1 expected)")
            if ctx.cuda:
                c.require(streamer.pin and all(t.is_pinned() for t in streamer.host.values()),
                          "host copies are not page-locked")
    # Same kernels on the same values: bitwise expected; a copy read before it landed would be far off.
    _compare_lora(c, loras[True], loras[False], "streamed", tol=1e-3)
    if ctx.cuda:
        c.numbers.update(peak_mib_plain=round(peaks[False] / 2**20, 3), peak_mib_streamed=round(peaks[True] / 2**20, 3))
        c.require(peaks[True] < peaks[False], f"streaming did not lower the peak GPU memory: {peaks}")
