"""The lean LoRA forward (adapters/fused.py): PEFT's function with fewer kernels per layer.

Against PEFT's own forward on the same layers: outputs and the gradients of x, A and B agree (fp32 to rounding,
bf16 autocast to bf16 rounding, dropout under one seed), the fallbacks give PEFT's result exactly, only plain LoRA
layers take it, and one forward + backward of a LoRA layer runs fewer aten ops with no full-size multiply. The CLI
runs use it throughout (resume bitwise, compile, streaming, sharding); run_started counts the layers."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("peft")

from lora_trainer.adapters.fused import fuse_lora_forward, unfuse_lora_forward  # noqa: E402
from lora_trainer.adapters.lora import add_lora  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(24, 32)
        self.to_out = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x):
        return self.to_out(torch.nn.functional.gelu(self.to_q(x)))


def _model(*, alpha=8.0, dropout=0.0, dora=False, seed=0):
    torch.manual_seed(seed)
    model = Block()
    params = add_lora(model, rank=4, alpha=alpha, dropout=dropout, targets=("to_q", "to_out"), use_dora=dora,
                      path="target_modules")
    with torch.no_grad():
        for p in params:  # B starts at zero: give both factors values so that every gradient path is exercised
            p.normal_(0, 0.3)
    return model, params


def _run(model, params, x, *, seed=1):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


def _both(model, params, x, **kw):
    peft = _run(model, params, x, **kw)
    assert fuse_lora_forward([model]) == 2
    lean = _run(model, params, x, **kw)
    unfuse_lora_forward([model])
    return peft, lean


@pytest.mark.parametrize("alpha", [4.0, 8.0, 3.0])
def test_same_function_and_gradients_as_peft(alpha):
    model, params = _model(alpha=alpha)
    x = torch.randn(2, 5, 24)
    (out0, g0), (out1, g1) = _both(model, params, x)
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_draws_as_peft_does():
    model, params = _model(dropout=0.5)
    x = torch.randn(3, 24)  # 2-D input too
    (out0, g0), (out1, g1) = _both(model, params, x)
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()  # no dropout: the same again without a seed's help
    (out0, _), (out1, _) = _both(model, params, x)
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)


def test_bf16_base_under_autocast_and_without():
    model, params = _model()
    for name in ("to_q", "to_out"):  # the frozen base in bf16, the LoRA fp32, as a bf16 run holds them
        getattr(model, name).base_layer.to(torch.bfloat16)
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out0, g0), (out1, g1) = _both(model, params, x)
    assert out1.dtype == out0.dtype == torch.bfloat16
    for a, b in zip([out1] + g1, [out0] + g0):  # both round to bf16, at different places: to bf16's precision
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm(), (a, b)
    # no autocast: x (bf16) and the LoRA (fp32) differ, which only PEFT's casts handle: its forward, exactly
    (out0, g0), (out1, g1) = _both(model, params, x)
    assert torch.equal(out1, out0) and all(torch.equal(a, b) for a, b in zip(g1, g0))


def test_disabled_adapter_falls_back():
    model, params = _model()
    x = torch.randn(2, 24)
    fuse_lora_forward([model])
    for layer in (model.to_q, model.to_out):
        layer.enable_adapters(False)
    with torch.no_grad():
        base = model.to_out.base_layer(torch.nn.functional.gelu(model.to_q.base_layer(x)))
        assert torch.equal(model(x), base)


def test_only_plain_lora_takes_it():
    dora, _ = _model(dora=True)
    assert fuse_lora_forward([dora]) == 0
    from lora_trainer.adapters.lycoris import Network

    torch.manual_seed(0)
    lokr = Block()
    add_lora(lokr, rank=4, alpha=4.0, dropout=0.0, targets=("to_q",), use_dora=False, path="target_modules",
             network=Network("lokr", -1, False, False))
    assert fuse_lora_forward([lokr]) == 0
    from peft import LoraConfig, inject_adapter_in_model

    biased = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"], lora_bias=True), Block())
    assert fuse_lora_forward([biased]) == 0  # a bias on B: not the function the lean forward computes


class _Ops(TorchDispatchMode):
    """Counts aten ops, and the elements each op writes."""

    def __init__(self):
        super().__init__()
        self.ops, self.elements = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if isinstance(out, torch.Tensor):
            self.elements[name] += out.numel()
        return out

    def elementwise(self, names=("mul", "add", "_to_copy", "copy_")) -> int:
        return sum(self.elements[n] for n in names)


def _ops(model, params, x):
    with _Ops() as mode:
        _run(model, params, x)
    return mode


def test_less_elementwise_work_per_layer():
    model, params = _model(alpha=8.0)  # scaling 2: PEFT multiplies the full-size output by it, forward and backward
    x = torch.randn(2, 50, 24)  # 100 tokens: a full-size tensor is 25x a rank-4 one
    peft = _ops(model, params, x)
    fuse_lora_forward([model])
    lean = _ops(model, params, x)
    # the scale and the add ride in addmm: what is left elementwise is the rank-sized scaling of A's and B's
    # gradients, the test's own weighting and gelu's backward
    assert lean.elementwise() < 0.6 * peft.elementwise(), (lean.elements, peft.elements)
    assert lean.ops["addmm"] >= peft.ops["addmm"] + 2 and lean.ops["add"] < peft.ops["add"], (lean.ops, peft.ops)


def test_no_input_casts_under_autocast():
    """A bf16 base under autocast: PEFT casts each LoRA layer's input to fp32 (its weights' dtype) for autocast to
    cast it back to bf16 in the matmul, and the backward casts the gradient both ways; the lean forward casts only
    the small LoRA weights."""
    model, params = _model(alpha=8.0)
    for name in ("to_q", "to_out"):
        getattr(model, name).base_layer.to(torch.bfloat16)
    x = torch.randn(2, 50, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft = _ops(model, params, x)
        fuse_lora_forward([model])
        lean = _ops(model, params, x)
    assert lean.elements["_to_copy"] < 0.5 * peft.elements["_to_copy"], (lean.elements, peft.elements)
    assert lean.elementwise() < 0.5 * peft.elementwise(), (lean.elements, peft.elements)
