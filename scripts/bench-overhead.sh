#!/usr/bin/env bash
# Proxy overhead: oha with a fixed streaming chat body against one instant backend
# (`vllm-sim --time-scale 0`), directly and through nginx (round robin), llm-lb (round_robin,
# prefix_cache on the embedded store and on Redis, global_least_request on Redis) and the SGLang
# router (round_robin and cache_aware). All of them run at once; the oha runs are interleaved
# (round r runs every target once, starting at a different target each round) and repeated, and
# every ratio (to nginx, to direct) is taken within a round. Then regenerates docs/benchmarks.md.
#
#   ./scripts/bench-overhead.sh               # 5 rounds x 8 targets x 10 s: about 8 minutes
#   OVERHEAD_ROUNDS=3 OVERHEAD_SECS=5 ./scripts/bench-overhead.sh
#
# Environment knobs (all optional):
#   OVERHEAD_PORT_BASE   first port (default 27000; uses BASE+1, +10, +20..23, +30..33, +40..41, +79)
#   OVERHEAD_ROUNDS      interleaved rounds (default 5)
#   OVERHEAD_SECS        seconds of load per target and round (default 8; plus a 2 s warm-up)
#   OVERHEAD_CONNS       oha connections (default 32)
#   OVERHEAD_MAX_TOKENS  output tokens per response (default 16)
#   OVERHEAD_TARGETS     subset of: direct nginx llm-lb_round_robin llm-lb_prefix_cache
#                        llm-lb_prefix_cache_redis llm-lb_global_least_request_redis
#                        sglang_round_robin sglang_cache_aware (default: all)
#   OVERHEAD_NO_REPORT=1 do not regenerate docs/benchmarks.md
#   OVERHEAD_BASELINE    a git ref: also run that commit's llm-lb (targets baseline_round_robin and
#                        baseline_prefix_cache, built once in a worktree cached under
#                        ~/.cache/llm-lb/baseline/<sha>) and print this build's requests/s and p99
#                        as ratios to it, round by round; results then go to
#                        bench/results/overhead-vs-<sha>/ and docs/benchmarks.md is left alone
#   OHA                  oha binary (default: oha on PATH, else ~/.cargo/bin/oha, installed with
#                        `cargo install oha --locked` when missing: about 7 minutes)
# Results: bench/results/overhead/*.json (oha's output per target and round) and
# bench/results/overhead.{json,csv}.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"

bench_args "$0" "$@"

BASE="${OVERHEAD_PORT_BASE:-27000}"
ROUNDS="${OVERHEAD_ROUNDS:-5}"
SECS="${OVERHEAD_SECS:-8}"
CONNS="${OVERHEAD_CONNS:-32}"
MAX_TOKENS="${OVERHEAD_MAX_TOKENS:-16}"
ALL_TARGETS="direct nginx llm-lb_round_robin llm-lb_prefix_cache llm-lb_prefix_cache_redis llm-lb_global_least_request_redis sglang_round_robin sglang_cache_aware"
TARGETS="${OVERHEAD_TARGETS:-$ALL_TARGETS}"
MODEL="bench/llama-3.1-8b"
SIM_PORT=$((BASE + 1))
REDIS_PORT=$((BASE + 79))
RESULTS="$ROOT/bench/results/overhead"
WORK="$ROOT/bench/work/overhead"
BASELINE_SHA=""
if [ -n "${OVERHEAD_BASELINE:-}" ]; then
    BASELINE_SHA=$(git rev-parse --short=7 "$OVERHEAD_BASELINE^{commit}")
    RESULTS="$ROOT/bench/results/overhead-vs-$BASELINE_SHA"
    OVERHEAD_NO_REPORT=1
    [ -n "${OVERHEAD_TARGETS:-}" ] ||
        TARGETS="llm-lb_round_robin baseline_round_robin llm-lb_prefix_cache baseline_prefix_cache"
fi

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

ensure_packages
ensure_bench_packages
ensure_rust
OHA="${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}"
if [ ! -x "$OHA" ]; then
    step "installing oha (cargo install oha --locked; about 7 minutes on 2 cores)"
    cargo install oha --locked --version 1.16.0
    OHA="$HOME/.cargo/bin/oha"
fi
bench_build
if [ -n "$BASELINE_SHA" ]; then
    BASE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/llm-lb/baseline/$BASELINE_SHA"
    BASELINE_BIN="$BASE_DIR/target/release/llm-lb"
    if [ ! -x "$BASELINE_BIN" ]; then
        step "building the baseline $BASELINE_SHA (release, in a worktree; once per commit)"
        rm -rf "$BASE_DIR/src"
        mkdir -p "$BASE_DIR"
        git worktree add --detach -f "$BASE_DIR/src" "$BASELINE_SHA" >/dev/null
        (cd "$BASE_DIR/src" && cargo build --release -q --bin llm-lb --target-dir "$BASE_DIR/target")
        git worktree remove --force "$BASE_DIR/src"
    fi
fi
case " $TARGETS " in *" sglang_"*) bench_venv; bench_sgl_venv ;; *) bench_venv ;; esac

declare -A PORT=(
    [direct]=$SIM_PORT [nginx]=$((BASE + 10))
    [llm-lb_round_robin]=$((BASE + 20)) [llm-lb_prefix_cache]=$((BASE + 21))
    [llm-lb_prefix_cache_redis]=$((BASE + 22)) [llm-lb_global_least_request_redis]=$((BASE + 23))
    [sglang_round_robin]=$((BASE + 40)) [sglang_cache_aware]=$((BASE + 42))
    [baseline_round_robin]=$((BASE + 24)) [baseline_prefix_cache]=$((BASE + 25))
)
for t in $TARGETS; do
    [ -n "${PORT[$t]:-}" ] || { echo "unknown target $t (see --help)" >&2; exit 2; }
    ports_free "${PORT[$t]}"
done
ports_free "$SIM_PORT" "$REDIS_PORT"

rm -rf "$WORK" "$RESULTS"
mkdir -p "$WORK" "$RESULTS"
write_pingora_yaml "$WORK"

step "starting the backend (vllm-sim --time-scale 0) and the proxies"
bench_spawn "$WORK/sim.log" "$SIM_BIN" --host 127.0.0.1 --port "$SIM_PORT" --model "$MODEL" \
    --time-scale 0 --max-num-seqs 256 --seed 1
wait_port "$SIM_PORT" 30

# llm-lb instance $1 with lb_policy $2, lb_config $3 (binary $4, default this build's).
llmlb() {
    local name=$1 policy=$2 lbcfg=$3 port=${PORT[$1]}
    local LLMLB_BIN=${4:-$LLMLB_BIN}
    cat >"$WORK/$name.yaml" <<YAML
listen: 127.0.0.1:$port
admin: 127.0.0.1:$((port + 10))
pools:
  - name: bench
    models: ["*"]
    endpoints: ["127.0.0.1:$SIM_PORT"]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    lb_policy: $policy
    lb_config: $lbcfg
YAML
    start_llmlb "$WORK/pingora.yaml" "$WORK/$name.yaml" "$WORK/$name.log" "$port"
}

case " $TARGETS " in *" llm-lb_"*"_redis "*) start_redis "$REDIS_PORT" "$WORK/redis" ;; esac
for t in $TARGETS; do
    case $t in
        direct) ;;
        nginx) start_nginx "${PORT[nginx]}" "$WORK/nginx" "127.0.0.1:$SIM_PORT" ;;
        llm-lb_round_robin) llmlb "$t" round_robin "{}" ;;
        llm-lb_prefix_cache) llmlb "$t" prefix_cache "{}" ;;
        baseline_round_robin) llmlb "$t" round_robin "{}" "$BASELINE_BIN" ;;
        baseline_prefix_cache) llmlb "$t" prefix_cache "{}" "$BASELINE_BIN" ;;
        llm-lb_prefix_cache_redis)
            llmlb "$t" prefix_cache "{serviceFQDN: 127.0.0.1, servicePort: $REDIS_PORT, keyPrefix: pc}" ;;
        llm-lb_global_least_request_redis)
            llmlb "$t" global_least_request "{serviceFQDN: 127.0.0.1, servicePort: $REDIS_PORT, keyPrefix: glr}" ;;
        sglang_round_robin)
            start_sglang "${PORT[$t]}" round_robin "$WORK/$t.log" "http://127.0.0.1:$SIM_PORT" ;;
        sglang_cache_aware)
            start_sglang "${PORT[$t]}" cache_aware "$WORK/$t.log" "http://127.0.0.1:$SIM_PORT" ;;
    esac
done
sleep 1.5 # first health-check round of llm-lb

# A fixed streaming chat request: a ~1 KiB system prompt and a question.
"$BENCH_PY" - "$MODEL" "$MAX_TOKENS" >"$WORK/body.json" <<'EOF'
import json, sys
system = ("You are a meticulous assistant for a logistics company. Answer with numbered steps, "
          "cite the relevant policy section, and keep a friendly, concise tone. ") * 7
print(json.dumps({"model": sys.argv[1], "stream": True, "max_tokens": int(sys.argv[2]),
                  "messages": [{"role": "system", "content": system},
                               {"role": "user", "content": "A pallet arrived damaged. What now?"}]}))
EOF
BODY_BYTES=$(wc -c <"$WORK/body.json")

# Every target answers the body with 200 before we measure it.
for t in $TARGETS; do
    code=$(curl -s -o "$WORK/check-$t.out" -w '%{http_code}' -H 'content-type: application/json' \
        --data-binary "@$WORK/body.json" "http://127.0.0.1:${PORT[$t]}/v1/chat/completions")
    grep -q '\[DONE\]' "$WORK/check-$t.out" && [ "$code" = 200 ] ||
        { echo "$t answered $code: $(head -c 300 "$WORK/check-$t.out")" >&2; exit 1; }
done

oha_run() {
    local url=$1 secs=$2 out=$3
    "$OHA" -z "${secs}s" -c "$CONNS" -w --no-tui --output-format json -o "$out" -m POST \
        -T application/json -D "$WORK/body.json" "$url/v1/chat/completions" >/dev/null
}

read -r -a T <<<"$TARGETS"
N=${#T[@]}
START=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    step "round $r of $ROUNDS"
    for ((k = 0; k < N; k++)); do
        t=${T[(k + r - 1) % N]}
        url="http://127.0.0.1:${PORT[$t]}"
        oha_run "$url" 2 "$WORK/warmup.json"
        oha_run "$url" "$SECS" "$RESULTS/$t-r$r.json"
        "$BENCH_PY" - "$RESULTS/$t-r$r.json" "$t" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
print(f"   {sys.argv[2]:<36} {s['requestsPerSec']:>8.0f} req/s  p50 {1000 * p['p50']:6.2f} ms  "
      f"p99 {1000 * p['p99']:6.2f} ms  status {codes}")
EOF
    done
done
ELAPSED=$(($(date +%s) - START))
step "measured in $((ELAPSED / 60)) min $((ELAPSED % 60)) s"

if [ -n "$BASELINE_SHA" ]; then
    step "this build ($(git rev-parse --short=7 HEAD)$(git diff --quiet -- src Cargo.toml Cargo.lock || echo ', dirty')) against $BASELINE_SHA, ratios within each round"
    "$BENCH_PY" - "$RESULTS" "$ROUNDS" $TARGETS <<'EOF' | tee "$RESULTS/ratios.txt"
import json, statistics, sys
res, rounds, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def get(t, r):
    d = json.load(open(f"{res}/{t}-r{r}.json"))
    return d["summary"]["requestsPerSec"], d["latencyPercentiles"]["p99"]
for policy in ("round_robin", "prefix_cache"):
    new, old = f"llm-lb_{policy}", f"baseline_{policy}"
    if new not in targets or old not in targets:
        continue
    rps = [get(new, r)[0] / get(old, r)[0] for r in range(1, rounds + 1)]
    p99 = [get(new, r)[1] / get(old, r)[1] for r in range(1, rounds + 1)]
    print(f"{policy:<14} req/s x{statistics.median(rps):.3f} (rounds {', '.join(f'{x:.3f}' for x in rps)})"
          f"   p99 x{statistics.median(p99):.3f} (rounds {', '.join(f'{x:.3f}' for x in p99)})")
EOF
fi

cat >"$WORK/meta.json" <<EOF
{"rounds": $ROUNDS, "duration": "${SECS} s", "warmup": "2 s", "connections": $CONNS,
 "max_tokens": $MAX_TOKENS, "body_bytes": $BODY_BYTES, "elapsed_s": $ELAPSED,
 "oha_version": "$("$OHA" --version | awk '{print $2}')"}
EOF
if [ -n "$BASELINE_SHA" ]; then
    # Stamp the side-by-side run; the published overhead results are left as they are.
    cp "$WORK/meta.json" "$RESULTS/meta.json"
    { echo "commit: $(git rev-parse HEAD)$(git diff --quiet -- src Cargo.toml Cargo.lock || echo ' (dirty)')"
      echo "baseline: $(git rev-parse "$BASELINE_SHA")"
      echo "machine: $(nproc) cores, $(uname -srm)"
      echo "command: OVERHEAD_BASELINE=$OVERHEAD_BASELINE OVERHEAD_ROUNDS=$ROUNDS OVERHEAD_SECS=$SECS scripts/bench-overhead.sh"
    } >"$RESULTS/stamp.txt"
else
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" collect-overhead --dir "$RESULTS" --meta "$WORK/meta.json"
    if [ "${OVERHEAD_NO_REPORT:-0}" != 1 ]; then
        "$BENCH_PY" "$ROOT/scripts/bench-report.py" render
    fi
fi
