#!/usr/bin/env bash
# Proxy overhead: oha with a fixed streaming chat body against one instant backend
# (`vllm-sim --time-scale 0`), directly and through nginx (round robin), a bare Pingora proxy,
# llm-lb (round_robin; prefix_cache and global_least_request, each on the embedded store and on
# Redis) and the SGLang router (round_robin and cache_aware). All of them run at once; the oha
# runs are interleaved (round r runs every target once, starting at a different target each
# round) and repeated, and every ratio (to nginx, to bare Pingora, to direct, and each Redis
# policy to its embedded counterpart) is taken within a round. Then regenerates
# docs/benchmarks.md.
#
#   ./scripts/bench-overhead.sh               # 5 rounds x 10 targets x 10 s: about 9 minutes
#   OVERHEAD_ROUNDS=3 OVERHEAD_SECS=5 ./scripts/bench-overhead.sh
#
# Targets:
#   direct                              oha straight to vllm-sim (no proxy)
#   nginx                               nginx round robin, 2 workers, keep-alive upstream
#   pingora_bare                        examples/bare_pingora.rs: Pingora's HTTP proxy with one
#                                       fixed upstream, no body reading, no routing; same
#                                       Pingora configuration (2 threads) as llm-lb: the limit
#                                       of llm-lb's architecture on this machine
#   llm-lb_round_robin                  llm-lb, round_robin
#   llm-lb_prefix_cache                 llm-lb, prefix_cache, embedded store
#   llm-lb_prefix_cache_redis           llm-lb, prefix_cache, Redis
#   llm-lb_global_least_request         llm-lb, global_least_request, embedded store
#   llm-lb_global_least_request_redis   llm-lb, global_least_request, Redis
#   sglang_round_robin                  SGLang router 0.3.2, round_robin
#   sglang_cache_aware                  SGLang router 0.3.2, cache_aware
#
# Environment knobs (all optional):
#   OVERHEAD_PORT_BASE   first port (default 27000; uses BASE+1, +10, +12, +20..26, +30..36,
#                        +40..43, +79)
#   OVERHEAD_ROUNDS      interleaved rounds (default 5)
#   OVERHEAD_SECS        seconds of load per target and round (default 8; plus a 2 s warm-up)
#   OVERHEAD_CONNS       oha connections (default 32)
#   OVERHEAD_MAX_TOKENS  output tokens per response (default 16)
#   OVERHEAD_TARGETS     a subset of the targets above, in the order to run them (default: all)
#   OVERHEAD_NO_REPORT=1 do not regenerate docs/benchmarks.md
#   OVERHEAD_BASELINE    a git ref: also run that commit's llm-lb (targets baseline_round_robin and
#                        baseline_prefix_cache, built once in a worktree cached under
#                        ~/.cache/llm-lb/baseline/<sha>) and print this build's requests/s and p99
#                        as ratios to it, round by round; results then go to
#                        bench/results/overhead-vs-<sha>/ and docs/benchmarks.md is left alone
#   BENCH_RUST_LOG       RUST_LOG of llm-lb and the bare Pingora proxy (default warn)
#   OHA                  oha binary (default: oha on PATH, else ~/.cargo/bin/oha, installed with
#                        `cargo install oha --locked` when missing: about 7 minutes)
# Results: bench/results/overhead/<target>-r<round>.json (oha's output per target and round),
# bench/results/overhead/stamp.json (provenance of the run: commit, whether the tree was dirty
# and which files, machine, date, command, run parameters, oha version, binaries' sha256) and
# bench/results/overhead.{json,csv} (every run with its within-round ratios, and per target the
# median and min-max; the JSON carries the stamp, the CSV starts with `# commit:`, `# machine:`,
# `# command:` lines). A run from a tree with uncommitted changes is recorded as dirty and
# bench-report.py warns about it when it renders the page.
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
ALL_TARGETS="direct nginx pingora_bare llm-lb_round_robin llm-lb_prefix_cache llm-lb_prefix_cache_redis llm-lb_global_least_request llm-lb_global_least_request_redis sglang_round_robin sglang_cache_aware"
TARGETS="${OVERHEAD_TARGETS:-$ALL_TARGETS}"
MODEL="bench/llama-3.1-8b"
SIM_PORT=$((BASE + 1))
REDIS_PORT=$((BASE + 79))
RESULTS="$ROOT/bench/results/overhead"
COMMAND=$(bench_command "$0" OVERHEAD_ OHA BENCH_RUST_LOG)
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
ensure_oha
bench_build
case " $TARGETS " in *" pingora_bare "*)
    step "building the bare Pingora proxy (examples/bare_pingora.rs, release)"
    cargo build --release -q --example bare_pingora
    ;;
esac
BARE_BIN="$ROOT/target/release/examples/bare_pingora"
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
    [direct]=$SIM_PORT [nginx]=$((BASE + 10)) [pingora_bare]=$((BASE + 12))
    [llm-lb_round_robin]=$((BASE + 20)) [llm-lb_prefix_cache]=$((BASE + 21))
    [llm-lb_prefix_cache_redis]=$((BASE + 22)) [llm-lb_global_least_request_redis]=$((BASE + 23))
    [llm-lb_global_least_request]=$((BASE + 26))
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

# Provenance, taken now (the binaries were just built from this tree); the run's parameters are
# added at the end.
sha16() { if [ -x "$1" ]; then sha256sum "$1" | cut -c1-16; else echo null; fi; }
python3 - "$TARGETS" "$BASELINE_SHA" "$(sha16 "$LLMLB_BIN")" "$(sha16 "$SIM_BIN")" \
    "$(sha16 "$BARE_BIN")" "$("$OHA" --version | awk '{print $2}')" <<'EOF' |
import json, sys
targets, baseline, lb, sim, bare, oha = sys.argv[1:]
sha = lambda v: None if v == "null" else v
print(json.dumps({"targets": targets.split(), "baseline": baseline or None, "oha_version": oha,
                  "binaries_sha256_16": {"llm-lb": sha(lb), "vllm-sim": sha(sim),
                                         "bare_pingora": sha(bare) if "pingora_bare" in targets.split() else None}}))
EOF
    bench_stamp "$RESULTS/stamp.json" "$COMMAND"

step "starting the backend (vllm-sim --time-scale 0) and the proxies"
bench_spawn "$WORK/sim.log" "$SIM_BIN" --host 127.0.0.1 --port "$SIM_PORT" --model "$MODEL" \
    --time-scale 0 --max-num-seqs 256 --seed 1
wait_port "$SIM_PORT" 30

# llm-lb instance $1 with lb_policy $2, lb_config $3 (binary $4, default this build's).
llmlb() {
    local name=$1 policy=$2 lbcfg=$3 port=${PORT[$1]}
    local LLMLB_BIN=${4:-$LLMLB_BIN}
    write_policy_yaml "$WORK/$name.yaml" "$port" "$SIM_PORT" "$policy" "$lbcfg"
    start_llmlb "$WORK/pingora.yaml" "$WORK/$name.yaml" "$WORK/$name.log" "$port"
}

case " $TARGETS " in *" llm-lb_"*"_redis "*) start_redis "$REDIS_PORT" "$WORK/redis" ;; esac
for t in $TARGETS; do
    case $t in
        direct) ;;
        nginx) start_nginx "${PORT[nginx]}" "$WORK/nginx" "127.0.0.1:$SIM_PORT" ;;
        pingora_bare)
            bench_spawn "$WORK/$t.log" env RUST_LOG="${BENCH_RUST_LOG:-warn}" "$BARE_BIN" \
                "127.0.0.1:${PORT[$t]}" "127.0.0.1:$SIM_PORT" "$WORK/pingora.yaml"
            wait_port "${PORT[$t]}" 30
            ;;
        llm-lb_round_robin) llmlb "$t" round_robin "{}" ;;
        llm-lb_prefix_cache) llmlb "$t" prefix_cache "{}" ;;
        llm-lb_global_least_request) llmlb "$t" global_least_request "{}" ;;
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
write_chat_body "$WORK/body.json" "$MODEL" "$MAX_TOKENS"
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
# The stamp gets the run's parameters; a tree that changed while the run went on is said so.
bench_stamp "$WORK/stamp-end.json" "$COMMAND" </dev/null 2>/dev/null
python3 - "$RESULTS/stamp.json" "$WORK/meta.json" "$WORK/stamp-end.json" <<'EOF'
import json, sys
stamp, meta, end = (json.load(open(p)) for p in sys.argv[1:])
stamp.update(meta)
stamp["finished"] = end["date"]
if (end["commit"], end["uncommitted_changes"], end["diff_sha256"]) != (
        stamp["commit"], stamp["uncommitted_changes"], stamp["diff_sha256"]):
    stamp["tree_changed_during_run"] = True
    print("WARNING: the work tree changed while the benchmark ran (recorded in stamp.json)",
          file=sys.stderr)
json.dump(stamp, open(sys.argv[1], "w"), indent=1)
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
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" collect-overhead --dir "$RESULTS" --meta "$RESULTS/stamp.json"
    if [ "${OVERHEAD_NO_REPORT:-0}" != 1 ]; then
        "$BENCH_PY" "$ROOT/scripts/bench-report.py" render
    fi
fi
