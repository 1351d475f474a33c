// A Next.js App Router route handler over trainer.mjs: copy it to app/api/train/route.ts (and trainer.mjs,
// trainer.d.mts, events.d.ts next to it, fixing the import paths). Route handlers are plain functions of a web
// Request, so this file runs as it is under Node.js too: tests/test_event_types.py compiles it with tsc and drives
// POST / DELETE against a real tiny training, with no Next.js installed.
//
//   POST   /api/train  {"config": "/jobs/42/config.json", "resume": false}
//          -> text/event-stream: one `event: <type>` / `data: <event JSON>` message per trainer event, then
//             `event: summary` with the RunSummary (exit code, outputs, error, interruption) once it has exited
//   DELETE /api/train?run=<run_id>   -> SIGTERM: the trainer finishes its step, checkpoints and exits 143;
//          POST again with "resume": true to continue from that checkpoint
import { randomUUID } from "node:crypto";
import type { TrainLoraEvent } from "../events.js";
import { resumeRun, startRun, type RunSummary, type TrainerRun } from "../trainer.mjs";

export const runtime = "nodejs"; // a child process needs the Node.js runtime, not the Edge runtime
export const dynamic = "force-dynamic";

// The runs this server process started, by run_id. A real app keeps its job records in a database; the process
// handles only live here.
const runs = new Map<string, TrainerRun>();

interface StartRequest {
  config: string;
  resume?: boolean;
}

function isStartRequest(body: unknown): body is StartRequest {
  if (typeof body !== "object" || body === null) return false;
  const b = body as Record<string, unknown>;
  return typeof b.config === "string" && (b.resume === undefined || typeof b.resume === "boolean");
}

// What the browser's progress bar needs, derived from the typed union: each branch sees only its type's fields.
export function progressOf(ev: TrainLoraEvent): { label: string; fraction: number | null } | null {
  switch (ev.type) {
    case "step":
      return { label: `step ${ev.step}/${ev.total_steps}, loss ${ev.loss ?? "n/a"}`, fraction: ev.step / ev.total_steps };
    case "progress":
      return { label: `${ev.phase} ${ev.current}/${ev.total ?? "?"}`, fraction: ev.total ? ev.current / ev.total : null };
    case "status":
      return { label: ev.message, fraction: null };
    case "completed":
      return { label: `done: ${ev.outputs.lora}`, fraction: 1 };
    case "error":
      return { label: `${ev.code}: ${ev.message}`, fraction: null };
    case "interrupted":
      return { label: `stopped at step ${ev.step ?? "-"}`, fraction: null };
    case "validation":
    case "run_started":
    case "checkpoint":
    case "resumed":
    case "sample":
    case "eval_loss":
    case "warning":
    case "heartbeat":
      return null;
    default: {
      const unhandled: never = ev; // a new event type in the schema fails type checking here until handled
      return unhandled;
    }
  }
}

const encoder = new TextEncoder();
const message = (event: string, data: unknown) => encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);

export async function POST(request: Request): Promise<Response> {
  const body: unknown = await request.json().catch(() => null);
  if (!isStartRequest(body)) return Response.json({ error: 'expected {"config": PATH, "resume"?: boolean}' }, { status: 400 });
  const runId = randomUUID(); // known before the first event, so DELETE can find the run at once
  const run = (body.resume ? resumeRun : startRun)({ config: body.config, runId });
  runs.set(runId, run);
  void run.result.then(() => runs.delete(runId)); // live runs only, whether or not a browser still watches
  // Pulled one event at a time, so a slow reader holds the events back in trainer.mjs's buffer, not here.
  const events = run[Symbol.asyncIterator]();
  const stream = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const next = await events.next();
      if (!next.done) {
        controller.enqueue(message(next.value.type, next.value));
      } else {
        const summary: RunSummary = await run.result;
        controller.enqueue(message("summary", summary));
        controller.close();
      }
    },
    // The browser went away: the training goes on (stop it with DELETE); trainer.mjs stops buffering its events.
    async cancel() {
      await events.return?.();
    },
  });
  return new Response(stream, {
    headers: { "content-type": "text/event-stream", "cache-control": "no-cache", "x-run-id": runId },
  });
}

export async function DELETE(request: Request): Promise<Response> {
  const runId = new URL(request.url).searchParams.get("run");
  const run = runId === null ? undefined : runs.get(runId);
  if (!run) return Response.json({ error: `no live run ${JSON.stringify(runId)}` }, { status: 404 });
  return Response.json({ run_id: runId, stopping: run.stop("SIGTERM") });
}
