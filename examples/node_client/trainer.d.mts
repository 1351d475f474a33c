// GENERATED from trainer.mjs's JSDoc by scripts/gen-types.mjs (tsc --emitDeclarationOnly): do not edit.
// Run `npm run gen-types` in examples/node_client after changing trainer.mjs's exports.
export type TrainLoraEvent = import("./events.js").TrainLoraEvent;
export type TrainLoraEventType = import("./events.js").TrainLoraEventType;
export type CompletedEvent = import("./events.js").CompletedEvent;
export type CheckpointEvent = import("./events.js").CheckpointEvent;
export type ErrorEvent = import("./events.js").ErrorEvent;
export type StartOptions = {
    /**
     * training config (JSON) passed as `--config`
     */
    config: string;
    /**
     * Python interpreter; default `$PYTHON`, else `python3`
     */
    python?: string;
    /**
     * trainer script; default `$TRAIN_LORA_SCRIPT`, else `../../train_lora.py` from this file
     */
    trainer?: string;
    /**
     * events_schema.json for the required-field checks; default: next to the
     * trainer; `null`: no required-field checks
     */
    eventsSchema?: string | null;
    /**
     * pass `--resume` (continue from the newest checkpoint in output_path)
     */
    resume?: boolean;
    /**
     * pass `--validate-only` (one `validation` event, no training)
     */
    validateOnly?: boolean;
    /**
     * pass `--debug`
     */
    debug?: boolean;
    /**
     * pass `--run-id` (the run_id every event carries)
     */
    runId?: string;
    /**
     * further trainer arguments, appended as they are
     */
    args?: string[];
    /**
     * the trainer's working directory
     */
    cwd?: string;
    /**
     * the trainer's environment (default: this process's); PYTHONUNBUFFERED=1 is added
     */
    env?: NodeJS.ProcessEnv;
    /**
     * heartbeat interval for hang detection; default: the config's
     * `heartbeat_seconds`, else 30
     */
    heartbeatSeconds?: number | null;
    /**
     * a hang is reported after hangFactor x heartbeatSeconds without a line (default 3;
     * 0 turns hang detection off)
     */
    hangFactor?: number;
    /**
     * each line of the trainer's stderr (its human-readable log)
     */
    onStderr?: (line: string) => void;
    /**
     * each protocol error, as it is found
     */
    onProtocolError?: (message: string) => void;
    /**
     * no line arrived for hangFactor x heartbeatSeconds (again each period)
     */
    onHang?: (hang: HangInfo) => void;
    /**
     * an event whose type this schema version does not know
     */
    onUnknownEvent?: (event: UnknownEvent) => void;
    /**
     * send SIGTERM to the trainer if this process exits first (default true)
     */
    stopOnParentExit?: boolean;
};
export type HangInfo = {
    /**
     * seconds since the last stdout line
     */
    idleSeconds: number;
    /**
     * seq of the last event
     */
    lastSeq: number;
};
export type UnknownEvent = {
    type: string;
    schema_version: string;
    run_id: string;
    seq: number;
    time: string;
    [field: string]: unknown;
};
export type RunError = {
    code: ErrorEvent["code"] | "spawn_failed";
    exit_code: number;
    message: string;
    hint: string | null;
    details: ErrorEvent["details"] | null;
};
export type RunSummary = {
    /**
     * the trainer's exit code; 128 + n if signal n killed it; 127 / 126 if it did not start
     */
    exit_code: number;
    /**
     * the signal that stopped the run (named by `interrupted`, or the one that killed it)
     */
    signal: string | null;
    run_id: string | null;
    /**
     * events per type, unknown types included
     */
    events_by_type: Record<string, number>;
    last_step: number | null;
    total_steps: number | null;
    /**
     * the `completed` event's outputs
     */
    outputs: CompletedEvent["outputs"] | null;
    checkpoints: {
        step: number;
        path: string;
        reason: CheckpointEvent["reason"];
    }[];
    /**
     * sample image paths
     */
    samples: string[];
    warnings: {
        code: string;
        message: string;
    }[];
    /**
     * with --validate-only
     */
    validation: {
        ok: boolean;
        errors: number;
        warnings: number;
    } | null;
    error: RunError | null;
    /**
     * whether an `interrupted` event arrived
     */
    interrupted: boolean;
    interruption: {
        signal: string;
        step: number | null;
        checkpoint: string | null;
    } | null;
    protocol_errors: string[];
    hangs: number;
    /**
     * signals sent to the trainer by {@link TrainerRun.stop}
     */
    forwarded_signals: string[];
    unknown_types: string[];
    duration_s: number;
    /**
     * the last 20 lines of the trainer's stderr, when exit_code is not 0
     */
    stderr_tail?: string[];
};
export declare const DEFAULT_TRAINER: string;
/** Every event type this module yields, in the schema's order. */
export declare const EVENT_TYPES: readonly TrainLoraEventType[];
/** @param {string} type @returns {type is TrainLoraEventType} */
export declare const isKnownType: (type: string) => type is TrainLoraEventType;
/**
 * The hang timeout follows the config's heartbeat_seconds (top level or under training_params).
 * @param {string} configPath
 * @returns {number | null}
 */
export declare function heartbeatFromConfig(configPath: string): number | null;
/**
 * Starts the trainer; events are read from that moment on and buffered until iterated.
 * @param {StartOptions} options
 * @returns {TrainerRun}
 */
export declare function startRun(options: StartOptions): TrainerRun;
/**
 * Starts the trainer with `--resume`: it continues from the newest checkpoint in the config's output_path (a run
 * stopped with {@link TrainerRun.stop}, or killed) and ends on the same weights as an uninterrupted run.
 * @param {StartOptions} options
 * @returns {TrainerRun}
 */
export declare function resumeRun(options: StartOptions): TrainerRun;
/**
 * One trainer process. Iterate it (once) for its events; await `result` for the summary.
 * @implements {AsyncIterable<TrainLoraEvent>}
 */
export declare class TrainerRun implements AsyncIterable<TrainLoraEvent> {
    #private;
    /** The trainer's process id (undefined if it could not be started). @type {number | undefined} */
    pid: number | undefined;
    /** The command line that was started. @type {readonly string[]} */
    argv: readonly string[];
    /**
     * Resolves once the trainer has exited and its stdout and stderr are read; never rejects (a failed start is
     * exit code 127 / 126 with error.code "spawn_failed").
     * @type {Promise<RunSummary>}
     */
    result: Promise<RunSummary>;
    /** @param {StartOptions} options */
    constructor(options: StartOptions);
    /**
     * Asks the trainer to stop: with SIGTERM (or SIGINT) it finishes the current step, writes a checkpoint, emits
     * `interrupted` and exits 143 (130); resume it with {@link resumeRun}. A second call sends a second signal,
     * which makes the trainer exit at once without a checkpoint. Returns false when the trainer has already exited.
     * @param {"SIGTERM" | "SIGINT" | "SIGKILL"} [signal]
     * @returns {boolean}
     */
    stop(signal?: "SIGTERM" | "SIGINT" | "SIGKILL"): boolean;
    /** The run_id of the events read so far (null before the first). @returns {string | null} */
    get runId(): string | null;
    /** Protocol errors found so far. @returns {readonly string[]} */
    get protocolErrors(): readonly string[];
    /**
     * The events, in order, from the first line on (those that arrived before the loop began are buffered). One
     * consumer: a second iteration throws. Leaving the loop early stops the buffering but not the trainer (call
     * stop() for that); the loop ends when the trainer's stdout closes, after its last event.
     * @returns {AsyncIterator<TrainLoraEvent, undefined>}
     */
    [Symbol.asyncIterator](): AsyncIterator<TrainLoraEvent, undefined>;
}
