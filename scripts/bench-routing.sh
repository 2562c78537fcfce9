#!/usr/bin/env bash
# Routing quality: three simulated vLLM servers (finite KV cache, realistic time-scaled costs)
# behind each llm-lb policy and behind the SGLang router, driven by a real LLM benchmark client
# (AIPerf, with a tokenizer built locally). Reports TTFT, request latency, output token
# throughput, the fleet's prefix-cache hit rate (from the simulators' own counters) and the
# oracle bound, then regenerates docs/benchmarks.md.
#
#   ./scripts/bench-routing.sh                 # everything (about 28 minutes on 2 cores)
#   ROUTING_SCENARIOS=seed ./scripts/bench-routing.sh        # the seed workload only (the
#                                                            # other scenarios' results go: see ROUTING_APPEND)
#   ROUTING_REPEATS=3 ./scripts/bench-routing.sh             # interleaved repeats, shows spread
#
# Scenarios (ROUTING_SCENARIOS, space separated; default "seed seed_fixed unique hot replicas"):
#   seed      multi-turn chat: 60 sessions x 5 turns, ~200 input tokens per turn (sd 40), ~800
#             output tokens (sd 200), concurrency 20 (the seed article's workload, lengths varied)
#   seed_fixed  the literal seed workload: the same sessions, turns and concurrency with fixed
#             lengths, exactly 200 input and 800 output tokens every turn (AIPerf stddev 0)
#   unique    single-turn prompts that share nothing (affinity must cost nothing)
#   hot       every session starts with the same long system prompt (affinity must not hot-spot)
#   replicas  the seed workload through three llm-lb replicas behind an nginx that spreads
#             requests over them round robin, so the turns of a session reach different replicas
#             (Redis-shared state vs each replica on its own embedded store)
#
# ROUTING_SET=kv runs the precise-routing set instead (results in bench/results/kv*, the
# "kv-*" blocks of docs/benchmarks.md): the simulators tokenize with SmolLM2's real tokenizer
# (scripts/engine.sh) and publish vLLM's KV-cache events; policies prefix_cache, kv_aware without
# events (its own predictions), kv_aware with events, the SGLang router's cache_aware and
# global_least_request. Scenarios (default "evict reset docs docs_reset seed unique replicas"):
#   evict     long multi-turn sessions on caches too small to keep them (eviction pressure):
#             60 sessions x 5 turns, ~1000 input tokens per turn, 200 output, concurrency 20,
#             2048 KV blocks (32k tokens) per server (1024 thrashes for every policy alike)
#   reset     evict, and each simulator in turn empties its prefix cache during the run, as an
#             engine restart does (vLLM's POST /reset_prefix_cache, running requests preempted)
#   evict_varied  (not in the default) evict with sessions of varied length (5 turns on average,
#             standard deviation 2), so that sessions started together do not end together
#   chat      (not in the default) chat users who think between turns: 90 sessions of varied
#             length (5 turns on average, standard deviation 2), ~1000 input tokens a turn (sd 300),
#             200 output, 3 s between a reply and the next turn (sd 1.5 s), 24 sessions at once;
#             evict's 2048 blocks per server. A waiting session's blocks are evicted before its
#             next turn is routed, so the index knows it and a guess does not
#   chat_reset  (not in the default) chat, with the resets of reset
#   docs      shared documents under eviction: 80 sessions x 4 turns, each opening with one of 16
#             documents of 2000 tokens (AIPerf --num-prefix-prompts) and going on with its own
#             questions (~300 tokens) and answers (~150), concurrency 24, ROUTING_DOCS_KV_BLOCKS
#             blocks per server (default 1024, 16k tokens: the documents, 32k tokens, fit once
#             across the fleet but not on any one server, and not beside the sessions' own turns
#             without evicting)
#   docs_reset  docs, with the resets of reset
#   seed, unique   as above (prefix_cache / kv_aware with events / least request)
#   replicas  seed through three kv_aware replicas sharing Redis, against one replica
#
# Environment knobs (all optional):
#   ROUTING_PORT_BASE   first port (default 28000; uses BASE+1..3, BASE+80..95, BASE+379)
#   ROUTING_TIME_SCALE  vllm-sim --time-scale (default 0.5: simulated times run twice as fast)
#   ROUTING_KV_BLOCKS   KV-cache blocks per server, 16 tokens each (default 4096 = 64k tokens)
#   ROUTING_REPEATS     rounds; each round runs every policy once, in order (default 1)
#   ROUTING_POLICIES    subset of: round_robin global_least_request prefix_cache least_busy
#                       sglang_cache_aware (default: all)
#   ROUTING_SESSIONS    sessions of the seed workload (default 60)
#   ROUTING_SET         routing (default) or kv (see above)
#   ROUTING_EVICT_KV_BLOCKS  KV blocks per server in the evict, reset and evict_varied scenarios (default 2048)
#   ROUTING_DOCS_KV_BLOCKS   KV blocks per server in the docs and docs_reset scenarios (default 1024)
#   ROUTING_KV_CONFIG   more lb_config keys for kv_aware, e.g. "loadWeight: 0.5, decodeTokens: 32"
#   ROUTING_APPEND=1    keep the results of the scenarios not run now (by default every earlier
#                       run file, raw output and stamp of the set is deleted first, so that the
#                       tables never mix runs of different commits; with ROUTING_APPEND=1 they
#                       may, and bench-report.py says so when it renders the page)
#   ROUTING_RESULTS     where the results go: bench/results/<name>/ and <name>.{json,csv}
#                       (default: the set's name). Runs kept under another name stay out of the
#                       tables of docs/benchmarks.md, e.g. ROUTING_RESULTS=kv-optional for the kv
#                       set's optional scenarios, which the page quotes from there
#   ROUTING_NO_REPORT=1 do not regenerate docs/benchmarks.md
#   LLMLB_VENV, LLMLB_SGL_VENV  Python venvs (default target/py-venv, target/sgl-venv)
#   BENCH_RUST_LOG      llm-lb's RUST_LOG (default warn; in the kv set
#                       warn,llm_lb::policy::kv_aware=debug, whose pick lines each kv_aware run
#                       keeps as raw/<run>/picks.log.gz for `bench-report.py losses` and `sessions`)
# Results (bench/results/kv/ and kv.{json,csv} for ROUTING_SET=kv):
#   bench/results/routing/stamp.json   provenance of the invocation, written before the first run
#                       and checked after the last: commit, whether the tree had uncommitted
#                       changes (which files, a hash of the diff), machine, date, the exact command,
#                       the run parameters, AIPerf's version, the binaries' sha256; a tree that
#                       changed during the runs is recorded (tree_changed_during_run)
#   bench/results/routing/<scenario>-<label>-r<round>.json   one file per run, carrying the stamp
#   bench/results/routing/raw/<scenario>-<label>-r<round>/   what each run file was computed from,
#                       gzipped: AIPerf's summary (profile_export_aiperf.json, .csv) and its
#                       per-request records (profile_export.jsonl without the per-chunk latency
#                       arrays, HTTP timings and ids), the /metrics of each simulator (sim1..3) and
#                       llm-lb replica (llm-lb0..2) at the end of the run: about 30-45 KB a run,
#                       under 1 MB a round of the default scenarios;
#                       `bench-report.py collect-routing --aiperf raw/<run> --sims raw/<run>/sim*
#                       --admins raw/<run>/llm-lb* ...` recomputes a run file from them
#   bench/results/routing.{json,csv}   every run, and per scenario and policy the rounds' values;
#                       the stamp in the JSON and as `# commit: ...` lines atop the CSV
# bench-report.py render warns loudly (render --strict refuses) when these results have no stamp,
# come from a dirty tree or another commit than HEAD, or mix runs of different trees.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"

bench_args "$0" "$@"

BASE="${ROUTING_PORT_BASE:-28000}"
TIME_SCALE="${ROUTING_TIME_SCALE:-0.5}"
KV_BLOCKS="${ROUTING_KV_BLOCKS:-4096}"
REPEATS="${ROUTING_REPEATS:-1}"
SET="${ROUTING_SET:-routing}"
case "$SET" in
    routing)
        KNOWN_SCENARIOS="seed seed_fixed unique hot replicas"
        SCENARIOS="${ROUTING_SCENARIOS:-$KNOWN_SCENARIOS}"
        POLICIES="${ROUTING_POLICIES:-round_robin global_least_request prefix_cache least_busy sglang_cache_aware}" ;;
    kv)
        KNOWN_SCENARIOS="evict reset docs docs_reset seed unique replicas evict_varied chat chat_reset"
        SCENARIOS="${ROUTING_SCENARIOS:-evict reset docs docs_reset seed unique replicas}"
        POLICIES="${ROUTING_POLICIES:-global_least_request prefix_cache kv_aware kv_aware_events sglang_cache_aware}" ;;
    *) echo "ROUTING_SET must be routing or kv" >&2; exit 2 ;;
esac
for scenario in $SCENARIOS; do
    case " $KNOWN_SCENARIOS " in
        *" $scenario "*) ;;
        *) echo "unknown scenario $scenario for ROUTING_SET=$SET (known: $KNOWN_SCENARIOS)" >&2; exit 2 ;;
    esac
done
APPEND="${ROUTING_APPEND:-0}"
SESSIONS="${ROUTING_SESSIONS:-60}"
MODEL="bench/llama-3.1-8b"
LB_PORT=$((BASE + 80))
SGL_PORT=$((BASE + 90))
FRONT_PORT=$((BASE + 95))
REDIS_PORT=$((BASE + 379))
RESULTS_NAME="${ROUTING_RESULTS:-$SET}"
case "$RESULTS_NAME" in
    routing | kv) [ "$RESULTS_NAME" = "$SET" ] || { echo "ROUTING_RESULTS=$RESULTS_NAME is another set's" >&2; exit 2; } ;;
    *[!a-z0-9_-]* | "") echo "ROUTING_RESULTS must be a name of lower-case letters, digits, - and _" >&2; exit 2 ;;
esac
RESULTS="$ROOT/bench/results/$RESULTS_NAME"
WORK="$ROOT/bench/work/$RESULTS_NAME"
# The exact command: every knob set in the environment, then the script.
COMMAND=$(bench_command "$0" ROUTING_ LLMLB_VENV LLMLB_SGL_VENV BENCH_RUST_LOG)
# The KV set logs every kv_aware pick (one debug line a request): each run keeps them in its raw
# directory (picks.log.gz), for `bench-report.py losses` to tell what the index held at the pick.
if [ "$SET" = kv ]; then BENCH_RUST_LOG="${BENCH_RUST_LOG:-warn,llm_lb::policy::kv_aware=debug}"; fi

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

ensure_packages
ensure_bench_packages
ensure_rust
bench_build
bench_venv
case " $POLICIES " in *" sglang_cache_aware "*) bench_sgl_venv ;; esac
ports_free $((BASE + 1)) $((BASE + 2)) $((BASE + 3)) "$LB_PORT" $((LB_PORT + 1)) $((LB_PORT + 2)) \
    "$SGL_PORT" "$FRONT_PORT" "$REDIS_PORT" $((BASE + 21)) $((BASE + 22)) $((BASE + 23)) \
    $((BASE + 31)) $((BASE + 32)) $((BASE + 33))

rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"
# Results of earlier invocations go, so that the tables never mix commits (ROUTING_APPEND=1: only
# those of the scenarios run now).
if [ "$APPEND" = 1 ]; then
    for scenario in $SCENARIOS; do
        rm -f "$RESULTS/$scenario-"*.json
        rm -rf "$RESULTS/raw/$scenario-"*
    done
else
    rm -f "$RESULTS/"*.json
    rm -rf "$RESULTS/raw"
fi
TOKENIZER="$ROOT/target/bench-tokenizer"
CORPUS="$("$BENCH_PY" -c 'import aiperf, os; print(os.path.join(os.path.dirname(aiperf.__file__), "dataset/generator/assets/shakespeare.txt"))')"
"$BENCH_PY" "$ROOT/vllm-sim/py/make_tokenizer.py" "$TOKENIZER" "$CORPUS" >/dev/null
write_pingora_yaml "$WORK"
SIM_TOKENIZER_ARGS=()
MODEL_TOKENIZER=""
if [ "$SET" = kv ]; then
    # The model's real tokenizer and chat template, in the simulators and in kv_aware alike.
    eval "$(bash "$ROOT/scripts/engine.sh")"
    MODEL_TOKENIZER="$LLAMA_TOKENIZER"
    SIM_TOKENIZER_ARGS=(--tokenizer "$MODEL_TOKENIZER")
fi

# Provenance, taken now (the binaries were just built from this tree); checked again at the end.
AIPERF_VERSION=$("$BENCH_PY" -c 'from importlib.metadata import version; print(version("aiperf"))')
SGL_VERSION=""
if [ -n "$BENCH_SGL_PY" ]; then
    SGL_VERSION=$("$BENCH_SGL_PY" -c 'from importlib.metadata import version; print(version("sglang-router"))')
fi
"$BENCH_PY" - "$SET" "$SCENARIOS" "$POLICIES" "$REPEATS" "$SESSIONS" "$TIME_SCALE" "$KV_BLOCKS" \
    "${ROUTING_EVICT_KV_BLOCKS:-2048}" "${ROUTING_DOCS_KV_BLOCKS:-1024}" "${ROUTING_KV_CONFIG:-}" "$APPEND" "$AIPERF_VERSION" "$SGL_VERSION" \
    "$(bench_sha16 "$LLMLB_BIN")" "$(bench_sha16 "$SIM_BIN")" "$(bench_sha16 "$MODEL_TOKENIZER")" <<'PY' |
import json, sys
(rset, scenarios, policies, repeats, sessions, time_scale, kv_blocks, evict_blocks, docs_blocks, kv_config, append,
 aiperf, sgl, lb, sim, tok) = sys.argv[1:]
sha = lambda v: None if v == "null" else v
params = {"set": rset, "scenarios": scenarios.split(), "policies": policies.split(),
          "repeats": int(repeats), "sessions": int(sessions), "time_scale": time_scale,
          "kv_blocks": int(kv_blocks), "append": append == "1"}
if rset == "kv":
    params.update(evict_kv_blocks=int(evict_blocks), docs_kv_blocks=int(docs_blocks), kv_config=kv_config or None)
print(json.dumps({"parameters": params, "aiperf_version": aiperf, "sglang_router_version": sgl or None,
                  "binaries_sha256_16": {"llm-lb": sha(lb), "vllm-sim": sha(sim)},
                  "model_tokenizer_sha256_16": sha(tok)}))
PY
    bench_stamp "$RESULTS/stamp.json" "$COMMAND"

SIM_URLS=()
SIM_ADDRS=()
for i in 1 2 3; do
    SIM_URLS+=("http://127.0.0.1:$((BASE + i))")
    SIM_ADDRS+=("127.0.0.1:$((BASE + i))")
done

# Fresh simulators for each run (cold caches, zeroed counters).
# Costs (model ms): an 8B model on one mid-range GPU: 5 ms per request + 0.1 ms per uncached
# prompt token of prefill (10k tokens/s), 10 ms per decode step, 1.5x slower at a full batch of 16.
# In the kv set each also publishes KV events on BASE+20+i (replay socket BASE+30+i).
start_sims() {
    local i blocks=$1 events=()
    SIM_PIDS=()
    for i in 1 2 3; do
        if [ "$SET" = kv ]; then
            events=(--kv-events-config "{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$((BASE + 20 + i))\", \"replay_endpoint\": \"tcp://*:$((BASE + 30 + i))\"}")
        fi
        bench_spawn "$RUN_DIR/sim$i.log" "$SIM_BIN" --host 127.0.0.1 --port $((BASE + i)) \
            --model "$MODEL" --seed "$i" --time-scale "$TIME_SCALE" --kv-blocks "$blocks" \
            --max-num-seqs 16 --prefill-overhead-ms 5 --prefill-ms-per-token 0.1 --itl-ms 10 \
            --load-factor 1.5 "${SIM_TOKENIZER_ARGS[@]}" "${events[@]}"
        SIM_PIDS+=("$LAST_PID")
    done
    for i in 1 2 3; do wait_port $((BASE + i)) 30; done
}

# A policy file for one llm-lb replica ($1: index 0..2) with lb_policy $2, store $3, run label $4.
policy_yaml() {
    local idx=$1 policy=$2 store=$3 label=$4 keys=() lbcfg endpoints i
    if [ "$store" = redis ]; then
        keys+=("serviceFQDN: 127.0.0.1" "servicePort: $REDIS_PORT" "timeout: 50")
    fi
    if [ "$policy" = kv_aware ]; then
        keys+=("tokenizer: \"$MODEL_TOKENIZER\"")
        if [ -n "${ROUTING_KV_CONFIG:-}" ]; then keys+=("$ROUTING_KV_CONFIG"); fi
    fi
    lbcfg="{$(IFS=,; echo "${keys[*]}")}"
    endpoints="\"${SIM_ADDRS[0]}\", \"${SIM_ADDRS[1]}\", \"${SIM_ADDRS[2]}\""
    case "$label" in
        kv_aware_events*)
            endpoints=""
            for i in 1 2 3; do
                endpoints+="${endpoints:+, }{address: \"${SIM_ADDRS[$((i - 1))]}\", kv_events: \"tcp://127.0.0.1:$((BASE + 20 + i))\", kv_events_replay: \"tcp://127.0.0.1:$((BASE + 30 + i))\"}"
            done ;;
    esac
    cat <<YAML
listen: 127.0.0.1:$((LB_PORT + idx))
admin: 127.0.0.1:$((LB_PORT + 10 + idx))
pools:
  - name: bench
    models: ["*"]
    endpoints: [$endpoints]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    metrics: {path: /metrics, interval_ms: 100}
    lb_policy: $policy
    lb_config: $lbcfg
YAML
}

# Start the router(s) for $1 (a policy name, or sglang_cache_aware), $2 replicas, store $3, run
# label $4. Sets URLS (what AIPerf targets) and ADMINS (llm-lb admin ports).
start_routers() {
    local policy=$1 replicas=$2 store=$3 label=$4 r
    URLS=()
    ADMINS=()
    ROUTER_PIDS=()
    if [ "$policy" = sglang_cache_aware ]; then
        start_sglang "$SGL_PORT" cache_aware "$RUN_DIR/sglang.log" "${SIM_URLS[@]}"
        ROUTER_PIDS+=("$SGL_PID")
        URLS+=("http://127.0.0.1:$SGL_PORT")
        return
    fi
    if [ "$store" = redis ]; then
        start_redis "$REDIS_PORT" "$RUN_DIR/redis"
        ROUTER_PIDS+=("$REDIS_PID")
    fi
    for ((r = 0; r < replicas; r++)); do
        policy_yaml "$r" "$policy" "$store" "$label" >"$RUN_DIR/policy$r.yaml"
        start_llmlb "$WORK/pingora.yaml" "$RUN_DIR/policy$r.yaml" "$RUN_DIR/llm-lb$r.log" $((LB_PORT + r))
        ROUTER_PIDS+=("$LB_PID")
        ADMINS+=($((LB_PORT + 10 + r)))
    done
    if ((replicas == 1)); then
        URLS+=("http://127.0.0.1:$LB_PORT")
    else
        # Spread requests over the replicas per request, as a layer-7 balancer in front of
        # gateway replicas does (AIPerf's own --url round robin keeps a session on one URL,
        # which would never test shared state).
        local ups=()
        for ((r = 0; r < replicas; r++)); do ups+=("127.0.0.1:$((LB_PORT + r))"); done
        start_nginx "$FRONT_PORT" "$RUN_DIR/nginx" "${ups[@]}"
        ROUTER_PIDS+=("$NGINX_PID")
        URLS+=("http://127.0.0.1:$FRONT_PORT")
    fi
    # Health checks mark the endpoints healthy on their first round; give them one.
    sleep 1.2
}

# AIPerf arguments of a scenario.
scenario_args() {
    case "$1" in
        evict | reset)
            echo "--isl 1000 --isl-stddev 200 --osl 200 --osl-stddev 50 \
                --conversation-num 60 --conversation-turn-mean 5 --conversation-turn-stddev 0 \
                --conversation-turn-delay-mean 0 --concurrency 20" ;;
        evict_varied)
            echo "--isl 1000 --isl-stddev 200 --osl 200 --osl-stddev 50 \
                --conversation-num 60 --conversation-turn-mean 5 --conversation-turn-stddev 2 \
                --conversation-turn-delay-mean 0 --concurrency 20" ;;
        chat | chat_reset)
            echo "--isl 1000 --isl-stddev 300 --osl 200 --osl-stddev 50 \
                --conversation-num 90 --conversation-turn-mean 5 --conversation-turn-stddev 2 \
                --conversation-turn-delay-mean 3000 --conversation-turn-delay-stddev 1500 --concurrency 24" ;;
        docs | docs_reset)
            echo "--num-prefix-prompts 16 --prefix-prompt-length 2000 --isl 300 --isl-stddev 60 \
                --osl 150 --osl-stddev 40 --conversation-num 80 --conversation-turn-mean 4 \
                --conversation-turn-stddev 0 --conversation-turn-delay-mean 0 --concurrency 24" ;;
        seed | replicas)
            echo "--isl 200 --isl-stddev 40 --osl 800 --osl-stddev 200 \
                --conversation-num $SESSIONS --conversation-turn-mean 5 --conversation-turn-stddev 0 \
                --conversation-turn-delay-mean 0 --concurrency 20" ;;
        seed_fixed)
            # The seed workload with every length fixed: 200 input and 800 output tokens a turn.
            echo "--isl 200 --isl-stddev 0 --osl 800 --osl-stddev 0 \
                --conversation-num $SESSIONS --conversation-turn-mean 5 --conversation-turn-stddev 0 \
                --conversation-turn-delay-mean 0 --concurrency 20" ;;
        unique)
            echo "--isl 1000 --isl-stddev 200 --osl 200 --osl-stddev 50 \
                --conversation-num 200 --conversation-turn-mean 1 --conversation-turn-stddev 0 \
                --concurrency 20" ;;
        hot)
            echo "--shared-system-prompt-length 2000 --isl 200 --isl-stddev 40 --osl 400 --osl-stddev 100 \
                --conversation-num 60 --conversation-turn-mean 3 --conversation-turn-stddev 0 \
                --conversation-turn-delay-mean 0 --concurrency 20" ;;
    esac
}

# Policies a scenario runs: "label policy replicas store".
scenario_runs() {
    local p
    case "$SET:$1" in
        kv:evict | kv:reset | kv:evict_varied | kv:chat | kv:chat_reset | kv:docs | kv:docs_reset)
            for p in $POLICIES; do
                case "$p" in
                    kv_aware_events) echo "$p kv_aware 1 embedded" ;;
                    *) echo "$p $p 1 embedded" ;;
                esac
            done ;;
        kv:seed)
            echo "prefix_cache prefix_cache 1 embedded"
            echo "kv_aware_events kv_aware 1 embedded" ;;
        kv:unique)
            echo "global_least_request global_least_request 1 embedded"
            echo "kv_aware_events kv_aware 1 embedded" ;;
        kv:replicas)
            echo "kv_aware_events kv_aware 1 embedded"
            echo "kv_aware_events_3x_redis kv_aware 3 redis" ;;
    esac
    case "$SET:$1" in
        kv:*) return ;;
    esac
    case "$1" in
        seed | seed_fixed | unique | hot)
            for p in $POLICIES; do echo "$p $p 1 embedded"; done ;;
        replicas)
            echo "prefix_cache_3x_redis prefix_cache 3 redis"
            echo "prefix_cache_3x_unshared prefix_cache 3 embedded" ;;
    esac
}

run_one() {
    local scenario=$1 label=$2 policy=$3 replicas=$4 store=$5 round=$6
    RUN_DIR="$WORK/$scenario-$label-r$round"
    mkdir -p "$RUN_DIR"
    step "[$scenario] $label (round $round of $REPEATS)"
    local blocks=$KV_BLOCKS
    case "$scenario" in
        evict | reset | evict_varied | chat | chat_reset) blocks=${ROUTING_EVICT_KV_BLOCKS:-2048} ;;
        docs | docs_reset) blocks=${ROUTING_DOCS_KV_BLOCKS:-1024} ;;
    esac
    start_sims "$blocks"
    start_routers "$policy" "$replicas" "$store" "$label"
    local resetter=""
    if [[ "$scenario" == *reset ]]; then
        # Each simulator in turn drops its prefix cache, 10, 20 and 30 s into the run.
        (
            for i in 1 2 3; do
                sleep 10
                curl -fsS -X POST "${SIM_URLS[$((i - 1))]}/reset_prefix_cache?reset_running_requests=true" \
                    >>"$RUN_DIR/resets.log" 2>&1 || echo "reset of sim $i failed" >>"$RUN_DIR/resets.log"
            done
        ) &
        resetter=$!
    fi
    local url_args=() u t0 t1
    for u in "${URLS[@]}"; do url_args+=(--url "$u"); done
    t0=$(date +%s.%N)
    # AIPerf 0.13.0 cannot load a local tokenizer with HF_HUB_OFFLINE=1 set; a dead endpoint
    # keeps it offline instead. It runs in its own process group, so that its worker processes
    # are stopped with it whatever happens.
    # shellcheck disable=SC2046
    if ! bench_run_group 1500 "$RUN_DIR/aiperf.out" env -u HF_HUB_OFFLINE HF_ENDPOINT=http://127.0.0.1:9 \
        "$BENCH_VENV/bin/aiperf" profile -m "$MODEL" --tokenizer "$TOKENIZER" --endpoint-type chat \
        "${url_args[@]}" --streaming --extra-inputs ignore_eos:true $(scenario_args "$scenario") \
        --use-server-token-count --no-gpu-telemetry --no-server-metrics --random-seed 1 --ui none \
        --artifact-dir "$RUN_DIR/aiperf"; then
        tail -n 30 "$RUN_DIR/aiperf.out" >&2
        echo "AIPerf failed (log: $RUN_DIR/aiperf.out)" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    if [ -n "$resetter" ]; then kill "$resetter" 2>/dev/null || true; wait "$resetter" 2>/dev/null || true; fi
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" collect-routing --aiperf "$RUN_DIR/aiperf" \
        --command "$COMMAND" --stamp "$RESULTS/stamp.json" --raw "$RESULTS/raw/$scenario-$label-r$round" \
        --scenario "$scenario" --label "$label" --policy "$policy" --replicas "$replicas" \
        --store "$store" --round "$round" --wall-start "$t0" --wall-end "$t1" \
        --pick-logs "$RUN_DIR"/llm-lb*.log \
        --sims "${SIM_URLS[@]}" --admins "${ADMINS[@]}" --out "$RESULTS/$scenario-$label-r$round.json"
    local pid
    for pid in "${ROUTER_PIDS[@]}" "${SIM_PIDS[@]}"; do bench_stop "$pid" 10; done
}

START=$(date +%s)
for scenario in $SCENARIOS; do
    for ((round = 1; round <= REPEATS; round++)); do
        while read -r label policy replicas store; do
            run_one "$scenario" "$label" "$policy" "$replicas" "$store" "$round"
        done < <(scenario_runs "$scenario")
    done
done
ELAPSED=$(($(date +%s) - START))
step "all runs done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
# The stamp gets the runs' duration; a tree that changed while the runs went on is said so.
echo "{\"elapsed_s\": $ELAPSED}" | bench_stamp_finish "$RESULTS/stamp.json" "$COMMAND" "$WORK/stamp-end.json"

KV_BLOCKS_NOTE="$KV_BLOCKS"
if [ "$SET" = kv ]; then
    KV_BLOCKS_NOTE="$KV_BLOCKS (evict and reset: ${ROUTING_EVICT_KV_BLOCKS:-2048}, docs and docs_reset: ${ROUTING_DOCS_KV_BLOCKS:-1024})"
fi
"$BENCH_PY" "$ROOT/scripts/bench-report.py" summarize-routing --dir "$RESULTS" --set "$SET" --name "$RESULTS_NAME" \
    --stamp "$RESULTS/stamp.json" --elapsed "$ELAPSED" --time-scale "$TIME_SCALE" --kv-blocks "$KV_BLOCKS_NOTE" --repeats "$REPEATS"
if [ "${ROUTING_NO_REPORT:-0}" != 1 ]; then
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" render
fi
