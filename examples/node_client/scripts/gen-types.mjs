#!/usr/bin/env node
// Generates the two committed declaration files of this folder:
//   events.d.ts    TypeScript types of every train_lora stdout event, from events_schema.json (json-schema-to-typescript)
//   trainer.d.mts  the declarations of trainer.mjs, emitted by tsc from its JSDoc (tsconfig.decl.json), so a
//                  TypeScript project without allowJs gets the module's types too
//
//   npm run gen-types                                        # rewrites both here
//   node scripts/gen-types.mjs --schema S --out-dir DIR      # another schema / folder (the freshness test uses it)
//
// events_schema.json describes one event as the envelope plus `allOf: [{if: {type: const X}, then: $ref X}]`.
// json-schema-to-typescript ignores if/then, so fed the schema as it is it would give one loose interface with no
// per-type fields. This script therefore builds, in memory, the schema of the same events as a oneOf of one
// object per type (the envelope's fields, `type` fixed to that type's name, then the type's own fields) and
// compiles that: TypeScript gets a union discriminated on `type`, which narrows in a switch or an if.
//
// The event interfaces are closed (no index signature), so `ev.lsos` is a type error rather than `unknown`. The
// schema lets a newer 1.x trainer add fields; those are simply not typed until the schema declares them and this
// script runs again. Nested objects keep the schema's openness (`[k: string]: unknown`): several are documented
// to carry more than they declare (run_started.objective, run_started.text_cache, ...).
//
// Anything the mapping cannot express (a type in the enum without an if/then, a $ref to a missing definition, two
// branches for one type) fails the generation instead of producing types that silently disagree with the schema.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

/** @typedef {import("json-schema-to-typescript").JSONSchema} JSONSchema */

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CLIENT_DIR = path.resolve(HERE, "..");
const DEFAULT_SCHEMA = path.resolve(CLIENT_DIR, "..", "..", "events_schema.json");

/** @param {string[]} argv */
function parseArgs(argv) {
  const opts = { schema: DEFAULT_SCHEMA, outDir: CLIENT_DIR };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--schema" && i + 1 < argv.length) opts.schema = argv[++i];
    else if (flag === "--out-dir" && i + 1 < argv.length) opts.outDir = argv[++i];
    else throw new Error(`unknown argument ${JSON.stringify(flag)} (usage: gen-types.mjs [--schema PATH] [--out-dir DIR])`);
  }
  return opts;
}

// run_started -> RunStartedEvent
/** @param {string} type */
const interfaceName = (type) => `${type.split(/[^A-Za-z0-9]+/).map((/** @type {string} */ w) => w[0].toUpperCase() + w.slice(1)).join("")}Event`;

// type name -> definition name, read from the allOf's if/then branches and checked against the type enum.
/** @param {any} schema events_schema.json as parsed @returns {Map<string, string>} */
function typeToDefinition(schema) {
  const types = schema.properties?.type?.enum;
  if (!Array.isArray(types) || !types.length) throw new Error("properties.type.enum (the list of event types) is missing");
  const map = new Map();
  for (const [i, branch] of (schema.allOf || []).entries()) {
    const type = branch?.if?.properties?.type?.const;
    const ref = branch?.then?.$ref;
    if (typeof type !== "string" || typeof ref !== "string" || !ref.startsWith("#/definitions/")) {
      throw new Error(`allOf[${i}] is not {if: {properties: {type: {const: NAME}}}, then: {$ref: "#/definitions/..."}}`);
    }
    const def = ref.slice("#/definitions/".length);
    if (!schema.definitions?.[def]) throw new Error(`allOf[${i}] refers to ${ref}, which does not exist`);
    if (map.has(type)) throw new Error(`event type ${JSON.stringify(type)} has two allOf branches`);
    if (!types.includes(type)) throw new Error(`allOf[${i}] is for ${JSON.stringify(type)}, which properties.type.enum lacks`);
    map.set(type, def);
  }
  const unmapped = types.filter((t) => !map.has(t));
  if (unmapped.length) throw new Error(`event type(s) ${unmapped.join(", ")} have no allOf if/then branch`);
  return map;
}

/** @param {any} schema events_schema.json as parsed @returns {JSONSchema} */
function eventsSchema(schema) {
  const envelope = { ...schema.properties };
  /** @type {Record<string, JSONSchema>} */
  const definitions = {};
  for (const [type, defName] of typeToDefinition(schema)) {
    const def = schema.definitions[defName];
    const own = def.properties || {};
    const clash = Object.keys(own).filter((k) => k in envelope);
    if (clash.length) throw new Error(`definitions.${defName} redefines envelope field(s) ${clash.join(", ")}`);
    const name = interfaceName(type);
    definitions[name] = {
      title: name,
      description: def.description,
      type: "object",
      properties: { ...envelope, type: { const: type }, ...own },
      required: [...new Set([...(schema.required || []), ...(def.required || [])])],
      additionalProperties: false,
    };
  }
  return {
    title: "TrainLoraEvent",
    description: schema.description,
    oneOf: Object.keys(definitions).map((name) => ({ $ref: `#/definitions/${name}` })),
    definitions,
  };
}

const BANNER = `/* eslint-disable */
/**
 * GENERATED from events_schema.json by scripts/gen-types.mjs (json-schema-to-typescript): do not edit.
 * Run \`npm run gen-types\` in examples/node_client after changing the schema; tests/test_event_types.py fails
 * while this file is stale.
 */`;

const DECL_BANNER = `// GENERATED from trainer.mjs's JSDoc by scripts/gen-types.mjs (tsc --emitDeclarationOnly): do not edit.
// Run \`npm run gen-types\` in examples/node_client after changing trainer.mjs's exports.`;

// Helpers json-schema-to-typescript has no schema form for; they only name what the union above already says.
const HELPERS = `
/** Every event type this schema version knows: the discriminant of {@link TrainLoraEvent}. */
export type TrainLoraEventType = TrainLoraEvent["type"];

/** The event of one type, e.g. \`EventOfType<"step">\` is {@link StepEvent}. */
export type EventOfType<T extends TrainLoraEventType> = Extract<TrainLoraEvent, { type: T }>;
`;

// trainer.mjs's declarations, by this folder's pinned tsc. They name the event types by import ("./events.js"),
// so they do not depend on which schema events.d.ts was generated from.
function emitTrainerDeclarations() {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "train-lora-decl-"));
  try {
    const tsc = path.join(CLIENT_DIR, "node_modules", "typescript", "bin", "tsc");
    const proc = spawnSync(process.execPath, [tsc, "-p", path.join(CLIENT_DIR, "tsconfig.decl.json"), "--outDir", tmp],
                           { encoding: "utf8" });
    if (proc.status !== 0) throw new Error(`tsc could not emit trainer.d.mts:\n${proc.stdout}${proc.stderr}`);
    return fs.readFileSync(path.join(tmp, "trainer.d.mts"), "utf8");
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const schema = JSON.parse(fs.readFileSync(opts.schema, "utf8"));
  const ts = await compile(eventsSchema(schema), "TrainLoraEvent", {
    bannerComment: BANNER,
    unknownAny: true,
    strictIndexSignatures: true, // an index-signature lookup is `unknown | undefined`: strictNullChecks applies
    style: { printWidth: 120, singleQuote: false, trailingComma: "all" },
  });
  const declarations = `${DECL_BANNER}\n${emitTrainerDeclarations()}`;
  fs.mkdirSync(opts.outDir, { recursive: true });
  for (const [name, text] of [["events.d.ts", `${ts.trimEnd()}\n${HELPERS}`], ["trainer.d.mts", declarations]]) {
    const file = path.join(opts.outDir, name);
    fs.writeFileSync(file, text);
    process.stderr.write(`wrote ${path.relative(process.cwd(), file) || file}\n`);
  }
}

main().catch((err) => {
  process.stderr.write(`gen-types: ${err.message}\n`);
  process.exitCode = 1;
});
