#!/usr/bin/env bash
# Long fault-injection run: minutes of load through llm-lb (release build) over four simulated
# vLLM servers while a fault rotates every few seconds — a server killed and restarted, a server
# hanging, a server answering 503 at once, clients abandoning streams. After every round the
# proxy must settle (nothing in flight, no leaked connection); at the end its RSS must stay near
# its RSS after warm-up and at most 10 % of the requests may have failed (only those that were on
# the faulty server). Prints one line per round and a summary.
#
#   ./scripts/soak.sh            # 300 s
#   SOAK_SECS=1800 ./scripts/soak.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"

ensure_packages
ensure_rust

step "soak: ${SOAK_SECS:=300} s of load with rotating faults (release build)"
SOAK_SECS="$SOAK_SECS" cargo test --release --test faults soak -- --ignored --nocapture
