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
// With --refs it checks nothing and prints, as JSON, what each query refers to, read from its
// PromQL syntax tree: one object per panel target and per query variable, in dashboard order,
//   {panel: {id, title}, refId, expr, legend}   a panel's target (legend: its legendFormat), or
//   {variable, expr, legend: ""}                a query variable (expr: its query), and both with
//   selectors: [{metric, matchers: [{label, op, value}]}]   every vector selector, values unquoted
//   grouping: [{clause, labels, selectors}]     every by, without, on, ignoring, group_left and
//       group_right clause (and the label of a variable's label_values(selector, label), as clause
//       "label_values"), with the indices in `selectors` of the series it applies to: the operand
//       of an aggregation, both sides of on and ignoring, the "one" side of group_left/right
//   unreadable: [string]                        a syntax error, a selector without a metric name
// Grafana's variables are replaced by placeholders where PromQL would not take them (see
// placeholders); in string literals they stay as written, so a matcher value reads "$pool".
//
// Usage: node check.mjs [--refs] [dashboard.json]   (default: ../llm-lb.json)
// Exit status 0 when the dashboard conforms and its queries parse (with --refs: when it is read),
// 1 otherwise. Installed and run by scripts/grafana-check.sh.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parser as promql } from '@prometheus-io/lezer-promql';

const here = path.dirname(fileURLToPath(import.meta.url));
const refsMode = process.argv[2] === '--refs';
const file = path.resolve(process.argv[refsMode ? 3 : 2] ?? path.join(here, '..', 'llm-lb.json'));
const dashboard = JSON.parse(readFileSync(file, 'utf8'));

// ---- the dashboard's queries, read with Prometheus's PromQL grammar ----

// Every query: each panel's targets (collapsed rows' panels included), then each query variable's.
// `promql` is what is parsed: for Grafana's label_values(selector, label), the selector.
function dashboardQueries() {
  const out = [];
  const walk = (panel, where) => {
    for (const t of panel.targets ?? []) {
      const expr = t.expr ?? '';
      const label = `${where}panel ${panel.id} "${panel.title}" query ${t.refId}`;
      const refs = { panel: { id: panel.id, title: panel.title }, refId: t.refId, expr, legend: t.legendFormat ?? '' };
      out.push({ label, promql: expr, refs });
    }
    for (const p of panel.panels ?? []) walk(p, `row "${panel.title}" > `);
  };
  (dashboard.panels ?? []).forEach((p) => walk(p, ''));
  for (const v of dashboard.templating?.list ?? []) {
    if (v.type !== 'query') continue;
    const query = typeof v.query === 'string' ? v.query : v.query?.query ?? '';
    const labelValues = /^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$/s.exec(query);
    const refs = { variable: v.name, expr: query, legend: '' };
    out.push({ label: `variable ${v.name}`, promql: labelValues?.[1] ?? query, labelValues: labelValues?.[2], refs });
  }
  return out;
}

// Grafana's variables ($name, ${name}, ${name:format}, [[name]]) outside PromQL's string literals
// and comments, replaced by what parses in their place: a duration for the interval and range
// variables, a number for any other. `column` maps a position in the result back to `expr`.
const DURATIONS = new Set(['__interval', '__rate_interval', '__range', '__auto']);
function placeholders(expr) {
  const variable = /\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]/y;
  const shifts = []; // [end of a placeholder in text, its length in expr minus its own]
  let text = '';
  for (let i = 0; i < expr.length; ) {
    const c = expr[i];
    let end = i + 1;
    if (c === '"' || c === "'") {
      while (end < expr.length && expr[end] !== c && expr[end] !== '\n') end += expr[end] === '\\' ? 2 : 1;
      end += 1;
    } else if (c === '`' || c === '#') {
      end = expr.indexOf(c === '#' ? '\n' : '`', end);
      end = end < 0 ? expr.length : end + 1;
    } else {
      variable.lastIndex = i;
      const m = variable.exec(expr);
      if (m) {
        const placeholder = DURATIONS.has(m[1] ?? m[2] ?? m[3]) ? '5m' : '1';
        text += placeholder;
        shifts.push([text.length, m[0].length - placeholder.length]);
        i += m[0].length;
        continue;
      }
    }
    text += expr.slice(i, end);
    i = end;
  }
  const column = (pos) => shifts.reduce((p, [at, shift]) => (pos >= at ? p + shift : p), pos);
  return { text, column };
}

// The syntax tree of `expr`, the text it was parsed from, and the column in `expr` of the first
// syntax error (undefined when there is none).
function parse(expr) {
  const { text, column } = placeholders(expr);
  const tree = promql.parse(text);
  let error = text.trim() ? undefined : 0;
  tree.iterate({
    enter: (node) => {
      if (error === undefined && node.type.isError) error = column(node.from);
    },
  });
  return { tree, text, error };
}

// The value of a PromQL string literal (Go's escapes; backquoted strings are raw).
const ESCAPES = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v' };
function unquote(literal) {
  const body = literal.slice(1, -1);
  if (literal[0] === '`') return body;
  return body.replace(/\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)/gs, (_, e) => {
    if (/^[0-7]/.test(e)) return String.fromCodePoint(parseInt(e, 8));
    if (e.length > 1) return String.fromCodePoint(parseInt(e.slice(1), 16));
    return ESCAPES[e] ?? e;
  });
}

// What the PromQL of query `q` refers to (the fields described at the top), added to q.refs.
const CLAUSES = { By: 'by', Without: 'without', On: 'on', Ignoring: 'ignoring', GroupLeft: 'group_left', GroupRight: 'group_right' };
function references(q) {
  const { tree, text, error } = parse(q.promql);
  const selectors = [];
  const grouping = [];
  const unreadable = error === undefined ? [] : [`not PromQL (syntax error at column ${error})`];
  const src = (node) => text.slice(node.from, node.to);
  const children = (node) => {
    const out = [];
    for (let c = node.firstChild; c; c = c.nextSibling) out.push(c);
    return out;
  };
  const label = (node) => (node.name === 'QuotedLabelName' ? unquote(src(node)) : src(node));
  const labels = (node) => (node ? children(node).filter((c) => c.name.endsWith('LabelName')).map(label) : []);
  const clause = (node, scope) => grouping.push({ clause: CLAUSES[node.name], labels: labels(node.nextSibling), selectors: scope });

  // The indices of the selectors in `node`, recording them and the grouping clauses on the way.
  function walk(node) {
    if (node.name === 'VectorSelector') {
      const name = node.getChild('Identifier');
      let metric = name && src(name);
      const list = node.getChild('LabelMatchers');
      const matchers = [];
      for (const m of list ? children(list) : []) {
        if (m.name === 'QuotedLabelName') metric = unquote(src(m)); // {"metric.name", …}
        const [op, value] = [m.getChild('MatchOp'), m.getChild('StringLiteral')];
        if (m.name.endsWith('LabelMatcher') && op && value)
          matchers.push({ label: label(m.firstChild), op: src(op), value: unquote(src(value)) });
      }
      if (!metric) {
        unreadable.push(`a selector without a metric name: ${src(node)}`);
        return [];
      }
      selectors.push({ metric, matchers });
      return [selectors.length - 1];
    }
    if (node.name === 'BinaryExpr') {
      const [left = [], ...rest] = children(node).filter((c) => c.type.is('Expr')).map(walk);
      const right = rest.flat(); // one operand, unless a syntax error split it
      const matching = node.getChild('MatchingModifierClause');
      for (const c of matching ? children(matching) : []) {
        if (c.name === 'On' || c.name === 'Ignoring') clause(c, [...left, ...right]);
        if (c.name === 'GroupLeft' && c.nextSibling) clause(c, right);
        if (c.name === 'GroupRight' && c.nextSibling) clause(c, left);
      }
      return [...left, ...right];
    }
    const inner = children(node).flatMap(walk);
    const modifier = node.name === 'AggregateExpr' && node.getChild('AggregateModifier');
    if (modifier) clause(modifier.firstChild, inner);
    return inner;
  }
  const all = walk(tree.topNode);
  if (q.labelValues) grouping.push({ clause: 'label_values', labels: [q.labelValues], selectors: all });
  return { ...q.refs, selectors, grouping, unreadable };
}

const queries = dashboardQueries();
if (refsMode) console.log(JSON.stringify(queries.map(references), null, 2));
else await check();

// ---- the schema check ----
async function check() {
  const { default: ts } = await import('typescript');
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

  // ---- every query parses as PromQL ----
  for (const q of queries) {
    const { error } = parse(q.promql);
    if (error !== undefined) problems.push(`${q.label}: not PromQL (syntax error at column ${error}): ${q.refs.expr}`);
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
}
