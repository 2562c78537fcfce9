//! The Grafana dashboard `deploy/grafana/llm-lb.json`, the operator's view of llm-lb:
//!
//! - it conforms to Grafana's own published schema: `scripts/grafana-check.sh` type-checks every
//!   panel, row, variable and Prometheus query against `@grafana/schema` and the Prometheus query
//!   type of `@grafana/grafana-foundation-sdk`, and parses every query with Prometheus's PromQL
//!   grammar (installing the checker from npm on first use); it rejects a broken copy;
//! - it imports into any Grafana and is laid out soundly: a `datasource` variable that every
//!   query uses, a `pool` variable, unique ids, panels inside the 24-column grid without overlaps,
//!   every panel titled, described and with a unit;
//! - every series a query (a panel's or a variable's) refers to exists, as read from the query's
//!   PromQL syntax tree with Prometheus's grammar (`scripts/grafana-check.sh --refs`): the metric
//!   names (histograms' `_bucket`, `_sum` and `_count` included), the labels its selectors match,
//!   the labels of its `by`, `without`, `on`, `ignoring` and `group_left`/`group_right` clauses
//!   (on the series each applies to) and those its legends show, and the values its matchers
//!   name, are all in the `/metrics` of a running llm-lb that has served every kind of pool the
//!   dashboard shows; and every selector of a metric with a `pool` label is filtered by the `pool`
//!   variable.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use vllm_sim::SimConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/llm-lb.json");
    let text = std::fs::read_to_string(&path).expect("read deploy/grafana/llm-lb.json");
    serde_json::from_str(&text).expect("deploy/grafana/llm-lb.json is JSON")
}

/// Every panel, rows first and the panels of collapsed rows after their row.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// `panel 7 "Title"`, for messages.
fn name(panel: &Value) -> String {
    format!("panel {} {:?}", panel["id"], str_of(panel, "title"))
}

/// `scripts/grafana-check.sh`, to be given its arguments and run.
fn grafana_check_sh() -> Command {
    let mut command = Command::new("bash");
    command.arg(root().join("scripts/grafana-check.sh"));
    command
}

/// Run `scripts/grafana-check.sh` on `dashboard`: (success, stdout + stderr).
fn grafana_check(dashboard: &Path) -> (bool, String) {
    let out = grafana_check_sh()
        .arg(dashboard)
        .output()
        .expect("run scripts/grafana-check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn conforms_to_grafanas_schema() {
    let (ok, text) = grafana_check(&root().join("deploy/grafana/llm-lb.json"));
    assert!(
        ok,
        "scripts/grafana-check.sh rejects the dashboard:\n{text}"
    );
    assert!(text.contains("conform to Grafana's schema"), "{text}");
    eprintln!("{}", text.trim());

    // The check has teeth: a legend mode outside its enum, an unknown key in a Prometheus query,
    // a panel wider than the grid and an unbalanced query are each reported, with their panel.
    let mut broken = dashboard();
    let all = panels(&broken);
    let ts = all
        .iter()
        .position(|p| p["type"] == "timeseries")
        .expect("a timeseries panel");
    let title = str_of(all[ts], "title").to_owned();
    let ts_id = all[ts]["id"].clone();
    let stat_id = all
        .iter()
        .find(|p| p["type"] == "stat")
        .expect("a stat panel")["id"]
        .clone();
    for p in broken["panels"].as_array_mut().expect("panels") {
        if p["id"] == ts_id {
            p["options"]["legend"]["displayMode"] = "tabel".into();
            p["targets"][0]["intervall"] = "1m".into();
        }
        if p["id"] == stat_id {
            p["gridPos"]["w"] = 25.into();
            p["targets"][0]["expr"] = "sum(rate(llmlb_requests_total[5m])".into();
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.json");
    std::fs::write(&path, broken.to_string()).expect("write");
    let (ok, text) = grafana_check(&path);
    assert!(!ok, "a broken dashboard passed:\n{text}");
    for needle in [
        title.as_str(),
        "\"tabel\"",
        "'\"intervall\"' does not exist",
        "gridPos.w must be in 1..24",
        "query A: not PromQL",
    ] {
        assert!(text.contains(needle), "{needle:?} not reported in:\n{text}");
    }
}

#[test]
fn imports_anywhere_and_is_laid_out_soundly() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64() >= Some(39),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    assert!(d["__inputs"].is_null(), "no import-time inputs: a variable");
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |n: &str| {
        vars.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no variable {n}"))
    };
    let ds = var("datasource");
    assert_eq!(
        (&ds["type"], &ds["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    let pool = var("pool");
    assert_eq!(pool["type"], "query");
    assert_eq!(
        pool["query"]["query"],
        "label_values(llmlb_requests_total, pool)"
    );
    assert_eq!(
        (&pool["multi"], &pool["includeAll"]),
        (&true.into(), &true.into())
    );
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {}",
            v["name"]
        );
    }

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    for p in &all {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{} twice",
            name(p)
        );
        let g = &p["gridPos"];
        let x_w = g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(99);
        assert!(x_w <= 24, "{} leaves the grid: {g}", name(p));
        if p["type"] == "row" {
            assert_eq!(g["w"], 24, "{}", name(p));
            continue;
        }
        for key in ["title", "description"] {
            assert!(!str_of(p, key).is_empty(), "{} has no {key}", name(p));
        }
        // A unit, or (state timelines) value mappings that name each state.
        let defaults = &p["fieldConfig"]["defaults"];
        let unit = defaults["unit"].as_str().is_some_and(|u| !u.is_empty());
        let mapped = defaults["mappings"]
            .as_array()
            .is_some_and(|m| !m.is_empty());
        assert!(
            unit || mapped,
            "{} has neither a unit nor value mappings",
            name(p)
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", name(p));
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", name(p));
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", name(p));
            assert!(!str_of(t, "expr").is_empty(), "{}: empty query", name(p));
            assert!(refs.insert(str_of(t, "refId")), "{}: refId twice", name(p));
        }
    }

    // No two panels overlap: the top level, and inside each collapsed row (whose panels lie below
    // it and take their place when it is expanded).
    let overlap = |a: &Value, b: &Value| {
        let r = |p: &Value, k: &str| p["gridPos"][k].as_u64().expect("gridPos");
        r(a, "x") < r(b, "x") + r(b, "w")
            && r(b, "x") < r(a, "x") + r(a, "w")
            && r(a, "y") < r(b, "y") + r(b, "h")
            && r(b, "y") < r(a, "y") + r(a, "h")
    };
    let top: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    assert_eq!(top[0]["type"], "row", "every panel is in a row");
    let mut groups = vec![top.clone()];
    for row in top.iter().filter(|p| p["type"] == "row") {
        let inner: Vec<&Value> = row["panels"]
            .as_array()
            .expect("row panels")
            .iter()
            .collect();
        for p in &inner {
            assert!(
                p["gridPos"]["y"].as_u64() > row["gridPos"]["y"].as_u64(),
                "{}",
                name(p)
            );
        }
        groups.push(inner);
    }
    for group in groups {
        for (i, a) in group.iter().enumerate() {
            for b in &group[i + 1..] {
                assert!(!overlap(a, b), "{} and {} overlap", name(a), name(b));
            }
        }
    }
}

// ---- what a PromQL query refers to, read with Prometheus's grammar ----

/// A query of the dashboard, a panel's target or a query variable's query, and what it refers to,
/// as `scripts/grafana-check.sh --refs` reads them from its PromQL syntax tree.
#[derive(Debug, Deserialize)]
struct Query {
    /// The panel (`id`, `title`) of a target.
    panel: Option<Value>,
    /// The name of a query variable.
    variable: Option<String>,
    expr: String,
    /// The target's `legendFormat` (empty for a variable).
    legend: String,
    selectors: Vec<Selector>,
    grouping: Vec<Grouping>,
    /// What the reader cannot make out: a syntax error, a selector without a metric name.
    unreadable: Vec<String>,
}

/// A vector selector: metric name and label matchers.
#[derive(Debug, Deserialize)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

/// `label op "value"`, the value unquoted (Grafana's variables in it as written).
#[derive(Debug, Deserialize)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// A `by`, `without`, `on`, `ignoring`, `group_left` or `group_right` clause, or the label of a
/// variable's `label_values(selector, label)` (clause `label_values`): its labels and the indices
/// in [`Query::selectors`] of the series it applies to.
#[derive(Debug, Deserialize)]
struct Grouping {
    clause: String,
    labels: Vec<String>,
    selectors: Vec<usize>,
}

impl Query {
    /// `panel 7 "Title"` or `variable "pool"`, for messages.
    fn what(&self) -> String {
        match (&self.panel, &self.variable) {
            (Some(panel), _) => name(panel),
            (None, variable) => format!("variable {:?}", variable.as_deref().unwrap_or_default()),
        }
    }
}

/// What each query of `dashboard` (a file) refers to: `scripts/grafana-check.sh --refs`.
fn query_refs(dashboard: &Path) -> Vec<Query> {
    let out = grafana_check_sh()
        .arg("--refs")
        .arg(dashboard)
        .output()
        .expect("run scripts/grafana-check.sh --refs");
    assert!(
        out.status.success(),
        "scripts/grafana-check.sh --refs {} failed:\n{}",
        dashboard.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scripts/grafana-check.sh --refs prints JSON")
}

// ---- what an llm-lb exports ----

/// A `/metrics` scrape: sample name → label → values seen.
type Scrape = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_scrape(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').unwrap_or((line, ""));
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_owned()).or_default();
        let mut rest = labels.trim_end_matches('}');
        while let Some((label, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((k, ch)) = chars.next() {
                match ch {
                    '\\' => value.extend(chars.next().map(|(_, e)| e)),
                    '"' => {
                        end = k + 1;
                        break;
                    }
                    _ => value.push(ch),
                }
            }
            let label = label.trim_start_matches(',').trim();
            entry.entry(label.to_owned()).or_default().insert(value);
            rest = &after[end..];
        }
    }
    out
}

/// The family of sample `name`: a histogram's `_bucket`, `_sum` and `_count` are its family's.
fn family<'a>(name: &'a str, scrape: &Scrape) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| scrape.contains_key(&format!("{base}_bucket")))
        .unwrap_or(name)
}

/// Labels Prometheus attaches to every series it scrapes (not in llm-lb's own output).
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// The literal alternatives of a regex like `5xx|none` (None if it is more than that).
fn alternatives(regex: &str) -> Option<Vec<&str>> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':'))
    };
    let alts: Vec<&str> = regex.split('|').collect();
    alts.iter().all(|a| plain(a)).then_some(alts)
}

/// What query `q` refers to that the scrape does not have; with `by_pool`, also each selector of a
/// metric with a pool label that the `pool` variable does not filter.
fn unexported(q: &Query, scrape: &Scrape, by_pool: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut say = |p: String| problems.push(format!("{}: {p}\n    in: {}", q.what(), q.expr));
    for u in &q.unreadable {
        say(u.clone());
    }
    if q.selectors.is_empty() {
        say("no metric".into());
    }
    let labels_of = |m: &str| -> BTreeSet<&str> {
        let mut l: BTreeSet<&str> = scrape
            .get(m)
            .into_iter()
            .flat_map(|labels| labels.keys().map(String::as_str))
            .collect();
        l.extend(TARGET_LABELS);
        l
    };
    for s in &q.selectors {
        let Some(series) = scrape.get(&s.metric) else {
            say(format!("llm-lb exports no series {}", s.metric));
            continue;
        };
        for Matcher { label, op, value } in &s.matchers {
            let Some(values) = series.get(label) else {
                say(format!("{} has no label {label}", s.metric));
                continue;
            };
            let wanted = match op.as_str() {
                _ if value.contains('$') => vec![],
                "=" => vec![value.as_str()],
                "=~" => alternatives(value).unwrap_or_default(),
                _ => vec![],
            };
            for w in wanted.into_iter().filter(|w| !values.contains(*w)) {
                say(format!(
                    "no {}{{{label}=\"{w}\"}} (values seen: {values:?})",
                    s.metric
                ));
            }
        }
        let filtered = s
            .matchers
            .iter()
            .any(|m| m.label == "pool" && m.op == "=~" && m.value == "$pool");
        if by_pool && series.contains_key("pool") && !filtered {
            say(format!("{} is not filtered by pool=~\"$pool\"", s.metric));
        }
    }
    for g in &q.grouping {
        for label in &g.labels {
            for s in g.selectors.iter().map(|&i| &q.selectors[i]) {
                let bucket = label == "le" && s.metric.ends_with("_bucket");
                if scrape.contains_key(&s.metric)
                    && !bucket
                    && !labels_of(&s.metric).contains(label.as_str())
                {
                    say(format!(
                        "{} ({label}) over {}, which has no such label",
                        g.clause, s.metric
                    ));
                }
            }
        }
    }
    let grouped: BTreeSet<&str> = q
        .grouping
        .iter()
        .flat_map(|g| &g.labels)
        .map(String::as_str)
        .collect();
    for part in q.legend.split("{{").skip(1) {
        let label = part.split("}}").next().unwrap_or_default().trim();
        let kept = if q.grouping.is_empty() {
            q.selectors
                .iter()
                .all(|s| labels_of(&s.metric).contains(label))
        } else {
            grouped.contains(label)
        };
        if !kept {
            say(format!(
                "legend {{{{{label}}}}}: no such label in the result"
            ));
        }
    }
    problems
}

/// Every query of the dashboard (panels and variables) the scrape cannot answer. A variable's
/// `label_values(selector, label)` is checked as `sum by (label) (selector)` would be.
fn dashboard_problems(queries: &[Query], scrape: &Scrape) -> Vec<String> {
    let mut problems = Vec::new();
    for q in queries {
        if q.variable.is_some() && !q.grouping.iter().any(|g| g.clause == "label_values") {
            problems.push(format!(
                "{}: not label_values(selector, label): {}",
                q.what(),
                q.expr
            ));
            continue;
        }
        // The pool variable lists the pools; it filters every other query.
        problems.extend(unexported(q, scrape, q.variable.as_deref() != Some("pool")));
    }
    problems
}

#[test]
fn the_query_reader_sees_metrics_labels_and_values() {
    let scrape = parse_scrape(
        "# TYPE llmlb_y gauge\nllmlb_y{pool=\"p\",endpoint=\"127.0.0.1:1\"} 1\nllmlb_z 2\n",
    );
    assert_eq!(
        scrape["llmlb_y"]["endpoint"],
        BTreeSet::from(["127.0.0.1:1".to_owned()])
    );
    assert!(scrape["llmlb_z"].is_empty());

    // A dashboard of one query per panel (in a collapsed row) and per variable, each with what
    // its check must report ("" for nothing), read by `scripts/grafana-check.sh --refs`.
    let first = "histogram_quantile(0.95, sum by (le, pool) (rate(llmlb_x_bucket{pool=~\"$pool\", kind=\"a\\\"b\"}[$__rate_interval])))\n/ on (pool) group_left (endpoint) max(llmlb_y) * 2";
    let panel_cases = [
        (first, "", "exports no series llmlb_x_bucket"),
        ("max by (pool) (llmlb_y{pool=~\"$pool\"})", "{{pool}}", ""),
        ("max by (instance) (llmlb_z)", "{{instance}}", ""),
        // `by (endpoint)` is over llmlb_y alone; `on ()` and a bare group_left name no label.
        (
            "sum by (endpoint) (rate(llmlb_y{pool=~\"$pool\", endpoint=~\"$endpoint\"}[${__range}]))\n/ on () group_left sum(llmlb_z offset $__interval)",
            "{{endpoint}}",
            "",
        ),
        ("llmlb_w", "", "exports no series llmlb_w"),
        (
            "llmlb_y{pool=~\"$pool\", kind=\"a\"}",
            "",
            "llmlb_y has no label kind",
        ),
        ("llmlb_y{pool=\"q\"}", "", "no llmlb_y{pool=\"q\"}"),
        ("llmlb_y{pool=~\"p|q\"}", "", "no llmlb_y{pool=\"q\"}"),
        ("llmlb_y", "", "llmlb_y is not filtered by pool"),
        ("sum by (kind) (llmlb_z)", "", "by (kind) over llmlb_z"),
        (
            "llmlb_y{pool=~\"$pool\"} * on (endpoint) group_left llmlb_z",
            "",
            "on (endpoint) over llmlb_z",
        ),
        (
            "sum by (pool) (llmlb_y{pool=~\"$pool\"})",
            "{{endpoint}}",
            "legend {{endpoint}}",
        ),
        ("rate(up[5m])", "", "exports no series up"),
        ("sum(rate(llmlb_z[5m])", "", "not PromQL (syntax error at column 21)"),
        ("sum({pool=~\"$pool\"})", "", "a selector without a metric name"),
        ("vector(1)", "", "no metric"),
    ];
    let variable_cases = [
        ("pool", "label_values(llmlb_y, pool)", ""),
        (
            "kind",
            "label_values(llmlb_y{pool=~\"$pool\"}, kind)",
            "label_values (kind) over llmlb_y",
        ),
        (
            "all",
            "query_result(llmlb_y)",
            "not label_values(selector, label)",
        ),
    ];
    let cases: Vec<Value> = panel_cases
        .iter()
        .enumerate()
        .map(|(i, (expr, legend, _))| {
            json!({"id": i + 2, "title": "case", "type": "timeseries",
                "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}]})
        })
        .collect();
    let variables: Vec<Value> = variable_cases
        .iter()
        .map(|(name, query, _)| json!({"name": name, "type": "query", "query": {"query": query}}))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cases.json");
    let d = json!({"panels": [{"id": 1, "type": "row", "collapsed": true, "panels": cases}],
        "templating": {"list": variables}});
    std::fs::write(&path, d.to_string()).expect("write");
    let queries = query_refs(&path);
    assert_eq!(queries.len(), panel_cases.len() + variable_cases.len());

    let q = &queries[0];
    assert_eq!(
        (q.panel.as_ref(), q.expr.as_str()),
        (Some(&json!({"id": 2, "title": "case"})), first)
    );
    let metrics: Vec<&str> = q.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(metrics, ["llmlb_x_bucket", "llmlb_y"]);
    let matchers: Vec<(&str, &str, &str)> = q.selectors[0]
        .matchers
        .iter()
        .map(|m| (m.label.as_str(), m.op.as_str(), m.value.as_str()))
        .collect();
    assert_eq!(matchers, [("pool", "=~", "$pool"), ("kind", "=", "a\"b")]);
    assert!(q.selectors[1].matchers.is_empty());
    let grouping: Vec<(&str, Vec<&str>, Vec<usize>)> = q
        .grouping
        .iter()
        .map(|g| {
            let labels = g.labels.iter().map(String::as_str).collect();
            (g.clause.as_str(), labels, g.selectors.clone())
        })
        .collect();
    assert_eq!(
        grouping,
        [
            ("by", vec!["le", "pool"], vec![0]),
            ("on", vec!["pool"], vec![0, 1]),
            ("group_left", vec!["endpoint"], vec![1]),
        ]
    );

    let says = panel_cases
        .iter()
        .map(|c| c.2)
        .chain(variable_cases.iter().map(|c| c.2));
    for (q, says) in queries.iter().zip(says) {
        let problems = dashboard_problems(std::slice::from_ref(q), &scrape);
        if says.is_empty() {
            assert!(problems.is_empty(), "{}: {problems:?}", q.expr);
        } else {
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{}: {says:?} not in {problems:?}",
                q.expr
            );
        }
    }
}

// ---- a running llm-lb serving every kind of pool the dashboard shows ----

/// `n` `vllm-sim`s serving `model` that publish KV-cache events; their YAML endpoint entries.
async fn event_sims(n: usize, model: &str) -> (Vec<vllm_sim::SimHandle>, Vec<String>) {
    let (mut sims, mut yaml) = (Vec::new(), Vec::new());
    for seed in 0..n as u64 {
        let (events, replay) = (free_port(), free_port());
        let cfg = SimConfig {
            model: model.into(),
            time_scale: 0.0,
            seed,
            kv_events_config: Some(
                vllm_sim::KvEventsConfig::from_json(&format!(
                    r#"{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:{events}", "replay_endpoint": "tcp://*:{replay}"}}"#
                ))
                .expect("kv events config"),
            ),
            ..SimConfig::default()
        };
        let sim = vllm_sim::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("spawn vllm-sim");
        yaml.push(format!(
            "{{address: \"{}\", kv_events: \"tcp://127.0.0.1:{events}\", kv_events_replay: \"tcp://127.0.0.1:{replay}\"}}",
            sim.addr()
        ));
        sims.push(sim);
    }
    (sims, yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_queries_series_llm_lb_exports() {
    // What each query refers to, read first: without node and npm the test fails here.
    let queries = query_refs(&root().join("deploy/grafana/llm-lb.json"));
    let sim = |model: &str| SimConfig {
        model: model.into(),
        time_scale: 0.0,
        ..SimConfig::default()
    };
    let pc = sim_fleet(2, sim("pc")).await;
    let busy = sim_fleet(2, sim("busy")).await;
    let (_kv, kv_yaml) = event_sims(2, "kv").await;
    let backend = Backend::start().await;
    // Nothing listens there: scrapes fail, requests picked for it fail over, and it is ejected.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addrs = |sims: &[vllm_sim::SimHandle]| sims.iter().map(|s| s.addr()).collect::<Vec<_>>();
    let mut busy_addrs = addrs(&busy);
    busy_addrs.push(dead);
    // `localhost:port` is a host name: it is looked up (llmlb_dns_lookups_total).
    let rr = format!(
        "  - name: rr\n    models: [rr]\n    endpoints: [\"{}\", \"{dead}\", \"localhost:{}\"]\n    lb_policy: round_robin\n    outlier_detection: {{consecutive_failures: 1, base_ejection_ms: 60000}}\n",
        backend.addr,
        backend.addr.port()
    );
    // Accepts connections (into its backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = Proxy::start(&format!(
        "pools:\n{}{}  - name: kv\n    models: [kv]\n    endpoints: [{}]\n    lb_policy: kv_aware\n{rr}{}{}",
        pool_yaml("pc", "[pc]", &addrs(&pc), "prefix_cache", ""),
        pool_yaml(
            "busy",
            "[busy]",
            &busy_addrs,
            "least_busy",
            "    metrics: {interval_ms: 100}\n"
        ),
        kv_yaml.join(", "),
        pool_yaml("down", "[down]", &[dead], "round_robin", ""),
        pool_yaml(
            "hang",
            "[hang]",
            &[silent.local_addr().expect("addr")],
            "round_robin",
            "    health_check: {enabled: false}\n"
        ),
    ));

    // Traffic for every row: conversations with prefix affinity, streams with usage on the
    // scraped pool, token prompts on the kv_aware pool, fail-over and ejection, a 502, a 404, and
    // a client that hangs up mid-body (class "none").
    let client = reqwest::Client::new();
    let chat = proxy.url("/v1/chat/completions");
    let mut messages =
        vec![serde_json::json!({"role": "user", "content": "Tell me about the sea. ".repeat(100)})];
    for _ in 0..3 {
        chat_turn(&client, &chat, "pc", &mut messages, 8).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a few scrapes of the busy pool
    for i in 0..4 {
        let r = client
            .post(&chat)
            .json(
                &serde_json::json!({"model": "busy", "stream": true, "max_tokens": 4,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": format!("stream {i}")}]}),
            )
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200);
        r.text().await.expect("stream body");
    }
    let prompt: Vec<u32> = (1000..1256).collect();
    for _ in 0..2 {
        let r = client
            .post(proxy.url("/v1/completions"))
            .json(&serde_json::json!({"model": "kv", "prompt": prompt, "max_tokens": 2}))
            .send()
            .await
            .expect("completion");
        assert_eq!(r.status(), 200);
    }
    for model in ["rr", "rr", "rr", "rr", "down", "nobody"] {
        client
            .post(&chat)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("send");
    }
    // A client that gives up waiting for an endpoint that never answers: no response is written.
    let gave_up = client
        .post(&chat)
        .timeout(Duration::from_millis(300))
        .json(&serde_json::json!({"model": "hang", "messages": [{"role": "user", "content": "hello?"}]}))
        .send()
        .await;
    assert!(gave_up.is_err(), "answered: {gave_up:?}");

    // Every query must be answerable; series appear as scrapes, heartbeats and events come in.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = parse_scrape(&proxy.metrics().await);
        let problems = dashboard_problems(&queries, &scrape);
        if problems.is_empty() {
            // For the record (not a failure): what llm-lb exports that no panel shows.
            let shown: BTreeSet<String> = queries
                .iter()
                .filter(|q| q.panel.is_some())
                .flat_map(|q| &q.selectors)
                .map(|s| family(&s.metric, &scrape).to_owned())
                .collect();
            let unshown: BTreeSet<&str> = scrape
                .keys()
                .map(|m| family(m, &scrape))
                .filter(|f| f.starts_with("llmlb_") && !shown.contains(*f))
                .collect();
            eprintln!(
                "{} metric families queried, all exported; exported but on no panel: {unshown:?}",
                shown.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries what llm-lb does not export:\n{}\nlog:\n{}",
            problems.join("\n"),
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
