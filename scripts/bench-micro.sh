#!/usr/bin/env bash
# Criterion micro-benchmarks: body parse + prefix block hashing vs body size (1 KiB to 4 MiB,
# benches/parse.rs) and pick cost vs pool size (4 to 1024 endpoints) per policy on the embedded
# store, kv_aware also with SmolLM2's chat template and tokenizer, and that tokenization alone
# (benches/pick.rs). Collects criterion's estimates into bench/results/micro.{json,csv} with a
# provenance stamp (bench/results/micro-stamp.json: commit, uncommitted changes, machine,
# command) and regenerates docs/benchmarks.md.
#
#   ./scripts/bench-micro.sh            # about 7 minutes on 2 cores (after the build)
#   MICRO_QUICK=1 ./scripts/bench-micro.sh   # criterion --quick: about a minute, rougher
#
# Environment knobs: MICRO_QUICK=1 (see above), MICRO_NO_REPORT=1 (do not touch the docs),
# CARGO_TARGET_DIR (criterion's output is read from $CARGO_TARGET_DIR/criterion).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"

bench_args "$0" "$@"

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
COMMAND=$(bench_command "$0" MICRO_)
ensure_packages
ensure_rust
bench_venv
# SmolLM2's tokenizer (derived from its GGUF and cached by scripts/engine.sh).
eval "$(bash "$ROOT/scripts/engine.sh")"
export LLMLB_BENCH_TOKENIZER="$LLAMA_TOKENIZER"
mkdir -p "$ROOT/bench/results"
STAMP="$ROOT/bench/results/micro-stamp.json"
bench_stamp "$STAMP" "$COMMAND" </dev/null
args=()
[ "${MICRO_QUICK:-0}" = 1 ] && args+=(--quick)
START=$(date +%s)
step "cargo bench --bench parse --bench pick"
rm -rf "$TARGET/criterion/parse" "$TARGET/criterion/pick" "$TARGET/criterion/tokenize"
cargo bench -q --bench parse --bench pick -- "${args[@]}" 2>&1 | grep -E '^(parse|pick|tokenize)/|time:' || true
step "done in $(($(date +%s) - START)) s"
bench_stamp_finish "$STAMP" "$COMMAND" "$(mktemp)" <<<"{\"tokenizer_sha256\": \"$(bench_sha16 "$LLAMA_TOKENIZER/tokenizer.json")\"}"
"$BENCH_PY" "$ROOT/scripts/bench-report.py" collect-micro --criterion "$TARGET/criterion" --stamp "$STAMP"
if [ "${MICRO_NO_REPORT:-0}" != 1 ]; then
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" render
fi
