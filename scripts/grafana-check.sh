#!/usr/bin/env bash
# Checks the Grafana dashboard against Grafana's own published schema: deploy/grafana/check/check.mjs
# type-checks every panel, row, variable and Prometheus query of the dashboard with TypeScript
# against @grafana/schema (dashboard and panel-plugin types generated from Grafana's CUE kinds) and
# @grafana/grafana-foundation-sdk (the Prometheus query type), and parses every query with
# Prometheus's PromQL grammar (@prometheus-io/lezer-promql). Installs the checker first when it is
# missing or its lock file changed: `npm ci` in deploy/grafana/check, versions pinned by
# package-lock.json (node_modules is not committed).
#
# With --refs it checks nothing and prints, as JSON, what each query (of the panels and the query
# variables) refers to, read from its PromQL syntax tree: the metric and label matchers of each
# selector, the labels of each by, without, on, ignoring, group_left and group_right clause and the
# selectors each applies to (tests/grafana.rs compares them with a running llm-lb's /metrics; the
# format is described at the top of check.mjs).
#
# Usage: scripts/grafana-check.sh [--refs] [dashboard.json]   (default: deploy/grafana/llm-lb.json)
# Exit status 0 when the dashboard passes; otherwise each problem is printed with its panel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECK="$ROOT/deploy/grafana/check"
MODE=()
if [ "${1:-}" = --refs ]; then MODE=(--refs); shift; fi
DASHBOARD="$(realpath "${1:-$ROOT/deploy/grafana/llm-lb.json}")"

die() { printf 'grafana-check: %s\n' "$*" >&2; exit 1; }
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
    die "node and npm are needed (scripts/test.sh installs them: apt-get install nodejs npm)"

# One install at a time (tests may run this concurrently); reinstall when the lock file changes.
exec 9>"$CHECK/.install.lock"
flock 9
stamp="$CHECK/node_modules/.llm-lb-installed"
want="$(sha256sum "$CHECK/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    printf '== grafana-check: installing the checker (npm ci in %s)\n' "${CHECK#"$ROOT"/}" >&2
    (cd "$CHECK" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed in $CHECK"
    echo "$want" >"$stamp"
fi
flock -u 9

cd "$ROOT"
exec node "$CHECK/check.mjs" "${MODE[@]}" "$DASHBOARD"
