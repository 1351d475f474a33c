#!/usr/bin/env node
// A reference client for train_lora's event stream, written as a web app's back end would drive it.
//
//   node client.js --config config.json [--python python3] [--stop-after-step N] [-- extra trainer flags]
//
// It spawns `python3 train_lora.py --config <path>`, reads the trainer's stdout line by line, parses every
// line as JSON (a line that is not a JSON event is a protocol error), checks the envelope (seq 1, 2, 3 ...,
// one run_id, schema_version 1.x, the required fields of each type from events_schema.json), shows progress
// on its own stderr, forwards SIGINT/SIGTERM to the trainer, reports a hang when no line arrives within
// 3x the heartbeat interval, and prints ONE JSON summary line to its stdout at the end. Its exit code is the
// trainer's. No dependencies: Node.js >= 18.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_TRAINER = path.resolve(HERE, "..", "..", "train_lora.py");
const DEFAULT_HEARTBEAT_S = 30; // the trainer's default heartbeat_seconds
const KNOWN_TYPES = [
  "validation", "run_started", "status", "progress", "step", "checkpoint", "resumed", "sample",
  "warning", "error", "interrupted", "completed", "heartbeat",
];
// Exit codes of the trainer (README "Exit codes"); 130/143 come with an `interrupted` event instead.
const ERROR_EXIT_CODES = new Set([1, 2, 3, 4, 5, 6, 7]);
const SIGNAL_EXIT_CODES = { 130: "SIGINT", 143: "SIGTERM" };

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
function parseArgs(argv) {
  const opts = {
    config: null,
    python: process.env.PYTHON || "python3",
    trainer: process.env.TRAIN_LORA_SCRIPT || DEFAULT_TRAINER,
    eventsSchema: null,
    stopAfterStep: null,
    heartbeatSeconds: null,
    hangFactor: 3,
    killOnHang: false,
    quiet: false,
    passthrough: [],
  };
  const need = (i, flag) => {
    if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
    return argv[i + 1];
  };
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

// The hang timeout follows the config's heartbeat_seconds (top level or under training_params).
function heartbeatFromConfig(configPath) {
  try {
    const cfg = JSON.parse(fs.readFileSync(configPath, "utf8"));
    const value = cfg?.heartbeat_seconds ?? cfg?.training_params?.heartbeat_seconds;
    return typeof value === "number" && value > 0 ? value : null;
  } catch {
    return null; // unreadable or invalid: the trainer reports that itself, as an error event
  }
}

// type -> required fields, from events_schema.json's definitions (optional: checks are skipped without it).
function loadRequiredFields(schemaPath) {
  try {
    const schema = JSON.parse(fs.readFileSync(schemaPath, "utf8"));
    const required = { "*": schema.required || [] };
    for (const [name, def] of Object.entries(schema.definitions || {})) required[name] = def.required || [];
    return required;
  } catch {
    return null;
  }
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

function say(message) {
  clearProgress();
  process.stderr.write(`[client] ${message}\n`);
}

function showProgress(line) {
  if (isTTY) {
    process.stderr.write(`\r\x1b[K[client] ${line}`);
    progressShown = true;
  } else {
    process.stderr.write(`[client] ${line}\n`);
  }
}

function fmtDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

const fmtNum = (x, digits = 4) => (typeof x === "number" && Number.isFinite(x) ? x.toPrecision(digits) : "n/a");

// ----------------------------------------------------------------------------------------------- main
function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`client: ${err.message}\n`);
    process.exitCode = 2;
    return;
  }
  if (opts.help) {
    process.stderr.write(`${USAGE}\n`);
    return;
  }

  const startedAt = Date.now();
  const heartbeatS = opts.heartbeatSeconds ?? heartbeatFromConfig(opts.config) ?? DEFAULT_HEARTBEAT_S;
  const hangAfterMs = heartbeatS * opts.hangFactor * 1000;
  const required = loadRequiredFields(opts.eventsSchema || path.join(path.dirname(opts.trainer), "events_schema.json"));

  const state = {
    runId: null,
    lastSeq: 0,
    lineNo: 0,
    eventsByType: {},
    lastStep: null,
    totalSteps: null,
    outputs: null,
    checkpoints: [],
    samples: [],
    warnings: [],
    error: null,
    interruption: null,
    validation: null,
    completed: null,
    protocolErrors: [],
    unknownTypes: new Set(),
    hangs: 0,
    forwardedSignals: [],
    stopSent: false,
    stderrTail: [],
  };
  const protocolError = (message) => {
    state.protocolErrors.push(message);
    say(`protocol error: ${message}`);
  };

  // The trainer gets its own process group (detached), so a Ctrl-C in the terminal reaches only this client,
  // which forwards it exactly once: a second SIGINT would make the trainer skip its checkpoint.
  const args = [opts.trainer, "--config", opts.config, ...opts.passthrough];
  say(`starting: ${opts.python} ${args.join(" ")}`);
  const child = spawn(opts.python, args, {
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
    env: { ...process.env, PYTHONUNBUFFERED: "1" },
  });
  let childExited = false;
  let spawnError = null;

  const sendToChild = (sig, reason) => {
    if (childExited || child.pid === undefined) return false;
    try {
      child.kill(sig);
      state.forwardedSignals.push(sig);
      say(`sent ${sig} to the trainer (${reason})`);
      return true;
    } catch (err) {
      say(`could not send ${sig}: ${err.message}`);
      return false;
    }
  };

  for (const sig of ["SIGINT", "SIGTERM"]) {
    process.on(sig, () => {
      if (childExited || child.pid === undefined) process.exit(128 + os.constants.signals[sig]);
      sendToChild(sig, `received ${sig}`);
    });
  }
  // If this client dies of an uncaught error, do not leave a detached trainer running unattended.
  process.on("exit", () => {
    if (!childExited && child.pid !== undefined) {
      try { child.kill("SIGTERM"); } catch { /* already gone */ }
    }
  });

  // ----- hang detection: any stdout line (heartbeats included) re-arms the timer.
  let hangTimer = null;
  let lastLineAt = Date.now();
  const armHangTimer = () => {
    if (hangTimer) clearTimeout(hangTimer);
    if (!(hangAfterMs > 0) || childExited) return;
    hangTimer = setTimeout(() => {
      state.hangs += 1;
      const idle = (Date.now() - lastLineAt) / 1000;
      say(`HANG: no event for ${idle.toFixed(1)} s (> ${opts.hangFactor} x heartbeat ${heartbeatS} s); ` +
          `last event #${state.lastSeq}`);
      if (opts.killOnHang) sendToChild("SIGTERM", "hang");
      armHangTimer();
    }, hangAfterMs);
  };
  armHangTimer();

  // ----- event handling
  const handlers = {
    validation(ev) {
      state.validation = { ok: ev.ok, errors: (ev.errors || []).length, warnings: (ev.warnings || []).length };
      say(`validation: ${ev.ok ? "OK" : "FAILED"} (${state.validation.errors} error(s), ` +
          `${state.validation.warnings} warning(s))`);
      for (const e of ev.errors || []) say(`  error: ${e.path ? `${e.path}: ` : ""}${e.message}`);
      for (const w of ev.warnings || []) say(`  warning: ${w.message}`);
    },
    run_started(ev) {
      state.totalSteps = ev.total_steps;
      const dev = ev.device || {};
      say(`run started: ${ev.family} on ${dev.name || dev.type || "?"}, mixed precision ${ev.mixed_precision}, ` +
          `${ev.total_steps} step(s)${ev.start_step ? ` from step ${ev.start_step}` : ""}, world size ${ev.world_size}`);
    },
    status(ev) { say(`[${ev.phase}] ${ev.message}`); },
    progress(ev) {
      const pct = ev.total ? ` (${Math.round((100 * ev.current) / ev.total)}%)` : "";
      showProgress(`${ev.phase}: ${ev.current}/${ev.total ?? "?"} ${ev.unit || ""}${pct}`);
    },
    step(ev) {
      state.lastStep = ev.step;
      state.totalSteps = ev.total_steps ?? state.totalSteps;
      const pct = ev.total_steps ? ` ${((100 * ev.step) / ev.total_steps).toFixed(1)}%` : "";
      showProgress(`step ${ev.step}/${ev.total_steps}${pct}  loss ${fmtNum(ev.loss)} (avg ${fmtNum(ev.loss_avg)})` +
                   `  lr ${fmtNum(ev.lr, 3)}  ETA ${fmtDuration(ev.eta_s)}  elapsed ${fmtDuration(ev.elapsed_s)}`);
      if (opts.stopAfterStep !== null && !state.stopSent && ev.step >= opts.stopAfterStep) {
        state.stopSent = true;
        sendToChild("SIGTERM", `--stop-after-step ${opts.stopAfterStep}`);
      }
    },
    checkpoint(ev) {
      state.checkpoints.push({ step: ev.step, path: ev.path, reason: ev.reason });
      say(`checkpoint (${ev.reason}) at step ${ev.step}: ${ev.path}`);
    },
    resumed(ev) {
      const changed = ev.changed && Object.keys(ev.changed).length ? `; changed: ${JSON.stringify(ev.changed)}` : "";
      say(`resumed from ${ev.checkpoint} at step ${ev.step}${changed}`);
    },
    sample(ev) {
      state.samples.push(ev.path);
      say(`sample at step ${ev.step}: ${ev.path} (${JSON.stringify(ev.prompt)}, seed ${ev.seed})`);
    },
    warning(ev) {
      state.warnings.push({ code: ev.code, message: ev.message });
      say(`warning [${ev.code}]: ${ev.message}`);
    },
    error(ev) {
      state.error = { code: ev.code, exit_code: ev.exit_code, message: ev.message, hint: ev.hint ?? null,
                      details: ev.details ?? null };
      say(`ERROR [${ev.code}, exit ${ev.exit_code}]: ${ev.message}${ev.hint ? `\n[client]   hint: ${ev.hint}` : ""}`);
    },
    interrupted(ev) {
      state.interruption = { signal: ev.signal, step: ev.step, checkpoint: ev.checkpoint };
      say(`interrupted by ${ev.signal} at step ${ev.step ?? "-"}; ` +
          (ev.checkpoint ? `resume from ${ev.checkpoint}` : "no checkpoint"));
    },
    completed(ev) {
      state.completed = ev;
      state.outputs = ev.outputs;
      say(`completed ${ev.steps} step(s) in ${fmtDuration(ev.duration_s)}, final loss ${fmtNum(ev.final_loss)}`);
      for (const [kind, file] of Object.entries(ev.outputs || {})) say(`  ${kind}: ${file}`);
    },
    heartbeat(ev) {
      if (!isTTY) say(`heartbeat: ${ev.phase}, up ${fmtDuration(ev.uptime_s)}`);
    },
  };

  const onLine = (line) => {
    lastLineAt = Date.now();
    armHangTimer();
    const n = ++state.lineNo;
    let ev;
    try {
      ev = JSON.parse(line);
    } catch (err) {
      protocolError(`stdout line ${n} is not JSON (${err.message}): ${JSON.stringify(line.slice(0, 200))}`);
      return;
    }
    if (ev === null || typeof ev !== "object" || Array.isArray(ev)) {
      protocolError(`stdout line ${n} is not a JSON object: ${JSON.stringify(line.slice(0, 200))}`);
      return;
    }
    if (typeof ev.type !== "string") {
      protocolError(`stdout line ${n} has no string "type"`);
      return;
    }
    if (typeof ev.schema_version !== "string" || !/^1\.\d+$/.test(ev.schema_version)) {
      protocolError(`line ${n}: unsupported schema_version ${JSON.stringify(ev.schema_version)} (this client reads 1.x)`);
    }
    if (!Number.isInteger(ev.seq)) {
      protocolError(`line ${n}: seq is not an integer: ${JSON.stringify(ev.seq)}`);
    } else {
      if (ev.seq !== state.lastSeq + 1) protocolError(`line ${n}: seq ${ev.seq} follows ${state.lastSeq} (expected ${state.lastSeq + 1})`);
      state.lastSeq = ev.seq;
    }
    if (typeof ev.run_id !== "string" || !ev.run_id) {
      protocolError(`line ${n}: missing run_id`);
    } else if (state.runId === null) {
      state.runId = ev.run_id;
    } else if (ev.run_id !== state.runId) {
      protocolError(`line ${n}: run_id changed from ${state.runId} to ${ev.run_id}`);
    }
    if (required) {
      const missing = [...required["*"], ...(required[ev.type] || [])].filter((k) => !(k in ev));
      if (missing.length) protocolError(`line ${n}: ${ev.type} event lacks ${missing.join(", ")}`);
    }
    state.eventsByType[ev.type] = (state.eventsByType[ev.type] || 0) + 1;
    const handler = Object.hasOwn(handlers, ev.type) ? handlers[ev.type] : null;
    if (handler) {
      handler(ev);
    } else if (!state.unknownTypes.has(ev.type)) {
      state.unknownTypes.add(ev.type); // newer trainer with a new event type: tolerated, counted, noted once
      say(`note: unknown event type ${JSON.stringify(ev.type)} ignored (newer trainer?)`);
    }
  };

  const stdoutDone = new Promise((resolve) => {
    const rl = readline.createInterface({ input: child.stdout, crlfDelay: Infinity });
    rl.on("line", onLine);
    rl.on("close", resolve);
  });
  const stderrDone = new Promise((resolve) => {
    const rl = readline.createInterface({ input: child.stderr, crlfDelay: Infinity });
    rl.on("line", (line) => {
      state.stderrTail.push(line);
      if (state.stderrTail.length > 20) state.stderrTail.shift();
      if (!opts.quiet) {
        clearProgress();
        process.stderr.write(`  | ${line}\n`);
      }
    });
    rl.on("close", resolve);
  });
  const exited = new Promise((resolve) => {
    child.on("error", (err) => {
      spawnError = err;
      if (child.pid === undefined) { childExited = true; resolve({ code: null, signal: null }); }
    });
    child.on("exit", (code, signal) => { childExited = true; resolve({ code, signal }); });
  });

  Promise.all([exited, stdoutDone, stderrDone]).then(([{ code, signal }]) => {
    if (hangTimer) clearTimeout(hangTimer);
    clearProgress();
    let exitCode;
    let stopSignal = null;
    if (spawnError && child.pid === undefined) {
      exitCode = spawnError.code === "ENOENT" ? 127 : 126;
      state.error = { code: "spawn_failed", exit_code: exitCode, message: `${opts.python}: ${spawnError.message}`,
                      hint: "set $PYTHON or --python to a Python with the trainer's requirements", details: null };
      say(`ERROR: could not start the trainer: ${spawnError.message}`);
    } else if (signal) {
      exitCode = 128 + (os.constants.signals[signal] ?? 0); // killed outright (e.g. SIGKILL, OOM killer)
      stopSignal = signal;
      say(`trainer killed by ${signal}`);
    } else {
      exitCode = code;
      stopSignal = state.interruption?.signal ?? null;
      // Cross-checks of the exit code against the events (README "Exit codes").
      if (code === 0 && !state.completed && !state.validation) {
        protocolError("exit 0 without a completed or validation event");
      } else if (ERROR_EXIT_CODES.has(code)) {
        if (!state.error) protocolError(`exit ${code} without an error event`);
        else if (state.error.exit_code !== code) protocolError(`exit ${code} but the error event says ${state.error.exit_code}`);
      } else if (code in SIGNAL_EXIT_CODES) {
        if (!state.interruption) protocolError(`exit ${code} without an interrupted event`);
        else if (state.interruption.signal !== SIGNAL_EXIT_CODES[code]) {
          protocolError(`exit ${code} but the interrupted event names ${state.interruption.signal}`);
        }
      } else if (code !== 0) {
        protocolError(`undocumented exit code ${code}`);
      }
    }
    say(`trainer exited with ${exitCode}${stopSignal ? ` (${stopSignal})` : ""} after ${fmtDuration((Date.now() - startedAt) / 1000)}`);

    const summary = {
      exit_code: exitCode,
      signal: stopSignal,
      run_id: state.runId,
      events_by_type: state.eventsByType,
      last_step: state.lastStep,
      total_steps: state.totalSteps,
      outputs: state.outputs,
      checkpoints: state.checkpoints,
      samples: state.samples,
      warnings: state.warnings,
      validation: state.validation,
      error: state.error,
      interrupted: state.interruption !== null,
      interruption: state.interruption,
      protocol_errors: state.protocolErrors,
      hangs: state.hangs,
      forwarded_signals: state.forwardedSignals,
      unknown_types: [...state.unknownTypes],
      duration_s: Math.round((Date.now() - startedAt) / 100) / 10,
      ...(exitCode !== 0 ? { stderr_tail: state.stderrTail } : {}),
    };
    process.stdout.on("error", () => process.exit(exitCode)); // a closed stdout must not mask the exit code
    process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(exitCode));
  });
}

main();
