// @ts-check
// train_lora as a typed Node.js module: what a web app's back end (a Next.js route handler, a job worker) imports.
//
//   import { startRun, resumeRun } from "./trainer.mjs";
//   const run = startRun({ config: "/jobs/42/config.json" });
//   for await (const ev of run) {            // TrainLoraEvent: a union discriminated on ev.type
//     if (ev.type === "step") console.log(ev.step, ev.total_steps, ev.loss);
//   }
//   const summary = await run.result;         // exit code, outputs, error, interruption, protocol errors
//   run.stop();                               // SIGTERM: the trainer finishes the step, checkpoints, exits 143
//   resumeRun({ config: "/jobs/42/config.json" });   // = startRun with --resume: continues from that checkpoint
//
// Every stdout line of the trainer is parsed and checked (JSON object, seq 1, 2, 3 ..., one run_id, schema_version
// 1.x, the fields events_schema.json requires for the type); a line that fails is a protocol error, reported
// through onProtocolError and in the summary, and never yielded. An event of a type this schema version does not
// know (a newer trainer) is not yielded either: it goes to onUnknownEvent and summary.unknown_types. So what the
// iterator yields is exactly what the types in events.d.ts (generated from events_schema.json) promise.
// Dependency-free at run time: Node.js >= 18. Types: trainer.d.mts (tsc's declarations of this file).
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

/**
 * @typedef {import("./events.js").TrainLoraEvent} TrainLoraEvent
 * @typedef {import("./events.js").TrainLoraEventType} TrainLoraEventType
 * @typedef {import("./events.js").CompletedEvent} CompletedEvent
 * @typedef {import("./events.js").CheckpointEvent} CheckpointEvent
 * @typedef {import("./events.js").ErrorEvent} ErrorEvent
 */

/**
 * How to start the trainer. Only `config` is required.
 * @typedef {object} StartOptions
 * @property {string} config training config (JSON) passed as `--config`
 * @property {string} [python] Python interpreter; default `$PYTHON`, else `python3`
 * @property {string} [trainer] trainer script; default `$TRAIN_LORA_SCRIPT`, else `../../train_lora.py` from this file
 * @property {string | null} [eventsSchema] events_schema.json for the required-field checks; default: next to the
 *   trainer; `null`: no required-field checks
 * @property {boolean} [resume] pass `--resume` (continue from the newest checkpoint in output_path)
 * @property {boolean} [validateOnly] pass `--validate-only` (one `validation` event, no training)
 * @property {boolean} [debug] pass `--debug`
 * @property {string} [runId] pass `--run-id` (the run_id every event carries)
 * @property {string[]} [args] further trainer arguments, appended as they are
 * @property {string} [cwd] the trainer's working directory
 * @property {NodeJS.ProcessEnv} [env] the trainer's environment (default: this process's); PYTHONUNBUFFERED=1 is added
 * @property {number | null} [heartbeatSeconds] heartbeat interval for hang detection; default: the config's
 *   `heartbeat_seconds`, else 30
 * @property {number} [hangFactor] a hang is reported after hangFactor x heartbeatSeconds without a line (default 3;
 *   0 turns hang detection off)
 * @property {(line: string) => void} [onStderr] each line of the trainer's stderr (its human-readable log)
 * @property {(message: string) => void} [onProtocolError] each protocol error, as it is found
 * @property {(hang: HangInfo) => void} [onHang] no line arrived for hangFactor x heartbeatSeconds (again each period)
 * @property {(event: UnknownEvent) => void} [onUnknownEvent] an event whose type this schema version does not know
 * @property {boolean} [stopOnParentExit] send SIGTERM to the trainer if this process exits first (default true)
 */

/**
 * @typedef {object} HangInfo
 * @property {number} idleSeconds seconds since the last stdout line
 * @property {number} lastSeq seq of the last event
 */

/**
 * An envelope-valid event of a type outside {@link TrainLoraEventType} (a newer trainer's).
 * @typedef {{ type: string, schema_version: string, run_id: string, seq: number, time: string,
 *   [field: string]: unknown }} UnknownEvent
 */

/**
 * The run's error: the trainer's `error` event, or `spawn_failed` when the interpreter could not be started.
 * @typedef {object} RunError
 * @property {ErrorEvent["code"] | "spawn_failed"} code
 * @property {number} exit_code
 * @property {string} message
 * @property {string | null} hint
 * @property {ErrorEvent["details"] | null} details
 */

/**
 * What a run came to, once the trainer has exited and its output is read. Field names are the JSON keys the CLI
 * (client.js) prints.
 * @typedef {object} RunSummary
 * @property {number} exit_code the trainer's exit code; 128 + n if signal n killed it; 127 / 126 if it did not start
 * @property {string | null} signal the signal that stopped the run (named by `interrupted`, or the one that killed it)
 * @property {string | null} run_id
 * @property {Record<string, number>} events_by_type events per type, unknown types included
 * @property {number | null} last_step
 * @property {number | null} total_steps
 * @property {CompletedEvent["outputs"] | null} outputs the `completed` event's outputs
 * @property {{ step: number, path: string, reason: CheckpointEvent["reason"] }[]} checkpoints
 * @property {string[]} samples sample image paths
 * @property {{ code: string, message: string }[]} warnings
 * @property {{ ok: boolean, errors: number, warnings: number } | null} validation with --validate-only
 * @property {RunError | null} error
 * @property {boolean} interrupted whether an `interrupted` event arrived
 * @property {{ signal: string, step: number | null, checkpoint: string | null } | null} interruption
 * @property {string[]} protocol_errors
 * @property {number} hangs
 * @property {string[]} forwarded_signals signals sent to the trainer by {@link TrainerRun.stop}
 * @property {string[]} unknown_types
 * @property {number} duration_s
 * @property {string[]} [stderr_tail] the last 20 lines of the trainer's stderr, when exit_code is not 0
 */

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_TRAINER = path.resolve(HERE, "..", "..", "train_lora.py");
const DEFAULT_HEARTBEAT_S = 30; // the trainer's default heartbeat_seconds
const STDERR_TAIL = 20;

// Written out as a Record so that tsc fails here when the schema gains or loses an event type (and so the
// generated union): the runtime list of types this module yields cannot drift from the types it promises.
/** @type {Record<TrainLoraEventType, true>} */
const KNOWN = {
  validation: true, run_started: true, status: true, progress: true, step: true, checkpoint: true, resumed: true,
  sample: true, eval_loss: true, warning: true, error: true, interrupted: true, completed: true, heartbeat: true,
};
/** Every event type this module yields, in the schema's order. */
export const EVENT_TYPES = /** @type {readonly TrainLoraEventType[]} */ (Object.freeze(Object.keys(KNOWN)));

/** @param {string} type @returns {type is TrainLoraEventType} */
export const isKnownType = (type) => Object.hasOwn(KNOWN, type);

// Exit codes of the trainer (README "Exit codes"); 130/143 come with an `interrupted` event instead.
const ERROR_EXIT_CODES = new Set([1, 2, 3, 4, 5, 6, 7, 8]);
/** @type {Record<number, string>} */
const SIGNAL_EXIT_CODES = { 130: "SIGINT", 143: "SIGTERM" };

/**
 * The hang timeout follows the config's heartbeat_seconds (top level or under training_params).
 * @param {string} configPath
 * @returns {number | null}
 */
export function heartbeatFromConfig(configPath) {
  try {
    const cfg = JSON.parse(fs.readFileSync(configPath, "utf8"));
    const value = cfg?.heartbeat_seconds ?? cfg?.training_params?.heartbeat_seconds;
    return typeof value === "number" && value > 0 ? value : null;
  } catch {
    return null; // unreadable or invalid: the trainer reports that itself, as an error event
  }
}

/**
 * type -> required fields, from events_schema.json ("*": the envelope's); null when the schema cannot be read.
 * @param {string} schemaPath
 * @returns {Record<string, string[]> | null}
 */
function loadRequiredFields(schemaPath) {
  try {
    const schema = JSON.parse(fs.readFileSync(schemaPath, "utf8"));
    /** @type {Record<string, string[]>} */
    const required = { "*": schema.required || [] };
    for (const [name, def] of Object.entries(schema.definitions || {})) required[name] = def.required || [];
    return required;
  } catch {
    return null;
  }
}

// A detached trainer outlives its parent; if the parent exits first (an uncaught error, process.exit), stop it
// rather than leave it training unattended. One listener for all runs: a server may hold many at once.
/** @type {Set<import("node:child_process").ChildProcess>} */
const liveChildren = new Set();
let exitHookInstalled = false;
/** @param {import("node:child_process").ChildProcess} child */
function stopOnExit(child) {
  liveChildren.add(child);
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const c of liveChildren) {
      try { c.kill("SIGTERM"); } catch { /* already gone */ }
    }
  });
}

/**
 * Starts the trainer; events are read from that moment on and buffered until iterated.
 * @param {StartOptions} options
 * @returns {TrainerRun}
 */
export function startRun(options) {
  return new TrainerRun(options);
}

/**
 * Starts the trainer with `--resume`: it continues from the newest checkpoint in the config's output_path (a run
 * stopped with {@link TrainerRun.stop}, or killed) and ends on the same weights as an uninterrupted run.
 * @param {StartOptions} options
 * @returns {TrainerRun}
 */
export function resumeRun(options) {
  return new TrainerRun({ ...options, resume: true });
}

/**
 * One trainer process. Iterate it (once) for its events; await `result` for the summary.
 * @implements {AsyncIterable<TrainLoraEvent>}
 */
export class TrainerRun {
  /** The trainer's process id (undefined if it could not be started). @type {number | undefined} */
  pid;
  /** The command line that was started. @type {readonly string[]} */
  argv;
  /**
   * Resolves once the trainer has exited and its stdout and stderr are read; never rejects (a failed start is
   * exit code 127 / 126 with error.code "spawn_failed").
   * @type {Promise<RunSummary>}
   */
  result;

  /** @type {TrainLoraEvent[]} */ #queue = [];
  /** @type {((r: IteratorResult<TrainLoraEvent, undefined>) => void) | null} */ #waiting = null;
  #ended = false; // stdout is closed: nothing more will be queued
  #iterated = false;
  #discard = false; // the consumer left the loop: stop buffering
  #exited = false;
  /** @type {import("node:child_process").ChildProcess} */ #child;
  #state;

  /** @param {StartOptions} options */
  constructor(options) {
    if (!options || typeof options.config !== "string") throw new TypeError("startRun: options.config (a path) is required");
    const o = options;
    const startedAt = Date.now();
    const python = o.python ?? process.env.PYTHON ?? "python3";
    const trainer = o.trainer ?? process.env.TRAIN_LORA_SCRIPT ?? DEFAULT_TRAINER;
    const schemaPath = o.eventsSchema === undefined ? path.join(path.dirname(trainer), "events_schema.json") : o.eventsSchema;
    const required = schemaPath === null ? null : loadRequiredFields(schemaPath);
    const heartbeatS = o.heartbeatSeconds ?? heartbeatFromConfig(o.config) ?? DEFAULT_HEARTBEAT_S;
    const hangFactor = o.hangFactor ?? 3;
    const hangAfterMs = heartbeatS * hangFactor * 1000;

    const st = (this.#state = {
      /** @type {string | null} */ runId: null,
      lastSeq: 0,
      lineNo: 0,
      /** @type {Record<string, number>} */ eventsByType: {},
      /** @type {number | null} */ lastStep: null,
      /** @type {number | null} */ totalSteps: null,
      /** @type {CompletedEvent | null} */ completed: null,
      /** @type {RunSummary["checkpoints"]} */ checkpoints: [],
      /** @type {string[]} */ samples: [],
      /** @type {RunSummary["warnings"]} */ warnings: [],
      /** @type {RunError | null} */ error: null,
      /** @type {RunSummary["interruption"]} */ interruption: null,
      /** @type {RunSummary["validation"]} */ validation: null,
      /** @type {string[]} */ protocolErrors: [],
      /** @type {Set<string>} */ unknownTypes: new Set(),
      hangs: 0,
      /** @type {string[]} */ forwardedSignals: [],
      /** @type {string[]} */ stderrTail: [],
    });
    /** @param {string} message */
    const protocolError = (message) => {
      st.protocolErrors.push(message);
      o.onProtocolError?.(message);
    };

    const args = [trainer, "--config", o.config];
    if (o.validateOnly) args.push("--validate-only");
    if (o.resume) args.push("--resume");
    if (o.debug) args.push("--debug");
    if (o.runId !== undefined) args.push("--run-id", o.runId);
    args.push(...(o.args ?? []));
    this.argv = Object.freeze([python, ...args]);

    // Its own process group (detached): a Ctrl-C in a terminal, or a signal to the web server's group, must not
    // reach the trainer directly. Whoever holds the run decides (stop()), and the trainer sees one signal: a
    // second one would make it skip its checkpoint.
    const child = (this.#child = spawn(python, args, {
      cwd: o.cwd,
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
      env: { ...(o.env ?? process.env), PYTHONUNBUFFERED: "1" },
    }));
    this.pid = child.pid;
    /** @type {Error | null} */
    let spawnError = null;

    if ((o.stopOnParentExit ?? true) && child.pid !== undefined) stopOnExit(child);

    // Hang detection: any stdout line (heartbeats included) re-arms the timer.
    /** @type {NodeJS.Timeout | null} */
    let hangTimer = null;
    let lastLineAt = Date.now();
    const armHangTimer = () => {
      if (hangTimer) clearTimeout(hangTimer);
      if (!(hangAfterMs > 0) || this.#exited) return;
      hangTimer = setTimeout(() => {
        st.hangs += 1;
        o.onHang?.({ idleSeconds: (Date.now() - lastLineAt) / 1000, lastSeq: st.lastSeq });
        armHangTimer();
      }, hangAfterMs);
    };
    armHangTimer();

    /** @param {string} line */
    const onLine = (line) => {
      lastLineAt = Date.now();
      armHangTimer();
      const n = ++st.lineNo;
      const ev = this.#checkEnvelope(line, n, protocolError);
      if (!ev) return;
      st.eventsByType[ev.type] = (st.eventsByType[ev.type] || 0) + 1;
      if (!isKnownType(ev.type)) {
        // A newer trainer's type: tolerated and counted (the schema allows new types in minor versions).
        st.unknownTypes.add(ev.type);
        o.onUnknownEvent?.(ev);
        return;
      }
      if (required) {
        const missing = [...(required["*"] || []), ...(required[ev.type] || [])].filter((k) => !(k in ev));
        if (missing.length) {
          protocolError(`line ${n}: ${ev.type} event lacks ${missing.join(", ")}`);
          return; // it is not what its type promises: not yielded
        }
      }
      // Envelope, type and required fields checked against events_schema.json: this is the typed event.
      const event = /** @type {TrainLoraEvent} */ (/** @type {unknown} */ (ev));
      this.#record(event);
      this.#push(event);
    };

    const stdoutDone = new Promise((resolve) => {
      if (!child.stdout) return resolve(undefined);
      const rl = readline.createInterface({ input: child.stdout, crlfDelay: Infinity });
      rl.on("line", onLine);
      rl.on("close", () => resolve(undefined));
    });
    const stderrDone = new Promise((resolve) => {
      if (!child.stderr) return resolve(undefined);
      const rl = readline.createInterface({ input: child.stderr, crlfDelay: Infinity });
      rl.on("line", (line) => {
        st.stderrTail.push(line);
        if (st.stderrTail.length > STDERR_TAIL) st.stderrTail.shift();
        o.onStderr?.(line);
      });
      rl.on("close", () => resolve(undefined));
    });
    /** @type {Promise<{ code: number | null, signal: NodeJS.Signals | null }>} */
    const exited = new Promise((resolve) => {
      child.on("error", (err) => {
        spawnError = err;
        if (child.pid === undefined) { this.#exited = true; resolve({ code: null, signal: null }); }
      });
      child.on("exit", (code, signal) => { this.#exited = true; resolve({ code, signal }); });
    });

    this.result = Promise.all([exited, stdoutDone, stderrDone]).then(([{ code, signal }]) => {
      if (hangTimer) clearTimeout(hangTimer);
      liveChildren.delete(child);
      this.#end();
      let exitCode;
      /** @type {string | null} */
      let stopSignal = null;
      if (spawnError && child.pid === undefined) {
        const err = /** @type {NodeJS.ErrnoException} */ (spawnError);
        exitCode = err.code === "ENOENT" ? 127 : 126;
        st.error = { code: "spawn_failed", exit_code: exitCode, message: `${python}: ${err.message}`,
                     hint: "set $PYTHON or the python option to a Python with the trainer's requirements", details: null };
      } else if (signal) {
        exitCode = 128 + (os.constants.signals[signal] ?? 0); // killed outright (e.g. SIGKILL, the OOM killer)
        stopSignal = signal;
      } else {
        exitCode = code ?? 0;
        stopSignal = st.interruption?.signal ?? null;
        // Cross-checks of the exit code against the events (README "Exit codes").
        if (exitCode === 0 && !st.completed && !st.validation) {
          protocolError("exit 0 without a completed or validation event");
        } else if (ERROR_EXIT_CODES.has(exitCode)) {
          if (!st.error) protocolError(`exit ${exitCode} without an error event`);
          else if (st.error.exit_code !== exitCode) protocolError(`exit ${exitCode} but the error event says ${st.error.exit_code}`);
        } else if (exitCode in SIGNAL_EXIT_CODES) {
          if (!st.interruption) protocolError(`exit ${exitCode} without an interrupted event`);
          else if (st.interruption.signal !== SIGNAL_EXIT_CODES[exitCode]) {
            protocolError(`exit ${exitCode} but the interrupted event names ${st.interruption.signal}`);
          }
        } else if (exitCode !== 0) {
          protocolError(`undocumented exit code ${exitCode}`);
        }
      }
      /** @type {RunSummary} */
      const summary = {
        exit_code: exitCode,
        signal: stopSignal,
        run_id: st.runId,
        events_by_type: st.eventsByType,
        last_step: st.lastStep,
        total_steps: st.totalSteps,
        outputs: st.completed?.outputs ?? null,
        checkpoints: st.checkpoints,
        samples: st.samples,
        warnings: st.warnings,
        validation: st.validation,
        error: st.error,
        interrupted: st.interruption !== null,
        interruption: st.interruption,
        protocol_errors: st.protocolErrors,
        hangs: st.hangs,
        forwarded_signals: st.forwardedSignals,
        unknown_types: [...st.unknownTypes],
        duration_s: Math.round((Date.now() - startedAt) / 100) / 10,
        ...(exitCode !== 0 ? { stderr_tail: st.stderrTail } : {}),
      };
      return summary;
    });
  }

  /**
   * Asks the trainer to stop: with SIGTERM (or SIGINT) it finishes the current step, writes a checkpoint, emits
   * `interrupted` and exits 143 (130); resume it with {@link resumeRun}. A second call sends a second signal,
   * which makes the trainer exit at once without a checkpoint. Returns false when the trainer has already exited.
   * @param {"SIGTERM" | "SIGINT" | "SIGKILL"} [signal]
   * @returns {boolean}
   */
  stop(signal = "SIGTERM") {
    if (this.#exited || this.#child.pid === undefined) return false;
    try {
      if (!this.#child.kill(signal)) return false;
    } catch {
      return false;
    }
    this.#state.forwardedSignals.push(signal);
    return true;
  }

  /** The run_id of the events read so far (null before the first). @returns {string | null} */
  get runId() {
    return this.#state.runId;
  }

  /** Protocol errors found so far. @returns {readonly string[]} */
  get protocolErrors() {
    return this.#state.protocolErrors;
  }

  /**
   * The events, in order, from the first line on (those that arrived before the loop began are buffered). One
   * consumer: a second iteration throws. Leaving the loop early stops the buffering but not the trainer (call
   * stop() for that); the loop ends when the trainer's stdout closes, after its last event.
   * @returns {AsyncIterator<TrainLoraEvent, undefined>}
   */
  [Symbol.asyncIterator]() {
    if (this.#iterated) throw new Error("a TrainerRun's events can be iterated once");
    this.#iterated = true;
    return {
      next: () => {
        const ev = this.#queue.shift();
        if (ev) return Promise.resolve({ value: ev, done: false });
        if (this.#ended || this.#discard) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => { this.#waiting = resolve; });
      },
      return: () => {
        this.#discard = true;
        this.#queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  /** @param {TrainLoraEvent} ev */
  #push(ev) {
    if (this.#discard) return;
    if (this.#waiting) {
      const resolve = this.#waiting;
      this.#waiting = null;
      resolve({ value: ev, done: false });
    } else {
      this.#queue.push(ev);
    }
  }

  #end() {
    this.#ended = true;
    if (this.#waiting) {
      const resolve = this.#waiting;
      this.#waiting = null;
      resolve({ value: undefined, done: true });
    }
  }

  /**
   * Parses one stdout line and checks the envelope; returns the object unless it is not an event at all.
   * @param {string} line
   * @param {number} n
   * @param {(message: string) => void} protocolError
   * @returns {UnknownEvent | null}
   */
  #checkEnvelope(line, n, protocolError) {
    const st = this.#state;
    let ev;
    try {
      ev = JSON.parse(line);
    } catch (err) {
      protocolError(`stdout line ${n} is not JSON (${/** @type {Error} */ (err).message}): ${JSON.stringify(line.slice(0, 200))}`);
      return null;
    }
    if (ev === null || typeof ev !== "object" || Array.isArray(ev)) {
      protocolError(`stdout line ${n} is not a JSON object: ${JSON.stringify(line.slice(0, 200))}`);
      return null;
    }
    if (typeof ev.type !== "string") {
      protocolError(`stdout line ${n} has no string "type"`);
      return null;
    }
    // The envelope's problems below are reported, but the event still counts: one bad seq must not hide the
    // run's error or completion from the parent.
    if (typeof ev.schema_version !== "string" || !/^1\.\d+$/.test(ev.schema_version)) {
      protocolError(`line ${n}: unsupported schema_version ${JSON.stringify(ev.schema_version)} (this client reads 1.x)`);
    }
    if (!Number.isInteger(ev.seq)) {
      protocolError(`line ${n}: seq is not an integer: ${JSON.stringify(ev.seq)}`);
    } else {
      if (ev.seq !== st.lastSeq + 1) protocolError(`line ${n}: seq ${ev.seq} follows ${st.lastSeq} (expected ${st.lastSeq + 1})`);
      st.lastSeq = ev.seq;
    }
    if (typeof ev.run_id !== "string" || !ev.run_id) {
      protocolError(`line ${n}: missing run_id`);
    } else if (st.runId === null) {
      st.runId = ev.run_id;
    } else if (ev.run_id !== st.runId) {
      protocolError(`line ${n}: run_id changed from ${st.runId} to ${ev.run_id}`);
    }
    return ev;
  }

  /**
   * The summary's bookkeeping; typed narrowing on ev.type.
   * @param {TrainLoraEvent} ev
   */
  #record(ev) {
    const st = this.#state;
    switch (ev.type) {
      case "validation":
        st.validation = { ok: ev.ok, errors: ev.errors.length, warnings: ev.warnings.length };
        break;
      case "run_started":
        st.totalSteps = ev.total_steps;
        break;
      case "step":
        st.lastStep = ev.step;
        st.totalSteps = ev.total_steps;
        break;
      case "checkpoint":
        st.checkpoints.push({ step: ev.step, path: ev.path, reason: ev.reason });
        break;
      case "sample":
        st.samples.push(ev.path);
        break;
      case "warning":
        st.warnings.push({ code: ev.code, message: ev.message });
        break;
      case "error":
        st.error = { code: ev.code, exit_code: ev.exit_code, message: ev.message, hint: ev.hint, details: ev.details ?? null };
        break;
      case "interrupted":
        st.interruption = { signal: ev.signal, step: ev.step, checkpoint: ev.checkpoint };
        break;
      case "completed":
        st.completed = ev;
        break;
      default:
        break; // status, progress, resumed, heartbeat: nothing to keep
    }
  }
}
