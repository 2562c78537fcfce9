#!/usr/bin/env bash
# Criterion micro-benchmarks: body parse + prefix block hashing vs body size (1 KiB to 4 MiB,
# benches/parse.rs) and pick cost vs pool size (4 to 1024 endpoints) per policy on the embedded
# store (benches/pick.rs). Collects criterion's estimates into bench/results/micro.{json,csv}
# and regenerates docs/benchmarks.md.
#
#   ./scripts/bench-micro.sh            # about 5 minutes on 2 cores (after the build)
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
ensure_packages
ensure_rust
bench_venv
args=()
[ "${MICRO_QUICK:-0}" = 1 ] && args+=(--quick)
START=$(date +%s)
step "cargo bench --bench parse --bench pick"
rm -rf "$TARGET/criterion/parse" "$TARGET/criterion/pick"
cargo bench -q --bench parse --bench pick -- "${args[@]}" 2>&1 | grep -E '^(parse|pick)/|time:' || true
step "done in $(($(date +%s) - START)) s"
"$BENCH_PY" "$ROOT/scripts/bench-report.py" collect-micro --criterion "$TARGET/criterion"
if [ "${MICRO_NO_REPORT:-0}" != 1 ]; then
    "$BENCH_PY" "$ROOT/scripts/bench-report.py" render
fi
