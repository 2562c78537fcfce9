#!/usr/bin/env bash
# Overload with priorities and tenants: two simulated vLLM servers (4 batch seats each, 60 output
# tokens at 10 ms a token: about 18 requests/s between them) behind llm-lb, offered 1.75x that
# for 30 s by four open-loop classes — critical (tenant ops, 1.5 req/s), standard tenant-a
# (14 req/s) and tenant-b (10 req/s), sheddable (batch, 6 req/s) — streaming completions. Two configurations
# side by side in each round: llm-lb's waiting room (admission: 4 in flight per endpoint,
# deadlines critical 60 s, standard 10 s, sheddable 2 s) and no waiting room (requests pile onto
# the engines' queues). Reports per class goodput, refusals and TTFT; per band the deviation of
# each tenant's goodput from its max-min fair share, waits past the deadline (from llm-lb's
# llmlb_queue_wait_seconds) and the engines' waiting queues (sampled every 250 ms). Results, raw
# files and provenance in bench/results/admission/.
#
#   ./scripts/bench-admission.sh                  # 3 rounds (about 5 minutes)
#   ADMISSION_REPEATS=1 ./scripts/bench-admission.sh
#
# Knobs: ADMISSION_REPEATS (3), ADMISSION_DURATION (30 s), ADMISSION_PORT_BASE (29000).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"
bench_args "$0" "$@"

REPEATS="${ADMISSION_REPEATS:-3}"
DURATION="${ADMISSION_DURATION:-30}"
BASE="${ADMISSION_PORT_BASE:-29000}"
MODEL="bench/llama-3.1-8b"
LB_PORT=$((BASE + 80))
RESULTS="$ROOT/bench/results/admission"
WORK="$ROOT/bench/work/admission"
COMMAND="ADMISSION_REPEATS=$REPEATS ADMISSION_DURATION=$DURATION scripts/bench-admission.sh"
DEADLINES='{"critical": 60, "standard": 10, "sheddable": 2}'

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

ensure_packages
ensure_rust
bench_build
bench_venv
ports_free $((BASE + 1)) $((BASE + 2)) "$LB_PORT" $((LB_PORT + 1))
rm -rf "$WORK" "$RESULTS"
mkdir -p "$WORK" "$RESULTS"
write_pingora_yaml "$WORK"

policy_file() { # $1 config name, $2 file
    {
        echo "listen: 127.0.0.1:$LB_PORT"
        echo "admin: 127.0.0.1:$((LB_PORT + 1))"
        echo "pools:"
        echo "  - name: sim"
        echo "    models: ['*']"
        echo "    endpoints: ['127.0.0.1:$((BASE + 1))', '127.0.0.1:$((BASE + 2))']"
        echo "    lb_policy: round_robin"
        echo "    health_check: {enabled: false}"
        if [ "$1" = waiting_room ]; then
            echo "    admission:"
            echo "      max_inflight: 4"
            echo "      bands:"
            echo "        critical: {queue: 1024, deadline_ms: 60000}"
            echo "        standard: {queue: 512, deadline_ms: 10000}"
            echo "        sheddable: {queue: 64, deadline_ms: 2000}"
        fi
    } >"$2"
}

for ((round = 1; round <= REPEATS; round++)); do
    for config in waiting_room no_waiting_room; do
        RUN_DIR="$RESULTS/$config-$round"
        mkdir -p "$RUN_DIR"
        step "round $round/$REPEATS: $config"
        for i in 1 2; do
            bench_spawn "$RUN_DIR/sim$i.log" "$SIM_BIN" --host 127.0.0.1 --port $((BASE + i)) \
                --model "$MODEL" --seed "$i" --max-num-seqs 4 --itl-ms 10 --load-factor 1.0
        done
        for i in 1 2; do wait_port $((BASE + i)) 30; done
        policy_file "$config" "$RUN_DIR/policy.yaml"
        start_llmlb "$WORK/pingora.yaml" "$RUN_DIR/policy.yaml" "$RUN_DIR/llm-lb.log" "$LB_PORT"
        "$BENCH_PY" "$ROOT/scripts/bench_admission.py" drive --port "$LB_PORT" --model "$MODEL" \
            --engines "127.0.0.1:$((BASE + 1))" "127.0.0.1:$((BASE + 2))" \
            --duration "$DURATION" --seed "$round" --out "$RUN_DIR"
        curl -fsS "http://127.0.0.1:$((LB_PORT + 1))/metrics" >"$RUN_DIR/llmlb-metrics.txt"
        "$BENCH_PY" "$ROOT/scripts/bench_admission.py" collect --run "$RUN_DIR" --config "$config" \
            --duration "$DURATION" --deadlines "$DEADLINES"
        bench_stop_all
    done
done

{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet -- src Cargo.toml Cargo.lock || echo ' (dirty)')"
    echo "machine: $(nproc) cores, $(uname -srm)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: $COMMAND"
} >"$RESULTS/provenance.txt"
"$BENCH_PY" "$ROOT/scripts/bench_admission.py" summarize --results "$RESULTS" \
    --header "$(sed 's/^/    /' "$RESULTS/provenance.txt")"
