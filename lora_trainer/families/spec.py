"""What a model family is, as plain data: no torch, so preflight (``--validate-only``) can use it in a second.

Each family folder's ``spec.py`` holds one ``FamilySpec`` (``SPEC``); the torch side (loading, conditioning, the
denoiser call, sampling) is its ``adapter.py``. The spec holds the facts both sides and the shared modules need:
its components and their classes, the objective it trains with and that objective's defaults, native resolution
and bucketing, the pixel multiple its latents need, LoRA target presets, which text encoders may get LoRA, the
sampler's defaults, its latents and text-cache entries, the figures the memory plan scales, and the names other
tools use for it (modelspec, kohya ``ss_base_model_version``, hub tags). Every field is required: a new family
that forgets one fails at import, instead of silently getting another family's figure.

Target presets are lists of module patterns. A pattern without ``*`` is matched as PEFT matches target names (the
module's name or a "."-suffix of it); a pattern with ``*`` is an fnmatch pattern over full module names and selects
only Linear layers under it (``transformer_blocks.*``: every Linear of every block), so that a preset can say
"all Linear layers of the blocks" without naming the model's embeddings or final layer.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping

def tokenizer_of(encoder: str) -> str:
    """The pipeline attribute of a text encoder's tokenizer: text_encoder_2 -> tokenizer_2."""
    return encoder.replace("text_encoder", "tokenizer")


PRESETS = ("attention", "attention_mlp", "all_linear")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# CLIP text encoders' layers, a "."-suffix of the path: transformers 5 names a CLIPTextModel's modules encoder.*, 4.x
# text_model.encoder.*, and weight files hold either.
CLIP_LAYERS = "encoder.layers"


@dataclass(frozen=True)
class EncoderReads:
    """How deep a family's conditioning reads one of its LoRA'd text encoders.

    ``layers`` is the encoder's ModuleList of layers, the path or a "."-suffix of it (transformers'
    ``hidden_states[i + 1]`` is layer i's output);
    ``deepest`` the deepest hidden state any conditioning input comes from, indexed like ``hidden_states``: -1 the
    last layer's output (``last_hidden_state``, ``pooler_output`` and ``text_embeds`` all come from it), -2 the
    penultimate (SDXL's CLIP-L: the last layer's output is computed and never read)."""

    layers: str
    deepest: int

    @property
    def unread(self) -> int:
        """How many final layers the conditioning never reads."""
        return -1 - self.deepest

@dataclass(frozen=True)
class FlowDefaults:
    """One variant's defaults of the flow-matching options (config keys flow_*; see README "Flow matching")."""

    sigma_sampling: str = "uniform"
    shift: str = "none"
    shift_value: float = 3.0
    logit_std: float = 1.0  # of "logit_normal" sampling (Ideogram 4 trains with 1.5)
    loss_weighting: str = "none"
    precondition_outputs: bool = False


@dataclass(frozen=True)
class ToolNames:
    """How other tools name a LoRA of this family (sd-scripts library/sai_model_spec.py writes these): A1111 and
    Forge decide compatibility by ``ss_base_model_version`` (network.py detect_version) and by the modelspec
    architecture / implementation (Forge sd_forge_lora/network.py); Civitai files LoRAs by them."""

    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture, without the "/lora" suffix
    implementation: str  # modelspec.implementation
    # A variant that is its own release (Wan 2.2 beside 2.1): what the model card calls it instead of the family's
    # display_name, and its Hub tags beside the family's hub_tags. Empty: the family's alone.
    display_name: str = ""
    hub_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextEntry:
    """One caption's text-cache entry for the real model, as shapes: ``tokens`` fixed tokens (CLIP's 77), plus
    max_sequence_length more when ``sequence`` (T5), each ``width`` wide, plus a ``pooled`` vector."""

    tokens: int
    sequence: bool
    width: int
    pooled: int

    def elements(self, max_sequence_length: int) -> int:
        return (self.tokens + (max_sequence_length if self.sequence else 0)) * self.width + self.pooled


@dataclass(frozen=True, kw_only=True)
class Activations:
    """What the memory plan scales activations by (memory_plan.py says how each kind was measured).

    ``"unet"``: bytes per pixel measured on SDXL, scaled by the UNet's weight count. ``"transformer"``: per block,
    linear in tokens (image tokens (resolution / (token_pixels or pixel_multiple))^2 plus the text sequence,
    FamilySpec.text_length) and in the hidden size, read from the denoiser's config.json: ``width_keys``
    multiplied, ``depth_keys`` summed, each key mapped to the figure taken where config.json lacks it.

    ``conditioning_inputs``: module patterns (as target patterns) of the Linears fed only by the conditioning (the
    timestep and pooled-text embedding's modulation layers, cross-attention keys and values over the text states).
    While the text encoders are frozen their input needs no gradient, so autograd keeps nothing of them: a quantised
    base that upcasts its weights for each matmul (fp8, int8) holds no copy of these for the backward.
    ``checkpoint_units``: the ModuleList names whose items diffusers' gradient checkpointing recomputes one at a
    time (the innermost such item holds a layer)."""

    kind: str  # "unet" | "transformer"
    conditioning_inputs: tuple[str, ...]
    checkpoint_units: tuple[str, ...]
    width_keys: Mapping[str, int] = field(default_factory=dict)
    depth_keys: Mapping[str, int] = field(default_factory=dict)
    # What one of its blocks saves for backward relative to the FLUX.1 block the transformer figures were measured on
    # (same tokens, width and LoRA preset kind): 1.0 for FLUX.1 / SD3; FLUX.2's fused single blocks save more.
    block_scale: float = 1.0
    # Pixels per image token side where that is not pixel_multiple: Qwen-Image 2.1's sides are multiples of 32 (one
    # image slot is 2x2 tokens) but a token is 16 px. 0: pixel_multiple.
    token_pixels: int = 0
    # Where the family's own block was measured because FLUX.1's figures do not hold for it: what a block saves in
    # L x d x 2-byte units by LoRA kind ("attention" | "more"; empty: FLUX.1's), plus per unit of its MLP's hidden
    # width over d (ffn_keys, as width_keys: config key -> default) 1 (the activation's input) or, with LoRA on the
    # MLP, 2 (its second Linear's input too). Wan: its modulation and residuals run in fp32 (memory_plan.py).
    block_factors: Mapping[str, float] = field(default_factory=dict)
    ffn_keys: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Experts:
    """A variant whose denoising is split by noise level between denoisers of one architecture (Wan 2.2 A14B: a
    high-noise and a low-noise transformer). ``groups``: (train_experts name, component), noisiest first; the
    denoiser of group i takes timesteps t (sigma x 1000) with t >= boundary x 1000 for i = 0, below for i = 1 (the
    pipeline's rule). ``boundary``: the release's boundary_ratio where its model_index.json lacks one."""

    groups: tuple[tuple[str, str], ...]
    boundary: float

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.groups)

    def trained(self, train_experts: str) -> tuple[str, ...]:
        """The components a run trains: every expert ("both") or the one named."""
        return tuple(comp for name, comp in self.groups if train_experts in ("both", name))

    def sigma_range(self, train_experts: str, boundary: float) -> tuple[float, float] | None:
        """The sigmas the trained experts see (None: all of them). The low-noise end stops at the largest float32
        below the boundary, so that sigma x 1000 < boundary x 1000 holds in the float32 the routing compares."""
        if train_experts == "both":
            return None
        import struct

        nearest = struct.unpack("<f", struct.pack("<f", boundary))[0]
        bits = struct.unpack("<I", struct.pack("<f", nearest))[0]
        below = struct.unpack("<f", struct.pack("<I", bits - 1))[0] if nearest >= boundary else nearest
        return (boundary, 1.0) if train_experts == self.groups[0][0] else (0.0, below)


@dataclass(frozen=True)
class FamilySpec:
    name: str  # the model_type value
    label: str  # short, for people: "FLUX.1", "SDXL"
    display_name: str  # long, for the model card and report: "Stable Diffusion 1.x"
    objective: str  # "ddpm" | "flow"
    pipeline_class: str  # the diffusers text-to-image pipeline (samples, single-file loading)
    denoisers: tuple[str, ...]  # pipeline attribute names of the trainable denoiser(s)
    text_encoders: tuple[str, ...]  # pipeline attribute names; tokenizer of text_encoder_N is tokenizer_N
    # component (denoisers, "vae", text encoders, their tokenizers) -> diffusers / transformers class name
    component_classes: Mapping[str, str]
    components: tuple[str, ...]  # what its diffusers folder must hold, in the order the probe reports them
    lora_text_encoders: tuple[str, ...]  # the encoders train_text_encoder puts LoRA on (T5 never: 4.7 B frozen)
    # Each of lora_text_encoders -> how deep the conditioning (the adapter's encode_text) reads it. Layers past that
    # get no LoRA (text_encoder_layers_unread): it could not learn, is dead weight in every exported file, and DDP
    # refuses a parameter that gets no gradient.
    text_encoder_reads: Mapping[str, EncoderReads]
    default_resolution: int
    # Prediction type -> native resolution where it differs from default_resolution (SD2's 512 px epsilon base).
    prediction_resolution: Mapping[str, int]
    bucketing_default: bool
    pixel_multiple: int  # image sides must be multiples: VAE downsampling x the denoiser's patch size
    # Variant -> its pixel multiple where it differs from pixel_multiple (the default variant's): Wan 2.2 TI2V-5B's
    # VAE compresses 16x where Wan 2.1's does 8x, so its sides are multiples of 32 (empty: every variant's is
    # pixel_multiple). Read through pixel_multiple_for.
    variant_pixel_multiple: Mapping[str, int]
    latent_channels: int  # of the VAE's latents (8x downsampled)
    presets: Mapping[str, tuple[str, ...]]
    default_preset: str
    # Variant -> its flow-matching defaults; key None: the default variant's, for a variant not known yet (a hub
    # model not downloaded) or not listed. Per variant because variants of one family sample differently (FLUX.1-dev
    # shifts by resolution, schnell not) and training should match. None for DDPM families.
    flow: Mapping[str | None, FlowDefaults] | None
    # Sampling defaults: guidance_scale of the diffusers pipeline (CFG, or FLUX-dev's embedded guidance).
    sample_guidance: float
    # Variant -> value fed to the guidance embedder during training (None: the variant has no embedder).
    train_guidance: Mapping[str | None, float | None]
    # Variant -> default T5 max_sequence_length (empty: the family has no T5).
    max_sequence_length: Mapping[str | None, int]
    # Variant -> the hub repo diffusers takes a single file's configs from (None: the default).
    single_file_config_repo: Mapping[str | None, str]
    # Those of its single_file_config_repo repos that are gated on the Hub (accept the licence, set HF_TOKEN).
    gated_repos: tuple[str, ...]
    # The denoiser's repeated blocks (ModuleList names, in forward order): the units offload_blocks streams from host
    # memory (offload.py) and shard_base shards (shard.py), and the memory plan counts.
    blocks: tuple[str, ...]
    text_entry: TextEntry
    activations: Activations
    # Variant, or "v" for a v-prediction model of a family without variants, -> tool names (None: the default).
    tool_names: Mapping[str | None, ToolNames]
    # whether the tool file's layout can carry DoRA magnitudes: not where it fuses q/k/v (FLUX.2's, Ideogram 4's:
    # one magnitude per fused output row cannot hold three parts' norms); use_dora is then a config error
    tool_file_dora: bool
    kohya_v2: bool  # ss_v2: A1111 classifies a LoRA whose ss_base_model_version is not SDXL's as SD2 by it
    # The kohya file names the UNet's modules in SGM layout (sd-scripts trains SDXL on its own SGM UNet), not by their
    # diffusers paths (families/_unet/kohya_names.py); False for a family without a UNet.
    kohya_sgm_unet: bool
    extra_metadata: Mapping[str, str]  # more kohya keys its sd-scripts trainer writes (FLUX.1: ss_model_type)
    hub_tags: tuple[str, ...]  # model card tags (the Hub's filters)
    # A video family's temporal compression: its VAE turns a clip of 4k+1 frames into k+1 latent frames when this is
    # 4 (Wan's causal 3-D VAE). 0: an image family, whose datasets' clips are refused (data, scan, memory plan and
    # caches read this; the loop never does).
    temporal_compression: int
    # Variant -> its experts (a denoiser per noise level: Wan 2.2 A14B), for the variants that have them; the
    # denoisers are then the experts' components, ``denoisers`` being the first. Empty: one denoiser per variant.
    experts: Mapping[str, Experts]

    def denoisers_of(self, variant: str | None) -> tuple[str, ...]:
        """Every denoiser a variant has (its experts' components, or ``denoisers``)."""
        experts = self.experts.get(variant or "")
        return tuple(comp for _, comp in experts.groups) if experts else self.denoisers

    def trained_denoisers(self, variant: str | None, train_experts: str = "both") -> tuple[str, ...]:
        experts = self.experts.get(variant or "")
        return experts.trained(train_experts) if experts else self.denoisers

    def __post_init__(self):
        if "vae" not in self.component_classes:
            raise ValueError(f"{self.name}: component_classes must name the VAE's class")
        if set(self.text_encoder_reads) != set(self.lora_text_encoders):
            raise ValueError(f"{self.name}: text_encoder_reads must name exactly the lora_text_encoders "
                             f"{self.lora_text_encoders}, not {tuple(self.text_encoder_reads)}")

    def pixel_multiple_for(self, variant: str | None) -> int:
        """The multiple a variant's image sides must be (VAE downsampling x patch size): what the resolution check,
        the buckets and the memory plan read."""
        return self.variant_pixel_multiple.get(variant or "", self.pixel_multiple)

    def token_pixels_for(self, variant: str | None) -> int:
        """Pixels per side of one denoiser token of a variant (Activations.token_pixels, else its pixel multiple)."""
        return self.activations.token_pixels or self.pixel_multiple_for(variant)

    def text_encoder_layers_unread(self, encoder: str, names) -> tuple[str, ...]:
        """The module-name prefixes of ``encoder``'s layers whose output the conditioning never reads, given its
        module names (``named_modules``) or weight names (a safetensors header): the last ``unread`` of the
        ``layers`` list. Empty where the names hold no such list (the caller decides whether that is wrong)."""
        reads = self.text_encoder_reads[encoder]
        if not reads.unread:
            return ()
        pattern = re.compile(r"((?:.+\.)?" + re.escape(reads.layers) + r")\.(\d+)(?:\.|$)")
        counts: dict[str, int] = {}
        for name in names:
            if m := pattern.match(name):
                counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
        return tuple(f"{path}.{i}" for path, count in sorted(counts.items())
                     for i in range(max(count - reads.unread, 0), count))

    def tool_names_for(self, variant: str | None, prediction_type: str | None = None) -> ToolNames:
        if variant is not None and variant in self.tool_names:
            return self.tool_names[variant]
        if prediction_type in ("v", "v_prediction") and "v" in self.tool_names:
            return self.tool_names["v"]
        return self.tool_names[None]

    def tokenizer_of(self, encoder: str) -> str:
        """The pipeline attribute (and folder) of ``encoder``'s tokenizer: tokenizer_N, or diffusers' name for a
        multimodal encoder's tokenizer, ``processor`` (Qwen-Image 2.1's Qwen3VLProcessor), where the components list
        that instead (a pipeline has one processor, so one encoder)."""
        name = tokenizer_of(encoder)
        if name not in self.components and "processor" in self.components and len(self.text_encoders) == 1:
            return "processor"
        return name

    @property
    def sampling_only(self) -> tuple[str, ...]:
        """The other models that are a second copy of a denoiser (its class): frozen parts that only sampling runs
        (Ideogram 4's unconditional transformer, its guidance's second model). Loaded with the model and kept in host
        memory, moved to the accelerator only while sample images are made; never trained, never in the LoRA; the
        memory plan counts them at sampling time. Other models of other classes (Anima's text conditioner) belong to
        the family's text encoding."""
        denoiser_classes = {self.component_classes[d] for d in self.denoisers}
        return tuple(c for c in self.other_models if self.component_classes.get(c) in denoiser_classes)

    def tokenizer_class(self, encoder: str) -> str:
        return self.component_classes[self.tokenizer_of(encoder)]

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """Every tokenizer component: each text encoder's (a processor where the folder has one), then any other the
        folder holds (Anima's T5 tokenizer, whose ids feed its text conditioner: no T5 model)."""
        own = tuple(self.tokenizer_of(e) for e in self.text_encoders)
        return own + tuple(c for c in self.components
                           if c not in own and "Tokenizer" in self.component_classes.get(c, ""))

    @property
    def other_models(self) -> tuple[str, ...]:
        """Model components beside the denoisers, the VAE and the text encoders (Anima's text conditioner): loaded
        from the folder like the VAE, weights and config.json in their subfolder."""
        skip = {*self.denoisers, "vae", *self.text_encoders, *self.tokenizers, "scheduler"}
        return tuple(c for c in self.components if c not in skip)

    @property
    def t5_tokenizers(self) -> tuple[str, ...]:
        """Tokenizer attributes that are T5's (their folders need tokenizer.json or spiece.model)."""
        return tuple(n for n, c in self.component_classes.items() if c.startswith("T5Tokenizer"))

    @property
    def is_flow(self) -> bool:
        return self.objective == "flow"

    def flow_defaults(self, variant: str | None) -> FlowDefaults:
        """The flow defaults of a variant (the default variant's where it is None or not listed)."""
        if not self.flow:
            return FlowDefaults()
        return self.flow.get(variant, self.flow[None])

    def has_guidance_embedder(self, variant: str | None) -> bool:
        return self.train_guidance.get(variant) is not None

    def text_length(self, variant: str | None, max_sequence_length: int | None = None) -> int:
        """Tokens of the text sequence the denoiser attends to: the fixed (CLIP) tokens plus T5's sequence at the
        run's max_sequence_length, or the variant's default when it is unset (what the adapter tokenizes to)."""
        if not self.text_entry.sequence:
            return self.text_entry.tokens
        default = self.max_sequence_length.get(variant, self.max_sequence_length.get(None, 0))
        return self.text_entry.tokens + (max_sequence_length or default)

    def targets(self, value) -> tuple[str, ...]:
        """target_modules as configured ("auto", a preset name, or explicit names) -> module patterns."""
        if value in (None, "auto"):
            return self.presets[self.default_preset]
        if isinstance(value, str):
            return self.presets[value]
        return tuple(value)


FLOW_KEYS = ("flow_sigma_sampling", "flow_logit_mean", "flow_logit_std", "flow_mode_scale", "flow_sigmoid_scale",
             "flow_shift", "flow_shift_value", "flow_loss_weighting", "flow_precondition_outputs")
DDPM_KEYS = ("min_snr_gamma", "noise_offset", "prediction_type")


def expand_targets(patterns: tuple[str, ...], modules: Mapping[str, int]) -> dict[str, list[str]]:
    """Which modules each pattern selects. ``modules`` maps module name -> rank of its weight (2 Linear, 4 conv;
    what a safetensors header or ``named_modules`` says). Suffix patterns select any layer (the caller checks
    the kind); ``*`` patterns only rank-2 weights not named like an embedding table."""
    out: dict[str, list[str]] = {}
    for pat in patterns:
        if "*" in pat:
            out[pat] = sorted(n for n, d in modules.items()
                              if fnmatch.fnmatchcase(n, pat) and d == 2 and not n.rsplit(".", 1)[-1].endswith("embedding"))
        else:
            out[pat] = sorted(n for n in modules if n == pat or n.endswith("." + pat))
    return out


def peft_targets(patterns: tuple[str, ...], modules: Mapping[str, int]) -> list[str]:
    """The target_modules list for PEFT: suffix patterns as they are, ``*`` patterns expanded to full names."""
    expanded = expand_targets(tuple(p for p in patterns if "*" in p), modules)
    names = {n for hits in expanded.values() for n in hits}
    return sorted({p for p in patterns if "*" not in p} | names)


def flow_options(cfg, spec: FamilySpec, variant: str | None) -> dict:
    """FlowSettings keyword arguments: each flow_* config key, or the variant's default where it is null."""
    d = spec.flow_defaults(variant)

    def pick(key: str, default):
        value = getattr(cfg, key, None) if cfg is not None else None
        return default if value is None else value

    return {"sigma_sampling": pick("flow_sigma_sampling", d.sigma_sampling),
            "logit_mean": pick("flow_logit_mean", 0.0), "logit_std": pick("flow_logit_std", d.logit_std),
            "mode_scale": pick("flow_mode_scale", 1.29), "sigmoid_scale": pick("flow_sigmoid_scale", 1.0),
            "shift": pick("flow_shift", d.shift), "shift_value": pick("flow_shift_value", d.shift_value),
            "loss_weighting": pick("flow_loss_weighting", d.loss_weighting),
            "precondition_outputs": bool(pick("flow_precondition_outputs", d.precondition_outputs))}


def objective_summary(cfg, spec: FamilySpec, variant: str | None) -> dict:
    """What the run trains with, every default resolved for the variant (validation summary and run_started)."""
    return {"kind": "flow", **flow_options(cfg, spec, variant)} if spec.is_flow else {"kind": "ddpm"}
