// Compile-time tests of the generated event types and of trainer.mjs's declarations: `tsc --noEmit` (npm run
// typecheck, tests/test_event_types.py) fails if one of the `@ts-expect-error` lines below stops being an error
// (the union lost its discriminant, an interface became open) or if a line meant to compile does not. Never run.
import type { CompletedEvent, EventOfType, StepEvent, TrainLoraEvent, TrainLoraEventType } from "./events.js";
import { EVENT_TYPES, resumeRun, startRun, type RunSummary, type TrainerRun } from "./trainer.mjs";

declare const ev: TrainLoraEvent;

// Narrowing on `type` gives each event its own fields.
if (ev.type === "step") {
  const loss: number | null = ev.loss;
  const step: number = ev.step;
  void [loss, step];
  // @ts-expect-error a misspelt field is an error: the event interfaces are closed, not `unknown` index signatures
  void ev.lsos;
}
// @ts-expect-error `loss` exists only on step events, so not on the union
void ev.loss;
if (ev.type === "error") {
  // @ts-expect-error error.code is the schema's enum, not any string
  const code: "no_such_code" = ev.code;
  void code;
}
if (ev.type === "completed") {
  const lora: string = ev.outputs.lora; // required in the schema
  // @ts-expect-error optional in the schema: a string or undefined
  const report: string = ev.outputs.report;
  void [lora, report];
}

// @ts-expect-error not an event type of this schema version
const notAType: TrainLoraEventType = "telemetry";
void notAType;
const step: EventOfType<"step"> = ev as StepEvent;
const completed: CompletedEvent = ev as EventOfType<"completed">;
void [step, completed];

// The runtime list of types is the union's.
const types: readonly TrainLoraEventType[] = EVENT_TYPES;
void types;

// The module: options are checked, the iterator yields the union, the result is a RunSummary.
// @ts-expect-error config is required
startRun({});
// @ts-expect-error stop() sends a stop signal, not any signal
startRun({ config: "c.json" }).stop("SIGHUP");
async function drive(): Promise<RunSummary> {
  const run: TrainerRun = resumeRun({ config: "c.json", onHang: ({ idleSeconds }) => void idleSeconds.toFixed(1) });
  for await (const e of run) {
    const typed: TrainLoraEvent = e;
    void typed;
  }
  return run.result;
}
void drive;
