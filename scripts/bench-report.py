#!/usr/bin/env python3
"""Collect, summarise and publish llm-lb's benchmark results.

Called by scripts/bench-*.sh; usable by hand on the files they leave in bench/results/:

  bench-report.py collect-routing ...     one routing run -> bench/results/routing/<run>.json
                                          (--stamp: the run's provenance copied in; --raw DIR:
                                          AIPerf's exports and every /metrics snapshot kept,
                                          gzipped; --aiperf/--sims/--admins also take such a
                                          raw directory and its files, to recompute a run)
  bench-report.py summarize-routing ...   every routing run -> bench/results/<set>.{json,csv}
                                          (--set routing, or kv for bench-routing.sh's KV set;
                                          --stamp: the invocation's stamp.json, copied into the
                                          JSON and as `# ...` lines atop the CSV)
  bench-report.py collect-overhead ...    oha outputs + stamp.json -> bench/results/overhead.{json,csv}
                                          (every run with its within-round ratios, per-target
                                          medians, and the run's provenance)
  bench-report.py collect-micro ...       criterion estimates -> bench/results/micro.{json,csv}
  bench-report.py losses --dir DIR --scenario S   where each policy's cache hits were lost in
                                          a multi-turn scenario, from the raw AIPerf records: the
                                          tokens of each turn's previous context (prompt + reply)
                                          not found cached, in points of all prompt tokens, split
                                          between the sessions of the opening burst and later ones,
                                          and (kv_aware, from the picks.log.gz a run keeps) what
                                          the index held on the chosen endpoint at the pick
  bench-report.py sessions --dir DIR --run R   one kv_aware run's sessions in start order: the
                                          endpoint each went to, the tokens each turn lost
  bench-report.py render [--strict]       tables and plots -> docs/benchmarks.md, docs/img/*.png,
                                          README's headline block; warns loudly when overhead.json,
                                          routing.json or kv.json has no stamp, was measured on a
                                          dirty tree or at another commit than HEAD, or (routing,
                                          kv) mixes runs of different trees (--strict: refuses,
                                          writes nothing)

Only the blocks between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers are rewritten;
the prose around them is kept.
"""
import argparse
import csv
import datetime
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")
README = os.path.join(ROOT, "README.md")
BLOCK = 16  # vLLM's KV block size (vllm-sim default)

POLICY_ORDER = [
    "round_robin",
    "global_least_request",
    "prefix_cache",
    "least_busy",
    "sglang_cache_aware",
    "prefix_cache_3x_redis",
    "prefix_cache_3x_unshared",
    "kv_aware",
    "kv_aware_events",
    "kv_aware_events_3x_redis",
]
POLICY_TITLE = {
    "round_robin": "round_robin (no LB)",
    "global_least_request": "global_least_request",
    "prefix_cache": "prefix_cache",
    "least_busy": "least_busy",
    "sglang_cache_aware": "SGLang router cache_aware",
    "prefix_cache_3x_redis": "prefix_cache, 3 replicas, Redis",
    "prefix_cache_3x_unshared": "prefix_cache, 3 replicas, unshared",
    "kv_aware": "kv_aware, predicted (no events)",
    "kv_aware_events": "kv_aware with KV events",
    "kv_aware_events_3x_redis": "kv_aware with KV events, 3 replicas, Redis",
}
# The column other policies are compared with, per result set.
BASELINE = {"routing": "round_robin", "kv": "prefix_cache"}


# ---------------------------------------------------------------- helpers


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text, name):
    """(labels, value) of every sample of metric `name` in a Prometheus exposition."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue
        labels = {}
        if rest.startswith("{"):
            body, _, rest = rest[1:].partition("}")
            for m in re.finditer(r'(\w+)="((?:[^"\\]|\\.)*)"', body):
                labels[m.group(1)] = m.group(2)
        try:
            out.append((labels, float(rest.strip().split()[0])))
        except (ValueError, IndexError):
            pass
    return out


def total(text, name):
    return sum(v for _, v in samples(text, name))


def git_rev():
    try:
        return subprocess.check_output(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True
        ).strip()
    except Exception:
        return "unknown"


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1048576:.0f} GiB RAM"
    except OSError:
        pass
    distro = ""
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = ", " + line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{os.cpu_count()} vCPU ({cpu}){mem}{distro}, Linux {platform.release()}"


def fmt(v, digits=0, suffix=""):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{suffix}"


def pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def spread(values, digits=0, suffix="", scale=1.0):
    """Median, and min–max when there are several values."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:,.{digits}f}{suffix}"
    return f"{m:,.{digits}f}{suffix} ({min(vals):,.{digits}f}–{max(vals):,.{digits}f})"


def replace_block(text, name, content):
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = f"{begin}\n{content.rstrip()}\n{end}"
    if pat.search(text):
        return pat.sub(lambda _: new, text)
    return text  # no such block: leave the document alone


# ---------------------------------------------------------------- routing


def oracle(records):
    """Hit rate if every turn found its whole previous context (prompt + reply) cached, with
    vLLM's rules: full blocks only, at most floor((n-1)/16)*16 tokens of an n-token prompt."""
    by_conv = {}
    for r in records:
        by_conv.setdefault(r["conversation"], []).append(r)
    hits = queries = 0
    for turns in by_conv.values():
        turns.sort(key=lambda r: r["turn"])
        prev = None
        for r in turns:
            n = r["isl"]
            cap = (max(n - 1, 0) // BLOCK) * BLOCK
            ctx = r.get("shared_prefix", 0)
            if prev is not None:
                ctx = max(ctx, prev["isl"] + prev["osl"])
            hits += min((ctx // BLOCK) * BLOCK, cap)
            queries += n
            prev = r
    return hits / queries if queries else None


# What of AIPerf's per-request records is kept under raw/: every field the tables, the oracle bound
# and the TTFT plots are computed from, and the request timing. Left out: the per-chunk latency
# arrays (one number per output token: megabytes per run), per-request HTTP timings and ids.
RAW_RECORD_METADATA = (
    "conversation_id", "turn_index", "session_num", "benchmark_phase", "was_cancelled",
    "credit_issued_ns", "request_start_ns", "request_ack_ns", "request_end_ns",
)
RAW_RECORD_METRICS = (
    "time_to_first_token", "time_to_second_token", "request_latency", "inter_token_latency",
    "input_sequence_length", "output_sequence_length", "output_token_count",
    "usage_prompt_tokens", "usage_completion_tokens", "usage_prompt_cache_read_tokens",
)


def read_text(path):
    """A file's text, or that of `path`.gz when only the compressed copy exists."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    if path.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return f.read()
    with open(path) as f:
        return f.read()


def write_gz(path, text):
    """`text` gzipped to `path` (no timestamp in the header: same input, same bytes)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(text.encode())


def trim_record(d):
    out = {
        "metadata": {k: v for k, v in d.get("metadata", {}).items() if k in RAW_RECORD_METADATA},
        "metrics": {k: v for k, v in d.get("metrics", {}).items() if k in RAW_RECORD_METRICS},
    }
    for k, v in d.items():
        if k not in ("metadata", "metrics"):
            out[k] = v  # the error, when the request failed
    return out


def metrics_text(source):
    """A Prometheus exposition: fetched from an http URL, or read from a (gzipped) snapshot."""
    if source.startswith("http://") or source.startswith("https://"):
        return fetch(source.rstrip("/") + "/metrics")
    return read_text(source)


def cmd_collect_routing(a):
    art = a.aiperf
    summary_text = read_text(os.path.join(art, "profile_export_aiperf.json"))
    summary = json.loads(summary_text)

    def stat(key, field):
        v = summary.get(key) or {}
        return v.get(field)

    records = []
    record_lines = read_text(os.path.join(art, "profile_export.jsonl")).splitlines()
    for line in record_lines:
        if not line.strip():
            continue
        d = json.loads(line)
        m, x = d.get("metadata", {}), d.get("metrics", {})
        if d.get("error") or "time_to_first_token" not in x:
            continue
        records.append(
            {
                "conversation": m.get("conversation_id"),
                "turn": m.get("turn_index", 0),
                "isl": x.get("input_sequence_length", {}).get("value", 0),
                "osl": x.get("output_sequence_length", {}).get("value", 0),
                "ttft_ms": x["time_to_first_token"]["value"],
                "latency_ms": x.get("request_latency", {}).get("value"),
                "cached": x.get("usage_prompt_cache_read_tokens", {}).get("value", 0),
            }
        )
    # Shared system prompt (hot scenario): the tokens every first turn could find cached,
    # measured as what the best-placed first turn actually found.
    firsts = [r["cached"] for r in records if r["turn"] == 0]
    shared = max(firsts) if firsts else 0
    if shared:
        for r in records:
            if r["turn"] == 0:
                r["shared_prefix"] = shared

    # The simulators' and llm-lb's /metrics (URLs, or snapshots kept by an earlier collect),
    # read once: what is parsed below is what --raw keeps.
    sim_texts = [metrics_text(s) for s in a.sims]
    admin_sources = [p if not p.isdigit() else f"http://127.0.0.1:{p}" for p in (a.admins or [])]
    admin_texts = [metrics_text(s) for s in admin_sources]

    sims = []
    for url, text in zip(a.sims, sim_texts):
        ttft_sum = total(text, "vllm:time_to_first_token_seconds_sum")
        ttft_n = total(text, "vllm:time_to_first_token_seconds_count")
        sims.append(
            {
                "url": url,
                "hits": total(text, "vllm:prefix_cache_hits_total"),
                "queries": total(text, "vllm:prefix_cache_queries_total"),
                "requests": total(text, "vllm:request_success_total"),
                "preemptions": total(text, "vllm:num_preemptions_total"),
                "ttft_ms_mean": 1000 * ttft_sum / ttft_n if ttft_n else None,
                "ttft_n": ttft_n,
            }
        )
    hits = sum(s["hits"] for s in sims)
    queries = sum(s["queries"] for s in sims)
    served = [s["requests"] for s in sims]
    ttft_n = sum(s["ttft_n"] for s in sims)
    server_ttft = (
        sum((s["ttft_ms_mean"] or 0) * s["ttft_n"] for s in sims) / ttft_n if ttft_n else None
    )

    picks, replica_requests = {}, []
    for text in admin_texts:
        for labels, v in samples(text, "llmlb_picks_total"):
            picks[labels.get("reason", "?")] = picks.get(labels.get("reason", "?"), 0) + v
        replica_requests.append(total(text, "llmlb_requests_total"))

    # Provenance: the invocation's stamp (commit, dirty state and files, machine, command, date,
    # parameters), copied whole so that each run file stands on its own.
    stamp = {}
    if a.stamp:
        if os.path.exists(a.stamp):
            stamp = json.load(open(a.stamp))
        else:
            print(f"WARNING: no provenance stamp at {a.stamp}", file=sys.stderr)

    errors = summary.get("error_summary") or []
    out = {
        "git": stamp["commit"][:7] if stamp.get("commit") else git_rev(),
        "machine": machine(),
        "command": a.command,
        **stamp,
        "scenario": a.scenario,
        "label": a.label,
        "policy": a.policy,
        "replicas": a.replicas,
        "store": a.store,
        "round": a.round,
        "wall_s": float(a.wall_end) - float(a.wall_start),
        "finished": now_utc(),
        "requests": stat("request_count", "avg"),
        "errors": sum(e.get("count", 0) for e in errors) if isinstance(errors, list) else errors,
        "ttft_ms": {k: stat("time_to_first_token", k) for k in ("avg", "p50", "p90", "p99")},
        "latency_ms": {k: stat("request_latency", k) for k in ("avg", "p50", "p90", "p99")},
        "output_tok_s": stat("output_token_throughput", "avg"),
        "request_throughput": stat("request_throughput", "avg"),
        "hit_rate": hits / queries if queries else None,
        "oracle_hit_rate": oracle(records),
        "server_ttft_ms": server_ttft,
        "served_per_server": served,
        "max_share": max(served) / sum(served) if sum(served) else None,
        "preemptions": sum(s["preemptions"] for s in sims),
        "picks": picks,
        "replica_requests": replica_requests,
        "ttft_samples_ms": sorted(round(r["ttft_ms"], 2) for r in records),
    }
    if a.raw:
        # The client's and the servers' outputs this file was computed from, gzipped: AIPerf's
        # summary (JSON and CSV) and its per-request records (trimmed, see RAW_RECORD_*), each
        # simulator's /metrics (sim1..) and each llm-lb replica's (llm-lb0..) at the end of the run.
        os.makedirs(a.raw, exist_ok=True)
        write_gz(os.path.join(a.raw, "profile_export_aiperf.json.gz"), summary_text)
        csv_path = os.path.join(art, "profile_export_aiperf.csv")
        if os.path.exists(csv_path) or os.path.exists(csv_path + ".gz"):
            write_gz(os.path.join(a.raw, "profile_export_aiperf.csv.gz"), read_text(csv_path))
        write_gz(
            os.path.join(a.raw, "profile_export.jsonl.gz"),
            "".join(json.dumps(trim_record(json.loads(l)), separators=(",", ":")) + "\n"
                    for l in record_lines if l.strip()),
        )
        for i, text in enumerate(sim_texts, 1):
            write_gz(os.path.join(a.raw, f"sim{i}.metrics.gz"), text)
        for i, text in enumerate(admin_texts):
            write_gz(os.path.join(a.raw, f"llm-lb{i}.metrics.gz"), text)
        picks_kept = [l for log in (a.pick_logs or []) if os.path.exists(log)
                      for l in read_text(log).splitlines(keepends=True) if PICK_LINE.search(l)]
        if picks_kept:
            write_gz(os.path.join(a.raw, "picks.log.gz"), "".join(picks_kept))
        out["raw"] = os.path.relpath(a.raw, ROOT) if os.path.abspath(a.raw).startswith(ROOT + os.sep) else a.raw
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    json.dump(out, open(a.out, "w"), indent=1)
    print(
        f"   TTFT mean {fmt(out['ttft_ms']['avg'], 1)} ms p99 {fmt(out['ttft_ms']['p99'], 1)} ms | "
        f"latency mean {fmt(out['latency_ms']['avg'])} ms | {fmt(out['output_tok_s'])} tok/s | "
        f"hit rate {pct(out['hit_rate'])} (oracle {pct(out['oracle_hit_rate'])}) | "
        f"served {served} | {out['wall_s']:.0f} s"
    )


ROUTING_FIELDS = [
    ("ttft_mean_ms", lambda r: r["ttft_ms"]["avg"]),
    ("ttft_p99_ms", lambda r: r["ttft_ms"]["p99"]),
    ("latency_mean_ms", lambda r: r["latency_ms"]["avg"]),
    ("latency_p99_ms", lambda r: r["latency_ms"]["p99"]),
    ("output_tok_s", lambda r: r["output_tok_s"]),
    ("hit_rate", lambda r: r["hit_rate"]),
    ("oracle_hit_rate", lambda r: r["oracle_hit_rate"]),
    ("server_ttft_mean_ms", lambda r: r["server_ttft_ms"]),
    ("max_server_share", lambda r: r["max_share"]),
    ("errors", lambda r: r["errors"]),
    ("wall_s", lambda r: r["wall_s"]),
]


ROUTING_RUN = re.compile(r"^(?P<scenario>[^-]+)-(?P<label>.+)-r(?P<round>\d+)\.json$")
# The keys of a results file that say where it comes from (bench_stamp in bench-common.sh).
PROVENANCE_KEYS = ("commit", "dirty", "uncommitted_changes", "diff_sha256")


def run_provenance(runs):
    """The distinct trees the runs were measured on: commit, dirty flag and diff hash, with the
    runs of each (`scenario-label-rN`). A run file without a stamp counts under commit None."""
    trees = {}
    for r in runs:
        key = tuple(json.dumps(r.get(k), sort_keys=True) for k in PROVENANCE_KEYS)
        t = trees.setdefault(key, {k: r.get(k) for k in PROVENANCE_KEYS} | {"runs": []})
        t["runs"].append(f"{r['scenario']}-{r['label']}-r{r['round']}")
    return list(trees.values())


def cmd_summarize_routing(a):
    # Run files only: stamp.json and anything else in the directory are not runs.
    paths = [p for p in sorted(glob.glob(os.path.join(a.dir, "*.json"))) if ROUTING_RUN.match(os.path.basename(p))]
    runs = [json.load(open(p)) for p in paths]
    commits = sorted({r.get("git", "unknown") for r in runs})
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["label"]), []).append(r)
    stamp = {}
    if a.stamp and os.path.exists(a.stamp):
        stamp = json.load(open(a.stamp))
    elif a.stamp:
        print(f"WARNING: no provenance stamp at {a.stamp}", file=sys.stderr)
    trees = run_provenance(runs)
    summary = {
        "generated": now_utc(),
        "git": stamp["commit"][:7] if stamp.get("commit") else git_rev(),
        "run_commits": commits,
        "machine": machine(),
        **stamp,
        "set": a.set,
        "elapsed_s": a.elapsed,
        "time_scale": a.time_scale,
        "kv_blocks": a.kv_blocks,
        "repeats": a.repeats,
        "run_provenance": trees,
        "runs_without_stamp": sum(len(t["runs"]) for t in trees if not t["commit"]),
        "results": [],
    }
    if stamp.get("commit") and any(
        tuple(t[k] for k in PROVENANCE_KEYS) != tuple(stamp.get(k) for k in PROVENANCE_KEYS)
        for t in trees if t["commit"]
    ):
        summary["runs_from_other_trees"] = True
    out = a.name or a.set
    prev = os.path.join(RESULTS, f"{out}.json")
    if os.path.exists(prev):
        # Keep the timing of scenarios that this invocation did not run.
        try:
            summary["previous_elapsed_s"] = json.load(open(prev)).get("elapsed_by_scenario", {})
        except Exception:
            pass
    elapsed_by = dict(summary.get("previous_elapsed_s", {}))
    for (scenario, label), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["round"])
        row = {"scenario": scenario, "label": label, "rounds": len(rs)}
        for name, get in ROUTING_FIELDS:
            row[name] = [get(r) for r in rs]
        # One P99 over every round's requests: steadier than each round's own (3 of 300).
        samples = [x for r in rs for x in r.get("ttft_samples_ms") or []]
        row["ttft_p99_pooled_ms"] = [pooled_p99(samples)]
        row["served_per_server"] = [r["served_per_server"] for r in rs]
        row["picks"] = [r["picks"] for r in rs]
        row["replica_requests"] = [r["replica_requests"] for r in rs]
        row["finished"] = max(r["finished"] for r in rs)
        summary["results"].append(row)
    for scenario in {r["scenario"] for r in runs}:
        elapsed_by[scenario] = sum(r["wall_s"] for r in runs if r["scenario"] == scenario)
    # Only scenarios whose runs are here: a stale timing would describe results that are gone.
    summary["elapsed_by_scenario"] = {k: v for k, v in elapsed_by.items() if k in {r["scenario"] for r in runs}}
    summary.pop("previous_elapsed_s", None)
    json.dump(summary, open(os.path.join(RESULTS, f"{out}.json"), "w"), indent=1)
    with open(os.path.join(RESULTS, f"{out}.csv"), "w", newline="") as f:
        for line in provenance_lines(summary):
            f.write(f"# {line}\n")
        for msg in routing_provenance_problems(summary, f"bench/results/{out}.json"):
            if "HEAD is" not in msg:
                f.write(f"# warning: {msg}\n")
        w = csv.writer(f)
        # Each run's own commit and dirty flag come last (the columns before are as they were).
        w.writerow(["scenario", "label", "round"] + [n for n, _ in ROUTING_FIELDS] + ["commit", "dirty"])
        for r in sorted(runs, key=lambda r: (r["scenario"], r["label"], r["round"])):
            w.writerow(
                [r["scenario"], r["label"], r["round"]]
                + [("" if g(r) is None else round(g(r), 4)) for _, g in ROUTING_FIELDS]
                + [r.get("commit") or "", "" if r.get("dirty") is None else int(bool(r["dirty"]))]
            )
    print("wrote", os.path.relpath(os.path.join(RESULTS, f"{out}.json"), ROOT), f"and {out}.csv")
    for msg in routing_provenance_problems(summary, f"bench/results/{out}.json"):
        print(f"WARNING: {msg}", file=sys.stderr)


def pooled_p99(samples):
    """The 99th percentile of `samples` (linear interpolation, as AIPerf's), or None."""
    if len(samples) < 2:
        return None
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def routing_provenance_problems(data, name):
    """provenance_problems, and for a routing summary: runs with no stamp, runs from several trees."""
    problems = provenance_problems(data, name)
    n = data.get("runs_without_stamp") or 0
    if n and data.get("commit"):
        problems.append(f"{n} of the runs in {name} carry no provenance stamp")
    trees = [t for t in data.get("run_provenance") or [] if t.get("commit")]
    if len(trees) > 1 or data.get("runs_from_other_trees"):
        problems.append(
            f"{name} mixes runs from different trees ("
            + "; ".join(f"{t['commit'][:7]}{' dirty ' + str(t.get('diff_sha256')) if t.get('dirty') else ''}: "
                        f"{len(t['runs'])} run(s)" for t in trees)
            + ")"
        )
    return problems


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def routing_table(rows, rr=None, ratio=True):
    """Metric rows, one column per policy (the seed article's layout). Cells: the median over the
    rounds, and min–max when there are several; (×) the ratio of the medians to the baseline."""
    cols = sorted(rows, key=lambda r: POLICY_ORDER.index(r["label"]) if r["label"] in POLICY_ORDER else 99)
    head = "| metric | " + " | ".join(POLICY_TITLE.get(r["label"], r["label"]) for r in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]

    def line(title, key, digits=0, suffix="", scale=1.0, vs_rr=False):
        cells = []
        for r in cols:
            cell = spread(r[key], digits, suffix, scale)
            if vs_rr and rr is not None and r is not rr and median(rr[key]) and median(r[key]) is not None:
                cell += f" (×{median(r[key]) / median(rr[key]):.2f})"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    line("TTFT mean (ms)", "ttft_mean_ms", 1, vs_rr=ratio)
    line("TTFT P99 (ms)", "ttft_p99_ms", 1, vs_rr=ratio)
    if cols and all(r.get("ttft_p99_pooled_ms") and r["rounds"] > 1 for r in cols):
        line("TTFT P99, rounds pooled (ms)", "ttft_p99_pooled_ms", 1, vs_rr=ratio)
    line("request latency mean (ms)", "latency_mean_ms", 0, vs_rr=ratio)
    line("request latency P99 (ms)", "latency_p99_ms", 0, vs_rr=ratio)
    line("output tokens/s", "output_tok_s", 0, vs_rr=ratio)
    line("fleet prefix-cache hit rate", "hit_rate", 1, " %", 100)
    line("oracle hit rate (bound)", "oracle_hit_rate", 1, " %", 100)
    line("TTFT mean at the servers (ms)", "server_ttft_mean_ms", 1)
    line("busiest server's share of requests", "max_server_share", 0, " %", 100)
    if any(v for r in cols for v in r["errors"]):
        line("failed requests", "errors", 0)
    return "\n".join(lines)


def placement_cell(values):
    """A count over the rounds: median (min–max), or the count alone when every round had it."""
    vals = [v for v in values if v is not None]
    if vals and min(vals) == max(vals):
        return f"{vals[0]:,.0f}"
    return spread(vals)


# The scenarios of each set, in the order of the page: a block whose scenario is missing from the
# results is marked as such rather than left showing figures of an earlier run.
ROUTING_SCENARIOS = {
    "routing": ["seed", "seed_fixed", "unique", "hot", "replicas"],
    "kv": ["evict", "reset", "docs", "docs_reset", "seed", "unique", "replicas"],
}


def routing_blocks(data):
    blocks = {}
    by = {}
    name = data.get("set", "routing")
    base = BASELINE.get(name, "round_robin")
    for r in data["results"]:
        by.setdefault(r["scenario"], []).append(r)
    for scenario, rows in by.items():
        rr = next((r for r in rows if r["label"] == base), None)
        blocks[f"{name}-{scenario}"] = routing_table(rows, rr, ratio=rr is not None)
    for scenario in ROUTING_SCENARIOS.get(name, []):
        if scenario not in by:
            blocks[f"{name}-{scenario}"] = (
                f"_Not measured: `bench/results/{name}.json` has no `{scenario}` run (the last "
                f"invocation did not run this scenario). `{'ROUTING_SET=kv ' if name == 'kv' else ''}"
                f"./scripts/bench-routing.sh` runs every scenario._"
            )
    el = data.get("elapsed_by_scenario", {})
    script = "scripts/bench-routing.sh"
    if data.get("commit"):
        provenance = (
            f"from commit `{data['commit'][:7]}`"
            + (" **with uncommitted changes**" if data.get("dirty") else "")
            + f" by `{data.get('command') or script}` on {data['machine']}, started {data.get('date', '?')}"
            + (f", finished {data['finished']}" if data.get("finished") else "")
            + f" (provenance in `bench/results/{name}/stamp.json`, in every run file and atop "
            f"`bench/results/{name}.csv`"
            + (f"; raw client and server outputs in `bench/results/{name}/raw/`"
               if os.path.isdir(os.path.join(RESULTS, name, "raw")) else "")
            + ")"
        )
    else:
        runs = data.get("run_commits")
        provenance = (
            f"by `{script}`" + (" with `ROUTING_SET=kv`" if name == "kv" else "") + f" on {data['machine']}; "
            + (f"runs from commit(s) {', '.join(f'`{c}`' for c in runs)} (each results file names its own)"
               if runs and runs != ["unknown"]
               else f"summarised at commit `{data['git']}` (these results files do not name theirs)")
        )
    rounds = max((r.get("rounds", 1) for r in data["results"]), default=1)
    meta = [
        f"Generated {data['generated']} {provenance}.",
        f"vllm-sim `--time-scale {data['time_scale']}`, `--kv-blocks` {data['kv_blocks']} per server, "
        f"{data['repeats']} round(s) per policy"
        + (" (cells: median, and min–max over the rounds; × is the ratio of the medians)" if rounds > 1 else "")
        + ".",
        "Time spent in the runs: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(el.items()))
        + f" (the last invocation, build excluded: {data['elapsed_s'] / 60:.1f} min).",
    ]
    # Only what makes the figures belong to no commit goes on the page (a later HEAD is normal).
    loud = [p for p in routing_provenance_problems(data, f"bench/results/{name}.json") if "HEAD is" not in p]
    if loud:
        meta.append("\n**Warning: " + "; ".join(loud) + ".**")
    blocks[f"{name}-meta"] = "\n".join(meta)
    # Request placement and pick reasons, for the discussion (median, min–max over the rounds).
    lines = ["| scenario | policy | requests per server | llm-lb pick reasons |", "|---|---|---|---|"]
    for scenario, rows in sorted(by.items()):
        for r in sorted(rows, key=lambda r: POLICY_ORDER.index(r["label"]) if r["label"] in POLICY_ORDER else 99):
            per_round = r["served_per_server"]
            n = max(len(s) for s in per_round)
            served = " / ".join(
                placement_cell([s[i] if i < len(s) else None for s in per_round]) for i in range(n)
            )
            # Reasons never given in any round are left out; a count the same in every round
            # is given once.
            keys = {k for p in r["picks"] for k in p if any(q.get(k) for q in r["picks"])}
            totals = {k: median([p.get(k, 0) for p in r["picks"]]) for k in keys}
            reasons = ", ".join(
                f"{k} {placement_cell([p.get(k, 0) for p in r['picks']])}"
                for k in sorted(keys, key=lambda k: (-totals[k], k))
            ) or "–"
            lines.append(f"| {scenario} | {POLICY_TITLE.get(r['label'], r['label'])} | {served} | {reasons} |")
    blocks[f"{name}-placement"] = "\n".join(lines)
    return blocks


def routing_plots(data, plt):
    seed = [r for r in data["results"] if r["scenario"] == "seed"]
    if not seed:
        return
    seed.sort(key=lambda r: POLICY_ORDER.index(r["label"]) if r["label"] in POLICY_ORDER else 99)
    runs = {}
    for p in glob.glob(os.path.join(RESULTS, "routing", "seed-*.json")):
        r = json.load(open(p))
        runs.setdefault(r["label"], []).extend(r["ttft_samples_ms"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in seed:
        xs = sorted(runs.get(r["label"], []))
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=POLICY_TITLE.get(r["label"], r["label"]))
    ax.set_xscale("log")
    lo = min((min(v) for v in runs.values() if v), default=1)
    ax.set_xlim(left=max(lo * 0.8, 5))
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Seed workload: TTFT CDF per policy (AIPerf, 3 vllm-sim)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "routing-ttft-cdf.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [POLICY_TITLE.get(r["label"], r["label"]).replace(" (no LB)", "\n(no LB)").replace("SGLang router ", "SGLang\n") for r in seed]
    vals = [100 * (median(r["hit_rate"]) or 0) for r in seed]
    bars = ax.bar(names, vals, color="#4c72b0")
    orc = median([median(r["oracle_hit_rate"]) for r in seed])
    if orc:
        ax.axhline(100 * orc, color="#c44e52", linestyle="--", label=f"oracle bound {100 * orc:.0f} %")
        ax.legend(fontsize=8, loc="lower right")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f} %", ha="center", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("fleet prefix-cache hit rate (%)")
    ax.set_title("Seed workload: prefix-cache hit rate per policy")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "routing-hit-rate.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- overhead


# Each run's requests/s and latencies are also given as ratios to other targets of the same round
# (the runs of a round are back to back): to nginx, to the bare Pingora proxy (the limit of
# llm-lb's architecture), to direct, and for a Redis policy to the same policy on the embedded
# store. Key suffix -> the target divided by (None: the row's own counterpart, EMBEDDED_OF).
OVERHEAD_BASES = {
    "nginx": "nginx",
    "pingora_bare": "pingora_bare",
    "direct": "direct",
    "embedded": None,
}
EMBEDDED_OF = {
    "llm-lb_prefix_cache_redis": "llm-lb_prefix_cache",
    "llm-lb_global_least_request_redis": "llm-lb_global_least_request",
}
OVERHEAD_RUN = re.compile(r"^(?P<target>.+)-r(?P<round>\d+)\.json$")


def overhead_base(target, base):
    """The target `target` is divided by for ratio key `base`, or None."""
    b = OVERHEAD_BASES[base]
    return EMBEDDED_OF.get(target) if b is None else b


def overhead_ratios(runs):
    """Add `<metric>_vs_<base>` to every run (a dict with target, round, rps, p50_ms, p99_ms):
    the ratio to the base target's run of the same round, None when that round has none."""
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["target"]] = r
    for r in runs:
        for base in OVERHEAD_BASES:
            b = by_round[r["round"]].get(overhead_base(r["target"], base) or "")
            for m in ("rps", "p50_ms", "p99_ms"):
                key = f"{m.removesuffix('_ms')}_vs_{base}"
                r[key] = r[m] / b[m] if b and b[m] else None
    return runs


def cmd_collect_overhead(a):
    rows = []
    for path in sorted(glob.glob(os.path.join(a.dir, "*.json"))):
        m = OVERHEAD_RUN.match(os.path.basename(path))
        if not m:
            continue  # stamp.json, meta.json: not oha outputs
        d = json.load(open(path))
        s = d["summary"]
        lat = d.get("latencyPercentiles", {})
        codes = d.get("statusCodeDistribution", {})
        ok = sum(v for k, v in codes.items() if k.startswith("2"))
        total_n = sum(codes.values()) + sum(d.get("errorDistribution", {}).values())
        rows.append(
            {
                "target": m.group("target"),
                "round": int(m.group("round")),
                "rps": s["requestsPerSec"],
                "p50_ms": 1000 * lat.get("p50", 0),
                "p99_ms": 1000 * lat.get("p99", 0),
                "ok": ok,
                "total": total_n,
            }
        )
    overhead_ratios(rows)
    meta = json.load(open(a.meta)) if a.meta and os.path.exists(a.meta) else {}
    if not meta.get("commit"):
        print(f"WARNING: no provenance stamp ({a.meta}): overhead.json names only the commit checked out now",
              file=sys.stderr)
    out = {
        "generated": now_utc(),
        "git": (meta["commit"][:7] if meta.get("commit") else git_rev()),
        "machine": machine(),
        **meta,
        "runs": rows,
    }
    out["summary"] = overhead_summary(out)
    json.dump(out, open(os.path.join(RESULTS, "overhead.json"), "w"), indent=1)
    ratio_keys = [f"{m}_vs_{b}" for b in OVERHEAD_BASES for m in ("rps", "p50", "p99")]
    with open(os.path.join(RESULTS, "overhead.csv"), "w", newline="") as f:
        for line in provenance_lines(out):
            f.write(f"# {line}\n")
        w = csv.writer(f)
        w.writerow(["target", "round", "rps", "p50_ms", "p99_ms", "ok", "total"] + ratio_keys)
        for r in rows:
            w.writerow(
                [r["target"], r["round"], round(r["rps"], 1), round(r["p50_ms"], 3), round(r["p99_ms"], 3), r["ok"], r["total"]]
                + ["" if r[k] is None else round(r[k], 4) for k in ratio_keys]
            )
    print("wrote", os.path.relpath(os.path.join(RESULTS, "overhead.json"), ROOT), "and overhead.csv")


def provenance_lines(data):
    """`commit: …`, `machine: …`, `command: …` (and what was uncommitted) of a results file."""
    commit = data.get("commit") or f"{data.get('git', 'unknown')} (checked out when collected; no stamp)"
    if data.get("dirty"):
        commit += " + uncommitted changes (diff sha256 {}): {}".format(
            data.get("diff_sha256"), "; ".join(data.get("uncommitted_changes", [])))
    lines = [f"commit: {commit}", f"machine: {data.get('machine', 'unknown')}",
             f"command: {data.get('command', 'unknown')}"]
    if data.get("date"):
        lines.append(f"date: {data['date']}")
    if data.get("tree_changed_during_run"):
        lines.append("warning: the work tree changed while the benchmark ran")
    return lines


def head_commit():
    try:
        return subprocess.check_output(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return None


def provenance_problems(data, name):
    """What is wrong with a results file's provenance, as sentences (empty: nothing)."""
    problems = []
    commit = data.get("commit")
    if not commit:
        problems.append(f"{name} carries no provenance stamp (commit, dirty flag, command)")
    else:
        if data.get("dirty"):
            problems.append(
                f"{name} was measured on a work tree with uncommitted changes "
                f"({'; '.join(data.get('uncommitted_changes', []))}): its figures belong to no commit"
            )
        head = head_commit()
        if head and head != commit:
            problems.append(f"{name} was measured at commit {commit[:7]}, HEAD is {head[:7]}")
    if data.get("tree_changed_during_run"):
        problems.append(f"the work tree changed while {name} was measured")
    return problems


OVERHEAD_ORDER = [
    "direct",
    "nginx",
    "pingora_bare",
    "llm-lb_round_robin",
    "llm-lb_prefix_cache",
    "llm-lb_prefix_cache_redis",
    "llm-lb_global_least_request",
    "llm-lb_global_least_request_redis",
    "sglang_round_robin",
    "sglang_cache_aware",
]
OVERHEAD_TITLE = {
    "direct": "direct (no proxy)",
    "nginx": "nginx round robin",
    "pingora_bare": "bare Pingora (fixed upstream)",
    "llm-lb_round_robin": "llm-lb round_robin",
    "llm-lb_prefix_cache": "llm-lb prefix_cache (embedded)",
    "llm-lb_prefix_cache_redis": "llm-lb prefix_cache (Redis)",
    "llm-lb_global_least_request": "llm-lb global_least_request (embedded)",
    "llm-lb_global_least_request_redis": "llm-lb global_least_request (Redis)",
    "sglang_round_robin": "SGLang router round_robin",
    "sglang_cache_aware": "SGLang router cache_aware",
}


def overhead_stats(data):
    """Per target: lists over rounds of rps, p50, p99, ok, total and of every within-round ratio
    (`rps_nginx`, `p99_pingora_bare`, `rps_embedded`, ...). Ratios are recomputed from the runs,
    so an overhead.json written before a base target existed renders too."""
    runs = overhead_ratios([dict(r) for r in data["runs"]])
    stats = {}
    for r in sorted(runs, key=lambda r: r["round"]):
        s = stats.setdefault(r["target"], {"rps": [], "p50": [], "p99": [], "ok": [], "total": []})
        s["rps"].append(r["rps"])
        s["p50"].append(r["p50_ms"])
        s["p99"].append(r["p99_ms"])
        s["ok"].append(r["ok"])
        s["total"].append(r["total"])
        for base in OVERHEAD_BASES:
            for m in ("rps", "p50", "p99"):
                s.setdefault(f"{m}_{base}", []).append(r[f"{m}_vs_{base}"])
    return stats


def overhead_summary(data):
    """Per target: median, min and max over rounds of every figure and ratio (ratios taken
    within a round first); a ratio no round has is left out."""
    out = {}
    for t, s in overhead_stats(data).items():
        row = {"rounds": len(s["rps"]), "non_2xx": sum(s["total"]) - sum(s["ok"])}
        for k, vals in s.items():
            if k in ("ok", "total"):
                continue
            vals = [v for v in vals if v is not None]
            if vals:
                name = {"rps": "rps", "p50": "p50_ms", "p99": "p99_ms"}.get(k, k.replace("_", "_vs_", 1))
                row[name] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out[t] = row
    return out


def ratio_cell(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ({min(vals):.2f}–{max(vals):.2f})"


def med_cell(vals, digits):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:,.{digits}f}"
    return f"{m:,.{digits}f} ({min(vals):,.{digits}f}–{max(vals):,.{digits}f})"


def overhead_blocks(data):
    st = overhead_stats(data)
    targets = [t for t in OVERHEAD_ORDER if t in st] + sorted(t for t in st if t not in OVERHEAD_ORDER)
    lines = [
        "**Absolute figures**",
        "",
        "| target | requests/s | p50 (ms) | p99 (ms) | non-2xx |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in targets:
        s = st[t]
        bad = sum(s["total"]) - sum(s["ok"])
        lines.append(
            f"| {OVERHEAD_TITLE.get(t, t)} | {med_cell(s['rps'], 0)} | {med_cell(s['p50'], 2)} | {med_cell(s['p99'], 2)} | {bad} |"
        )
    lines += [
        "",
        "**Ratios** (within each round, then the median; \"embedded\" is the same policy on the embedded "
        "store, for the Redis rows; p50 ratios are in `bench/results/overhead.{json,csv}`)",
        "",
        "| target | req/s ÷ bare Pingora | p99 ÷ bare Pingora | req/s ÷ embedded | p99 ÷ embedded | "
        "req/s ÷ nginx | p99 ÷ nginx | req/s ÷ direct | p99 ÷ direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        s = st[t]
        cells = [ratio_cell(s[f"{m}_{b}"]) for b in ("pingora_bare", "embedded", "nginx", "direct") for m in ("rps", "p99")]
        lines.append(f"| {OVERHEAD_TITLE.get(t, t)} | " + " | ".join(cells) + " |")
    problems = provenance_problems(data, "bench/results/overhead.json")
    command = data.get("command") or "scripts/bench-overhead.sh"
    meta = (
        f"Generated {data['generated']} from commit `{data['git']}` by `{command}` on "
        f"{data['machine']}. {data.get('rounds', '?')} interleaved round{'' if data.get('rounds') == 1 else 's'} of {data.get('duration', '?')} per target "
        f"(after a {data.get('warmup', '?')} warm-up), oha {data.get('oha_version', '')}, {data.get('connections', '?')} connections, "
        f"{data.get('body_bytes', '?')}-byte streaming chat body, backend `vllm-sim --time-scale 0` "
        f"({data.get('max_tokens', '?')} output tokens). Cells: median over rounds (min–max); ratios are taken "
        f"within each round, then the median. Whole script: {data.get('elapsed_s', 0) / 60:.1f} min (build excluded)."
    )
    # Only what makes the figures belong to no commit goes on the page (a later HEAD is normal).
    loud = [p for p in problems if "HEAD is" not in p]
    if loud:
        meta += "\n\n**Warning: " + "; ".join(loud) + ".**"
    return {"overhead": "\n".join(lines), "overhead-meta": meta}, st


def overhead_plot(data, st, plt):
    targets = [t for t in OVERHEAD_ORDER if t in st]
    if not targets:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    short = {
        "direct": "direct",
        "nginx": "nginx",
        "pingora_bare": "bare\nPingora",
        "llm-lb_round_robin": "llm-lb RR",
        "llm-lb_prefix_cache": "llm-lb PC",
        "llm-lb_prefix_cache_redis": "llm-lb PC\nRedis",
        "llm-lb_global_least_request": "llm-lb GLR",
        "llm-lb_global_least_request_redis": "llm-lb GLR\nRedis",
        "sglang_round_robin": "SGLang RR",
        "sglang_cache_aware": "SGLang\ncache_aware",
    }
    names = [short.get(t, t) for t in targets]
    for ax, key, title in ((axes[0], "rps", "requests/s (higher is better)"), (axes[1], "p99", "p99 latency, ms (lower is better)")):
        med = [statistics.median(st[t][key]) for t in targets]
        lo = [m - min(st[t][key]) for m, t in zip(med, targets)]
        hi = [max(st[t][key]) - m for m, t in zip(med, targets)]
        ax.bar(range(len(targets)), med, yerr=[lo, hi], capsize=3, color="#55a868")
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels(names, fontsize=7, rotation=35, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Proxy overhead: oha against one instant vllm-sim (median, min–max over rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "overhead.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- micro


def cmd_collect_micro(a):
    rows = []
    for est in glob.glob(os.path.join(a.criterion, "**", "new", "estimates.json"), recursive=True):
        bench_dir = os.path.dirname(os.path.dirname(est))
        bj = os.path.join(bench_dir, "new", "benchmark.json")
        if not os.path.exists(bj):
            continue
        b = json.load(open(bj))
        group = b.get("group_id", "")
        if not group.startswith(("parse", "pick", "tokenize")):
            continue
        e = json.load(open(est))
        rows.append(
            {
                "group": group,
                "function": b.get("function_id"),
                "parameter": b.get("value_str"),
                "throughput": b.get("throughput"),
                "mean_ns": e["mean"]["point_estimate"],
                "mean_lo_ns": e["mean"]["confidence_interval"]["lower_bound"],
                "mean_hi_ns": e["mean"]["confidence_interval"]["upper_bound"],
            }
        )
    out = {"generated": now_utc(), "git": git_rev(), "machine": machine()}
    if a.stamp:
        out.update(json.load(open(a.stamp)))
    out["rows"] = rows
    json.dump(out, open(os.path.join(RESULTS, "micro.json"), "w"), indent=1)
    with open(os.path.join(RESULTS, "micro.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "function", "parameter", "mean_ns", "ci_lo_ns", "ci_hi_ns"])
        for r in sorted(rows, key=lambda r: (r["group"], str(r["function"]), num(r["parameter"]))):
            w.writerow([r["group"], r["function"], r["parameter"], round(r["mean_ns"], 1), round(r["mean_lo_ns"], 1), round(r["mean_hi_ns"], 1)])
    print("wrote", os.path.relpath(os.path.join(RESULTS, "micro.json"), ROOT), f"({len(rows)} benchmarks)")


def num(s):
    m = re.match(r"(\d+)", str(s or ""))
    return int(m.group(1)) if m else 0


def human_time(ns):
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns / 1e6:.2f} ms"


def human_bytes(n):
    return f"{n // 1048576} MiB" if n >= 1048576 else f"{n // 1024} KiB"


def micro_blocks(data):
    rows = data["rows"]
    parse = sorted((r for r in rows if r["group"].startswith("parse")), key=lambda r: (str(r["function"]), num(r["parameter"])))
    lines = ["| body | " + " | ".join(sorted({str(r['function']) for r in parse})) + " | throughput |", None]
    funcs = sorted({str(r["function"]) for r in parse})
    lines[1] = "|---|" + "---:|" * (len(funcs) + 1)
    for size in sorted({num(r["parameter"]) for r in parse}):
        cells = []
        thr = ""
        for f in funcs:
            r = next((r for r in parse if str(r["function"]) == f and num(r["parameter"]) == size), None)
            cells.append(human_time(r["mean_ns"]) if r else "–")
            if r and f == funcs[-1]:
                thr = f"{size / (r['mean_ns'] / 1e9) / 1048576:,.0f} MiB/s"
        lines.append(f"| {human_bytes(size)} | " + " | ".join(cells) + f" | {thr} |")
    pick = [r for r in rows if r["group"].startswith("pick")]
    order = ["round_robin", "random", "global_least_request", "prefix_cache", "least_busy"]
    present = {r["function"] for r in pick}
    policies = [p for p in order if p in present] + sorted(present - set(order))
    plines = ["| endpoints | " + " | ".join(policies) + " |", "|---:|" + "---:|" * len(policies)]
    for n in sorted({num(r["parameter"]) for r in pick}):
        cells = []
        for p in policies:
            r = next((r for r in pick if r["function"] == p and num(r["parameter"]) == n), None)
            cells.append(human_time(r["mean_ns"]) if r else "–")
        plines.append(f"| {n} | " + " | ".join(cells) + " |")
    tok = sorted((r for r in rows if r["group"].startswith("tokenize")), key=lambda r: (str(r["function"]), num(r["parameter"])))
    tlines = ["| tokenizer | prompt tokens | time | per 1k tokens |", "|---|---:|---:|---:|"]
    for r in tok:
        n = num(r["parameter"])
        tlines.append(f"| {r['function']} | {n:,} | {human_time(r['mean_ns'])} | {human_time(r['mean_ns'] * 1000 / max(n, 1))} |")
    if data.get("commit"):
        meta = " · ".join(provenance_lines(data)) + ". Criterion mean per iteration."
    else:
        meta = f"Generated {data['generated']} from commit `{data['git']}` by `scripts/bench-micro.sh` on {data['machine']} (no provenance stamp). Criterion mean per iteration."
    return {"micro-parse": "\n".join(lines), "micro-pick": "\n".join(plines), "micro-tokenize": "\n".join(tlines), "micro-meta": meta}


def micro_plot(data, plt):
    rows = data["rows"]
    parse = [r for r in rows if r["group"].startswith("parse")]
    pick = [r for r in rows if r["group"].startswith("pick")]
    if not parse and not pick:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for f in sorted({str(r["function"]) for r in parse}):
        pts = sorted((num(r["parameter"]), r["mean_ns"] / 1e3) for r in parse if str(r["function"]) == f)
        axes[0].plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=f)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("request body (KiB)")
    axes[0].set_ylabel("µs per request")
    axes[0].set_title("body parse + prefix block hashing", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].grid(True, which="both", alpha=0.3)
    for p in ["round_robin", "random", "global_least_request", "prefix_cache", "least_busy", "kv_aware", "kv_aware_tokenizer"]:
        pts = sorted((num(r["parameter"]), r["mean_ns"] / 1e3) for r in pick if r["function"] == p)
        if pts:
            axes[1].plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("endpoints in the pool")
    axes[1].set_ylabel("µs per pick (+ release)")
    axes[1].set_title("pick cost, embedded store", fontsize=10)
    axes[1].legend(fontsize=8)
    axes[1].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "micro.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- render


def headline(routing, overhead_st):
    """The headline bullets (medians over the rounds)."""
    parts = []
    if routing:
        m = median

        def scenario(name):
            return {r["label"]: r for r in routing["results"] if r["scenario"] == name}

        sessions = (routing.get("parameters") or {}).get("sessions") or 60
        rounds = max((r.get("rounds", 1) for r in routing["results"]), default=1)
        of_rounds = f"; medians of {rounds} rounds" if rounds > 1 else ""
        seed = scenario("seed")
        rr, pc = seed.get("round_robin"), seed.get("prefix_cache")
        if rr and pc:
            parts.append(
                f"- **Seed workload** ({sessions} five-turn chat sessions, ~200 input and ~800 output tokens a "
                f"turn with varied lengths, concurrency 20, three simulated vLLM servers{of_rounds}): "
                f"`prefix_cache` cuts mean TTFT from {m(rr['ttft_mean_ms']):.0f} ms to {m(pc['ttft_mean_ms']):.0f} ms "
                f"(×{m(pc['ttft_mean_ms']) / m(rr['ttft_mean_ms']):.2f}) and P99 TTFT from {m(rr['ttft_p99_ms']):.0f} to "
                f"{m(pc['ttft_p99_ms']):.0f} ms, and raises the fleet prefix-cache hit rate from "
                f"{100 * m(rr['hit_rate']):.0f} % to {100 * m(pc['hit_rate']):.0f} % "
                f"(oracle bound {100 * m(pc['oracle_hit_rate']):.0f} %) against round robin."
            )
        fixed = scenario("seed_fixed")
        frr, fpc = fixed.get("round_robin"), fixed.get("prefix_cache")
        if frr and fpc:
            parts.append(
                f"- **The literal seed workload** (fixed lengths: exactly 200 input and 800 output tokens every "
                f"turn): mean TTFT {m(frr['ttft_mean_ms']):.0f} → {m(fpc['ttft_mean_ms']):.0f} ms "
                f"(×{m(fpc['ttft_mean_ms']) / m(frr['ttft_mean_ms']):.2f}), P99 {m(frr['ttft_p99_ms']):.0f} → "
                f"{m(fpc['ttft_p99_ms']):.0f} ms, hit rate {100 * m(frr['hit_rate']):.0f} → "
                f"{100 * m(fpc['hit_rate']):.0f} % (oracle {100 * m(fpc['oracle_hit_rate']):.0f} %)."
            )
        sg, fsg = seed.get("sglang_cache_aware"), fixed.get("sglang_cache_aware")
        if sg and rr and pc:
            s = (f"- The seed workload through the SGLang router's `cache_aware`: TTFT {m(sg['ttft_mean_ms']):.0f} ms, "
                 f"hit rate {100 * m(sg['hit_rate']):.0f} %")
            if fsg and frr and fpc:
                s += f" (fixed lengths: {m(fsg['ttft_mean_ms']):.0f} ms, {100 * m(fsg['hit_rate']):.0f} %)"
            parts.append(s + ".")
        rep = scenario("replicas")
        if "prefix_cache_3x_redis" in rep:
            r3 = rep["prefix_cache_3x_redis"]
            un = rep.get("prefix_cache_3x_unshared")
            s = (f"- **Three llm-lb replicas sharing Redis**, requests spread over them round robin: hit rate "
                 f"{100 * m(r3['hit_rate']):.0f} %, TTFT {m(r3['ttft_mean_ms']):.0f} ms")
            if un:
                s += f" (unshared embedded stores: {100 * m(un['hit_rate']):.0f} %, {m(un['ttft_mean_ms']):.0f} ms)"
            parts.append(s + ".")
    if overhead_st:
        s = overhead_headline(overhead_st)
        if s:
            parts.append(s)
    return "\n".join(parts)


def overhead_headline(st):
    """The overhead bullet: llm-lb against the bare Pingora proxy (the limit of its architecture),
    each Redis policy against the same policy on the embedded store, and nginx for context.
    Medians of within-round ratios; a figure whose targets did not run is left out."""

    def med(t, k):
        v = [x for x in st.get(t, {}).get(k, []) if x is not None]
        return statistics.median(v) if v else None

    def pair(t, base):
        r, p = med(t, f"rps_{base}"), med(t, f"p99_{base}")
        if r is None:
            return None
        return f"{r:.2f}×" + (f" (p99 ×{p:.2f})" if p is not None else "")

    clauses = []
    bare = [(t, name, pair(t, "pingora_bare")) for t, name in (
        ("llm-lb_round_robin", "`round_robin`"),
        ("llm-lb_prefix_cache", "`prefix_cache`"),
        ("llm-lb_global_least_request", "`global_least_request`"),
    )]
    bare = [f"{name} {c}" for _, name, c in bare if c]
    if bare:
        clauses.append("against a bare Pingora proxy (fixed upstream, no body reading: the limit of "
                       "llm-lb's architecture) llm-lb " + ", ".join(bare))
    redis = [(name, pair(t, "embedded")) for t, name in (
        ("llm-lb_prefix_cache_redis", "`prefix_cache`"),
        ("llm-lb_global_least_request_redis", "`global_least_request`"),
    )]
    redis = [f"{name} {c}" for name, c in redis if c]
    if redis:
        clauses.append("on Redis against the same policy on the embedded store, " + ", ".join(redis))
    rr = pair("llm-lb_round_robin", "nginx")
    if rr:
        # The SGLang router's row stays out of the headline: on this loopback set-up it waits a
        # constant ~44 ms per request (Nagle / delayed ACK), which is not a routing cost.
        clauses.append(f"against nginx, llm-lb `round_robin` {rr}")
    if not clauses:
        return ""
    return ("- **Overhead** (oha, one instant backend; requests/s as a fraction of the reference's, "
            "medians of within-round ratios): " + "; ".join(clauses) + ".")


def cmd_render(_a):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib missing: tables only", file=sys.stderr)
    os.makedirs(IMG, exist_ok=True)
    if not os.path.exists(DOC):
        print(f"{DOC} is missing: nothing to render into", file=sys.stderr)
        return 1
    problems = []
    p = os.path.join(RESULTS, "overhead.json")
    if os.path.exists(p):
        problems += provenance_problems(json.load(open(p)), "bench/results/overhead.json")
    p = os.path.join(RESULTS, "micro.json")
    if os.path.exists(p):
        problems += provenance_problems(json.load(open(p)), "bench/results/micro.json")
    for name in ("routing", "kv"):
        p = os.path.join(RESULTS, f"{name}.json")
        if os.path.exists(p):
            problems += routing_provenance_problems(json.load(open(p)), f"bench/results/{name}.json")
    for msg in problems:
        print(f"\n*** WARNING: {msg} ***\n", file=sys.stderr)
    if problems and _a.strict:
        print("render --strict: refusing to publish these figures (nothing written)", file=sys.stderr)
        return 1
    text = open(DOC).read()
    routing = overhead = None
    st = None
    p = os.path.join(RESULTS, "routing.json")
    if os.path.exists(p):
        routing = json.load(open(p))
        for k, v in routing_blocks(routing).items():
            text = replace_block(text, k, v)
        if plt:
            routing_plots(routing, plt)
    p = os.path.join(RESULTS, "kv.json")
    if os.path.exists(p):
        for k, v in routing_blocks(json.load(open(p))).items():
            text = replace_block(text, k, v)
    p = os.path.join(RESULTS, "overhead.json")
    if os.path.exists(p):
        overhead = json.load(open(p))
        blocks, st = overhead_blocks(overhead)
        for k, v in blocks.items():
            text = replace_block(text, k, v)
        if plt:
            overhead_plot(overhead, st, plt)
    p = os.path.join(RESULTS, "micro.json")
    if os.path.exists(p):
        micro = json.load(open(p))
        for k, v in micro_blocks(micro).items():
            text = replace_block(text, k, v)
        if plt:
            micro_plot(micro, plt)
    head = headline(routing, st)
    text = replace_block(text, "headline", head)
    open(DOC, "w").write(text)
    if os.path.exists(README):
        r = open(README).read()
        r2 = replace_block(r, "headline", head)
        if r2 != r:
            open(README, "w").write(r2)
    print("rendered", os.path.relpath(DOC, ROOT))
    return 0


# One kv_aware pick in llm-lb's debug log (RUST_LOG llm_lb::policy::kv_aware=debug).
PICK_LINE = re.compile(
    r"^\[(\S+?)Z? DEBUG .*kv_aware prompt=(\d+) tokens.*candidates \[([^\]]*)\] matched blocks "
    r"\[([^\]]*)\].* chose (\S+) \(cost")


def read_picks(path):
    """kv_aware's picks in a pick log: (unix time, prompt tokens, blocks the index said the
    chosen endpoint held, the chosen endpoint)."""
    picks = []
    for line in read_text(path).splitlines():
        m = PICK_LINE.search(line)
        if not m:
            continue
        stamp, prompt, candidates, matched, chosen = m.groups()
        labels = [c.strip().strip('"') for c in candidates.split(",")]
        blocks = [int(x) for x in matched.split(",")]
        if chosen not in labels or len(blocks) != len(labels):
            continue
        when = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc)
        picks.append((when.timestamp(), int(prompt), blocks[labels.index(chosen)], chosen))
    return picks


def read_turns(path, picks=None):
    """A run's turns from AIPerf's records, by session: {conversation: {turn: [prompt tokens,
    cached tokens, completion tokens, start ns, pick]}}, and every turn by start time. With
    `picks` (read_picks), each turn gets the unused pick of the same prompt length closest in
    time (within 0.2 s), or None."""
    sessions = {}
    for line in read_text(path).splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        md, mt = d.get("metadata", {}), d.get("metrics", {})
        value = lambda k: (mt.get(k) or {}).get("value", 0) or 0
        turn = [value("usage_prompt_tokens"), value("usage_prompt_cache_read_tokens"),
                value("usage_completion_tokens"), md.get("request_start_ns", 0), None]
        sessions.setdefault(md.get("conversation_id"), {})[md.get("turn_index", 0)] = turn
    every = sorted((t for turns in sessions.values() for t in turns.values()), key=lambda t: t[3])
    free = sorted(picks or [])
    for t in every if picks else []:
        start = t[3] / 1e9
        near = [i for i, p in enumerate(free) if p[1] == t[0] and abs(p[0] - start) <= 0.2]
        if near:
            t[4] = free.pop(min(near, key=lambda i: abs(free[i][0] - start)))
    return sessions, every


def turn_lost(turns, i):
    """(tokens of turn i's previous context — the previous prompt and reply, in full blocks —
    and how many of them it did not find cached), or None for a first turn."""
    prev = turns.get(i - 1)
    if prev is None:
        return None
    p, c = turns[i][0], turns[i][1]
    context = (min(p, prev[0] + prev[2]) // BLOCK) * BLOCK
    return context, max(0, context - c)


def turn_losses(path, wave_secs, picks=None):
    """(client-side hit rate, lost in the opening burst, lost later, lost although the index
    held it at the pick), in points of the run's prompt tokens: a turn loses the full blocks of
    its previous turn's prompt and reply that it did not find cached. Sessions whose first
    request started within `wave_secs` of the run's first request form the opening burst. The
    last figure (None without `picks`, kv_aware's picks from read_picks) counts the lost tokens
    that the chosen endpoint held by the index when the turn was routed: evicted by the engine
    after the pick."""
    sessions, every = read_turns(path, picks)
    if not every:
        return None
    t0 = every[0][3]
    prompt = sum(t[0] for t in every)
    cached = sum(t[1] for t in every)
    burst = later = after = 0
    for turns in sessions.values():
        in_burst = min(t[3] for t in turns.values()) - t0 < wave_secs * 1e9
        for i, turn in turns.items():
            got = turn_lost(turns, i)
            if got is None:
                continue
            context, lost = got
            if in_burst:
                burst += lost
            else:
                later += lost
            if turn[4] is not None:
                after += max(0, min(turn[4][2] * BLOCK, context) - turn[1])
    scale = 100.0 / prompt if prompt else 0.0
    return cached * scale, burst * scale, later * scale, (after * scale if picks else None)


def cmd_sessions(a):
    """One run's sessions in the order they started: where kv_aware sent them and what each
    turn lost, from the raw records and the picks the run kept."""
    run = os.path.join(a.dir, "raw", a.run)
    pick_log = os.path.join(run, "picks.log.gz")
    if not os.path.exists(pick_log):
        print(f"no picks.log.gz in {run} (only kv_aware runs of the KV set keep one)", file=sys.stderr)
        return 1
    sessions, every = read_turns(os.path.join(run, "profile_export.jsonl"), read_picks(pick_log))
    if not every:
        print(f"no records in {run}", file=sys.stderr)
        return 1
    t0 = every[0][3]
    print("| session | start (s) | endpoint | tokens lost by turn |")
    print("|---|---:|---|---|")
    for conv, turns in sorted(sessions.items(), key=lambda kv: min(t[3] for t in kv[1].values())):
        start = (min(t[3] for t in turns.values()) - t0) / 1e9
        where = sorted({t[4][3] for t in turns.values() if t[4] is not None}) or ["?"]
        lost = [str(turn_lost(turns, i)[1]) for i in sorted(turns) if i > 0 and i - 1 in turns]
        print(f"| {conv} | {start:.2f} | {', '.join(where)} | {' '.join(lost)} |")
    return 0


def cmd_losses(a):
    runs = {}
    pattern = os.path.join(a.dir, "raw", f"{a.scenario}-*-r*", "profile_export.jsonl*")
    for path in sorted(glob.glob(pattern)):
        run = os.path.basename(os.path.dirname(path))
        label, _, rnd = run[len(a.scenario) + 1:].rpartition("-r")
        pick_log = os.path.join(os.path.dirname(path), "picks.log.gz")
        picks = read_picks(pick_log) if os.path.exists(pick_log) else None
        got = turn_losses(path, a.wave_secs, picks)
        if got is not None:
            runs.setdefault(label, []).append((int(rnd), got))
    if not runs:
        print(f"no raw records for scenario {a.scenario} under {a.dir}/raw", file=sys.stderr)
        return 1
    print(f"| {a.scenario} | hit rate (client) | lost, opening burst | lost, later sessions "
          "| lost, held by the index at the pick |")
    print("|---|---:|---:|---:|---:|")
    for label, rows in sorted(runs.items()):
        rows.sort()
        cells = [", ".join("—" if r[1][k] is None else f"{r[1][k]:.1f}" for r in rows)
                 for k in range(4)]
        print(f"| {label} | {cells[0]} % | {cells[1]} | {cells[2]} | {cells[3]} |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect-routing")
    c.add_argument("--aiperf", required=True)
    c.add_argument("--scenario", required=True)
    c.add_argument("--label", required=True)
    c.add_argument("--policy", required=True)
    c.add_argument("--replicas", type=int, default=1)
    c.add_argument("--store", default="embedded")
    c.add_argument("--round", type=int, default=1)
    c.add_argument("--wall-start", required=True)
    c.add_argument("--wall-end", required=True)
    c.add_argument("--sims", nargs="+", required=True,
                   help="simulator base URLs (their /metrics is read), or /metrics snapshot files")
    c.add_argument("--admins", nargs="*", default=[],
                   help="llm-lb admin ports or URLs (their /metrics is read), or snapshot files")
    c.add_argument("--out", required=True)
    c.add_argument("--command", default="", help="the command that ran the benchmark")
    c.add_argument("--stamp", help="the run's provenance stamp (stamp.json), copied into the result")
    c.add_argument("--raw", help="keep AIPerf's exports and the /metrics snapshots here, gzipped")
    c.add_argument("--pick-logs", nargs="*", default=[],
                   help="llm-lb logs whose kv_aware pick lines (debug level) --raw keeps as picks.log.gz")
    s = sub.add_parser("summarize-routing")
    s.add_argument("--dir", required=True)
    s.add_argument("--elapsed", type=float, default=0)
    s.add_argument("--time-scale", default="")
    s.add_argument("--kv-blocks", default="")
    s.add_argument("--repeats", default="1")
    s.add_argument("--set", default="routing", choices=sorted(BASELINE))
    s.add_argument("--name", help="the summary's name, bench/results/<name>.{json,csv} (default: the set)")
    s.add_argument("--stamp", help="the invocation's provenance stamp (stamp.json)")
    o = sub.add_parser("collect-overhead")
    o.add_argument("--dir", required=True)
    o.add_argument("--meta")
    m = sub.add_parser("collect-micro")
    m.add_argument("--criterion", required=True)
    m.add_argument("--stamp", help="provenance stamp (bench_stamp) to carry into micro.json")
    lo = sub.add_parser("losses")
    lo.add_argument("--dir", required=True, help="a results directory with raw/ (bench/results/kv)")
    lo.add_argument("--scenario", required=True)
    lo.add_argument("--wave-secs", type=float, default=1.0,
                    help="sessions started this close to the first request form the opening burst")
    se = sub.add_parser("sessions")
    se.add_argument("--dir", required=True, help="a results directory with raw/ (bench/results/kv)")
    se.add_argument("--run", required=True, help="a kv_aware run, e.g. evict-kv_aware_events-r3")
    r = sub.add_parser("render")
    r.add_argument("--strict", action="store_true",
                   help="refuse (exit 1, nothing written) when a results file's provenance is "
                        "missing, dirty or not HEAD (otherwise: a loud warning)")
    a = ap.parse_args()
    fn = {
        "collect-routing": cmd_collect_routing,
        "summarize-routing": cmd_summarize_routing,
        "collect-overhead": cmd_collect_overhead,
        "collect-micro": cmd_collect_micro,
        "losses": cmd_losses,
        "sessions": cmd_sessions,
        "render": cmd_render,
    }[a.cmd]
    return fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
