"""How much accelerator memory a run will need, from the weight files' headers alone (no torch, no weights read),
part by part, and which cheaper settings would fit a card that is too small.

M = frozen weights at their storage format (base_quantization / text_encoder_quantization: the block Linears at
1 byte (fp8, int8) or 0.5625 (NF4) per weight, the rest at the compute precision, and the layers a class pins to
fp32 (T5's wo: quantize.KEEP_IN_FP32) never quantised) + upcast copies (fp8 / int8 only, below) + LoRA (fp32
weights, gradients, optimizer state) + activations + fixed overhead (+ text encoders at the compute precision and
the VAE in fp32 while they stay resident, i.e. while their outputs are not cached) + the models only sampling runs
(FamilySpec.sampling_only, with validation_steps: what they exceed the activations by, which are freed while they
are resident). Activations (B = 1, per image):

* transformer families (FLUX.1, SD3): linear in tokens L = (resolution / pixel multiple)^2 image tokens + the text
  sequence (the run's max_sequence_length, else the variant's default: FamilySpec.text_length), and in the hidden
  size d (the spec's Activations say which config.json keys give d and the depth). Measured on a full-width FLUX
  block (../shared/reference/quantized-base.md, section 7): a block keeps ~23 x L x d x 2 bytes for backward (bf16,
  LoRA on every Linear), ~13x with attention-only LoRA; with gradient checkpointing each block keeps its input
  (~1.1 x L x d x 2) and one block is recomputed at a time.
* UNet families: the SDXL UNet measured 1.32 GiB at 512 px and 5.2 GiB at 1024 px without checkpointing (bf16,
  attention LoRA): ~5.0 KiB per pixel, scaled here by the UNet's weight count relative to SDXL's 2.567 B, and by
  1.2 with LoRA beyond attention; checkpointing keeps about a quarter.

* Wan's block, measured the same way (tests/test_video_plan.py: saved_tensors_hooks on two blocks of the 1.3B
  width, bf16, r16, 64 tokens a latent frame): 20.5 + r x L x d x 2 bytes with attention LoRA, 21.5 + 2r with MLP
  LoRA too, r = ffn_dim / d (26.0 / 32.9 at the 1.3B's 5.83, 24.3 / 29.3 at 4): its modulation and residual adds run
  in fp32, and the GELU's input is kept (with LoRA on ffn.net.2 its input too).
* video families (FamilySpec.temporal_compression > 0, Wan): a clip of F frames (4k + 1) is F' = (F - 1) / 4 + 1
  latent frames, each (resolution / token pixels)^2 tokens: the transformer figure above with L = F' x that + the
  text sequence. F is the largest clip bucket the run trains (``frames``: preflight/run.py reads it from the clip
  audit); an images-only run plans one frame, exactly as an image family.

Which factor applies is decided from the targets as add_lora resolves them against the headers ("auto" and preset
names through the spec, ``*`` patterns and suffixes expanded): any selected layer the "attention" preset does not
select (feed-forward, FLUX's proj_mlp, modulation layers) means the larger one. Without a latent cache each step
first encodes its batch: the VAE encoder's scratch (5 fp32 maps of its first width at the input size, measured)
is freed before the denoiser runs, so the activation part is the larger of the two. Wan's causal 3-D VAE
(AutoencoderKLWan) encodes a clip as its first frame, then chunks of 4 frames, each conv keeping the last 2 frames of
its input for the next chunk (CACHE_T): its scratch grows over the first 9 frames, then stays flat however long the
clip (``_CAUSAL_ENCODE_MAPS``, measured); the clip's own pixels are added.

Upcast copies: fp8 (layerwise casting) and int8 (torchao's weight-only linear) turn each Linear's stored weight into
a compute-precision tensor for the matmul, and autograd keeps that tensor for the backward whenever the layer's
input needs a gradient (every block Linear but the ones fed only by the conditioning: the spec's
conditioning_inputs). Without checkpointing all of them live at the peak, more than a bf16 base holds; with it only
the recomputed unit's. NF4 (bitsandbytes) saves its packed weight instead. tests/test_memory_plan.py measures this
with saved_tensors_hooks through quantize.py and add_lora.

With shard_base over N processes each one holds 1/N of every block's frozen weights (and of the LoRA and its optimizer
state) plus two whole blocks (the one running and the next, gathered meanwhile); the rest of the denoiser stays whole.
The process count is WORLD_SIZE, which accelerate launch (torch.distributed.run) sets for every process.

Caches: the latent and text caches that go to the accelerator (each when it fits a tenth of the free memory, measured
by the trainer before the denoiser arrives: cache_plan.py) stay there for the whole run, so their bytes are a part.

Fixed: the CUDA context (~0.5 GiB, invisible to torch's counters) plus 10% allocator slack on the rest. These are
estimates: the first steps' measured peak is reported beside them and a drift over 15% is a warning.

The plan is judged against the free memory of the GPU this process will use (gpu.py). A hint (cheaper_settings) is
offered as fitting only with HINT_HEADROOM to spare: the plan is trusted to within DRIFT, the point where the trainer
warns that it was wrong, so a hint must still fit a run that needs that much more than planned. Every hint is a
config the config's own rules accept (model_checks.settings_problems): the others are left out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.network import adapter_params
from ..families import SPECS
from ..families.spec import FamilySpec, expand_targets
from .probe import weight_headers
from ..runtime.offload import SLOTS, resolve_count
from ..runtime.quantize import STORAGE_BYTES, file_dtype, kept_in_fp32, quantizable
from .cache_plan import device_cache_bytes
from .video_plan import latent_frames

GIB = 1024 ** 3
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 1}  # state bytes per fp32 LoRA param
CONTEXT_BYTES = int(0.5 * GIB)
SLACK = 0.10
DRIFT = 0.15  # the step event's warning threshold (trainer)
HINT_HEADROOM = DRIFT  # what a fitting hint leaves free, as a fraction of its plan (see the module's docstring)
_REFERENCE_UNET_PARAMS = 2.567e9  # SDXL's UNet, which the per-pixel figure was measured on
_UNET_BYTES_PER_PIXEL = 5.2 * GIB / 1024 ** 2  # bf16, B=1, no checkpointing (SDXL, measured)
# Saved for backward per block, in units of L x d x 2 bytes (FLUX block, bf16, see the module docstring): LoRA on
# attention only, or also on MLP / other Linears of the blocks.
_BLOCK_FACTOR = {"attention": 13, "more": 23}
# A UNet with LoRA beyond attention (its feed-forward, proj_in / proj_out) saves ~1.2x the attention-only figure:
# measured with saved_tensors_hooks on a quarter-width SDXL UNet at 512 px (CPU, bf16 autocast, r16): attention
# 414 MiB, attention_mlp 493 MiB, all_linear 502 MiB.
_UNET_MORE_TARGETS = 1.2
# Formats whose Linear upcasts its stored weight for each matmul as an ordinary tensor, which autograd then keeps for
# the backward (fp8: layerwise casting's bf16 copy; int8: torchao's weight-only linear casts qdata to the
# activation dtype). NF4 runs bitsandbytes' MatMul4Bit, which saves the packed weight and dequantises in backward.
# Measured through quantize.py + add_lora (tests/test_memory_plan.py).
_HOLDS_UPCAST_COPY = ("fp8", "int8")
# The VAE encoder's peak working memory with latents not cached: 5 feature maps of its first width at the input
# resolution (measured on the CPU: 40 / 160 MiB for FLUX.1's VAE at 128 / 256 px in fp32, no grad), taken at 4 bytes
# (the VAE is fp32; under bf16 autocast CUDA keeps GroupNorm in fp32, so fp32 bounds it).
_VAE_ENCODE_MAPS = 5
# AutoencoderKLWan's encode peak in fp32 maps of its first width (base_dim) at the encoder's input size (the pixels,
# or the 2x2 patches of Wan 2.2's VAE) per clip length: measured on the CPU with the real widths (Wan 2.1 base_dim
# 96; Wan 2.2 base_dim 160, residual, patch 2) at 64 / 96 px, no grad, with TorchDispatchMode as
# tests/test_memory_plan.py's _LivePeak: 2.1: 10.3 / 32.0 / 37.3 / 37.4 maps at 1 / 5 / 9 / 13 frames (37.2 at 96
# px, 9 frames); 2.2: 12.6 / 41.1 / 46.9 / 47.5 (46.6). From 9 frames on each chunk meets full caches: flat.
_CAUSAL_ENCODE_MAPS = {False: ((1, 10.5), (5, 32.5), (9, 38.0)), True: ((1, 13.0), (5, 41.5), (9, 48.0))}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _config(root: Path, comp: str) -> dict:
    try:
        return json.loads((root / comp / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _headers(root: Path, files) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A component's tensor shapes and dtypes, from its safetensors headers."""
    entries = weight_headers(root, files)
    return ({k: list(v.get("shape") or ()) for k, v in entries.items()},
            {k: str(v.get("dtype", "")) for k, v in entries.items()})


def _weight_bytes(shapes: dict[str, list[int]], fmt: str, b: int, keep: str | None = None, keep_b: float = 4) -> int:
    """Frozen weight bytes: the block Linears quantize.py stores in ``fmt`` at its bytes per element, everything
    else (norms, embeddings, input/output layers, biases, Conv2d) at the compute precision's ``b``, and the layers the
    ``keep`` class pins to fp32 (quantize.KEEP_IN_FP32: T5's wo) at ``keep_b``, never quantised."""
    store = STORAGE_BYTES.get(fmt)
    total = 0.0
    for key, shape in shapes.items():
        n = _numel(shape)
        if kept_in_fp32(keep, key):
            total += n * keep_b
            continue
        small = store is not None and key.endswith(".weight") and quantizable(key[: -len(".weight")], shape)
        total += n * (store if small else b)
    return int(total)


def _kept_bytes(fmt: str, dtypes: dict[str, str], precision: str) -> int:
    """Bytes per weight of the layers a class keeps in fp32: transformers upcasts them to fp32 when it loads at fp16,
    and leaves them at the load dtype otherwise; int8 / NF4 components load at their file's dtype when it differs
    from the compute one (quantize.load_dtypes) and keep these layers at it."""
    compute = {"bf16": "BF16", "fp16": "F16"}.get(precision, "F32")
    stored = file_dtype({k: v for k, v in dtypes.items() if k.endswith(".weight")})
    load = stored if fmt in ("int8", "nf4") and stored in ("F32", "BF16", "F16") and stored != compute else compute
    return 2 if load == "BF16" else 4


def _selected(shapes: dict[str, list[int]], targets) -> dict[str, list[int]]:
    """The Linear / Conv2d layers (name -> weight shape) that target patterns select, as add_lora resolves them."""
    weights = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) in (2, 4)}
    chosen: set[str] = set()
    for names in expand_targets(tuple(targets), {k: len(s) for k, s in weights.items()}).values():
        chosen.update(n for n in names if n in weights)
    return {n: weights[n] for n in chosen}


def _lora_params(shapes: dict[str, list[int]], targets, rank: int, cfg=None) -> int:
    """r x (in + out) for every Linear the targets select (Conv2d: r x (in x k x k + out)); LoKr / LoHa factors as
    PEFT builds them (config/network.py adapter_params)."""
    return sum(adapter_params(s, rank, cfg) for s in _selected(shapes, targets).values())


def _unit(name: str, lists: tuple[str, ...]) -> str:
    """The gradient-checkpointing unit a layer runs in: its innermost item of a ``lists`` ModuleList (FLUX's
    transformer_blocks.3, a UNet's ...attentions.0.transformer_blocks.1 or ...resnets.0); "" outside every unit."""
    parts = name.split(".")
    inner = [i for i in range(1, len(parts)) if parts[i].isdigit() and parts[i - 1] in lists]
    return ".".join(parts[: inner[-1] + 1]) if inner else ""


def _weight_copies(shapes: dict[str, list[int]], fmt: str, b: int, *, keep: str | None, conditioning: tuple[str, ...],
                   units: tuple[str, ...] | None) -> int:
    """Compute-precision copies of quantised weights that autograd keeps for the backward (``_HOLDS_UPCAST_COPY``):
    one per quantised Linear whose input needs a gradient, i.e. all but the ``conditioning`` ones. Without
    checkpointing (``units`` None) they all live until the backward reaches them; with it the layers inside the
    checkpointed ``units`` lists keep theirs only while their unit is recomputed (the largest unit counts), the
    rest as without."""
    if fmt not in _HOLDS_UPCAST_COPY:
        return 0
    linears = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    frozen_input = {n for names in expand_targets(conditioning, {n: 2 for n in linears}).values() for n in names}
    held: dict[str, int] = {}
    for name, shape in linears.items():
        if quantizable(name, shape) and not kept_in_fp32(keep, name) and name not in frozen_input:
            unit = _unit(name, units) if units is not None else ""
            held[unit] = held.get(unit, 0) + _numel(shape) * b
    outside = held.pop("", 0)
    return outside + max(held.values(), default=0)


def _vae_encode_bytes(vae_cfg: dict, resolution: int, batch: int, frames: int = 0) -> int:
    """The VAE encoder's peak working memory for one batch (``_VAE_ENCODE_MAPS``): what an uncached step needs
    before the denoiser runs. ``frames``: a video family's clip length (1 for an image), through its causal VAE's
    measured figure (``_CAUSAL_ENCODE_MAPS``) plus the clip's fp32 pixels; 0: an image family's VAE."""
    # AutoencoderKL names its first width block_out_channels[0]; Qwen-Image's (Wan's) causal VAE base_dim.
    width = int((vae_cfg.get("block_out_channels") or [vae_cfg.get("base_dim") or 128])[0])
    if frames <= 0:
        return batch * _VAE_ENCODE_MAPS * width * resolution ** 2 * 4
    table = _CAUSAL_ENCODE_MAPS[bool(vae_cfg.get("is_residual"))]
    maps = next((m for n, m in table if frames <= n), table[-1][1])
    patch = int(vae_cfg.get("patch_size") or 1)
    return batch * int(maps * width * (resolution // patch) ** 2 * 4 + 3 * frames * resolution ** 2 * 4)



def _block_bytes(shapes: dict[str, list[int]], attrs: tuple[str, ...], fmt: str, b: int) -> list[int]:
    """Frozen bytes of each streamable block (spec.blocks ModuleLists), in forward order."""
    blocks: dict[tuple[int, int], dict] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in attrs and parts[1].isdigit():
            blocks.setdefault((attrs.index(parts[0]), int(parts[1])), {})[key] = shape
    return [_weight_bytes(blocks[k], fmt, b) for k in sorted(blocks)]


def _offload(value: float, blocks: list[int]) -> dict | None:
    """What offload_blocks moves off the accelerator: the last blocks in forward order; on the device, the streamer's
    slots of the largest one's size (two from two blocks on: the one running and the one being copied in)."""
    count = resolve_count(value, len(blocks))
    if not count:
        return None
    streamed = blocks[len(blocks) - count:]
    return {"blocks": count, "of": len(blocks), "host_bytes": sum(streamed),
            "device_bytes": min(count, SLOTS) * max(streamed)}


def _summed(total: dict | None, part: dict | None) -> dict | None:
    """Another trained denoiser's offload / shard figures added to the run's: the byte counts add up (``blocks``,
    ``of``, ``processes``: per denoiser, as offload_blocks and shard_base apply to each)."""
    if total is None or part is None:
        return total or part
    return {k: v + part[k] if k.endswith("bytes") else v for k, v in total.items()}


def _shard(blocks: list[int], processes: int) -> dict | None:
    """What shard_base keeps on each of ``processes``: 1/N of every block, plus whole blocks while they run (FSDP2
    gathers the next block during the current one, so two at a time); the rest of the denoiser (embeddings, the
    output layer: the root unit) is whole while the denoiser runs."""
    if processes < 2 or not blocks:
        return None
    gathered = sum(sorted(blocks)[-2:])
    return {"processes": processes, "units": len(blocks) + 1, "block_bytes": sum(blocks),
            "device_bytes": -(-sum(blocks) // processes) + gathered}


def _activations(spec: FamilySpec, cfg_json: dict, denoiser_params: int, resolution: int, batch: int, b: int,
                 checkpointing: bool, attention_only: bool, text_tokens: int, *, variant: str | None = None,
                 latent: int = 1) -> int:
    """``latent``: the latent frames of the largest clip (1: images): each is a frame of image tokens."""
    act = spec.activations
    if act.kind == "transformer":
        d = 1
        for key, default in act.width_keys.items():
            d *= int(cfg_json.get(key, default))
        blocks = sum(int(cfg_json.get(key, default)) for key, default in act.depth_keys.items())
        tokens = latent * (resolution // spec.token_pixels_for(variant)) ** 2 + text_tokens
        kind = "attention" if attention_only else "more"
        factor = act.block_factors.get(kind) or _BLOCK_FACTOR[kind]
        for key, default in act.ffn_keys.items():
            factor += (1 if attention_only else 2) * int(cfg_json.get(key, default)) / d
        per_block = int(factor * act.block_scale * tokens * d * b)
        if checkpointing:
            return batch * (blocks * int(1.1 * tokens * d * b) + per_block)
        return batch * blocks * per_block
    scale = denoiser_params / _REFERENCE_UNET_PARAMS if denoiser_params else 1.0
    full = _UNET_BYTES_PER_PIXEL * resolution ** 2 * scale * b / 2 * (1 if attention_only else _UNET_MORE_TARGETS)
    return int(batch * (full / 4 if checkpointing else full))


def plan_memory(cfg: Any, probe: Any, family: str | None, resolution: int, *, gpu: dict | None,
                overrides: dict | None = None, processes: int = 1, caches: dict | None = None,
                frames: int = 1) -> dict | None:
    """Bytes per process for this config (``overrides``: settings to try instead, for the hints; ``processes``: how
    many train together, which only shard_base changes; ``caches``: cache_plan.plan_caches' figures, the ones placed
    on the GPU counted; ``frames``: the largest clip bucket's frames a video family trains, 1 for images). ``gpu``: gpu.detect_gpu's dict; the plan fits when its total is at most gpu["memory_bytes"]
    (None where that is unknown). None when the model's files cannot be read here (a hub id not downloaded yet, a
    single file)."""
    spec = SPECS.get(family or "")
    if spec is None or probe is None or probe.kind not in ("diffusers_dir", "hub") or not probe.path \
            or not probe.weight_files:
        return None
    o = {"gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": cfg.optimizer,
         "resolution": resolution, "base_quantization": cfg.base_quantization,
         "offload_blocks": cfg.offload_blocks, "shard_base": cfg.shard_base, **(overrides or {})}
    root = Path(probe.path)
    on_gpu = gpu is not None and cfg.device != "cpu"
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    b = 2 if precision in ("bf16", "fp16") else 4
    parts: dict[str, int] = {}
    denoiser_params, denoiser_bytes, lora, copies = 0, 0, 0, 0
    targets = spec.targets(cfg.target_modules)
    cfg_json: dict = {}
    offload = shard = None
    attention_only = True
    # Trained text encoders feed gradients into the conditioning, and their LoRA'd layers run under autograd.
    conditioning = () if cfg.train_text_encoder else spec.activations.conditioning_inputs
    # The trained denoisers (a two-expert model's experts named by train_experts); an untrained expert is a
    # sampling-only model (below).
    trained = spec.trained_denoisers(probe.variant, getattr(cfg, "train_experts", "both"))
    sampling_only = (*spec.sampling_only, *(d for d in spec.denoisers_of(probe.variant) if d not in trained))
    for comp in trained:
        shapes, dtypes = _headers(root, probe.weight_files.get(comp))
        denoiser_params += sum(_numel(s) for s in shapes.values())
        keep = spec.component_classes.get(comp)
        keep_b = _kept_bytes(o["base_quantization"], dtypes, precision)
        denoiser_bytes += _weight_bytes(shapes, o["base_quantization"], b, keep, keep_b)
        lora += _lora_params(shapes, targets, cfg.lora_rank, cfg)
        # The activation figure depends on which layers carry LoRA as resolved ("auto", presets, explicit names):
        # anything beyond the attention preset's layers saves the larger set.
        beyond = set(_selected(shapes, targets)) - set(_selected(shapes, spec.presets["attention"]))
        attention_only = attention_only and not beyond
        copies += _weight_copies(shapes, o["base_quantization"], b, keep=keep, conditioning=conditioning,
                                 units=spec.activations.checkpoint_units if o["gradient_checkpointing"] else None)
        cfg_json = cfg_json or _config(root, comp)
        blocks = _block_bytes(shapes, spec.blocks, o["base_quantization"], b)
        # Two trained experts are streamed (sharded) each by its own streamer, slots included: both count.
        offload = _summed(offload, _offload(o["offload_blocks"], blocks))
        shard = _summed(shard, _shard(blocks, processes) if o["shard_base"] else None)
    if offload:
        denoiser_bytes -= offload["host_bytes"] - offload["device_bytes"]
    if shard:
        denoiser_bytes -= shard["block_bytes"] - shard["device_bytes"]
    parts["denoiser_weights"] = denoiser_bytes
    text_cached = cfg.cache_text_embeddings and not cfg.train_text_encoder and not cfg.shuffle_tags
    te_bytes = 0
    te_fmt = cfg.text_encoder_quantization
    for comp in spec.text_encoders:
        shapes, dtypes = _headers(root, probe.weight_files.get(comp))
        keep = spec.component_classes.get(comp)
        te_bytes += _weight_bytes(shapes, te_fmt, b, keep, _kept_bytes(te_fmt, dtypes, precision))
        if cfg.train_text_encoder and comp in spec.lora_text_encoders:
            # layers whose output the conditioning never reads get no LoRA (training/attach.py unread_layers)
            unread = spec.text_encoder_layers_unread(comp, shapes)
            lora += _lora_params({k: s for k, s in shapes.items() if not k.startswith(tuple(p + "." for p in unread))},
                                 cfg.text_encoder_target_modules, cfg.lora_rank, cfg)
            copies += _weight_copies(shapes, te_fmt, b, keep=keep, conditioning=(), units=None)
    # Cached: the encoders run once, before training, and leave the accelerator (released for FLUX.1 / SD3).
    parts["text_encoders"] = 0 if text_cached else te_bytes
    # The VAE is loaded in fp32 whatever the compute precision (families/adapter.py: SD VAEs overflow in fp16).
    vae = sum(_numel(s) for s in _headers(root, probe.weight_files.get("vae"))[0].values())
    parts["vae"] = 0 if cfg.cache_latents else vae * 4
    per_param = 4 + 4 + OPTIMIZER_BYTES.get(o["optimizer"], 8)
    if shard:
        # LoRA weights and optimizer state are sharded with their blocks; gradients too, except while they
        # accumulate over micro-batches (no reduction until the last one): then they are whole.
        grads = 4 if cfg.gradient_accumulation_steps > 1 else 4 / processes
        parts["lora"] = int(lora * ((per_param - 4) / processes + grads))
    else:
        parts["lora"] = lora * per_param
    if cfg.ema_decay is not None and cfg.ema_device == "accelerator":
        parts["ema"] = lora * 4  # the EMA's fp32 copy of the LoRA (training/ema.py); ema_device "cpu": host memory
    parts["weight_copies"] = copies
    text_tokens = spec.text_length(probe.variant, cfg.max_sequence_length)
    video = spec.temporal_compression > 0
    latent = latent_frames(frames, spec.temporal_compression)
    activations = _activations(spec, cfg_json, denoiser_params, o["resolution"], cfg.batch_size, b,
                               o["gradient_checkpointing"], attention_only, text_tokens,
                               variant=getattr(probe, "variant", None), latent=latent)
    if not cfg.cache_latents:
        # Each step encodes its batch before the denoiser runs, and the encoder's scratch is freed before the
        # denoiser's activations are made: the larger of the two is the peak.
        activations = max(activations, _vae_encode_bytes(_config(root, "vae"), o["resolution"], cfg.batch_size,
                                                         frames if video else 0))
    parts["activations"] = activations
    if sampling_only and cfg.validation_steps:
        # Models only the sampler runs (Ideogram 4's unconditional transformer) are on the host while training and
        # join the denoiser on the accelerator for sample images, when the step's activations are freed: the peak
        # grows by what they exceed the activations by. At the compute precision (never quantised).
        sampler = sum(_weight_bytes(_headers(root, probe.weight_files.get(comp))[0], "none", b)
                      for comp in sampling_only)
        parts["sampling_models"] = max(0, sampler - activations)
    on_device = device_cache_bytes(caches if on_gpu else None, (o["resolution"] / resolution) ** 2)
    parts["caches"] = sum(on_device.values())
    variable = sum(parts.values())
    parts["fixed"] = (CONTEXT_BYTES if on_gpu else 0) + int(SLACK * variable)
    total = sum(parts.values())
    return {"parts_gib": {k: round(v / GIB, 2) for k, v in parts.items()}, "total_gib": round(total / GIB, 2),
            "total_bytes": total, "precision": precision, "lora_params": lora,
            "network_type": getattr(cfg, "network_type", "lora"),
            "denoiser_params": denoiser_params, "assumes": {k: o[k] for k in sorted(o)},
            **({"video": {"frames": frames, "latent_frames": latent}} if video else {}),
            "offload": None if offload is None else {**offload, "host_gib": round(offload["host_bytes"] / GIB, 2)},
            "shard": shard, "processes": processes, "caches": {**on_device, "device_bytes": parts["caches"]},
            "gpu": gpu, "fits": None if not gpu or gpu.get("memory_bytes") is None else total <= gpu["memory_bytes"]}


def _hint(change: dict, plan: dict, gpu: dict) -> dict:
    return {"settings": change, "total_gib": plan["total_gib"], "total_bytes": plan["total_bytes"],
            "fits": plan["total_bytes"] * (1 + HINT_HEADROOM) <= gpu["memory_bytes"]}


def cheaper_settings(cfg: Any, probe: Any, family: str, resolution: int, gpu: dict, processes: int = 1,
                     caches: dict | None = None, frames: int = 1) -> list[dict]:
    """Settings that would fit ``gpu`` (with HINT_HEADROOM), cheapest change first, each with its estimate; only
    changes the config's own rules accept (a refused companion, such as 8-bit AdamW with shard_base, is left out of
    the later hints rather than taking them with it). The defining change of each comes last in its settings."""
    from .model_checks import settings_problems

    variant = getattr(probe, "variant", None)

    def accepted(change: dict) -> bool:
        return not settings_problems(cfg, change, family, variant)

    base = {"gradient_checkpointing": True} if not cfg.gradient_checkpointing else {}
    base = base if accepted(base) else {}
    eight = {**base, "optimizer": "adamw8bit"} if cfg.optimizer != "adamw8bit" else base
    eight = eight if accepted(eight) else base
    tries: list[dict] = [base, eight]
    if processes > 1 and not cfg.shard_base:
        # Sharding costs communication, not accuracy.
        tries.insert(1, {**base, "shard_base": True})
    # A quantised base halves (8-bit) or quarters (NF4) the frozen weights at some accuracy (int8 per-row: ~0.4%
    # output error on random weights, NF4 ~9%), so it comes before a lower resolution, which changes the training.
    smaller = [f for f in ("int8", "nf4") if STORAGE_BYTES[f] < STORAGE_BYTES.get(cfg.base_quantization, 2.0)]
    tries += [{**eight, "base_quantization": fmt} for fmt in smaller]
    tries += [{**eight, "resolution": res} for res in (768, 512) if res < resolution]
    out: list[dict] = []
    for change in tries:
        if not change or any(o["settings"] == change for o in out) or not accepted(change):
            continue
        plan = plan_memory(cfg, probe, family, resolution, gpu=gpu, overrides=change, processes=processes,
                           caches=caches, frames=frames)
        if plan is not None:
            out.append(_hint(change, plan, gpu))
    streamed = _fewest_streamed_blocks(cfg, probe, family, resolution, gpu, eight, caches, accepted, frames)
    if streamed is not None:
        out.insert(next((i for i, o in enumerate(out) if "resolution" in o["settings"]), len(out)), streamed)
    return out


def _fewest_streamed_blocks(cfg: Any, probe: Any, family: str, resolution: int, gpu: dict, base: dict,
                            caches: dict | None, accepted, frames: int = 1) -> dict | None:
    """The smallest offload_blocks (on top of ``base``: checkpointing and 8-bit AdamW where accepted) that fits with
    headroom; None when even streaming every block does not, or the config's rules refuse streaming it (an int8 /
    NF4 base, DoRA, shard_base, no checkpointing)."""
    if not accepted({**base, "offload_blocks": 1}):
        return None

    def plan(count: float) -> dict | None:
        return plan_memory(cfg, probe, family, resolution, gpu=gpu, overrides={**base, "offload_blocks": count},
                           caches=caches, frames=frames)

    full = plan(0.999)
    if full is None or not full["offload"] or not _hint({}, full, gpu)["fits"]:
        return None
    # Each streamed block frees its bytes and costs at most twice the growth of the largest streamed one (the two
    # slots), so the total falls as the count grows wherever blocks are of similar size: bisect (each plan reads
    # every header; a linear scan over 57 FLUX blocks is slow). Where a much larger block joins it may not, and the
    # count found fits but may not be the fewest.
    lo, hi, best = 1, full["offload"]["of"], None
    while lo <= hi:
        mid = (lo + hi) // 2
        hint = _hint({**base, "offload_blocks": mid}, plan(mid), gpu)
        if hint["fits"]:
            best, hi = hint, mid - 1
        else:
            lo = mid + 1
    return best


def drift_warning(plan: dict | None, memory: dict) -> str | None:
    """A message when the measured peak (CUDA: reserved by torch's allocator plus the context it cannot see)
    differs from the plan by more than DRIFT; None on the CPU, where RSS also counts the libraries and the host
    copies of what went to the device."""
    peak = memory.get("gpu_reserved_peak_gb")
    if not plan or peak is None:
        return None
    measured = peak + CONTEXT_BYTES / GIB
    planned = plan["total_gib"]
    if planned <= 0 or abs(measured - planned) / planned <= DRIFT:
        return None
    return (f"memory: measured {measured:.2f} GiB (peak reserved + CUDA context) against a plan of {planned:.2f} GiB "
            f"({(measured - planned) / planned:+.0%}); the plan's parts: {plan['parts_gib']}")
