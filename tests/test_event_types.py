"""The typed Node.js side (examples/node_client): the TypeScript types generated from events_schema.json are
current, the module and its examples type-check, the real trainer's events fit the types, and the Next.js route
example drives a real tiny training (start, stop, resume) through trainer.mjs.

Needs node and examples/node_client/node_modules (`npm ci --prefix examples/node_client`, which .ci/run does).
Without them these tests skip, except where TRAIN_LORA_REQUIRE_NODE_TOOLS=1 (CI): there a missing tool fails."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, write_config

CLIENT_DIR = ROOT / "examples" / "node_client"
NODE = shutil.which("node")
TSC = CLIENT_DIR / "node_modules" / "typescript" / "bin" / "tsc"
GENERATOR_DEPS = CLIENT_DIR / "node_modules" / "json-schema-to-typescript"
GENERATED = ("events.d.ts", "trainer.d.mts")


@pytest.fixture(scope="module")
def node_tools() -> str:
    missing = [what for what, ok in (("node", NODE is not None), (str(TSC.relative_to(ROOT)), TSC.is_file()),
                                     (str(GENERATOR_DEPS.relative_to(ROOT)), GENERATOR_DEPS.is_dir())) if not ok]
    if missing:
        reason = f"missing {', '.join(missing)}: run `npm ci --prefix examples/node_client`"
        if os.environ.get("TRAIN_LORA_REQUIRE_NODE_TOOLS") == "1":
            pytest.fail(f"TRAIN_LORA_REQUIRE_NODE_TOOLS=1 but {reason}")
        pytest.skip(reason)
    return NODE


def _run(cmd: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tsc(node: str, *args: str, cwd: Path = CLIENT_DIR) -> subprocess.CompletedProcess:
    return _run([node, str(TSC), *args], cwd=cwd)


def _generate(node: str, schema: Path, out_dir: Path) -> subprocess.CompletedProcess:
    script = CLIENT_DIR / "scripts" / "gen-types.mjs"
    return _run([node, str(script), "--schema", str(schema), "--out-dir", str(out_dir)], cwd=CLIENT_DIR)


# ------------------------------------------------------------------------------------------ generated types
def test_committed_types_match_the_schema(node_tools, tmp_path):
    proc = _generate(node_tools, ROOT / "events_schema.json", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in GENERATED:
        fresh, committed = (tmp_path / name).read_text(), (CLIENT_DIR / name).read_text()
        assert fresh == committed, (
            f"examples/node_client/{name} is stale (events_schema.json or trainer.mjs changed since it was "
            f"generated): run `npm run gen-types` in examples/node_client and commit it")


def _schema() -> dict:
    return json.loads((ROOT / "events_schema.json").read_text())


def test_a_schema_change_changes_the_types(node_tools, tmp_path):
    """The freshness check above can fail: a new event type and a new field both reach the generated union."""
    schema = _schema()
    schema["properties"]["type"]["enum"].append("telemetry")
    schema["allOf"].append({"if": {"properties": {"type": {"const": "telemetry"}}},
                            "then": {"$ref": "#/definitions/telemetry"}})
    schema["definitions"]["telemetry"] = {"description": "GPU readings.", "type": "object",
                                          "properties": {"gpu_temp_c": {"type": "number"}}, "required": ["gpu_temp_c"]}
    schema["definitions"]["step"]["properties"]["grad_norm"] = {"type": ["number", "null"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    proc = _generate(node_tools, path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out" / "events.d.ts").read_text()
    assert text != (CLIENT_DIR / "events.d.ts").read_text()
    assert "| TelemetryEvent" in text and 'type: "telemetry";' in text and "gpu_temp_c: number;" in text
    assert "grad_norm?: number | null;" in text


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s["allOf"].pop(), "have no allOf if/then branch"),
    (lambda s: s["allOf"].append(copy.deepcopy(s["allOf"][0])), "has two allOf branches"),
    (lambda s: s["definitions"].pop("step"), "which does not exist"),
])
def test_the_generator_refuses_a_schema_it_cannot_type(node_tools, tmp_path, break_it, message):
    """Types that silently disagree with the schema are worse than none: the generator stops instead."""
    schema = _schema()
    break_it(schema)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    proc = _generate(node_tools, path, tmp_path / "out")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_discriminated_union_on_type(node_tools):
    """TrainLoraEvent is a union of one interface per event type, each with `type` fixed to its name."""
    text = (CLIENT_DIR / "events.d.ts").read_text()
    union = text.split("export type TrainLoraEvent =", 1)[1].split(";", 1)[0]
    members = [m.strip() for m in union.split("|") if m.strip()]
    literals = []
    for member in members:
        match = re.search(rf'export interface {member} {{\n  type: "([a-z_]+)";', text)
        assert match, f"{member} has no literal `type` as its first field"
        literals.append(match.group(1))
    assert sorted(literals) == sorted(_schema()["properties"]["type"]["enum"])


# ------------------------------------------------------------------------------------------ type checking
def test_typecheck(node_tools):
    """`tsc --noEmit` over trainer.mjs, client.js (JSDoc-typed, checkJs), the Next.js route example and
    type_tests.ts, whose @ts-expect-error lines fail the check when the union stops narrowing."""
    proc = _tsc(node_tools, "--noEmit", "-p", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _typecheck_events(node: str, tmp_path: Path, events: list[dict]) -> subprocess.CompletedProcess:
    """Real events as object literals typed TrainLoraEvent: tsc's excess-property check flags a top-level field
    the schema does not declare, and a missing or mistyped one, against the member that ev.type selects."""
    events_dts = (CLIENT_DIR / "events.js").as_posix()  # resolves to events.d.ts
    lines = [f'import type {{ TrainLoraEvent }} from "{events_dts}";', "export const events: TrainLoraEvent[] = ["]
    lines += [f"  {json.dumps(ev)}," for ev in events]
    lines.append("];")
    (tmp_path / "fixture.ts").write_text("\n".join(lines) + "\n")
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext",
                            "target": "es2022", "types": []},
        "files": ["fixture.ts"]}))
    return _tsc(node, "-p", str(tmp_path), cwd=tmp_path)


def test_event_type_check_can_fail(node_tools, tmp_path):
    good = {"type": "heartbeat", "schema_version": "1.0", "run_id": "r", "seq": 1, "time": "2026-01-01T00:00:00.000Z",
            "phase": "training", "uptime_s": 1.5}
    assert _typecheck_events(node_tools, tmp_path, [good]).returncode == 0
    for bad in ({**good, "uptime": 1.5}, {k: v for k, v in good.items() if k != "uptime_s"}, {**good, "seq": "1"},
                {**good, "type": "hearbeat"}):
        proc = _typecheck_events(node_tools, tmp_path, [bad])
        assert proc.returncode != 0 and "fixture.ts(3," in proc.stdout, (bad, proc.stdout)


# ------------------------------------------------------------------------------------------ the route, for real
DRIVER = r'''
import path from "node:path";
import { pathToFileURL } from "node:url";
const [build, config] = process.argv.slice(2);
const { POST, DELETE } = await import(pathToFileURL(path.join(build, "examples", "next-route.js")).href);

const post = (body) => POST(new Request("http://localhost/api/train", {
  method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) }));
const del = async (runId) => {
  const res = await DELETE(new Request(`http://localhost/api/train?run=${runId}`, { method: "DELETE" }));
  return { status: res.status, body: await res.json() };
};
// Server-Sent Events: "event: NAME\ndata: JSON\n\n" per message.
async function* messages(res) {
  const decoder = new TextDecoder();
  let buf = "";
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, { stream: true });
    for (let i; (i = buf.indexOf("\n\n")) >= 0; buf = buf.slice(i + 2)) {
      const block = buf.slice(0, i);
      yield { event: /^event: (.*)$/m.exec(block)[1], data: JSON.parse(/^data: (.*)$/m.exec(block)[1]) };
    }
  }
}
// One streamed run: every message, and a DELETE as soon as a step event with step >= stopAt arrives.
async function watch(body, stopAt) {
  const res = await post(body);
  const out = { status: res.status, content_type: res.headers.get("content-type"), run_id: res.headers.get("x-run-id"),
                messages: [], deletes: [] };
  for await (const m of messages(res)) {
    out.messages.push(m);
    if (stopAt && m.event === "step" && m.data.step >= stopAt && !out.deletes.length) {
      out.deletes.push(await del(out.run_id));
    }
  }
  out.delete_after_exit = await del(out.run_id);
  return out;
}
const bad = await post({ config: 5 });
const result = { bad_request: { status: bad.status, body: await bad.json() } };
result.first = await watch({ config }, 2);
result.resumed = await watch({ config, resume: true }, null);
process.stdout.write(JSON.stringify(result));
'''


def _events(watched: dict) -> list[dict]:
    msgs = watched["messages"]
    assert msgs and msgs[-1]["event"] == "summary", [m["event"] for m in msgs[-3:]]
    # Each SSE message is named after its event's type, and the route streams the summary once, last.
    assert all(m["event"] == m["data"]["type"] for m in msgs[:-1])
    return [m["data"] for m in msgs[:-1]]


def test_next_route_streams_typed_events_stops_and_resumes(node_tools, tmp_path, tiny_models, dataset):
    # The route handler as Next.js would build it: route.ts compiled (here by tsc), trainer.mjs copied beside.
    build = tmp_path / "build"
    proc = _tsc(node_tools, "-p", ".", "--noEmit", "false", "--outDir", str(build))
    assert proc.returncode == 0, proc.stdout
    shutil.copy(CLIENT_DIR / "trainer.mjs", build / "trainer.mjs")
    (build / "package.json").write_text('{"type": "module"}')
    (tmp_path / "driver.mjs").write_text(DRIVER)

    cfg = write_config(tmp_path / "config.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                       max_train_steps=12, checkpointing_steps=4, checkpoints_total_limit=10, log_every_n_steps=1,
                       heartbeat_seconds=1, validation_steps=12, validation_inference_steps=2,
                       validation_prompts=["ohwx, a circle"], eval_split=0.25)  # eval_split: eval_loss events
    # The copied trainer.mjs cannot find ../../train_lora.py from the build folder: the environment names it.
    env = {**os.environ, "PYTHON": sys.executable, "TRAIN_LORA_SCRIPT": str(ROOT / "train_lora.py"),
           "HF_HUB_OFFLINE": "1"}
    validated = run_cli("--config", str(cfg), "--validate-only")  # one `validation` event for the type check
    proc = _run([node_tools, str(tmp_path / "driver.mjs"), str(build), str(cfg)], timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)

    assert result["bad_request"]["status"] == 400

    first = result["first"]
    assert first["status"] == 200 and first["content_type"] == "text/event-stream" and first["run_id"]
    events, summary = _events(first), first["messages"][-1]["data"]
    assert {e["run_id"] for e in events} == {first["run_id"]}  # the route's --run-id reached every event
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert first["deletes"] == [{"status": 200, "body": {"run_id": first["run_id"], "stopping": True}}]
    assert first["delete_after_exit"]["status"] == 404  # the route forgets a run once it has exited
    assert summary["exit_code"] == 143 and summary["signal"] == "SIGTERM" and summary["interrupted"], summary
    assert summary["forwarded_signals"] == ["SIGTERM"] and summary["protocol_errors"] == []
    stopped_at = summary["interruption"]["step"]
    assert 2 <= stopped_at < 12 and Path(summary["interruption"]["checkpoint"]).is_dir()  # kept: total_limit 10
    assert events[-1]["type"] == "interrupted" and events[-1]["step"] == stopped_at

    resumed = result["resumed"]
    r_events, r_summary = _events(resumed), resumed["messages"][-1]["data"]
    assert r_summary["exit_code"] == 0 and r_summary["protocol_errors"] == [], r_summary
    assert resumed["run_id"] != first["run_id"]
    [res] = [e for e in r_events if e["type"] == "resumed"]
    assert res["step"] == stopped_at and res["checkpoint"] == summary["interruption"]["checkpoint"]
    steps = [e["step"] for e in r_events if e["type"] == "step"]
    assert steps == list(range(stopped_at + 1, 13))  # continues where it stopped, no step twice
    completed = r_events[-1]
    assert completed["type"] == "completed" and completed["steps"] == 12
    assert Path(r_summary["outputs"]["lora"]).is_file() and r_summary["outputs"] == completed["outputs"]
    assert r_summary["samples"] and all(Path(p).is_file() for p in r_summary["samples"])

    # Every real event fits the generated types (a broken config adds an `error` event).
    broken = run_cli("--config", str(write_config(tmp_path / "bad.json", dataset_path=5)))
    real = validated.events + events + r_events + broken.events
    seen = {e["type"] for e in real}
    assert seen >= set(_schema()["properties"]["type"]["enum"]) - {"heartbeat"}, seen  # heartbeats come if slow
    fixture = tmp_path / "fixture"
    fixture.mkdir()
    checked = _typecheck_events(node_tools, fixture, real)
    assert checked.returncode == 0, "real events that do not fit events.d.ts:\n" + _with_lines(checked.stdout, fixture)


def _with_lines(tsc_output: str, fixture: Path) -> str:
    """tsc's messages, each followed by the event (the fixture's line) it is about."""
    lines = (fixture / "fixture.ts").read_text().splitlines()
    out = []
    for message in tsc_output.splitlines()[:20]:
        out.append(message)
        match = re.match(r"fixture\.ts\((\d+),", message)
        if match:
            out.append("    " + lines[int(match.group(1)) - 1][:600])
    return "\n".join(out)
