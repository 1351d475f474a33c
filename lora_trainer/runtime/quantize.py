"""The frozen base's storage format (``base_quantization`` / ``text_encoder_quantization``): none | fp8 | int8 | nf4.

Weight-only formats (W8A16 / W4A16): the frozen Linear weights are stored small and turned back into the run's
compute precision inside each matmul; LoRA A/B stay fp32 and are the only trainable tensors. Backends, chosen from
../shared/reference/quantized-base.md (sections 3, 6, 9), all of which train on a CPU:

* fp8  -> diffusers' layerwise casting (float8_e4m3fn storage, upcast per layer in a forward hook). No extra package.
  It must follow LoRA injection: PEFT copies the base weight's dtype into new LoRA weights, so casting first would
  make fp8 LoRA weights (an error on the CPU, silently useless training on a GPU). Plain, unscaled e4m3: ~2.5%
  output error on random weights, where int8 per-channel has 0.4%.
* int8 -> torchao ``Int8WeightOnlyConfig`` (per-row scales); PEFT 0.21 wraps it in ``TorchaoLoraLinear``. PEFT refuses
  torchao < 0.16 during *any* LoRA injection, so the version is checked before a run.
* nf4  -> bitsandbytes ``Linear4bit(quant_type="nf4")`` swapped in per Linear (block 64, fp32 absmax, no double
  quantisation: 0.5625 bytes per weight). diffusers' ``BitsAndBytesConfig`` loader refuses without a GPU, a layer
  built by hand does not; PEFT's generic ``lora.Linear`` wraps it (forward and backward are exact, merging is not
  offered, and we never merge: only the LoRA is saved).

optimum-quanto is not used: PEFT has no quanto layer, its maintainers call it maintenance-mode, and torch 2.13's int8
kernel segfaults on bf16 Linears with fewer than 16 inputs.

Only Linear layers inside the repeated blocks are quantised (a module path with a list index: transformer_blocks.3,
down_blocks.1..., encoder.layers.0, encoder.block.5), and only from 16 features up: norms, embeddings, the patch /
time / text input projections and the output head stay at compute precision (small, and the most sensitive).

Host memory: layers are converted one at a time, each full-precision weight dropped (and the heap trimmed) before
the next, then the few unconverted tensors are copied out of the memory-mapped weight file so its mapping goes.
What that gives, measured on a 283 M-parameter FLUX-like transformer (fp32 file, 1.08 GiB): when the file is in the
compute dtype, diffusers keeps the weights memory-mapped, so the peak is the file's pages read while converting
(clean page cache, which the kernel can reclaim) + the quantised copy: RSS 1.7 (NF4) / 1.8 GiB (int8), then the
quantised size (+0.17 / +0.29 GiB over the process's baseline); without the trimming and the copy-out it stayed at
2.1 / 2.5 GiB. When the file holds another dtype than the compute one, ``from_pretrained`` would materialise the
whole component cast, in anonymous memory; instead it loads at the file's own dtype (load_dtypes), still
memory-mapped, and quantize_module casts each layer just before converting it. The accelerator only ever receives
the quantised model.

This module imports torch only inside functions: preflight and the memory plan use the torch-free part.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

FORMATS = ("none", "fp8", "int8", "nf4")
# Bytes per quantised weight element (the memory plan). int8 adds one fp32 scale per output row and fp8 nothing,
# both negligible next to in_features bytes per row; NF4 = 4 bits + one fp32 absmax per block of 64.
STORAGE_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
MIN_FEATURES = 16  # smaller Linears save nothing and hit kernel bugs (torch's int8 pack-mm at K < 16)
NF4_BLOCK = 64


@dataclass(frozen=True)
class Backend:
    dist: str  # distribution name (importlib.metadata)
    module: str  # import name (importlib.util.find_spec)
    minimum: tuple[int, int]  # the extra's lower bound (pyproject.toml)
    below: tuple[int, int]  # the extra's upper bound: first version not tried here
    extra: str  # pyproject extra
    broken_below: str | None = None  # why versions under ``minimum`` cannot work (refused); None: only untested


BACKENDS = {"int8": Backend("torchao", "torchao", (0, 16), (0, 19), "int8",
                            "peft 0.21 refuses torchao below 0.16 during every LoRA injection"),
            # Tested with 0.50.2 (CPU and the reference's runs); older 4-bit releases are allowed, not refused.
            "nf4": Backend("bitsandbytes", "bitsandbytes", (0, 45), (0, 51), "nf4")}


def pip_command(backend: Backend) -> str:
    lo, hi = ".".join(map(str, backend.minimum)), ".".join(map(str, backend.below))
    return f'pip install "{backend.dist}>={lo},<{hi}"  (or: pip install ".[{backend.extra}]")'


def _version_tuple(text: str) -> tuple[int, int]:
    nums = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        nums.append(int(digits))
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def backend_problem(fmt: str) -> tuple[str, str] | None:
    """(message, hint) when the format's backend is missing or too old; None when usable. Torch-free and fast:
    find_spec and the installed metadata, never an import (torchao alone takes ~0.3 s, bitsandbytes ~1 s)."""
    backend = BACKENDS.get(fmt)
    if backend is None:
        return None  # none / fp8 need only diffusers
    if importlib.util.find_spec(backend.module) is None:
        return (f"{fmt} needs {backend.dist}, which is not installed", pip_command(backend))
    try:
        version = importlib.metadata.version(backend.dist)
    except importlib.metadata.PackageNotFoundError:
        return None  # importable but unregistered (a source checkout): let it try
    if backend.broken_below and _version_tuple(version) < backend.minimum:
        return (f"{fmt} needs {backend.dist} >= {'.'.join(map(str, backend.minimum))}, found {version} "
                f"({backend.broken_below})", pip_command(backend))
    return None


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """Whether a Linear weight (``name`` = the module path, ``shape`` = (out, in)) is one we store small: inside a
    repeated block (a list index in its path) and at least MIN_FEATURES wide both ways."""
    parts = name.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    # A Sequential index inside an embedder or the output head is no repeated block (Z-Image's t_embedder.mlp.0,
    # cap_embedder.1, all_final_layer.2-1.adaLN_modulation.1): those stay at compute precision like every other
    # family's (its t_embedder casts its input to its first weight's dtype, which fp8 storage would break).
    return (len(shape) == 2 and min(int(s) for s in shape) >= MIN_FEATURES and first is not None
            and not any("embed" in p or "final_layer" in p for p in parts[:first]))


# Layers a model class pins to fp32 itself (its ``_keep_in_fp32_modules``; tests/test_memory_plan.py holds this table to
# the installed classes), which quantisation therefore leaves at full precision (_kept below): torch-free, for the
# memory plan. T5's ``wo`` is 1.0 B of T5-XXL's 4.7 B weights.
KEEP_IN_FP32: dict[str, tuple[str, ...]] = {"T5EncoderModel": ("wo",),
                                            "CosmosTransformer3DModel": ("learnable_pos_embed",),  # Anima: has none
                                            # its RMSNorms (no Linear among them): a few MB
                                            "Krea2Transformer2DModel": ("norm", "norm1", "norm2", "norm_q", "norm_k"),
                                            "UMT5EncoderModel": ("wo",),
                                            # Wan: the timestep MLP (two Linears, ~10 M at 5120 wide) and its norms
                                            "WanTransformer3DModel": ("rope", "time_embedder", "scale_shift_table",
                                                                      "norm1", "norm2", "norm3")}


def kept_in_fp32(class_name: str | None, name: str) -> bool:
    """Whether the module ``name`` of a ``class_name`` model is one its class keeps in fp32 (never quantised)."""
    return any(k in name.split(".") for k in KEEP_IN_FP32.get(class_name or "", ()))


def config_problems(cfg: Any) -> list[tuple[str, str, str]]:
    """(config key, message, hint) for every format setting that cannot work; torch-free (preflight)."""
    out = []
    for key in ("base_quantization", "text_encoder_quantization"):
        fmt = getattr(cfg, key, "none")
        if fmt == "none":
            continue
        problem = backend_problem(fmt)
        if problem:
            out.append((key, *problem))
        lora_here = key == "base_quantization" or cfg.train_text_encoder
        if cfg.use_dora and lora_here and fmt == "fp8":
            # DoRA's weight norm reads the base weight outside the layer's forward, where layerwise casting keeps
            # it in float8, and torch cannot promote float8 (RuntimeError). PEFT dequantises int8 / NF4 itself.
            out.append((key, f"{key} fp8 cannot be combined with use_dora: DoRA reads the base weight outside the "
                             "layer's forward, where fp8 storage cannot be computed with",
                        "use \"int8\" or \"nf4\" with DoRA, set use_dora false, or set this key to \"none\""))
    return out


# ------------------------------------------------------------------------------------------ torch part
def _kept(module, name: str) -> bool:
    """Layers the model itself pins to fp32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``, which overflows below fp32
    and whose forward casts its input to wo's weight dtype: an fp8 / uint8 one would wreck it)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    return any(k in name.split(".") for k in keep)


def _targets(module, fmt: str) -> list[str]:
    import torch

    return [n for n, m in module.named_modules()
            if type(m) is torch.nn.Linear and quantizable(n, tuple(m.weight.shape)) and not _kept(module, n)]


def _swap_nf4(module, names: Iterable[str], dtype=None) -> None:
    import bitsandbytes as bnb
    import torch

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, child)
        if dtype is not None:
            lin.to(dtype)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=lin.weight.dtype, compress_statistics=False, quant_type="nf4",
                              device="meta")
        # Params4bit quantises when moved to a device; the full-precision weight is freed with `lin` below.
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK,
                                     compress_statistics=False).to(lin.weight.device)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        # On CPUs with AVX512-BF16, bnb repacks the weight in place the first time the layer runs in eval mode
        # without grad (our validation samples) into an inference-only layout whose matmul then breaks autograd
        # in the next training step. Keep the trainable layout.
        q.support_avx512bf16_for_cpu = False
        setattr(parent, child, q.requires_grad_(False))
        del lin
        _trim_heap()


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise: the full-precision weights just dropped stay in
    RSS). Measured on a 283 M-parameter transformer: host RSS after conversion falls from 2.1-2.5 GiB to the
    quantised size. A no-op where libc has no malloc_trim."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _own_remaining_tensors(module, dtype=None) -> None:
    """diffusers / transformers keep a component's weights as views of its memory-mapped safetensors file; the
    mapping (and every page of it read while converting, i.e. the whole full-precision file) stays resident while
    any view lives. Copying the small unconverted tensors (norms, embeddings, biases) out of it releases it; with
    ``dtype`` (a component loaded at its file's dtype, see load_dtypes) the copies are cast to the compute dtype,
    except floating tensors the model keeps in fp32 and non-float buffers."""
    import torch

    for name, m in module.named_modules():
        cast = dtype is not None and not _kept(module, name)
        for key, p in m._parameters.items():
            if p is not None and type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor:  # not bnb / torchao
                p.data = p.data.to(dtype) if cast and p.is_floating_point() else p.data.clone()
        for key, b in list(m._buffers.items()):
            if b is not None and type(b) is torch.Tensor:
                m._buffers[key] = b.to(dtype) if cast and b.is_floating_point() else b.clone()


def quantize_module(module, fmt: str, dtype=None) -> dict:
    """Store ``module``'s block Linears as ``fmt`` (int8 / nf4: now; fp8: after LoRA, see cast_fp8). ``dtype``: the
    compute dtype when the module was loaded at its file's dtype (load_dtypes): each layer is cast just before it
    is converted, so the host holds one full-precision layer beyond the converted ones, never the whole model at
    the compute dtype. Returns what was converted (for the run's event and the manifest)."""
    names = _targets(module, fmt)
    params = sum(module.get_submodule(n).weight.numel() for n in names)
    if fmt == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig(set_inductor_config=False)
        for name in names:  # one layer at a time, its full-precision weight freed before the next
            layer = module.get_submodule(name)
            if dtype is not None:
                layer.to(dtype)
            quantize_(layer, config, filter_fn=lambda m, fqn: True)
            _trim_heap()
    elif fmt == "nf4":
        _swap_nf4(module, names, dtype)
    if names or dtype is not None:
        _own_remaining_tensors(module, dtype)
        _trim_heap()
    return {"format": fmt, "layers": len(names), "params": params}


def file_dtype(dtypes: dict[str, str]) -> str | None:
    """The safetensors dtype most of a component's 2-D weights are stored in ("F32", "BF16", ...); ``dtypes``:
    weight name -> its header dtype."""
    counts: dict[str, int] = {}
    for dt in dtypes.values():
        counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else None


def load_dtypes(cfg: Any, spec: Any, stored: dict[str, str | None], dtype) -> dict:
    """Component -> the dtype to load it at, for those converted at load (int8 / nf4) whose file holds another
    float dtype than the compute one (``stored``: component -> file_dtype). Loading at the file's own dtype
    keeps the weights as views of the memory-mapped file instead of a full cast copy (22 GiB for FLUX.1-dev in
    bf16); quantize_module then casts layer by layer."""
    import torch

    by_name = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for comp in (*spec.denoisers, *spec.text_encoders):
        fmt = cfg.base_quantization if comp in spec.denoisers else cfg.text_encoder_quantization
        file = by_name.get(stored.get(comp) or "")
        if fmt in ("int8", "nf4") and file is not None and file != dtype:
            out[comp] = file
    return out


def cast_fp8(module) -> dict:
    """fp8 storage for the block Linears of a module that already carries its LoRA (see the module docstring): the
    base layers inside PEFT's wrappers get diffusers' layerwise-casting hook, the LoRA layers never do."""
    import torch
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    layers, params = 0, 0
    for name, m in module.named_modules():
        if type(m) is not torch.nn.Linear or ".lora_" in f".{name}" or _kept(module, name) or not quantizable(
                name.replace(".base_layer", ""), tuple(m.weight.shape)):
            continue
        apply_layerwise_casting_hook(m, storage_dtype=torch.float8_e4m3fn, compute_dtype=m.weight.dtype,
                                     non_blocking=False)
        layers, params = layers + 1, params + m.weight.numel()
    return {"format": "fp8", "layers": layers, "params": params}


def check_lora_fp32(modules: dict) -> None:
    """Every LoRA tensor must be a trainable fp32 tensor after injection and casting: an fp8/bf16 one means the order
    above was broken and AdamW's small updates would vanish (or, on a CPU, crash)."""
    import torch

    from ..adapters.lora import is_adapter_param
    from ..contract.errors import TrainingError

    bad = [f"{comp}.{n} ({p.dtype})" for comp, m in modules.items() for n, p in m.named_parameters()
           if is_adapter_param(n) and (p.dtype != torch.float32 or not p.requires_grad)]
    if bad:
        raise TrainingError(f"internal check failed: LoRA weights must be trainable fp32, found {', '.join(bad[:5])}",
                            hint="a bug in how the frozen base was quantised; report it with the config",
                            details={"tensors": bad[:20]})


def stored_small(module) -> dict[str, int]:
    """Layers of a live module whose weight is held in a quantised format, by format: what the manifest records
    (read from the model, not the config, so a conversion that silently did nothing shows as zero)."""
    import torch

    counts = {"fp8": 0, "int8": 0, "nf4": 0}
    for m in module.modules():
        w = getattr(m, "weight", None)
        if type(m).__name__ == "Linear4bit":
            counts["nf4"] += 1
        elif isinstance(m, torch.nn.Linear) and w is not None:
            if w.dtype == torch.float8_e4m3fn:
                counts["fp8"] += 1
            elif "Int8" in type(w).__name__:  # torchao Int8Tensor / its AffineQuantizedTensor predecessor
                counts["int8"] += 1
    return {k: v for k, v in counts.items() if v}


def _te_formats(cfg: Any, spec: Any, comps: Any) -> dict[str, bool]:
    """Text encoder name -> whether it gets LoRA (so fp8 casting waits for it)."""
    return {name: cfg.train_text_encoder and name in spec.lora_text_encoders for name in comps.text_encoders}


def quantize_at_load(cfg: Any, spec: Any, comps: Any, loaded_at: dict | None = None, dtype=None) -> list[dict]:
    """After the components load (loading.load_components): int8 / nf4 for the denoisers and text encoders, and fp8
    for text encoders that will carry no LoRA. ``loaded_at``: the components load_dtypes loaded at their file's
    dtype, which are cast to ``dtype`` layer by layer. Returns one summary per converted component."""
    done = []
    loaded_at = loaded_at or {}
    fmt = cfg.base_quantization
    if fmt in ("int8", "nf4"):
        for name, denoiser in comps.denoisers.items():
            done.append({"component": name, **quantize_module(denoiser, fmt, dtype if name in loaded_at else None)})
    te_fmt = cfg.text_encoder_quantization
    for name, gets_lora in _te_formats(cfg, spec, comps).items():
        te = comps.text_encoders[name]
        if te_fmt in ("int8", "nf4"):
            done.append({"component": name, **quantize_module(te, te_fmt, dtype if name in loaded_at else None)})
        elif te_fmt == "fp8" and not gets_lora:
            done.append({"component": name, **cast_fp8(te)})
    return done


def after_lora(cfg: Any, comps: Any, lora_modules: dict) -> list[dict]:
    """Trainer._attach_lora, once every adapter is in: fp8 casting of the LoRA-carrying modules, then the fp32
    check on every LoRA tensor (whatever the format)."""
    done = []
    for name, module in lora_modules.items():
        fmt = cfg.base_quantization if name in comps.denoisers else cfg.text_encoder_quantization
        if fmt == "fp8":
            done.append({"component": name, **cast_fp8(module)})
        if fmt != "none":
            ddp_skip_frozen(module)
    check_lora_fp32(lora_modules)
    return done


def ddp_skip_frozen(module) -> None:
    """Several processes: DDP broadcasts every parameter from rank 0 when accelerate wraps the model, and neither
    torchao's int8 tensors (no view()) nor float8 over gloo can be broadcast. Every rank loaded and converted the
    same files the same way, so the frozen weights already agree: DDP is told to leave them alone (it syncs only
    the trainable LoRA gradients anyway). A no-op in one process."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
