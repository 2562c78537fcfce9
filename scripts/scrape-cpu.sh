#!/usr/bin/env bash
# What least_busy's scraping costs: llm-lb in front of three idle vllm-sim servers, no traffic,
# once with round_robin (health checks only) and once with least_busy scraping every endpoint's
# /metrics every 100 ms. Prints the CPU time (user + system, from /proc/<pid>/stat) llm-lb used
# over the same window for each, and the difference.
#
#   ./scripts/scrape-cpu.sh                                   # 30 s windows, release build
#   CPU_SECS=60 CPU_PROFILE=dev CPU_PORT_BASE=29000 ./scripts/scrape-cpu.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"

SECS="${CPU_SECS:-30}"
PROFILE="${CPU_PROFILE:-release}"
BASE="${CPU_PORT_BASE:-19000}"
MODEL="cpu/llama"
LB_PORT=$((BASE + 80))
ADMIN_PORT=$((BASE + 91))
BIN="target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
TICKS=$(getconf CLK_TCK)

ensure_rust
step "building llm-lb and vllm-sim ($PROFILE)"
cargo build --profile "$PROFILE" -q -p llm-lb -p vllm-sim

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ENDPOINTS=""
for i in 1 2 3; do
    port=$((BASE + i))
    "$BIN/vllm-sim" --host 127.0.0.1 --port "$port" --model "$MODEL" >"$WORK/sim$i.log" 2>&1 &
    PIDS+=($!)
    ENDPOINTS="$ENDPOINTS\"127.0.0.1:$port\", "
done
for i in 1 2 3; do wait_port $((BASE + i)) 30; done
sed -e "s#/tmp/llm-lb.pid#$WORK/llm-lb.pid#" -e "s#/tmp/llm-lb-upgrade.sock#$WORK/upgrade.sock#" \
    -e "s#graceful_shutdown_timeout_seconds: 10#graceful_shutdown_timeout_seconds: 1#" \
    -e "s#grace_period_seconds: 600#grace_period_seconds: 1#" \
    conf/pingora.yaml >"$WORK/pingora.yaml"

# CPU ticks (utime + stime) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Run llm-lb with $1 as lb_policy for $SECS seconds; print the CPU seconds it used.
measure() {
    cat >"$WORK/policy.yaml" <<YAML
listen: 127.0.0.1:$LB_PORT
admin: 127.0.0.1:$ADMIN_PORT
pools:
  - name: cpu
    models: ["*"]
    endpoints: [${ENDPOINTS%, }]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    metrics: {path: /metrics, interval_ms: 100}
    lb_policy: $1
YAML
    "$BIN/llm-lb" -c "$WORK/pingora.yaml" -p "$WORK/policy.yaml" >"$WORK/llm-lb-$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$LB_PORT" 30
    sleep 2
    if [ "$1" = least_busy ]; then
        local known
        known=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -c '^llmlb_endpoint_metrics_known{.*} 1$' || true)
        [ "$known" = 3 ] || { echo "expected 3 endpoints with known metrics, got $known" >&2; exit 1; }
    fi
    local t0 t1
    t0=$(ticks "$pid")
    sleep "$SECS"
    t1=$(ticks "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    sleep 1
    awk -v d=$((t1 - t0)) -v hz="$TICKS" 'BEGIN { printf "%.2f", d / hz }'
}

step "round_robin (no scraping), ${SECS} s"
RR=$(measure round_robin)
echo "  llm-lb used ${RR} s of CPU"
step "least_busy, 3 endpoints scraped every 100 ms, ${SECS} s"
LB=$(measure least_busy)
echo "  llm-lb used ${LB} s of CPU"
step "result"
awk -v rr="$RR" -v lb="$LB" -v s="$SECS" -v n=$((3 * SECS * 10)) 'BEGIN {
    printf "  scraping cost %.2f s of CPU per %d s = %.2f%% of one core (%.0f us per scrape, %d scrapes)\n",
        lb - rr, s, (lb - rr) / s * 100, (lb - rr) / n * 1e6, n
    printf "  totals: round_robin %.2f%%, least_busy %.2f%% of one core\n", rr / s * 100, lb / s * 100
}'
