#!/usr/bin/env bash
# The main job, end to end: three simulated vLLM servers, llm-lb in front of them (embedded state,
# no Redis), and a multi-turn conversation played through it. For each turn it shows which server
# answered and how much of the prompt that server served from its prefix cache.
#
#   ./scripts/demo.sh                            # prefix_cache
#   DEMO_POLICY=round_robin ./scripts/demo.sh    # another lb_policy, to compare
#   DEMO_PORT_BASE=28000 ./scripts/demo.sh  # other ports (uses BASE+1..3, BASE+80, BASE+91)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"

POLICY="${DEMO_POLICY:-prefix_cache}"
BASE="${DEMO_PORT_BASE:-18000}"
MODEL="demo/llama-3.1-8b"
LB_PORT=$((BASE + 80))
ADMIN_PORT=$((BASE + 91))

ensure_packages
ensure_rust
step "building llm-lb and vllm-sim (release; the first build takes a few minutes)"
cargo build --release -q -p llm-lb -p vllm-sim

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step "starting three simulated vLLM servers"
ENDPOINTS=""
for i in 1 2 3; do
    port=$((BASE + i))
    ./target/release/vllm-sim --host 127.0.0.1 --port "$port" --model "$MODEL" \
        --time-scale 0.2 --seed "$i" >"$WORK/sim$i.log" 2>&1 &
    PIDS+=($!)
    ENDPOINTS="$ENDPOINTS\"127.0.0.1:$port\", "
    echo "  vllm-sim $i on 127.0.0.1:$port"
done
for i in 1 2 3; do wait_port $((BASE + i)) 30; done

cat >"$WORK/policy.yaml" <<YAML
listen: 127.0.0.1:$LB_PORT
admin: 127.0.0.1:$ADMIN_PORT
expose_endpoint_header: true
pools:
  - name: demo
    models: ["$MODEL"]
    endpoints: [${ENDPOINTS%, }]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    lb_policy: $POLICY
YAML
# A short grace period: on SIGTERM Pingora waits all of it before exiting (conf/pingora.yaml's
# 600 s is for generations that stream for minutes, not for a demo's clean-up).
sed -e "s#/tmp/llm-lb.pid#$WORK/llm-lb.pid#" -e "s#/tmp/llm-lb-upgrade.sock#$WORK/upgrade.sock#" \
    -e "s#grace_period_seconds: 600#grace_period_seconds: 1#" \
    -e "s#graceful_shutdown_timeout_seconds: 10#graceful_shutdown_timeout_seconds: 1#" \
    conf/pingora.yaml >"$WORK/pingora.yaml"

step "starting llm-lb (lb_policy: $POLICY, embedded state) on 127.0.0.1:$LB_PORT"
./target/release/llm-lb -c "$WORK/pingora.yaml" -p "$WORK/policy.yaml" >"$WORK/llm-lb.log" 2>&1 &
PIDS+=($!)
wait_port "$LB_PORT" 30

step "a 5-turn conversation through llm-lb"
python3 - "$LB_PORT" "$MODEL" "$BASE" <<'PY'
import json, sys, time, urllib.request

port, model, base = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
system = ("You are a meticulous assistant for a logistics company. Answer with numbered steps, cite "
          "the relevant policy section, and keep a friendly, concise tone. ") * 12
questions = [
    "Our warehouse in Lyon received a damaged pallet of ceramic tiles. What do we do first?",
    "The carrier says the damage happened during unloading. Who is liable?",
    "Draft a short claim message to the carrier with the facts so far.",
    "The customer wants a replacement by Friday. Which options do we have?",
    "Summarise everything we decided in this conversation as a checklist.",
]
messages = [{"role": "system", "content": system}]
print(f"{'turn':>4}  {'endpoint':<16} {'prompt':>7} {'cached':>7} {'cached%':>8} {'seconds':>8}")
for turn, q in enumerate(questions, 1):
    messages.append({"role": "user", "content": q})
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 120,
                       "stream": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"content-type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=60) as r:
        endpoint = r.headers.get("x-llm-lb-endpoint", "?")
        reply = json.load(r)
    dt = time.time() - t0
    usage = reply.get("usage", {})
    prompt = usage.get("prompt_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    pct = 100.0 * cached / prompt if prompt else 0.0
    print(f"{turn:>4}  {endpoint:<16} {prompt:>7} {cached:>7} {pct:>7.1f}% {dt:>8.2f}")
    messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})

def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total

hits = queries = 0.0
for i in (1, 2, 3):
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + i}/metrics", timeout=5).read().decode()
    hits += metric(text, "vllm:prefix_cache_hits_total")
    queries += metric(text, "vllm:prefix_cache_queries_total")
rate = 100.0 * hits / queries if queries else 0.0
print(f"\nfleet prefix-cache hit rate (from the simulators' counters): {rate:.1f}% "
      f"({int(hits)} of {int(queries)} prompt tokens)")
PY

step "llm-lb access log"
grep 'llm_lb::access' "$WORK/llm-lb.log" | sed 's/^.*llm_lb::access\] /  /' || true
echo
case "$POLICY" in
    round_robin | random)
        echo "Done. $POLICY spreads the turns over the servers, so most turns miss the cache that an"
        echo "earlier turn warmed on another server." ;;
    prefix_cache)
        echo "Done. prefix_cache keeps every turn on the server that holds the conversation, so each"
        echo "turn prefills only what is new. Compare: DEMO_POLICY=round_robin ./scripts/demo.sh" ;;
    *) echo "Done." ;;
esac
