#!/usr/bin/env bash
# Dependency audit with cargo-deny, against deny.toml at the repository root: licences, bans
# (duplicate versions are reported as warnings, wildcards are errors) and sources (crates.io only).
# cargo-deny is built from crates.io once per machine, cached outside the repository and keyed by
# version, so a second run (or CI on the same machine) only pays for the check itself.
#
# Advisories (RustSec) are NOT checked: cargo-deny reads them from the RustSec advisory database,
# a git repository that cannot be fetched here (only the package registries are reachable).
#
# Duplicate versions are printed as warnings without their inclusion graphs:
# `cargo tree -i CRATE@VERSION` shows which dependency pulls each one.
#
# Usage: scripts/audit.sh
# Env:   LLMLB_TOOLS_CACHE  cache directory (default: ${XDG_CACHE_HOME:-~/.cache}/llm-lb/tools)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"

DENY_VERSION="0.20.2"
TOOLS="${LLMLB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-lb/tools}"
DENY_ROOT="$TOOLS/cargo-deny-$DENY_VERSION"

ensure_rust

mkdir -p "$TOOLS"
# One installer at a time per machine (test.sh and CI may run concurrently).
(
    flock 9
    if [ ! -x "$DENY_ROOT/bin/cargo-deny" ]; then
        step "installing cargo-deny $DENY_VERSION (about 3 minutes on 2 cores, once per machine)"
        if ! command -v cc >/dev/null 2>&1; then
            echo "audit: building cargo-deny needs a C toolchain (lib.sh ensure_packages)" >&2
            exit 1
        fi
        # A private target dir: never wait on (or fill) the workspace's target/ lock.
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        cargo install --locked --quiet cargo-deny --version "$DENY_VERSION" \
            --root "$DENY_ROOT" --target-dir "$work/target"
    fi
) 9>"$TOOLS/.lock"

# cargo-deny runs offline, but its `cargo metadata` needs every locked crate on disk, including
# the other platforms' ones (windows-sys, ...) that no build here downloads: fetch them (crates.io).
step "cargo fetch (every platform's crates, for cargo-deny's offline metadata)"
cargo fetch --quiet

step "cargo deny: licenses, bans (duplicate versions are warnings), sources"
echo "note: advisories are NOT checked: the RustSec advisory database (a git repository)" \
    "cannot be fetched on this machine"
PATH="$DENY_ROOT/bin:$PATH" cargo deny --offline --workspace \
    check --hide-inclusion-graph licenses bans sources
