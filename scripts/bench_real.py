#!/usr/bin/env python3
"""Multi-turn chat benchmark against real inference engines (helper of scripts/bench-real.sh).

Subcommands (all files are JSON / JSONL; every number in a summary can be recomputed from them):

  workload   build the deterministic workload (system prompts, user messages of a given token
             length, think times) -> workload.json; token lengths are calibrated against the
             engine's own tokenizer (/tokenize) when one answers
  drive      play the workload through a router with the `openai` client (streaming,
             stream_options.include_usage) -> requests.jsonl, one record per request
  scrape     snapshot the engines' /metrics -> metrics-*.json
  collect    one run's records, metric snapshots and router log -> run.json
             (hit rates, oracle bounds, TTFT, distribution, retries)
  summarize  every run.json -> summary.json, summary.csv, summary.md; prints the table
  recollect  recompute every run.json of a results directory from its raw files

Only the Python standard library and `openai` (drive) are used.
"""
import argparse
import asyncio
import csv
import datetime
import glob
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.error
import urllib.request

# ------------------------------------------------------------------ small helpers


def http_json(url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_text(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def pctl(values, p):
    """Percentile with linear interpolation (numpy's default); None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def mean(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def write_json(path, obj):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ workload

WORDS = """
river mountain village harbour engine signal market winter garden station library bridge
forest island kitchen window morning evening letter journey machine battery circuit orbit
planet comet telescope bakery recipe flour butter pepper tomato garlic lemon honey coffee
teacher student lesson chapter novel poem author painter museum gallery statue concert violin
piano drummer ticket airport runway pilot captain sailor anchor compass lantern blanket pillow
carpet ladder hammer nail timber quarry marble copper silver harvest orchard vineyard cellar
barrel wagon tractor farmer shepherd meadow valley canyon glacier desert oasis camel caravan
merchant silk spice lighthouse storm thunder rainbow breeze shadow mirror puzzle riddle clock
calendar festival parade costume mask theatre audience rehearsal script camera lens archive
database server network packet router cache kernel thread socket buffer ledger invoice budget
profit harbor council mayor election bicycle helmet marathon stadium referee whistle trophy
""".split()
ADJ = """
quiet ancient bright careful sudden gentle narrow distant curious patient rapid heavy silent
golden broken hidden modern rural coastal frozen humble noisy steady wooden crowded fragile
""".split()
VERBS = """
carries follows repairs describes measures collects explains protects watches builds records
crosses visits paints studies shares delivers questions remembers compares organises
""".split()
LINK = """
because although while after before when since unless until whereas
""".split()
QUESTIONS = [
    "Could you summarise what I described so far?",
    "What would you change first, and why?",
    "Which detail matters most here?",
    "How would you explain this to a child?",
    "What is the weakest part of this plan?",
    "Can you suggest a better title for it?",
]


def sentence(rng):
    def np_():
        return f"the {rng.choice(ADJ)} {rng.choice(WORDS)}"

    s = f"{np_()} {rng.choice(VERBS)} {np_()}"
    if rng.random() < 0.5:
        s += f" {rng.choice(LINK)} {np_()} {rng.choice(VERBS)} {np_()}"
    if rng.random() < 0.3:
        s += f" near the {rng.choice(WORDS)} number {rng.randint(2, 999)}"
    return s[0].upper() + s[1:] + "."


def word_stream(rng, n_words):
    words = []
    while len(words) < n_words:
        words.extend(sentence(rng).split())
    return words


class Tokenizer:
    """Counts tokens with the engine's /tokenize (llama.cpp or vLLM form), else estimates."""

    def __init__(self, url, model):
        self.url = url.rstrip("/") if url else None
        self.model = model
        self.kind = None
        if self.url:
            for kind in ("llamacpp", "vllm"):
                self.kind = kind
                try:
                    if self.count("hello world") > 0:
                        break
                except Exception:
                    pass
                self.kind = None

    def count(self, text):
        if self.kind == "llamacpp":
            return len(http_json(self.url + "/tokenize", {"content": text})["tokens"])
        if self.kind == "vllm":
            r = http_json(self.url + "/tokenize", {"model": self.model, "prompt": text,
                                                    "add_special_tokens": False})
            return int(r.get("count", len(r.get("tokens", []))))
        return int(round(len(text.split()) * 1.3))  # English words ≈ 1.3 BPE tokens


def text_of_tokens(tok, rng, target, prefix=""):
    """The shortest word prefix of a deterministic word stream with >= target tokens."""
    words = word_stream(rng, int(target * 1.2) + 20)

    def text(k):
        return (prefix + " ".join(words[:k])).strip()

    while tok.count(text(len(words))) < target:  # the estimate was too short
        words.extend(word_stream(rng, target))
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if tok.count(text(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    t = text(lo)
    return t, tok.count(t)


def cmd_workload(a):
    tok = Tokenizer(a.tokenize_url, a.model)
    sessions = []
    lo, hi = a.user_tokens
    for s in range(a.sessions):
        rng = random.Random(f"{a.seed}/system/{s}")
        sys_text, sys_n = text_of_tokens(
            tok, rng, a.system_tokens,
            prefix=f"Session {s:03d}. You are a concise assistant; answer in one short paragraph. Context: ")
        turns = []
        for t in range(a.turns):
            rng = random.Random(f"{a.seed}/user/{s}/{t}")
            target = rng.randint(lo, hi)
            q = QUESTIONS[rng.randrange(len(QUESTIONS))]
            body, n = text_of_tokens(tok, rng, max(1, target - tok.count(" " + q)))
            msg = body + " " + q
            think = 0.0
            # A deterministic third of the sessions pause longer than the engines' 5 s keep-alive
            # before their 3rd and 5th turns (where a stale pooled connection would show up).
            if a.think_secs > 0 and s % 3 == 2 and t in (2, 4):
                think = a.think_secs
            turns.append({"user": msg, "user_tokens": tok.count(msg), "target_tokens": target,
                          "think_before_s": think})
        sessions.append({"session": s, "system": sys_text, "system_tokens": sys_n, "turns": turns})
    out = {
        "seed": a.seed, "sessions": a.sessions, "turns": a.turns, "user_tokens": [lo, hi],
        "system_tokens": a.system_tokens, "think_secs": a.think_secs,
        "tokenizer": tok.kind or "estimate (1.3 tokens per word)",
        "items": sessions,
    }
    write_json(a.out, out)
    ut = [t["user_tokens"] for s in sessions for t in s["turns"]]
    print(f"workload: {a.sessions} sessions x {a.turns} turns, user messages {min(ut)}-{max(ut)} "
          f"tokens (mean {mean(ut):.0f}), system prompts ~{a.system_tokens} tokens, "
          f"tokenizer: {out['tokenizer']}")


# ------------------------------------------------------------------ drive


async def run_session(client, a, sess, emit):
    import openai

    messages = [{"role": "system", "content": sess["system"]}]
    for t, turn in enumerate(sess["turns"]):
        if turn["think_before_s"] > 0:
            await asyncio.sleep(turn["think_before_s"])
        messages.append({"role": "user", "content": turn["user"]})
        rec = {"label": a.label, "session": sess["session"], "turn": t,
               "think_before_s": turn["think_before_s"], "n_messages": len(messages)}
        reply = []
        first_chunk = first_token = None
        gaps = []
        last = None
        usage = None
        timings = None
        model = None
        endpoint = None
        status = None
        t_wall = time.time()
        t0 = time.perf_counter()
        try:
            async with client.chat.completions.with_streaming_response.create(
                model=a.model, messages=messages, max_tokens=a.max_tokens, temperature=0,
                seed=a.seed, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            ) as resp:
                status = resp.status_code
                endpoint = resp.headers.get("x-llm-lb-endpoint")
                async for chunk in await resp.parse():
                    now = time.perf_counter()
                    if first_chunk is None:
                        first_chunk = now
                    model = chunk.model or model
                    if chunk.choices:
                        piece = chunk.choices[0].delta.content
                        if piece:
                            if first_token is None:
                                first_token = now
                            else:
                                gaps.append(now - last)
                            last = now
                            reply.append(piece)
                    if chunk.usage is not None:
                        usage = chunk.usage
                    extra = getattr(chunk, "model_extra", None) or {}
                    if extra.get("timings"):
                        timings = extra["timings"]
            ok = first_token is not None and usage is not None
            err = None if ok else "stream ended without tokens or usage"
        except openai.APIStatusError as e:
            ok, err, status = False, f"HTTP {e.status_code}: {str(e)[:300]}", e.status_code
        except Exception as e:  # connection errors, timeouts, protocol errors
            ok, err = False, f"{type(e).__name__}: {str(e)[:300]}"
        t_end = time.perf_counter()
        text = "".join(reply)
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        rec.update({
            "ok": ok, "error": err, "status": status,
            "start": t_wall, "end": t_wall + (t_end - t0),
            "ttft_ms": (first_token - t0) * 1000 if first_token else None,
            "ttfb_ms": (first_chunk - t0) * 1000 if first_chunk else None,
            "latency_ms": (t_end - t0) * 1000,
            "itl_mean_ms": 1000 * statistics.fmean(gaps) if gaps else None,
            "itl_max_ms": 1000 * max(gaps) if gaps else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if usage else None,
            "model": model, "endpoint": endpoint, "engine_timings": timings,
            "reply": text,
        })
        emit(rec)
        # A failed turn still lets the session go on (with a placeholder answer), so one error
        # does not hide the rest of the workload; failures are counted, and must be 0.
        messages.append({"role": "assistant", "content": text if ok else "(no answer)"})


def cmd_drive(a):
    # The asyncio client: the sync one (openai 3.54) stops reading at `data: [DONE]` and closes
    # the connection before the chunked body's terminator arrives, so a proxy sees most
    # streams cut short by the client ("downstream connection closed") and every request opens
    # a new connection. The async client drains the body and keeps its connections alive.
    from openai import AsyncOpenAI

    wl = json.load(open(a.workload))
    out = open(a.out, "w")
    n_done = [0]
    n_fail = [0]
    total = sum(len(s["turns"]) for s in wl["items"])

    def emit(rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()
        n_done[0] += 1
        if not rec["ok"]:
            n_fail[0] += 1
            print(f"  request failed: session {rec['session']} turn {rec['turn']}: "
                  f"{rec['error']}", file=sys.stderr)

    async def main():
        todo = asyncio.Queue()
        for s in wl["items"]:
            todo.put_nowait(s)

        async def worker():
            # One client (one connection pool) per simulated user, no client-side retries: a
            # failure is the router's or the engine's, and is counted.
            client = AsyncOpenAI(base_url=a.url.rstrip("/") + "/v1", api_key="none",
                                 max_retries=0, timeout=a.timeout)
            try:
                while True:
                    try:
                        s = todo.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await run_session(client, a, s, emit)
            finally:
                await client.close()

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))

    t0 = time.time()
    asyncio.run(main())
    out.close()
    print(f"  {n_done[0]}/{total} requests in {time.time() - t0:.1f} s, {n_fail[0]} failed")


# ------------------------------------------------------------------ metrics

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


def parse_metrics(text):
    """Sum of every sample of each metric name (labels added up)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


def cmd_scrape(a):
    snap = {"time": time.time(), "engines": {}}
    for url in a.urls:
        try:
            text = http_text(url.rstrip("/") + a.path)
            snap["engines"][url] = {"ok": True, "metrics": parse_metrics(text)}
        except Exception as e:
            snap["engines"][url] = {"ok": False, "error": str(e)}
    write_json(a.out, snap)


COUNTERS = {
    # engine family: (cached tokens, uncached/processed tokens) or (hits, queries)
    "llamacpp": ("llamacpp:prompt_tokens_cached_total", "llamacpp:prompt_tokens_total"),
    "vllm": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
}


def engine_hits(before, after):
    """Fleet hit rate from the engines' own counters, delta over the run, summed over engines."""
    per = {}
    fam = None
    hit_sum = den_sum = 0.0
    for url, b in before["engines"].items():
        aft = after["engines"].get(url, {})
        if not (b.get("ok") and aft.get("ok")):
            return None, None, per
        mb, ma = b["metrics"], aft["metrics"]
        d = lambda k: ma.get(k, 0.0) - mb.get(k, 0.0)  # noqa: E731
        if COUNTERS["llamacpp"][0] in ma:
            fam = "llamacpp"
            cached, processed = d(COUNTERS["llamacpp"][0]), d(COUNTERS["llamacpp"][1])
            hits, den = cached, cached + processed
            per[url] = {"cached": cached, "processed": processed,
                        "predicted": d("llamacpp:tokens_predicted_total")}
        elif COUNTERS["vllm"][0] in ma:
            fam = "vllm"
            hits, den = d(COUNTERS["vllm"][0]), d(COUNTERS["vllm"][1])
            per[url] = {"hits": hits, "queries": den}
        else:
            return None, None, per  # e.g. SGLang: no cumulative prefix-cache counter
        hit_sum += hits
        den_sum += den
    return (hit_sum / den_sum if den_sum else None), fam, per


# ------------------------------------------------------------------ oracle


def lcp(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def oracle_usage(recs):
    """Per request: what a perfect router with an unbounded cache could reuse, from usage alone:
    0 for a first turn; otherwise the previous turn's prompt + all its generated tokens but the
    last (whose KV is never computed), at most prompt - 1 (an engine always computes the last
    prompt token)."""
    by = {(r["session"], r["turn"]): r for r in recs}
    out = {}
    for r in recs:
        if not r["ok"]:
            continue
        prev = by.get((r["session"], r["turn"] - 1))
        if r["turn"] == 0 or not prev or not prev["ok"]:
            out[(r["session"], r["turn"])] = 0
        else:
            out[(r["session"], r["turn"])] = min(
                r["prompt_tokens"] - 1, prev["prompt_tokens"] + prev["completion_tokens"] - 1)
    return out


def rebuild_messages(wl, recs):
    by = {(r["session"], r["turn"]): r for r in recs}
    msgs = {}
    for s in wl["items"]:
        m = [{"role": "system", "content": s["system"]}]
        for t, turn in enumerate(s["turns"]):
            m = m + [{"role": "user", "content": turn["user"]}]
            msgs[(s["session"], t)] = m
            r = by.get((s["session"], t))
            reply = r["reply"] if r and r["ok"] else "(no answer)"
            m = m + [{"role": "assistant", "content": reply}]
    return msgs


def oracle_tokens(engine, wl, recs):
    """Token-exact oracle (llama.cpp engines: /apply-template + /tokenize): for each request r,
    the longest common prefix of its prompt tokens with the tokens some request that had
    finished before r started left in an (unbounded) cache -- that request's prompt followed by
    its generated tokens but the last (approximated by re-tokenising the reply text) -- at most
    len(prompt) - 1. Any request of any session counts, so shared template tokens do too."""
    msgs = rebuild_messages(wl, recs)
    ok = [r for r in recs if r["ok"]]
    toks, evald = {}, {}
    mismatch = 0
    for r in ok:
        key = (r["session"], r["turn"])
        prompt = http_json(engine + "/apply-template", {"messages": msgs[key]})["prompt"]
        t = http_json(engine + "/tokenize", {"content": prompt, "add_special": True})["tokens"]
        if len(t) != r["prompt_tokens"]:
            mismatch += 1
        toks[key] = t
        gen = http_json(engine + "/tokenize", {"content": r["reply"], "parse_special": False})["tokens"]
        evald[key] = t + gen[: max(0, r["completion_tokens"] - 1)]
    out = {}
    for r in ok:
        key = (r["session"], r["turn"])
        best = 0
        for q in ok:
            if q["end"] <= r["start"]:
                best = max(best, lcp(toks[key], evald[(q["session"], q["turn"])]))
        out[key] = min(best, len(toks[key]) - 1)
    return out, mismatch


# ------------------------------------------------------------------ router logs

KV = re.compile(r"(\w+)=(\S*)")


def parse_llmlb_log(path):
    """llm-lb's access log (target llm_lb::access): key=value pairs per request."""
    out = {"requests": 0, "attempts_gt1": 0, "reconnects_gt0": 0, "by_endpoint": {},
           "by_reason": {}, "by_status": {}, "errors": {}, "retried": []}
    if not path or not os.path.exists(path):
        return None
    warn = []
    for line in open(path, errors="replace"):
        if " WARN " in line or " ERROR " in line:
            warn.append(line.strip()[:400])
        if "llm_lb::access]" not in line:
            continue
        f = dict(KV.findall(line.split("llm_lb::access]", 1)[1]))
        if f.get("path") != "/v1/chat/completions":
            continue
        out["requests"] += 1
        for key, name in (("endpoint", "by_endpoint"), ("reason", "by_reason"), ("status", "by_status")):
            out[name][f.get(key, "?")] = out[name].get(f.get(key, "?"), 0) + 1
        if f.get("error", "-") != "-":
            out["errors"][f["error"]] = out["errors"].get(f["error"], 0) + 1
        if int(f.get("attempts", "1")) > 1:
            out["attempts_gt1"] += 1
            out["retried"].append(line.strip()[-400:])
        if int(f.get("reconnects", "0") or 0) > 0:
            out["reconnects_gt0"] += 1
    out["warn_lines"] = len(warn)
    out["warn_sample"] = warn[:10]
    return out


# ------------------------------------------------------------------ collect


def ttft_stats(values):
    return {"n": len(values), "mean": mean(values), "p50": pctl(values, 50), "p90": pctl(values, 90),
            "max": max(values) if values else None}


def cmd_collect(a):
    recs = [json.loads(l) for l in open(a.requests) if l.strip()]
    wl = json.load(open(a.workload))
    before, after = json.load(open(a.metrics_before)), json.load(open(a.metrics_after))
    expected = sum(len(s["turns"]) for s in wl["items"])
    ok = [r for r in recs if r["ok"]]
    failed = len(recs) - len(ok) + max(0, expected - len(recs))
    first = [r["ttft_ms"] for r in ok if r["turn"] == 0]
    later = [r["ttft_ms"] for r in ok if r["turn"] > 0]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    hit_engine, family, per_engine = engine_hits(before, after)
    ou = oracle_usage(recs)
    ot, mismatch = (None, None)
    if a.oracle_engine:
        try:
            ot, mismatch = oracle_tokens(a.oracle_engine.rstrip("/"), wl, recs)
        except Exception as e:
            print(f"  token oracle unavailable: {e}", file=sys.stderr)
    # Which engine served each request: llm-lb's x-llm-lb-endpoint header, else (local fleet
    # only, --identify-by-model) the `model` the engine answered with: bench-real.sh gives each
    # llama-server its own alias. Otherwise unknown per request; the per-engine request counts
    # then come from vllm:request_success_total when the engines export it.
    def served_by(r):
        return r.get("endpoint") or (r.get("model") if a.identify_by_model else None)

    dist = {}
    same = moves = 0
    if ok and all(served_by(r) for r in ok):
        for r in ok:
            dist[served_by(r)] = dist.get(served_by(r), 0) + 1
        by = {(r["session"], r["turn"]): r for r in ok}
        for r in ok:
            p = by.get((r["session"], r["turn"] - 1))
            if r["turn"] > 0 and p:
                if served_by(p) == served_by(r):
                    same += 1
                else:
                    moves += 1
    else:
        for url, b in before["engines"].items():
            m_b = b.get("metrics", {})
            m_a = after["engines"].get(url, {}).get("metrics", {})
            if "vllm:request_success_total" in m_a:
                dist[url] = round(m_a["vllm:request_success_total"]
                                  - m_b.get("vllm:request_success_total", 0.0))
        if dist and sum(dist.values()) == 0:
            dist = {}
    # Client TTFT minus the engine's own prompt-processing time (llama.cpp `timings.prompt_ms`):
    # the router's hop plus any wait inside the engine before this prompt's processing started.
    waits = [r["ttft_ms"] - r["engine_timings"]["prompt_ms"] for r in ok
             if (r.get("engine_timings") or {}).get("prompt_ms") is not None]
    processed_engine = None
    if family == "llamacpp":
        processed_engine = sum(v["processed"] for v in per_engine.values())
    run = {
        "label": a.label, "router": a.router, "round": a.round, "order": a.order,
        "engines_restarted": a.engines_restarted,
        "wall_s": a.wall_end - a.wall_start,
        "requests": len(recs), "expected": expected, "failed": failed,
        "errors": sorted({r["error"] for r in recs if not r["ok"]}),
        "ttft_first_ms": ttft_stats(first), "ttft_later_ms": ttft_stats(later),
        "ttft_all_ms": ttft_stats(first + later),
        "latency_mean_ms": mean([r["latency_ms"] for r in ok]),
        "itl_mean_ms": mean([r["itl_mean_ms"] for r in ok]),
        "itl_max_ms": max([r["itl_max_ms"] or 0 for r in ok]) if ok else None,
        "ttft_minus_engine_prompt_ms": {"p50": pctl(waits, 50), "p90": pctl(waits, 90),
                                        "max": max(waits) if waits else None} if waits else None,
        "prompt_tokens": prompt, "cached_tokens_usage": cached,
        "completion_tokens": sum(r["completion_tokens"] for r in ok),
        "hit_rate_engine": hit_engine, "engine_counter_family": family,
        "per_engine_counters": per_engine,
        "processed_tokens_engine": processed_engine,
        "uncached_tokens_usage": prompt - cached,
        "hit_rate_usage": cached / prompt if prompt else None,
        "oracle_usage": sum(ou.values()) / prompt if prompt else None,
        "oracle_tokens": (sum(ot.values()) / prompt) if (ot and prompt) else None,
        "oracle_token_count_mismatches": mismatch,
        "distribution": dict(sorted(dist.items())),
        "busiest_share": max(dist.values()) / sum(dist.values()) if dist else None,
        "later_turns_same_endpoint": same / (same + moves) if same + moves else None,
        "llmlb": parse_llmlb_log(a.router_log) if a.router.startswith("llm-lb") else None,
        "loadavg_start": a.loadavg_start, "loadavg_end": a.loadavg_end,
    }
    write_json(a.out, run)
    ll = run["llmlb"]
    print(f"  hit rate {fmt_pct(run['hit_rate_engine'])} (usage {fmt_pct(run['hit_rate_usage'])}, "
          f"oracle {fmt_pct(run['oracle_tokens'] or run['oracle_usage'])}) | TTFT first "
          f"{fmt_ms(run['ttft_first_ms']['mean'])}, later {fmt_ms(run['ttft_later_ms']['mean'])} | "
          f"wall {run['wall_s']:.1f} s | failed {failed} | sticky {fmt_pct(run['later_turns_same_endpoint'])}"
          + (f" | attempts>1: {ll['attempts_gt1']}" if ll else "")
          + f" | {run['distribution']}")


def cmd_recollect(a):
    """Recompute every run.json of DIR/runs from its raw files (after a change to `collect`)."""
    meta = json.load(open(os.path.join(a.dir, "meta.json")))
    for d in sorted(glob.glob(os.path.join(a.dir, "runs", "*-r*"))):
        old = json.load(open(os.path.join(d, "run.json")))
        ns = argparse.Namespace(
            requests=os.path.join(d, "requests.jsonl"), workload=os.path.join(a.dir, "workload.json"),
            metrics_before=os.path.join(d, "metrics-before.json"),
            metrics_after=os.path.join(d, "metrics-after.json"), out=os.path.join(d, "run.json"),
            label=old["label"], router=old["router"], router_log=os.path.join(d, "router-log.txt"),
            oracle_engine=a.oracle_engine, round=old["round"], order=old["order"],
            engines_restarted=old["engines_restarted"], identify_by_model=not meta.get("external"),
            wall_start=0.0, wall_end=old["wall_s"], loadavg_start=old.get("loadavg_start", ""),
            loadavg_end=old.get("loadavg_end", ""))
        print(os.path.basename(d))
        cmd_collect(ns)


def fmt_pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def fmt_ms(v):
    return "–" if v is None else f"{v:.0f} ms"


# ------------------------------------------------------------------ summarize

ORDER = ["round_robin", "random", "global_least_request", "prefix_cache", "least_busy", "sglang"]
TITLE = {"sglang": "SGLang cache_aware"}

METRICS = [
    # key, title, getter, kind
    ("hit_engine", "hit rate (engine counters)", lambda r: r["hit_rate_engine"], "pct"),
    ("hit_usage", "hit rate (usage cached_tokens)", lambda r: r["hit_rate_usage"], "pct"),
    ("oracle", "oracle bound", lambda r: r["oracle_tokens"] if r["oracle_tokens"] is not None
     else r["oracle_usage"], "pct"),
    ("ttft_first_mean", "TTFT turn 1 mean (ms)", lambda r: r["ttft_first_ms"]["mean"], "ms"),
    ("ttft_first_p50", "TTFT turn 1 p50 (ms)", lambda r: r["ttft_first_ms"]["p50"], "ms"),
    ("ttft_first_p90", "TTFT turn 1 p90 (ms)", lambda r: r["ttft_first_ms"]["p90"], "ms"),
    ("ttft_later_mean", "TTFT turns 2+ mean (ms)", lambda r: r["ttft_later_ms"]["mean"], "ms"),
    ("ttft_later_p50", "TTFT turns 2+ p50 (ms)", lambda r: r["ttft_later_ms"]["p50"], "ms"),
    ("ttft_later_p90", "TTFT turns 2+ p90 (ms)", lambda r: r["ttft_later_ms"]["p90"], "ms"),
    ("ttft_wait_p50", "TTFT − engine prompt time p50 (ms)", lambda r: (r.get("ttft_minus_engine_prompt_ms")
     or {}).get("p50"), "ms1"),
    ("wall", "wall time (s)", lambda r: r["wall_s"], "s"),
    ("failed", "failed requests", lambda r: r["failed"], "n"),
    ("attempts_gt1", "requests with attempts>1", lambda r: r["llmlb"]["attempts_gt1"]
     if r.get("llmlb") else None, "n"),
    ("reconnects_gt0", "requests with reconnects>0", lambda r: r["llmlb"].get("reconnects_gt0")
     if r.get("llmlb") else None, "n"),
    ("sticky", "later turns on the previous turn's engine", lambda r: r["later_turns_same_endpoint"], "pct"),
    ("busiest", "busiest engine's share", lambda r: r["busiest_share"], "pct"),
]


def fmt_val(v, kind):
    if v is None:
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "ms":
        return f"{v:,.0f}"
    if kind == "s":
        return f"{v:.1f}"
    if kind == "ms1":
        return f"{v:.0f}"
    return f"{v:g}"


def cell(vals, kind):
    v = [x for x in vals if x is not None]
    if not v:
        return "–"
    med = statistics.median(v)
    if len(v) == 1 or kind == "n" and min(v) == max(v):
        return fmt_val(med, kind)
    return f"{fmt_val(med, kind)} ({fmt_val(min(v), kind)}–{fmt_val(max(v), kind)})"


def cmd_summarize(a):
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.dir, "runs", "*", "run.json")))]
    if not runs:
        sys.exit("no runs to summarize")
    meta = json.load(open(a.meta)) if a.meta else {}
    labels = sorted({r["label"] for r in runs}, key=lambda l: (ORDER.index(l) if l in ORDER else 99, l))
    med = {}
    table = {}
    for l in labels:
        rs = [r for r in runs if r["label"] == l]
        med[l] = {}
        table[l] = {"runs": len(rs)}
        for key, _, get, kind in METRICS:
            vals = [get(r) for r in rs]
            v = [x for x in vals if x is not None]
            med[l][key] = statistics.median(v) if v else None
            table[l][key] = {"median": med[l][key], "min": min(v) if v else None,
                             "max": max(v) if v else None, "values": vals}
    ratios = {}
    for base in ("round_robin", "sglang"):
        if base not in med:
            continue
        for l in labels:
            for key in ("ttft_first_mean", "ttft_later_mean", "ttft_later_p90", "wall"):
                b, v = med[base].get(key), med[l].get(key)
                if b and v is not None:
                    ratios.setdefault(l, {})[f"{key}_vs_{base}"] = v / b
    summary = {"meta": meta, "routers": table, "ratios_of_medians": ratios,
               "runs": [{k: r[k] for k in ("label", "round", "order", "wall_s", "failed")} for r in runs]}
    write_json(os.path.join(a.dir, "summary.json"), summary)
    with open(os.path.join(a.dir, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["commit", meta.get("commit"), "date", meta.get("date"), "machine", meta.get("machine")])
        w.writerow(["command", meta.get("command")])
        w.writerow(["router", "runs"] + [f"{k}_{s}" for k, *_ in METRICS for s in ("median", "min", "max")]
                   + ["ttft_later_mean_vs_round_robin", "ttft_later_mean_vs_sglang"])
        for l in labels:
            row = [l, table[l]["runs"]]
            for key, *_ in METRICS:
                t = table[l][key]
                row += [t["median"], t["min"], t["max"]]
            row += [ratios.get(l, {}).get("ttft_later_mean_vs_round_robin"),
                    ratios.get(l, {}).get("ttft_later_mean_vs_sglang")]
            w.writerow(row)
    # Markdown table: medians with (min–max) over the rounds, ratios of medians.
    head = "| metric | " + " | ".join(TITLE.get(l, l) for l in labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]
    for key, title, get, kind in METRICS:
        if all(table[l][key]["median"] is None for l in labels):
            continue
        cells = []
        for l in labels:
            c = cell(table[l][key]["values"], kind)
            cells.append(c)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for base, name in (("round_robin", "round_robin"), ("sglang", "SGLang")):
        if base not in med:
            continue
        for key, title in (("ttft_later_mean", "TTFT turns 2+ mean"), ("wall", "wall time")):
            cells = [f"×{ratios[l][f'{key}_vs_{base}']:.2f}" if f"{key}_vs_{base}" in ratios.get(l, {})
                     else "–" for l in labels]
            lines.append(f"| {title} vs {name} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    with open(os.path.join(a.dir, "summary.md"), "w") as f:
        f.write(f"<!-- {meta.get('command', '')} -->\n{md}\n")
    print()
    print(f"commit {meta.get('commit')} | {meta.get('machine')} | {meta.get('date')}")
    print(f"medians over {max(t['runs'] for t in table.values())} round(s), (min–max) in brackets")
    print(md)


# ------------------------------------------------------------------ main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("workload")
    w.add_argument("--tokenize-url", default="")
    w.add_argument("--model", default="")
    w.add_argument("--sessions", type=int, required=True)
    w.add_argument("--turns", type=int, required=True)
    w.add_argument("--user-tokens", type=lambda s: tuple(int(x) for x in s.split("-")), default=(150, 250))
    w.add_argument("--system-tokens", type=int, default=100)
    w.add_argument("--think-secs", type=float, default=6.0)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--out", required=True)

    d = sub.add_parser("drive")
    d.add_argument("--url", required=True)
    d.add_argument("--model", required=True)
    d.add_argument("--workload", required=True)
    d.add_argument("--concurrency", type=int, default=4)
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--timeout", type=float, default=600)
    d.add_argument("--label", default="")
    d.add_argument("--out", required=True)

    s = sub.add_parser("scrape")
    s.add_argument("--path", default="/metrics")
    s.add_argument("--out", required=True)
    s.add_argument("urls", nargs="+")

    c = sub.add_parser("collect")
    for k in ("requests", "workload", "metrics-before", "metrics-after", "out", "label", "router"):
        c.add_argument("--" + k, required=True)
    c.add_argument("--router-log", default="")
    c.add_argument("--oracle-engine", default="")
    c.add_argument("--round", type=int, default=1)
    c.add_argument("--order", type=int, default=0)
    c.add_argument("--engines-restarted", type=int, default=1)
    c.add_argument("--identify-by-model", action="store_true")
    c.add_argument("--wall-start", type=float, required=True)
    c.add_argument("--loadavg-start", default="")
    c.add_argument("--loadavg-end", default="")
    c.add_argument("--wall-end", type=float, required=True)

    rc = sub.add_parser("recollect")
    rc.add_argument("--dir", required=True)
    rc.add_argument("--oracle-engine", default="")

    m = sub.add_parser("summarize")
    m.add_argument("--dir", required=True)
    m.add_argument("--meta", default="")

    a = p.parse_args()
    {"workload": cmd_workload, "drive": cmd_drive, "scrape": cmd_scrape, "collect": cmd_collect,
     "summarize": cmd_summarize, "recollect": cmd_recollect}[a.cmd](a)


if __name__ == "__main__":
    main()
