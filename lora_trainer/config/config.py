"""Config loading: JSON file -> schema validation -> cross-field checks -> one frozen, typed TrainConfig.

config_schema.json is the single source of truth for names, types, ranges and defaults; schema.py checks a
document against it (with flat vs nested duplicates and did-you-mean), this module adds the cross-field rules a
schema cannot say (and the family's, where model_type names one) and reports every problem at once, each with the
JSON path, the bad value and what is allowed. It must stay free of torch and diffusers imports: ``--validate-only``
promises an answer in about a second.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import datasets
from ..data.buckets import bucket_range
from ..contract.errors import ConfigError
from ..families import SPECS
from .network import network_problems
from .schema import (check_keys, json_number, mark_non_finite, non_finite_problems, optional_fields, problem,
                     redact, schema_problems)
# Names modules and tests have always imported from here.
from .schema import (NESTED_KEY, REDACTED, REQUIRED, SCHEMA_PATH, SECRET_KEYS, SECRET_SUFFIXES,  # noqa: F401
                     SECRET_VALUE, is_secret_key, load_schema)


DEFAULT_MAX_TRAIN_STEPS = 1000
VAE_SCALE = 8  # every family's VAE downsamples 8x: the least multiple of an image side
BUCKET_STEP = 64  # buckets.make_buckets' step


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, resolved and immutable. Field names equal the config keys."""

    dataset_path: Path | None  # None with `datasets` (data/datasets.py)
    base_model: str
    output_path: Path
    trigger_words: tuple[str, ...]
    datasets: tuple = ()  # data.datasets.DatasetEntry per entry; () with dataset_path
    model_type: str = "auto"
    prediction_type: str = "auto"
    base_model_config: str | None = None
    resolution: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_epochs: int | None = None
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    ema_decay: float | None = None  # EMA of the adapter weights (training/ema.py); None: off
    ema_device: str = "accelerator"
    ema_update_interval: int = 1
    ema_warmup: bool = True
    ema_sampling: str = "ema"
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "auto"  # "auto", a preset name, or module names (families/spec.py)
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    use_dora: bool = False
    network_type: str = "lora"  # lora | lokr | loha (adapters/lycoris.py)
    lokr_factor: int = -1
    lokr_decompose_both: bool = False
    lycoris_effective_conv: bool = False
    init_lora: str | None = None
    merge_lora: str | None = None
    merge_lora_scale: float = 1.0
    train_text_encoder: bool = False
    # Wan 2.2 A14B's experts (families/wan/experts.py): both, or the one named (its sigmas only; the other frozen).
    train_experts: str = "both"
    mixed_precision: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int = 3
    background_checkpoints: str | bool = "auto"
    resume: bool | str = False
    caption_extension: str = ".txt"
    prepend_trigger_words: bool = True
    caption_dropout_rate: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1
    repeats: int = 1
    recursive: bool = True
    enable_bucketing: bool | None = None
    min_bucket_resolution: int | None = None  # None: buckets.bucket_range's default, which follows resolution
    max_bucket_resolution: int | None = None
    random_crop: bool = False
    flip_aug: bool = False
    # Video clips (data/video.py): frames sampled at video_fps, video_frames (4k+1) a clip, on one of video_windows
    # fixed windows per epoch (a finite set, so the latent cache can hold every window); trained by families with a
    # temporal_compression (Wan), skipped with a warning by image families.
    video_fps: float = 16.0
    video_frames: int = 81
    video_short_clip: str = "shorten"
    video_start: str = "first"
    video_windows: int = 3
    masked_loss: bool = False  # data/masks.py: a mask per image weights its loss
    mask_path: str | None = None
    alpha_mask: bool = False
    require_masks: bool = False
    mask_min_value: float = 0.0
    mask_normalize: bool = True
    cache_latents: bool = True
    cache_latents_to_disk: bool | None = None  # None: false, but a dataset with video clips spills to disk
    cache_text_embeddings: bool = True
    cache_text_embeddings_to_disk: bool = False
    cache_host_budget_gb: float | None = None  # None: text_cache.default_host_budget()
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    # Flow-matching options: None takes the family's default (families/spec.py FlowDefaults).
    flow_sigma_sampling: str | None = None
    flow_logit_mean: float | None = None
    flow_logit_std: float | None = None
    flow_mode_scale: float | None = None
    flow_sigmoid_scale: float | None = None
    flow_shift: str | None = None
    flow_shift_value: float | None = None
    flow_loss_weighting: str | None = None
    flow_precondition_outputs: bool | None = None
    train_guidance_scale: float | None = None
    max_sequence_length: int | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int | None = None
    num_validation_images: int = 1
    validation_inference_steps: int | None = None  # None: the model's (families/adapter.py sample_steps)
    validation_guidance_scale: float | None = None
    validation_base_model: str | None = None  # another release of the family draws the samples (training/validation_model.py)
    validation_frames: int = 17  # a video family's sample clip (outputs/clips.py); images ignore it
    validation_video_format: str = "mp4"
    # Validation loss on a held-out set (training/eval_loss.py; "validation_*" above means sample images).
    eval_dataset_path: str | None = None
    eval_split: float = 0.0
    eval_steps: int = 100
    eval_timesteps: tuple[float, ...] | None = None  # None: the objective's default_eval_levels
    eval_seed: int | None = None  # None: seed
    eval_max_images: int = 32
    output_name: str = "lora"
    save_precision: str = "fp16"
    overwrite_output: bool = False
    log_every_n_steps: int = 10
    report_to: str = "none"
    heartbeat_seconds: float = 30.0
    dataloader_workers: int = 0
    cpu_threads: int | None = None  # None: device.choose_cpu_threads decides
    ignore_memory_plan: bool = False
    base_quantization: str = "none"  # frozen denoiser storage: none | fp8 | int8 | nf4 (quantize.py)
    text_encoder_quantization: str = "none"
    compile: bool = False  # regional compilation of the denoiser's blocks (runtime/compile.py)
    offload_blocks: float = 0  # blocks streamed from host memory: a count (>= 1) or a fraction (offload.py)
    shard_base: bool = False  # FSDP2 shards of the frozen denoiser across processes (shard.py)
    # Keys the user wrote (flat or nested); some checks apply only to explicit values.
    explicit_keys: frozenset[str] = field(default_factory=frozenset, compare=False)
    config_path: Path | None = field(default=None, compare=False)

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the config are relative to: the config file's (else the working one)."""
        return self.config_path.parent if self.config_path is not None else Path.cwd()

    def resolve(self, value: str) -> Path:
        """A path from the config (base_model_config, init_lora, resume ...), ~ expanded, relative to base_dir."""
        return _resolve_path(value, self.base_dir)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for events and the manifest); secrets are redacted (see redact)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("explicit_keys", "config_path"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
            out[f.name] = redact(f.name, value)
        return out


def _resolve_path(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _compile_problems(cfg: TrainConfig, problems: list[dict]) -> None:
    # Measured on the tiny FLUX.1: torchao's int8 weights are tensor subclasses inductor refuses as graph inputs ("torch
    # .compile is currently being used with tensor subclass inputs"); fp8 layerwise casting's hooks recast weights
    # inside the compiled forward, and a checkpointed block's recomputation then sees fp8 where fp32 was saved.
    if cfg.compile and cfg.base_quantization in ("int8", "fp8"):
        problems.append(problem("compile", True, f"compile cannot compile blocks over a {cfg.base_quantization} base "
                                "(int8: torchao's tensor subclasses are not inductor inputs; fp8: layerwise casting "
                                "recasts the weights inside the compiled blocks)",
                                "base_quantization \"none\" or \"nf4\" with compile, or compile false"))


def _offload_problems(cfg: TrainConfig, problems: list[dict]) -> None:
    value = cfg.offload_blocks
    if not value:
        return
    if value >= 1 and value != int(value):
        problems.append(problem("offload_blocks", value, "offload_blocks of 1 or more is a block count and must be "
                                "a whole number", f"{int(value)}, or a fraction between 0 and 1"))
    if not cfg.gradient_checkpointing:
        # Without checkpointing the backward pass holds every block's activations; the streaming plan counts a
        # block's inputs only (offload.py).
        problems.append(problem("offload_blocks", value, "offload_blocks needs gradient_checkpointing: without it "
                                "the backward pass keeps every block's activations on the accelerator",
                                "set gradient_checkpointing true, or offload_blocks 0"))
    if cfg.base_quantization in ("int8", "nf4"):
        problems.append(problem("offload_blocks", value, f"offload_blocks cannot stream a {cfg.base_quantization} "
                                "base: its weights carry quantisation state that streaming does not move",
                                "base_quantization \"none\" or \"fp8\" with offload_blocks, or offload_blocks 0"))
    if cfg.use_dora:
        problems.append(problem("offload_blocks", value, "offload_blocks cannot be combined with use_dora: DoRA's "
                                "export reads the base weights, which streaming keeps in host memory",
                                "use_dora false, or offload_blocks 0"))


def _unused(cfg: TrainConfig, keys: tuple[str, ...], why: str, warnings: list[dict]) -> None:
    """An ``unused_setting`` warning for each of ``keys`` the config sets although ``why`` makes it moot."""
    for key in keys:
        if key in cfg.explicit_keys:
            warnings.append({"code": "unused_setting", "path": key, "message": f"{key} has no effect {why}"})


def _ema_warnings(cfg: TrainConfig, warnings: list[dict]) -> None:
    if cfg.ema_decay is None:
        _unused(cfg, ("ema_device", "ema_update_interval", "ema_warmup", "ema_sampling"),
                "because ema_decay is null (EMA off)", warnings)
        return
    updates = (cfg.max_train_steps or 0) // cfg.ema_update_interval
    window = 1 / (1 - cfg.ema_decay)  # the number of updates the average effectively spans
    if not cfg.ema_warmup and cfg.max_train_steps and updates < window:
        warnings.append({"code": "ema_too_slow", "path": "ema_decay",
                         "message": f"ema_decay {cfg.ema_decay} averages over about {window:.0f} updates but the run "
                                    f"makes {updates}: without ema_warmup the EMA stays close to the first steps' "
                                    "weights; lower ema_decay or set ema_warmup true"})


def shard_clashes(cfg: TrainConfig) -> list[tuple[str, str]]:
    """The settings shard_base cannot be combined with, as (message, allowed); shard.py says why for each. One list
    for the config error and for the memory plan's hints (which offer shard_base only where it would work)."""
    clashes = [
        (cfg.base_quantization != "none", f"base_quantization {cfg.base_quantization!r}: a quantised or fp8 base's "
         "tensors and casting hooks cannot be sharded", "base_quantization \"none\" with shard_base"),
        (bool(cfg.offload_blocks), "offload_blocks: streaming and sharding would move the same weights",
         "offload_blocks 0 with shard_base"),
        (cfg.use_dora, "use_dora: DoRA's export reads whole base weights, which no process holds",
         "use_dora false with shard_base"),
        (cfg.network_type != "lora", f"network_type {cfg.network_type!r}: only LoRA's sharded state is tested",
         "network_type \"lora\" with shard_base"),
        (cfg.train_text_encoder, "train_text_encoder: only the denoiser is sharded; train its LoRA alone",
         "train_text_encoder false with shard_base"),
        (cfg.optimizer != "adamw", f"optimizer {cfg.optimizer!r} does not run on sharded tensors",
         "optimizer \"adamw\" with shard_base"),
        (cfg.ema_decay is not None, "ema_decay: the EMA keeps whole copies of the LoRA, which sharding splits",
         "ema_decay null with shard_base"),
    ]
    return [(message, allowed) for clash, message, allowed in clashes if clash]


def _shard_problems(cfg: TrainConfig, problems: list[dict]) -> None:
    if not cfg.shard_base:
        return
    for message, allowed in shard_clashes(cfg):
        problems.append(problem("shard_base", True, f"shard_base cannot be combined with {message}",
                                f"{allowed}, or shard_base false"))


def resolution_problems(cfg: TrainConfig, problems: list[dict], path: str = "resolution") -> None:
    """The resolution's multiple and bucket range (`path` names it: an entry of `datasets` has its own)."""
    if cfg.resolution is None:
        return
    # A UNet family's resolution rules are checked here: its pixel multiple (the VAE's 8x times the UNet's
    # downsampling) and its bucketing default. A transformer family's (VAE x patch size) are checked by
    # preflight with its other family rules (model_checks), where a probed family gets them too.
    spec = SPECS.get(cfg.model_type)  # None for "auto"
    unet = spec if spec is not None and "unet" in spec.denoisers else None
    family_multiple = unet.pixel_multiple if unet else VAE_SCALE
    multiple = math.lcm(family_multiple, BUCKET_STEP if cfg.enable_bucketing is True else 1)
    if cfg.resolution % multiple:
        if cfg.enable_bucketing:
            why = f"bucketing uses a {BUCKET_STEP} px step"
        elif family_multiple > VAE_SCALE:
            why = f"{unet.label}'s UNet needs latents divisible by {family_multiple // VAE_SCALE}"
        else:
            why = f"the VAE downsamples {VAE_SCALE}x"
        problems.append(problem(path, cfg.resolution, f"resolution must be a multiple of {multiple} ({why})",
                                f"a multiple of {multiple}, e.g. {max(multiple, cfg.resolution // multiple * multiple)}"))
    bucketing = cfg.enable_bucketing or (cfg.enable_bucketing is None and unet is not None and unet.bucketing_default)
    lo, hi = bucket_range(cfg.min_bucket_resolution, cfg.max_bucket_resolution, cfg.resolution)
    if bucketing and not (lo <= cfg.resolution <= hi):  # only an explicit bound can exclude it
        problems.append(problem(path, cfg.resolution, "resolution lies outside the bucket range",
                                f"{lo} to {hi} (min_bucket_resolution / max_bucket_resolution)"))


def _cross_field(cfg: TrainConfig, problems: list[dict], warnings: list[dict]) -> None:
    ex = cfg.explicit_keys
    if cfg.max_train_steps is not None and cfg.num_epochs is not None:
        problems.append(problem("num_epochs", cfg.num_epochs, "set max_train_steps or num_epochs, not both",
                                "remove one of them"))
    steps = cfg.max_train_steps
    if steps is not None:
        if "checkpointing_steps" in ex and cfg.checkpointing_steps and cfg.checkpointing_steps > steps:
            problems.append(problem("checkpointing_steps", cfg.checkpointing_steps,
                                    f"checkpoint interval is beyond the total of {steps} steps: no checkpoint would be written before the end",
                                    f"an integer between 1 and {steps}, or null"))
        if cfg.lr_warmup_steps > steps:
            problems.append(problem("lr_warmup_steps", cfg.lr_warmup_steps,
                                    f"warm-up is longer than the whole run ({steps} steps)", f"0 to {steps}"))
        if cfg.validation_steps and cfg.validation_steps > steps:
            warnings.append({"code": "validation_never_runs", "path": "validation_steps",
                             "message": f"validation_steps {cfg.validation_steps} > max_train_steps {steps}: samples only at the end"})
    resolution_problems(cfg, problems)
    if None not in (cfg.min_bucket_resolution, cfg.max_bucket_resolution) and \
            cfg.min_bucket_resolution > cfg.max_bucket_resolution:
        problems.append(problem("min_bucket_resolution", cfg.min_bucket_resolution,
                                "min_bucket_resolution is larger than max_bucket_resolution",
                                f"<= {cfg.max_bucket_resolution}"))
    if cfg.dataset_path is None:
        pass  # datasets: each entry is checked by data.datasets.config_problems
    elif cfg.dataset_path == cfg.output_path or _is_within(cfg.output_path, cfg.dataset_path):
        problems.append(problem("output_path", str(cfg.output_path),
                                "output_path is the dataset folder or inside it: checkpoints and samples would be read as training images",
                                "a folder outside dataset_path"))
    elif _is_within(cfg.dataset_path, cfg.output_path):
        problems.append(problem("output_path", str(cfg.output_path),
                                "output_path contains dataset_path: pruning or overwriting outputs could touch the dataset",
                                "a folder that does not contain dataset_path"))
    if cfg.optimizer == "adamw8bit" and cfg.device == "cpu":
        problems.append(problem("optimizer", cfg.optimizer, "the 8-bit AdamW of bitsandbytes needs a CUDA GPU, but device is 'cpu'",
                                "adamw, prodigy or adafactor on the CPU"))
    if cfg.use_dora:
        warnings.append({"code": "dora_loaders", "path": "use_dora",
                         "message": "DoRA: diffusers loads pytorch_lora_weights.safetensors exactly; ComfyUI and Forge "
                                    "load the kohya file (their current output-axis DoRA normalises by the base "
                                    "weight's norm, a small approximation); A1111's built-in loader implements only "
                                    "input-axis DoRA and misapplies it. See README 'DoRA'."})
    datasets.config_problems(cfg, problems, warnings, problem, _is_within, resolution_problems)
    _ema_warnings(cfg, warnings)
    network_problems(cfg, problems, warnings)
    _offload_problems(cfg, problems)
    _compile_problems(cfg, problems)
    _shard_problems(cfg, problems)
    if cfg.video_frames < 1 or (cfg.video_frames - 1) % 4:
        problems.append(problem("video_frames", cfg.video_frames, "video_frames must be 4k+1 (1, 5, 9 ... 81): "
                                "a causal video VAE compresses 4 frames after the first into one", "4k+1"))
    if (cfg.validation_frames - 1) % 4:
        problems.append(problem("validation_frames", cfg.validation_frames, "validation_frames must be 4k+1 (1, 5, 9, "
                                "13, 17 ...): a video VAE decodes k+1 latent frames into 4k+1", "4k+1, e.g. 17"))
    if cfg.flip_aug and cfg.cache_latents:
        problems.append(problem("flip_aug", True, "flip_aug needs cache_latents false (a cached latent is of the unflipped image)",
                                "false, or set cache_latents to false"))
    if not cfg.masked_loss:
        _unused(cfg, ("mask_path", "alpha_mask", "require_masks", "mask_min_value", "mask_normalize"),
                "because masked_loss is false", warnings)
    if cfg.mixed_precision == "fp16" and cfg.device == "cpu":
        problems.append(problem("mixed_precision", "fp16", "fp16 mixed precision needs a GPU (the gradient scaler is CUDA-only)",
                                "\"no\", \"bf16\" or \"auto\" on the CPU"))
    if not cfg.train_text_encoder:
        _unused(cfg, ("text_encoder_lr", "text_encoder_target_modules"), "because train_text_encoder is false",
                warnings)
    if cfg.eval_dataset_path and cfg.eval_split:
        problems.append(problem("eval_split", cfg.eval_split, "set eval_dataset_path or eval_split, not both",
                                "0 with eval_dataset_path, or eval_dataset_path null"))
    if not (cfg.eval_dataset_path or cfg.eval_split):
        _unused(cfg, ("eval_max_images", "eval_seed", "eval_steps", "eval_timesteps"),
                "without a held-out set (eval_dataset_path or eval_split)", warnings)
    if cfg.validation_prompts and cfg.validation_steps is None:
        warnings.append({"code": "unused_setting", "path": "validation_prompts",
                         "message": "validation_prompts are set but validation_steps is null: no samples during training"})


def parse_config(raw: Any, *, base_dir: Path | None = None, config_path: Path | None = None) -> tuple[TrainConfig, list[dict]]:
    """Validate a decoded JSON document; returns the config and non-fatal warnings, or raises ConfigError."""
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a JSON object", [problem("(root)", raw if not isinstance(raw, (dict, list)) else type(raw).__name__,
                                                                        f"expected an object, got {type(raw).__name__}", "a JSON object with dataset_path, base_model, output_path, trigger_words")])
    raw = mark_non_finite(raw)  # NaN would pass every range check (and then fail a step after loading)
    problems: list[dict] = non_finite_problems(raw)
    warnings: list[dict] = []
    merged = check_keys(raw, problems)
    non_finite = {p["path"] for p in problems}
    # The schema would add "'NaN' is not of type 'number'" for a key already named above.
    problems.extend(p for p in schema_problems(raw) if p["path"] not in non_finite)
    problems.extend(datasets.key_problems(merged.get("datasets"), problem))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config", problems)

    opt = optional_fields()
    values: dict[str, Any] = {k: spec.get("default") for k, spec in opt.items()}
    values.update(merged)
    values["datasets"] = datasets.parse_entries(values["datasets"], base_dir)
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    triggers = raw["trigger_words"]
    triggers = (triggers,) if isinstance(triggers, str) else tuple(triggers)
    cfg = TrainConfig(
        dataset_path=_resolve_path(raw["dataset_path"], base_dir) if "dataset_path" in raw else None,
        base_model=raw["base_model"],
        output_path=_resolve_path(raw["output_path"], base_dir),
        trigger_words=tuple(t.strip() for t in triggers),
        explicit_keys=frozenset(merged),
        config_path=config_path,
        **values,
    )
    if cfg.max_train_steps is None and cfg.num_epochs is None:
        cfg = dataclasses.replace(cfg, max_train_steps=DEFAULT_MAX_TRAIN_STEPS)
    _cross_field(cfg, problems, warnings)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config", problems)
    return cfg, warnings


def load_config(path: str | os.PathLike) -> tuple[TrainConfig, list[dict]]:
    """Read and validate a config file. Relative paths inside it are relative to the file's folder."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}", [problem("--config", str(p), "file not found", "path to a JSON config file")]) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}", [problem("--config", str(p), str(exc), "a readable file")]) from None
    try:
        text = data.decode("utf-8-sig")  # editors on Windows add a BOM
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8", [problem("--config", str(p), f"byte {exc.start} is not UTF-8", "UTF-8 JSON")]) from None
    try:
        raw = json.loads(text, parse_float=json_number, parse_constant=json_number)
    except RecursionError:
        raise ConfigError(f"config file {p} nests too deeply", [problem("--config", str(p), "JSON nested too deeply", "a flat JSON object")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          [problem("--config", str(p), f"{exc.msg} at line {exc.lineno} column {exc.colno}", "valid JSON")]) from None
    return parse_config(raw, base_dir=p.resolve().parent, config_path=p.resolve())
