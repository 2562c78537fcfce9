#!/usr/bin/env python3
"""Overload benchmark of the waiting room (helper of scripts/bench-admission.sh).

Subcommands:

  drive      open-loop Poisson arrivals of several traffic classes (band, tenant, rate) through
             llm-lb for a fixed time, streaming completions; every request is recorded
             (requests.jsonl) and the engines' waiting queues are sampled (queues.jsonl)
  collect    one run's raw files and llm-lb's /metrics -> run.json
  summarize  every run.json -> summary.json, summary.md (spread over repeats); prints the table

Standard library and httpx only.
"""
import argparse
import asyncio
import glob
import json
import os
import random
import re
import statistics
import sys
import time

import httpx

# band, tenant, requests per second
CLASSES = [
    ("critical", "ops", 1.5),
    ("standard", "tenant-a", 14.0),
    ("standard", "tenant-b", 10.0),
    ("sheddable", "batch", 6.0),
]


async def one(client, url, model, band, tenant, tokens, out, t0):
    start = time.monotonic()
    rec = {"band": band, "tenant": tenant, "start": start - t0}
    body = {"model": model, "prompt": f"{tenant} {random.random()}", "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    headers = {"x-llm-lb-priority": band, "x-tenant-id": tenant}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            rec["status"] = r.status_code
            first = None
            async for chunk in r.aiter_bytes():
                if first is None and chunk:
                    first = time.monotonic()
            end = time.monotonic()
            rec["ttft"] = (first or end) - start
            rec["latency"] = end - start
    except httpx.HTTPError as e:
        rec["status"] = 0
        rec["error"] = type(e).__name__
        rec["latency"] = time.monotonic() - start
    out.append(rec)


async def sample_queues(engines, stop, out, t0):
    async with httpx.AsyncClient(timeout=2) as c:
        while not stop.is_set():
            row = {"t": time.monotonic() - t0}
            for e in engines:
                try:
                    text = (await c.get(f"http://{e}/metrics")).text
                    m = re.search(r'^vllm:num_requests_waiting\{[^}]*\} ([0-9.e+]+)$', text, re.M)
                    row[e] = float(m.group(1)) if m else None
                except httpx.HTTPError:
                    row[e] = None
            out.append(row)
            await asyncio.sleep(0.25)


async def drive(args):
    random.seed(args.seed)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    records, queues = [], []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=500)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_queues(args.engines, stop, queues, t0))
        tasks = []

        async def arrivals(band, tenant, rate):
            rng = random.Random(f"{args.seed}-{band}-{tenant}")
            t = rng.expovariate(rate)
            while t < args.duration:
                await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
                tasks.append(asyncio.create_task(
                    one(client, url, args.model, band, tenant, args.tokens, records, t0)))
                t += rng.expovariate(rate)

        await asyncio.gather(*(arrivals(*c) for c in CLASSES))
        await asyncio.gather(*tasks)
        stop.set()
        await sampler
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "requests.jsonl"), "w") as f:
        for r in sorted(records, key=lambda r: r["start"]):
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "queues.jsonl"), "w") as f:
        for q in queues:
            f.write(json.dumps(q) + "\n")


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def water_fill(total, demands):
    """Max-min fair split of `total` among `demands` (tenant -> demand)."""
    fair, left, open_ = {}, total, dict(demands)
    while open_:
        share = left / len(open_)
        small = {t: d for t, d in open_.items() if d <= share}
        if not small:
            for t in open_:
                fair[t] = share
            break
        for t, d in small.items():
            fair[t] = d
            left -= d
            del open_[t]
    return fair


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 90.0, 120.0)


def samples(metrics, name, band):
    """(labels, value) of every sample of `name` whose band is `band`."""
    return [(m.group(1), float(m.group(2)))
            for m in re.finditer(rf'^{name}\{{([^}}]*band="{band}"[^}}]*)\}} (\S+)$', metrics, re.M)]


def collect(args):
    recs = [json.loads(l) for l in open(os.path.join(args.run, "requests.jsonl"))]
    queues = [json.loads(l) for l in open(os.path.join(args.run, "queues.jsonl"))]
    metrics = open(os.path.join(args.run, "llmlb-metrics.txt")).read() if os.path.exists(
        os.path.join(args.run, "llmlb-metrics.txt")) else ""
    duration = args.duration
    deadlines = json.loads(args.deadlines)
    out = {"config": args.config, "classes": {}, "bands": {}}
    for band, tenant, rate in CLASSES:
        rs = [r for r in recs if r["band"] == band and r["tenant"] == tenant]
        ok = [r for r in rs if r.get("status") == 200]
        refused = [r for r in rs if r.get("status") in (429, 503)]
        failed = [r for r in rs if r.get("status") not in (200, 429, 503)]
        out["classes"][f"{band}/{tenant}"] = {
            "band": band, "tenant": tenant, "offered_rps": rate, "sent": len(rs), "ok": len(ok),
            "refused": len(refused), "failed": len(failed),
            "goodput_rps": len(ok) / duration,
            "ttft_p50": pct([r["ttft"] for r in ok], 50),
            "ttft_p99": pct([r["ttft"] for r in ok], 99),
            "latency_p99": pct([r["latency"] for r in ok], 99),
            "refused_latency_max": max((r["latency"] for r in refused), default=None),
        }
    for band in ("critical", "standard", "sheddable"):
        cls = {k: v for k, v in out["classes"].items() if v["band"] == band}
        goodput = sum(v["goodput_rps"] for v in cls.values())
        # Each tenant's demand is what it sent (Poisson arrivals vary around the offered rate).
        demands = {v["tenant"]: v["sent"] / duration for v in cls.values()}
        fair = water_fill(goodput, demands)
        dev = max((abs(v["goodput_rps"] - fair[v["tenant"]]) / fair[v["tenant"]]
                   for v in cls.values() if fair[v["tenant"]] > 0), default=0.0)
        refused_max = max((v["refused_latency_max"] or 0) for v in cls.values())
        # Waits past the deadline, from llm-lb's histogram (none without a waiting room): the
        # observations above the first bucket at or past 1.05 x the deadline (a refusal at the
        # deadline itself is not past it).
        over = None
        counts = samples(metrics, "llmlb_queue_wait_seconds_count", band)
        if counts:
            bucket = min(b for b in BUCKETS if b >= 1.05 * deadlines[band])
            within = sum(v for labels, v in samples(metrics, "llmlb_queue_wait_seconds_bucket", band)
                         if float(re.search(r'le="([^"]+)"', labels).group(1)) == bucket)
            over = sum(v for _, v in counts) - within
        out["bands"][band] = {"goodput_rps": goodput, "fair_share_max_deviation": dev,
                              "refused": sum(v["refused"] for v in cls.values()),
                              "refused_latency_max": refused_max, "waits_past_deadline": over}
    waiting = [v for q in queues for k, v in q.items() if k != "t" and v is not None]
    out["engine_waiting_max"] = max(waiting, default=None)
    out["engine_waiting_mean"] = statistics.mean(waiting) if waiting else None
    json.dump(out, open(os.path.join(args.run, "run.json"), "w"), indent=1)


def fmt(x, unit=""):
    if x is None:
        return "-"
    return f"{x:.2f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi, mid = min(values), max(values), statistics.median(values)
    return f"{mid:.2f} ({lo:.2f}–{hi:.2f})"


def summarize(args):
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(args.results, "*", "run.json")))]
    by_config = {}
    for r in runs:
        by_config.setdefault(r["config"], []).append(r)
    lines = [args.header, "",
             "| config | class | offered req/s | sent | served | refused | TTFT p50 s | TTFT p99 s |",
             "|---|---|---|---|---|---|---|---|"]
    for config, rs in by_config.items():
        for cls in rs[0]["classes"]:
            v = [r["classes"][cls] for r in rs]
            lines.append(f"| {config} | {cls} | {v[0]['offered_rps']} | {spread([float(x['sent']) for x in v])} "
                         f"| {spread([float(x['ok']) for x in v])} "
                         f"| {spread([float(x['refused']) for x in v])} | {spread([x['ttft_p50'] for x in v])} "
                         f"| {spread([x['ttft_p99'] for x in v])} |")
    lines += ["", "| config | band | fair-share deviation | waits past deadline | longest refusal s | engine queue max | engine queue mean |",
              "|---|---|---|---|---|---|---|"]
    for config, rs in by_config.items():
        for band in ("critical", "standard", "sheddable"):
            b = [r["bands"][band] for r in rs]
            lines.append(f"| {config} | {band} | {spread([x['fair_share_max_deviation'] for x in b])} "
                         f"| {spread([x['waits_past_deadline'] for x in b])} "
                         f"| {spread([x['refused_latency_max'] for x in b])} "
                         f"| {spread([r['engine_waiting_max'] for r in rs])} | {spread([r['engine_waiting_mean'] for r in rs])} |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(args.results, "summary.md"), "w").write(text)
    json.dump(runs, open(os.path.join(args.results, "summary.json"), "w"), indent=1)
    print(text)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--model", required=True)
    d.add_argument("--engines", nargs="+", required=True)
    d.add_argument("--duration", type=float, default=30)
    d.add_argument("--tokens", type=int, default=60)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--run", required=True)
    c.add_argument("--config", required=True)
    c.add_argument("--duration", type=float, default=30)
    c.add_argument("--deadlines", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--results", required=True)
    s.add_argument("--header", default="")
    args = p.parse_args()
    if args.cmd == "drive":
        asyncio.run(drive(args))
    elif args.cmd == "collect":
        collect(args)
    else:
        summarize(args)


if __name__ == "__main__":
    sys.exit(main())
