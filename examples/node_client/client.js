#!/usr/bin/env node
// @ts-check
// The command-line face of trainer.mjs: watch a training in a terminal, or drive one from a script.
//
//   node client.js --config config.json [--python python3] [--stop-after-step N] [-- extra trainer flags]
//
// trainer.mjs does the work (spawn, line-by-line protocol checks, typed events, hang detection, stop, the
// summary); this file parses flags, shows each event on its own stderr, forwards SIGINT/SIGTERM to the trainer
// and prints ONE JSON summary line to its stdout at the end. Its exit code is the trainer's. No dependencies at
// run time: Node.js >= 18.
import os from "node:os";
import { DEFAULT_TRAINER, startRun } from "./trainer.mjs";

/**
 * @typedef {import("./events.js").TrainLoraEventType} TrainLoraEventType
 * @typedef {import("./events.js").EventOfType<TrainLoraEventType>} AnyEvent
 */

const USAGE = `usage: node client.js --config PATH [options] [-- extra trainer arguments]

options:
  --config PATH            training config (JSON), passed to the trainer
  --python EXE             Python interpreter (default: $PYTHON or python3)
  --trainer PATH           trainer script (default: $TRAIN_LORA_SCRIPT or ${DEFAULT_TRAINER})
  --events-schema PATH     events_schema.json for required-field checks (default: next to the trainer)
  --stop-after-step N      send SIGTERM to the trainer once a step event with step >= N arrives
  --heartbeat-seconds S    heartbeat interval for hang detection (default: the config's heartbeat_seconds, else 30)
  --hang-factor F          report a hang after F x heartbeat seconds without any line (default 3)
  --kill-on-hang           also send SIGTERM to the trainer when a hang is reported
  --validate-only, --resume, --debug, --run-id ID   passed to the trainer
  --quiet                  do not forward the trainer's stderr (its human-readable log)
  -h, --help               this text

stdout: exactly one JSON line at exit: {exit_code, signal, events_by_type, last_step, outputs, error,
interrupted, protocol_errors, ...}. stderr: progress and the trainer's log. Exit code: the trainer's.`;

// ------------------------------------------------------------------------------------------ arguments
/**
 * @typedef {object} CliOptions
 * @property {string | null} config
 * @property {string | undefined} python
 * @property {string | undefined} trainer
 * @property {string | undefined} eventsSchema
 * @property {number | null} stopAfterStep
 * @property {number | null} heartbeatSeconds
 * @property {number} hangFactor
 * @property {boolean} killOnHang
 * @property {boolean} quiet
 * @property {boolean} help
 * @property {string[]} passthrough
 */

/** @param {string[]} argv @returns {CliOptions} */
function parseArgs(argv) {
  /** @type {CliOptions} */
  const opts = {
    config: null,
    python: undefined, // trainer.mjs: $PYTHON, else python3
    trainer: undefined, // trainer.mjs: $TRAIN_LORA_SCRIPT, else ../../train_lora.py
    eventsSchema: undefined,
    stopAfterStep: null,
    heartbeatSeconds: null,
    hangFactor: 3,
    killOnHang: false,
    quiet: false,
    help: false,
    passthrough: [],
  };
  /** @param {number} i @param {string} flag */
  const need = (i, flag) => {
    if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
    return argv[i + 1];
  };
  /** @param {string} value @param {string} flag @param {{ integer?: boolean, min?: number }} [limits] */
  const number = (value, flag, { integer = false, min = 0 } = {}) => {
    const n = Number(value);
    if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
      throw new Error(`${flag}: expected ${integer ? "an integer" : "a number"} >= ${min}, got ${JSON.stringify(value)}`);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const flag = eq > 0 ? arg.slice(0, eq) : arg;
    const takeValue = () => (eq > 0 ? arg.slice(eq + 1) : need(i++, flag));
    switch (flag) {
      case "-h": case "--help": opts.help = true; break;
      case "--config": opts.config = takeValue(); break;
      case "--python": opts.python = takeValue(); break;
      case "--trainer": opts.trainer = takeValue(); break;
      case "--events-schema": opts.eventsSchema = takeValue(); break;
      case "--stop-after-step": opts.stopAfterStep = number(takeValue(), flag, { integer: true, min: 1 }); break;
      case "--heartbeat-seconds": opts.heartbeatSeconds = number(takeValue(), flag); break;
      case "--hang-factor": opts.hangFactor = number(takeValue(), flag); break;
      case "--kill-on-hang": opts.killOnHang = true; break;
      case "--quiet": opts.quiet = true; break;
      case "--validate-only": case "--resume": case "--debug": opts.passthrough.push(flag); break;
      case "--run-id": opts.passthrough.push("--run-id", takeValue()); break;
      case "--": opts.passthrough.push(...argv.slice(i + 1)); i = argv.length; break;
      default: throw new Error(`unknown argument ${JSON.stringify(arg)} (see --help)`);
    }
  }
  if (!opts.help && !opts.config) throw new Error("--config is required (see --help)");
  return opts;
}

// -------------------------------------------------------------------------------------------- display
const isTTY = Boolean(process.stderr.isTTY);
let progressShown = false;

function clearProgress() {
  if (progressShown) {
    process.stderr.write("\r\x1b[K");
    progressShown = false;
  }
}

/** @param {string} message */
function say(message) {
  clearProgress();
  process.stderr.write(`[client] ${message}\n`);
}

/** @param {string} line */
function showProgress(line) {
  if (isTTY) {
    process.stderr.write(`\r\x1b[K[client] ${line}`);
    progressShown = true;
  } else {
    process.stderr.write(`[client] ${line}\n`);
  }
}

/** @param {number | null | undefined} seconds */
function fmtDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  /** @param {number} n */
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

/** @param {number | null | undefined} x */
const fmtNum = (x, digits = 4) => (typeof x === "number" && Number.isFinite(x) ? x.toPrecision(digits) : "n/a");

// One line (or more) per event type. A mapped type over the union: tsc fails here when the schema gains an event
// type this CLI does not show, and each handler gets its own event type (ev.loss exists only on "step").
/** @type {{ [T in TrainLoraEventType]: (ev: import("./events.js").EventOfType<T>) => void }} */
const show = {
  validation(ev) {
    say(`validation: ${ev.ok ? "OK" : "FAILED"} (${ev.errors.length} error(s), ${ev.warnings.length} warning(s))`);
    for (const e of ev.errors) say(`  error: ${e.path ? `${e.path}: ` : ""}${e.message}`);
    for (const w of ev.warnings) say(`  warning: ${w.message}`);
  },
  run_started(ev) {
    const dev = ev.device;
    say(`run started: ${ev.family} on ${dev.name || dev.type || "?"}, mixed precision ${ev.mixed_precision}, ` +
        `${ev.total_steps} step(s)${ev.start_step ? ` from step ${ev.start_step}` : ""}, world size ${ev.world_size}`);
  },
  status(ev) { say(`[${ev.phase}] ${ev.message}`); },
  progress(ev) {
    const pct = ev.total ? ` (${Math.round((100 * ev.current) / ev.total)}%)` : "";
    showProgress(`${ev.phase}: ${ev.current}/${ev.total ?? "?"} ${ev.unit || ""}${pct}`);
  },
  step(ev) {
    const pct = ev.total_steps ? ` ${((100 * ev.step) / ev.total_steps).toFixed(1)}%` : "";
    showProgress(`step ${ev.step}/${ev.total_steps}${pct}  loss ${fmtNum(ev.loss)} (avg ${fmtNum(ev.loss_avg)})` +
                 `  lr ${fmtNum(ev.lr, 3)}  ETA ${fmtDuration(ev.eta_s)}  elapsed ${fmtDuration(ev.elapsed_s)}`);
  },
  checkpoint(ev) { say(`checkpoint (${ev.reason}) at step ${ev.step}: ${ev.path}`); },
  resumed(ev) {
    const changed = ev.changed && Object.keys(ev.changed).length ? `; changed: ${JSON.stringify(ev.changed)}` : "";
    say(`resumed from ${ev.checkpoint} at step ${ev.step}${changed}`);
  },
  sample(ev) { say(`sample at step ${ev.step}: ${ev.path} (${JSON.stringify(ev.prompt)}, seed ${ev.seed})`); },
  eval_loss(ev) { say(`held-out loss at step ${ev.step}: ${fmtNum(ev.loss)} (${ev.images} image(s))`); },
  warning(ev) { say(`warning [${ev.code}]: ${ev.message}`); },
  error(ev) {
    say(`ERROR [${ev.code}, exit ${ev.exit_code}]: ${ev.message}${ev.hint ? `\n[client]   hint: ${ev.hint}` : ""}`);
  },
  interrupted(ev) {
    say(`interrupted by ${ev.signal} at step ${ev.step ?? "-"}; ` +
        (ev.checkpoint ? `resume from ${ev.checkpoint}` : "no checkpoint"));
  },
  completed(ev) {
    say(`completed ${ev.steps} step(s) in ${fmtDuration(ev.duration_s)}, final loss ${fmtNum(ev.final_loss)}`);
    for (const [kind, file] of Object.entries(ev.outputs)) say(`  ${kind}: ${file}`);
  },
  heartbeat(ev) {
    if (!isTTY) say(`heartbeat: ${ev.phase}, up ${fmtDuration(ev.uptime_s)}`);
  },
};

/**
 * Calls the handler of the event's own type. TypeScript cannot follow the pairing of `show[ev.type]` and `ev`
 * through a union (it would need the handler of every type at once), hence the one cast.
 * @param {AnyEvent} ev
 */
const showEvent = (ev) => /** @type {(e: AnyEvent) => void} */ (show[ev.type])(ev);

// ----------------------------------------------------------------------------------------------- main
async function main() {
  /** @type {CliOptions} */
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`client: ${/** @type {Error} */ (err).message}\n`);
    process.exitCode = 2;
    return;
  }
  if (opts.help || opts.config === null) {
    process.stderr.write(`${USAGE}\n`);
    return;
  }

  const noted = new Set();
  const run = startRun({
    config: opts.config,
    python: opts.python,
    trainer: opts.trainer,
    eventsSchema: opts.eventsSchema,
    heartbeatSeconds: opts.heartbeatSeconds,
    hangFactor: opts.hangFactor,
    args: opts.passthrough,
    onStderr: (line) => {
      if (opts.quiet) return;
      clearProgress();
      process.stderr.write(`  | ${line}\n`);
    },
    onProtocolError: (message) => say(`protocol error: ${message}`),
    onHang: ({ idleSeconds, lastSeq }) => {
      say(`HANG: no event for ${idleSeconds.toFixed(1)} s (> ${opts.hangFactor} x heartbeat); last event #${lastSeq}`);
      if (opts.killOnHang) stop("SIGTERM", "hang");
    },
    onUnknownEvent: (ev) => {
      if (noted.has(ev.type)) return;
      noted.add(ev.type); // a newer trainer's type: tolerated, counted in the summary, noted once
      say(`note: unknown event type ${JSON.stringify(ev.type)} ignored (newer trainer?)`);
    },
  });
  say(`starting: ${run.argv.join(" ")}`);

  /** @param {"SIGTERM" | "SIGINT"} sig @param {string} reason */
  const stop = (sig, reason) => {
    if (run.stop(sig)) say(`sent ${sig} to the trainer (${reason})`);
  };
  // The trainer runs in its own process group (trainer.mjs), so a Ctrl-C in the terminal reaches only this
  // client, which forwards each signal once: the trainer checkpoints on the first and exits at once on a second.
  for (const sig of /** @type {const} */ (["SIGINT", "SIGTERM"])) {
    process.on(sig, () => {
      if (!run.stop(sig)) process.exit(128 + os.constants.signals[sig]); // the trainer is gone: just exit
      else say(`sent ${sig} to the trainer (received ${sig})`);
    });
  }

  let stopSent = false;
  for await (const ev of run) {
    showEvent(ev);
    if (ev.type === "step" && opts.stopAfterStep !== null && !stopSent && ev.step >= opts.stopAfterStep) {
      stopSent = true;
      stop("SIGTERM", `--stop-after-step ${opts.stopAfterStep}`);
    }
  }

  const summary = await run.result;
  clearProgress();
  if (summary.error?.code === "spawn_failed") say(`ERROR: could not start the trainer: ${summary.error.message}`);
  else if (summary.signal && !summary.interrupted) say(`trainer killed by ${summary.signal}`);
  say(`trainer exited with ${summary.exit_code}${summary.signal ? ` (${summary.signal})` : ""} after ` +
      `${fmtDuration(summary.duration_s)}`);
  const exitCode = summary.exit_code;
  process.stdout.on("error", () => process.exit(exitCode)); // a closed stdout must not mask the exit code
  process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(exitCode));
}

main();
