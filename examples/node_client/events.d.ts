/* eslint-disable */
/**
 * GENERATED from events_schema.json by scripts/gen-types.mjs (json-schema-to-typescript): do not edit.
 * Run `npm run gen-types` in examples/node_client after changing the schema; tests/test_event_types.py fails
 * while this file is stale.
 */

/**
 * Every stdout line of train_lora.py is one JSON object matching this schema. Envelope fields: type, schema_version (this document's version; a parent should accept any 1.x), run_id (same for every event of a run), seq (1, 2, 3, ... per process, no gaps), time (UTC ISO-8601 with milliseconds and a Z suffix). Numbers that are not finite are sent as null. Unknown extra fields may be added in minor versions.
 */
export type TrainLoraEvent =
  | ValidationEvent
  | RunStartedEvent
  | StatusEvent
  | ProgressEvent
  | StepEvent
  | CheckpointEvent
  | ResumedEvent
  | SampleEvent
  | EvalLossEvent
  | WarningEvent
  | ErrorEvent
  | InterruptedEvent
  | CompletedEvent
  | HeartbeatEvent;

/**
 * Result of --validate-only: config, dataset, base model and output folder checked without loading a model.
 */
export interface ValidationEvent {
  type: "validation";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  ok: boolean;
  errors: {
    code?: string;
    path?: string;
    message: string;
    allowed?: unknown;
    value?: unknown;
    hint?: string | null;
    files?: unknown[];
    [k: string]: unknown | undefined;
  }[];
  warnings: {
    code?: string;
    path?: string;
    message: string;
    allowed?: unknown;
    value?: unknown;
    hint?: string | null;
    files?: unknown[];
    [k: string]: unknown | undefined;
  }[];
  /**
   * dataset, model, output, resume and plan details
   */
  summary: {
    [k: string]: unknown | undefined;
  };
  duration_s?: number;
}
/**
 * Training begins: resolved settings, hardware and plan.
 */
export interface RunStartedEvent {
  type: "run_started";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  version: string;
  pid?: number;
  family:
    | "sd15"
    | "sd2"
    | "sdxl"
    | "flux1"
    | "sd3"
    | "flux2"
    | "flux2_klein"
    | "zimage"
    | "qwen_image"
    | "qwen_image21"
    | "chroma"
    | "anima"
    | "krea2"
    | "ideogram4"
    | "wan";
  config?: {
    [k: string]: unknown | undefined;
  };
  device: {
    type?: string;
    name?: string;
    memory_gb?: number | null;
    capability?: string | null;
    torch?: string;
    cuda?: string | null;
    /**
     * the resolved compute precision (also run_started.mixed_precision)
     */
    mixed_precision?: "no" | "fp16" | "bf16";
    /**
     * torch's CPU thread count (run_started.cpu_threads says why); CPU kernels split their sums by it, so training_manifest.json's device records it too
     */
    cpu_threads?: number | null;
    [k: string]: unknown | undefined;
  };
  mixed_precision: string;
  world_size: number;
  total_steps: number;
  start_step: number;
  num_images?: number;
  /**
   * of num_images, the video clips (trained at their frames; 0 for an image family, which skips clips with video_not_trained)
   */
  num_clips?: number;
  samples_per_epoch?: number;
  effective_batch_size?: number;
  resume_from?: string | null;
  resolution?: number;
  bucketing?: boolean;
  /**
   * every dataset of the run, in config order (one for dataset_path), with its counts: the images it trains on and the samples it gives an epoch (a regularisation set's share balanced to the train samples); also in training_manifest.json and the model card
   */
  datasets?: {
    path: string;
    role: "train" | "regularization";
    images: number;
    samples_per_epoch: number;
    resolution?: number;
    batch_size?: number;
    loss_weight?: number;
    class_prompt?: string | null;
    [k: string]: unknown | undefined;
  }[];
  prediction_type?: "epsilon" | "v_prediction" | "flow";
  /**
   * the model's variant within its family: FLUX.1 "dev" / "schnell", SD3 "sd3-medium" / "sd3.5-medium" / "sd3.5-large"; null for SD1.x/SD2.x/SDXL
   */
  variant?: string | null;
  /**
   * the training objective: {"kind": "ddpm"} or {"kind": "flow", sigma_sampling, shift, shift_value, loss_weighting, precondition_outputs, ...} with every default resolved for the model's variant (FLUX.1-schnell: shift none, dev: resolution)
   */
  objective?: {
    kind: "ddpm" | "flow";
    [k: string]: unknown | undefined;
  };
  /**
   * the text-embedding cache's plan (null when captions are encoded every step): placement (device | host | disk), entries, bytes_per_entry, total_bytes, hits (reused from disk), encoded, disk_dir, budgets, reason; text_encoders_released: true when the text encoders were dropped after caching (FLUX.1, SD3: samples come from cached prompt embeddings)
   */
  text_cache?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * the latent cache's plan (null with cache_latents false): placement (device | host | disk: read per step, the latents exceed cache_host_budget_gb), total_bytes, host_budget_bytes, reason
   */
  latent_cache?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * torch's CPU thread count and why: threads, cores (this process may use: its affinity, capped by a cgroup CPU quota), busy_cores (kept busy by other processes when sampled; null unless source is auto, and under a quota), source (config | OMP_NUM_THREADS | checkpoint | auto: one thread per usable core, whatever the load, so that the LoRA does not depend on it)
   */
  cpu_threads?: {
    threads: number;
    cores: number;
    busy_cores?: number | null;
    source: "config" | "OMP_NUM_THREADS" | "checkpoint" | "auto";
    /**
     * OMP_WAIT_POLICY in effect (null: OpenMP's default, idle threads spin): the trainer sets PASSIVE when other processes keep cores busy at start, unless the environment sets it; it changes speed, never a result
     */
    wait_policy?: string | null;
    [k: string]: unknown | undefined;
  };
  /**
   * the memory plan (as validation's summary.memory): parts_gib (denoiser_weights, text_encoders, vae, lora, weight_copies (the compute-precision copies of fp8 / int8 weights autograd keeps for the backward), activations, caches, fixed), total_gib, total_bytes, precision, lora_params, network_type (lora, lokr or loha: the adapter lora_params counts), denoiser_params, assumes, video (a video family's: frames, the largest clip bucket's frames the activations count (1 for images), and latent_frames), offload, shard (shard_base over several processes: processes, units, block_bytes (the blocks' frozen weights, whole), device_bytes (what each process keeps of them: its shards plus the two blocks gathered at a time)), processes (WORLD_SIZE), caches (latents, text, device_bytes: the cache bytes that stay on the GPU, each cache that fits a tenth of its free memory), gpu (the GPU this process uses, CUDA_VISIBLE_DEVICES and LOCAL_RANK applied: name, index, uuid, total_bytes, free_bytes, memory_bytes (what the plan must fit: the free memory), source (nvidia-smi, or torch in the trainer), known (false with reason where the card or its free memory cannot be told: MIG, different cards without CUDA_DEVICE_ORDER=PCI_BUS_ID, nvidia-smi failing; memory_bytes is then null and the plan is not judged); null without a GPU), fits (null when not judged); in validation's summary, when it does not fit, cheaper: the hints (settings, total_gib, total_bytes, fits: with 15% of the plan to spare), each a config the config's rules accept; null when the model's files could not be read before loading
   */
  memory_plan?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * block streaming (offload_blocks; null when off): per denoiser, blocks (streamed), of (its streamable blocks), host_bytes (their frozen weights in host memory), pinned (page-locked, on CUDA)
   */
  offload?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * regional compilation (config compile; null when off): blocks (modules whose forward is compiled), classes (their class names), graphs (compiled so far: 0 before the first step), compile_s (seconds spent compiling them)
   */
  compile?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * how the adapter layers run their forward: fused (plain LoRA Linear layers on the lean forward: the scale and the add inside the second matmul, no input casts), peft (the others on PEFT's own: DoRA, LoKr, LoHa, conv layers)
   */
  lora_forward?: {
    [k: string]: unknown | undefined;
  } | null;
  /**
   * sharding of the frozen denoiser across processes (shard_base; null when off or with one process): processes, units (FSDP units: the blocks plus the denoiser itself), frozen_bytes (the denoiser's frozen weights, whole), local_bytes (rank 0's shards of them)
   */
  shard?: {
    [k: string]: unknown | undefined;
  } | null;
}
/**
 * A phase of the run starts (loading the model, caching, training, saving, exporting).
 */
export interface StatusEvent {
  type: "status";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  phase: string;
  message: string;
  /**
   * phase latent_cache / text_cache: entries read from the disk cache
   */
  reused?: number;
  /**
   * phase latent_cache: images encoded with the VAE; phase text_cache: captions encoded with the text encoders
   */
  encoded?: number;
}
/**
 * Progress inside a long phase (model download/loading, latent and text caching).
 */
export interface ProgressEvent {
  type: "progress";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  phase: string;
  current: number;
  total: number | null;
  unit?: string;
  message?: string;
  /**
   * seconds left in this phase at its average rate so far (null until there is a rate)
   */
  eta_s?: number | null;
}
/**
 * Training progress, every log_every_n_steps optimizer steps, always the first and the last.
 */
export interface StepEvent {
  type: "step";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  step: number;
  total_steps: number;
  epoch: number;
  loss: number | null;
  loss_avg?: number | null;
  lr: number | null;
  images_per_sec?: number | null;
  eta_s?: number | null;
  elapsed_s?: number | null;
  /**
   * with compile on only: graphs (compiled so far: each block class's first per image shape, and recompilations) and compile_s (seconds spent compiling them); a recompilation warning comes once when more graphs were compiled after the first 3 steps than during them
   */
  compile?: {
    [k: string]: unknown | undefined;
  };
  /**
   * GiB: gpu_allocated_gb, gpu_reserved_gb (now), gpu_peak_gb (highest allocation since training began, after model loading and caching; samples included), CUDA only; gpu_reserved_peak_gb (the allocator's peak reservation); plan_gb (the memory plan's total, beside the measured figures: a drift over 15% is a memory_plan_drift warning on CUDA); rss_peak_gb (the process's peak resident memory since it started)
   */
  memory?: {
    [k: string]: unknown | undefined;
  };
}
/**
 * A resumable checkpoint was written completely.
 */
export interface CheckpointEvent {
  type: "checkpoint";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  step: number;
  path: string;
  reason: "interval" | "final" | "interrupt";
  size_bytes?: number;
}
/**
 * Training continues from a checkpoint.
 */
export interface ResumedEvent {
  type: "resumed";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  checkpoint: string;
  step: number;
  epoch?: number;
  changed?: {
    [k: string]: unknown | undefined;
  };
}
/**
 * A sample was generated with the current LoRA: an image, or for a video family (Wan) a clip saved as a video file beside a PNG of a few of its frames.
 */
export interface SampleEvent {
  type: "sample";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  step: number;
  /**
   * The PNG: the image, or a clip's frames side by side (first, last and evenly spaced ones between)
   */
  path: string;
  prompt: string;
  seed: number;
  index?: number;
  /**
   * With ema_decay: drawn with the EMA of the LoRA weights or the raw ones (ema_sampling)
   */
  weights?: "ema" | "raw";
  /**
   * The clip (validation_video_format: .mp4 or animated .webp) beside the PNG; null for an image
   */
  video: string | null;
  /**
   * Frames of the sample (validation_frames for a video family; 1 for an image)
   */
  frames: number;
}
/**
 * The validation loss on the held-out set (eval_dataset_path / eval_split): before training (step 0, the base model), every eval_steps and at the last step, at fixed noise levels with fixed noise, so values compare across steps and resumes. Not the sample images of validation_steps.
 */
export interface EvalLossEvent {
  type: "eval_loss";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  step: number;
  /**
   * mean over the noise levels of the mean over the held-out images
   */
  loss: number | null;
  /**
   * the noise levels (eval_timesteps): flow sigmas, or fractions of a DDPM schedule
   */
  timesteps: number[];
  /**
   * the loss at each level, in the order of timesteps
   */
  losses: (number | null)[];
  images: number;
  duration_s: number;
}
/**
 * Something the operator should know; the run continues.
 */
export interface WarningEvent {
  type: "warning";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  /**
   * e.g. no_gpu, images_skipped, nonfinite_step_skipped, caption_missing, image_too_small, unused_setting, report_failed, dora_loaders, cpu_bf16_slow, single_file_config_download, prediction_type_override, prediction_type_unknown, init_lora_partial, trigger_missing, caption_encoding, low_disk_space, validation_never_runs, output_in_use, memory_plan_drift, memory_plan_gpu_unknown, offload_host_memory, shard_base_single_process, cpu_cores_busy (other processes keep usable cores busy: training still uses one thread per core; cpu_threads trades that for speed), checkpoint_rejected (resume "auto" skips an unusable checkpoint: files names it, the message gives the reason and the checkpoint used instead), model_distilled (the base model is a step- or guidance-distilled release that a LoRA degrades: the hint names the base checkpoint to train on), recompilation (compile: more graphs compiled after the first 3 steps than during them), ema_too_slow (ema_decay without ema_warmup averages over more updates than the run makes: the EMA stays near the first steps' weights), eval_image_unreadable (validation loss: held-out images that cannot be used are left out; files names them), mask_missing (masked_loss: images without a mask train unmasked; files names them), mask_unusable (masked_loss: images whose mask is unreadable, of another aspect ratio or all black are skipped; files gives each reason), mask_scaled (masked_loss: masks of another size than their image, same aspect ratio, are scaled), video_unreadable (video clips whose container, stream or first frame cannot be read, or that the video_short_clip rule skips: files names each with its reason), video_not_trained (the model family trains on images only: the dataset's usable video clips are audited by --validate-only and skipped)
   */
  code: string;
  message: string;
  path?: string;
  files?: unknown[];
  details?: unknown;
}
/**
 * The run failed; the process exits with exit_code right after.
 */
export interface ErrorEvent {
  type: "error";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  code:
    | "config_invalid"
    | "dataset_invalid"
    | "model_load_failed"
    | "training_failed"
    | "out_of_memory"
    | "io_error"
    | "output_in_use"
    | "internal_error";
  exit_code: number;
  message: string;
  hint: string | null;
  details?: {
    [k: string]: unknown | undefined;
  };
}
/**
 * Stopped by SIGTERM/SIGINT after finishing the current step; the checkpoint (if any) resumes exactly.
 */
export interface InterruptedEvent {
  type: "interrupted";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  signal: string;
  step: number | null;
  checkpoint: string | null;
  message?: string;
}
/**
 * Training finished and the outputs are written.
 */
export interface CompletedEvent {
  type: "completed";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  outputs: {
    lora: string;
    peft_lora?: string;
    /**
     * With ema_decay: raw/<output_name>.safetensors, the raw (not averaged) weights; lora holds the EMA
     */
    raw_lora?: string;
    /**
     * With ema_decay: raw/pytorch_lora_weights.safetensors, the raw weights in the diffusers layout
     */
    raw_peft_lora?: string;
    /**
     * Wan 2.2 T2V-A14B (a file pair per trained expert): <output_name>_high_noise.safetensors, the ComfyUI file of the high-noise expert (transformer); lora is the first trained expert's file
     */
    lora_high_noise?: string;
    /**
     * Wan 2.2 T2V-A14B: pytorch_lora_weights_high_noise.safetensors (pipe.load_lora_weights(file))
     */
    peft_lora_high_noise?: string;
    /**
     * Wan 2.2 T2V-A14B: <output_name>_low_noise.safetensors, the ComfyUI file of the low-noise expert (transformer_2)
     */
    lora_low_noise?: string;
    /**
     * Wan 2.2 T2V-A14B: pytorch_lora_weights_low_noise.safetensors (pipe.load_lora_weights(file, load_into_transformer_2=True))
     */
    peft_lora_low_noise?: string;
    manifest?: string;
    loss_curve?: string;
    report?: string;
    /**
     * README.md beside the LoRA: Hugging Face model card (YAML front matter, samples, how to load)
     */
    model_card?: string;
    /**
     * samples_over_steps.png: prompts by validation step (with validation_steps)
     */
    samples_over_steps?: string;
    [k: string]: unknown | undefined;
  };
  steps: number;
  duration_s: number;
  final_loss?: number | null;
}
/**
 * Emitted whenever nothing else was emitted for heartbeat_seconds: the process is alive.
 */
export interface HeartbeatEvent {
  type: "heartbeat";
  schema_version: string;
  run_id: string;
  seq: number;
  time: string;
  phase: string;
  uptime_s: number;
  idle_s?: number;
}

/** Every event type this schema version knows: the discriminant of {@link TrainLoraEvent}. */
export type TrainLoraEventType = TrainLoraEvent["type"];

/** The event of one type, e.g. `EventOfType<"step">` is {@link StepEvent}. */
export type EventOfType<T extends TrainLoraEventType> = Extract<TrainLoraEvent, { type: T }>;
