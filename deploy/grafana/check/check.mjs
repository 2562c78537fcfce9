// Checks a Grafana dashboard JSON against Grafana's own published schemas (see schema.ts):
// every panel, row, variable and annotation, key by key, with each panel checked against its
// plugin's Options and FieldConfig and each target against the Prometheus query type; and parses
// every query with Prometheus's own PromQL grammar (@prometheus-io/lezer-promql).
//
// How: the JSON is turned, in memory, into a TypeScript module of object literals, one per panel
// (`const p7 = {…} satisfies Panels['timeseries']`), rows and the dashboard referring to them,
// and type-checked with the TypeScript compiler. Object literals get TypeScript's excess-property
// check, so an unknown key is an error as well as a wrong type or a value outside an enum. Each
// error is reported with the panel (id, title) it is in and the offending line. The few
// constraints of Grafana's CUE schema that TypeScript cannot express (grid bounds, unsigned ids)
// are checked directly.
//
// Usage: node check.mjs [dashboard.json]   (default: ../llm-lb.json)
// Exit status 0 when the dashboard conforms and its queries parse, 1 otherwise. Installed and run by
// scripts/grafana-check.sh.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { parser as promql } from '@prometheus-io/lezer-promql';

const here = path.dirname(fileURLToPath(import.meta.url));
const file = path.resolve(process.argv[2] ?? path.join(here, '..', 'llm-lb.json'));
const dashboard = JSON.parse(readFileSync(file, 'utf8'));
const problems = [];

// ---- the dashboard as a TypeScript module: one chunk per panel, each remembered by its lines ----
const chunks = []; // {label, text}
let counter = 0;
const literal = (value) => JSON.stringify(value, null, 2);
const MARK = '@@panels@@'; // stands for the list of panel constants in a row or the dashboard

function emitPanel(panel, where) {
  const name = `p${++counter}`;
  const label = `${where}panel ${panel.id} "${panel.title}" (${panel.type})`;
  if (panel.type === 'row') {
    const refs = (panel.panels ?? []).map((p) => emitPanel(p, `row "${panel.title}" > `));
    const text = literal({ ...panel, panels: MARK }).replace(`"${MARK}"`, `[${refs.join(', ')}]`);
    chunks.push({ label: `row ${panel.id} "${panel.title}"`, text: `const ${name} = ${text} satisfies Row;` });
  } else {
    const type = JSON.stringify(panel.type ?? '');
    chunks.push({ label, text: `const ${name} = ${literal(panel)} satisfies Panels[${type}];` });
  }
  return name;
}

const refs = (dashboard.panels ?? []).map((p) => emitPanel(p, ''));
chunks.push({
  label: 'dashboard (top-level keys, variables, annotations)',
  text:
    'export const dashboard = ' +
    literal({ ...dashboard, panels: MARK }).replace(`"${MARK}"`, `[${refs.join(', ')}]`) +
    ' satisfies Dashboard;',
});

let source = "import type { Dashboard, Panels, Row } from './schema';\n";
const ranges = []; // [firstLine, lastLine, label], 0-based
for (const c of chunks) {
  const first = source.split('\n').length - 1;
  source += c.text + '\n';
  ranges.push([first, source.split('\n').length - 2, c.label]);
}

// ---- type-check it against schema.ts ----
const virtual = path.join(here, '__dashboard__.ts');
const options = {
  strict: true,
  noEmit: true,
  skipLibCheck: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.ESNext,
  moduleResolution: ts.ModuleResolutionKind.Bundler,
  types: [],
};
const host = ts.createCompilerHost(options);
const { getSourceFile, fileExists, readFile } = host;
host.getSourceFile = (name, lang, ...rest) =>
  name === virtual ? ts.createSourceFile(name, source, lang, true) : getSourceFile.call(host, name, lang, ...rest);
host.fileExists = (name) => name === virtual || fileExists.call(host, name);
host.readFile = (name) => (name === virtual ? source : readFile.call(host, name));
const program = ts.createProgram([virtual], options, host);
const lines = source.split('\n');
for (const d of ts.getPreEmitDiagnostics(program)) {
  const message = ts.flattenDiagnosticMessageText(d.messageText, '\n  ');
  if (d.file?.fileName === virtual && d.start !== undefined) {
    const { line } = d.file.getLineAndCharacterOfPosition(d.start);
    const where = ranges.find(([a, b]) => line >= a && line <= b)?.[2] ?? `line ${line + 1}`;
    problems.push(`${where}: ${message}\n    at: ${lines[line].trim()}`);
  } else {
    problems.push(`${d.file ? path.relative(here, d.file.fileName) : 'typescript'}: ${message}`);
  }
}

// ---- constraints of Grafana's CUE schema that TypeScript cannot express ----
const uint = (v) => Number.isInteger(v) && v >= 0;
function constraints(panel, where) {
  const label = `${where}panel ${panel.id} "${panel.title}"`;
  if (!uint(panel.id)) problems.push(`${label}: id must be an unsigned integer`);
  if (typeof panel.type !== 'string' || panel.type.length === 0) problems.push(`${label}: empty type`);
  const g = panel.gridPos;
  if (g) {
    if (![g.h, g.w, g.x, g.y].every(uint)) problems.push(`${label}: gridPos values must be unsigned integers`);
    if (!(g.h > 0)) problems.push(`${label}: gridPos.h must be > 0`);
    if (!(g.w > 0 && g.w <= 24)) problems.push(`${label}: gridPos.w must be in 1..24`);
    if (!(g.x >= 0 && g.x < 24)) problems.push(`${label}: gridPos.x must be in 0..23`);
  }
  for (const p of panel.panels ?? []) constraints(p, `row "${panel.title}" > `);
}
(dashboard.panels ?? []).forEach((p) => constraints(p, ''));
if (!(uint(dashboard.schemaVersion) && dashboard.schemaVersion < 65536)) problems.push('schemaVersion must be a uint16');
if ('fiscalYearStartMonth' in dashboard && !(uint(dashboard.fiscalYearStartMonth) && dashboard.fiscalYearStartMonth < 12))
  problems.push('fiscalYearStartMonth must be in 0..11');

// ---- every query parses as PromQL (Grafana's interval variables stand for a duration) ----
function syntax(expr, label) {
  const text = expr.replace(/\$\{?(__rate_interval|__interval|__range)\}?/g, '5m');
  const errors = [];
  promql.parse(text).iterate({
    enter: (node) => {
      if (node.type.isError) errors.push(node.from);
    },
  });
  if (errors.length || !text.trim())
    problems.push(`${label}: not PromQL (syntax error at column ${errors[0] ?? 0}): ${expr}`);
}
function queries(panel, where) {
  for (const t of panel.targets ?? []) syntax(t.expr ?? '', `${where}panel ${panel.id} "${panel.title}" query ${t.refId}`);
  for (const p of panel.panels ?? []) queries(p, `row "${panel.title}" > `);
}
(dashboard.panels ?? []).forEach((p) => queries(p, ''));
for (const v of dashboard.templating?.list ?? []) {
  if (v.type !== 'query') continue;
  const query = typeof v.query === 'string' ? v.query : v.query?.query ?? '';
  // Grafana's label_values(selector, label): the selector is PromQL.
  const inner = /^label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$/s.exec(query);
  syntax(inner ? inner[1] : query, `variable ${v.name}`);
}

const version = (pkg) => JSON.parse(readFileSync(path.join(here, 'node_modules', pkg, 'package.json'), 'utf8')).version;
const against = ['@grafana/schema', '@grafana/grafana-foundation-sdk', '@prometheus-io/lezer-promql', 'typescript']
  .map((pkg) => `${pkg} ${version(pkg).replace(/^v/, '')}`)
  .join(', ');
const rel = path.relative(process.cwd(), file) || file;
if (problems.length) {
  console.error(`${rel} fails the check (${against}):`);
  for (const p of problems) console.error(`- ${p}`);
  process.exit(1);
}
console.log(
  `${rel}: ${counter} panels and rows, ${dashboard.templating?.list?.length ?? 0} variables conform to Grafana's schema; every query parses as PromQL (${against})`,
);
