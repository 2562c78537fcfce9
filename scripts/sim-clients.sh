#!/usr/bin/env bash
# Real clients against vllm-sim: the official `openai` Python client (chat and text
# completions, the Responses API with a previous_response_id turn, embeddings; streaming and
# not, cached tokens on a second turn), the official `anthropic` Python SDK (Messages API,
# plain and streaming, cached tokens on a repeated prefix) and a small multi-turn AIPerf
# benchmark (zero errors).
#
# Env: LLMLB_VENV      Python venv to create/reuse (default: $ROOT/target/py-venv)
#      VLLM_SIM_BIN    use this vllm-sim binary instead of building one
#      CARGO_TARGET_DIR honoured by the build (default: $ROOT/target)
# Everything listens on 127.0.0.1; no model or tokenizer is downloaded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMLB_VENV:-$ROOT/target/py-venv}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$TARGET/sim-clients"
PY_DIR="$ROOT/vllm-sim/py"
OPENAI_VERSION="3.54.0"
AIPERF_VERSION="0.13.0"
ANTHROPIC_VERSION="2.10.0"
MODEL="sim-model"

say() { printf '== %s\n' "$*"; }
die() { printf 'sim-clients: %s\n' "$*" >&2; exit 1; }

SIM_PID=""
cleanup() {
  if [ -n "$SIM_PID" ] && kill -0 "$SIM_PID" 2>/dev/null; then
    kill "$SIM_PID" 2>/dev/null || true
    wait "$SIM_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK"

# 1. Python venv with the clients.
command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "python3 >= 3.10 is required (AIPerf)"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "$OPENAI_VERSION" "$AIPERF_VERSION" "$ANTHROPIC_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = tuple(sys.argv[1:4])
sys.exit(0 if (version("openai"), version("aiperf"), version("anthropic")) == want else 1)
EOF
then
  say "installing openai==$OPENAI_VERSION aiperf==$AIPERF_VERSION anthropic==$ANTHROPIC_VERSION (takes a few minutes the first time)"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "openai==$OPENAI_VERSION" "aiperf==$AIPERF_VERSION" "anthropic==$ANTHROPIC_VERSION"
fi

# 2. The simulator.
if [ -n "${VLLM_SIM_BIN:-}" ]; then
  SIM_BIN="$VLLM_SIM_BIN"
else
  say "building vllm-sim"
  (cd "$ROOT" && cargo build -q -p vllm-sim --bin vllm-sim)
  SIM_BIN="$TARGET/debug/vllm-sim"
fi
[ -x "$SIM_BIN" ] || die "no vllm-sim binary at $SIM_BIN"

SIM_LOG="$WORK/vllm-sim.log"
"$SIM_BIN" --host 127.0.0.1 --port 0 --model "$MODEL" --seed 1 2>"$SIM_LOG" &
SIM_PID=$!
URL=""
for _ in $(seq 1 100); do
  URL="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$SIM_LOG" 2>/dev/null | head -n1 || true)"
  [ -n "$URL" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$SIM_LOG" >&2; die "vllm-sim exited"; }
  sleep 0.1
done
[ -n "$URL" ] || die "vllm-sim did not report its address"
say "vllm-sim listening on $URL"

# 3. The official openai client, then the official anthropic SDK.
say "openai client checks"
"$VENV/bin/python" "$PY_DIR/check_openai.py" "$URL/v1" "$MODEL"
say "anthropic SDK checks"
"$VENV/bin/python" "$PY_DIR/check_anthropic.py" "$URL" "$MODEL"

# 4. AIPerf, multi-turn, with a tokenizer built locally.
TOKENIZER="$WORK/tokenizer"
CORPUS="$("$VENV/bin/python" -c 'import aiperf, os; print(os.path.join(os.path.dirname(aiperf.__file__), "dataset/generator/assets/shakespeare.txt"))')"
"$VENV/bin/python" "$PY_DIR/make_tokenizer.py" "$TOKENIZER" "$CORPUS"
ART="$WORK/aiperf"
rm -rf "$ART"
CONVERSATIONS=4
TURNS=3
say "AIPerf: $CONVERSATIONS conversations x $TURNS turns, streaming"
# AIPerf 0.13.0 cannot load a local tokenizer with HF_HUB_OFFLINE=1 set; a dead endpoint
# keeps it offline instead.
if ! env -u HF_HUB_OFFLINE HF_ENDPOINT=http://127.0.0.1:9 timeout 300 \
  "$VENV/bin/aiperf" profile -m "$MODEL" --tokenizer "$TOKENIZER" --endpoint-type chat \
  --url "$URL" --streaming --isl 100 --osl 20 --extra-inputs ignore_eos:true \
  --conversation-num "$CONVERSATIONS" --conversation-turn-mean "$TURNS" \
  --conversation-turn-stddev 0 --conversation-turn-delay-mean 0 --concurrency 4 \
  --use-server-token-count --no-gpu-telemetry --random-seed 1 --ui none \
  --artifact-dir "$ART" >"$WORK/aiperf.out" 2>&1; then
  tail -n 40 "$WORK/aiperf.out" >&2
  die "AIPerf failed (log: $WORK/aiperf.out)"
fi
"$VENV/bin/python" - "$ART/profile_export_aiperf.json" "$((CONVERSATIONS * TURNS))" "$URL" <<'EOF'
import json, sys, urllib.request
path, expected, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = json.load(open(path))
count = d["request_count"]["avg"]
errors = d.get("request_error_rate", {}).get("avg", 0.0)
assert not d.get("was_cancelled"), "AIPerf run was cancelled"
assert count == expected, f"AIPerf completed {count} requests, expected {expected}"
assert errors == 0 and not d.get("error_summary"), f"AIPerf saw errors: {d.get('error_summary')}"
cache = d.get("total_usage_prompt_cache_read_tokens", {}).get("avg", 0)
assert cache > 0, "later turns should report cached prompt tokens"
ttft = d["time_to_first_token"]["avg"]
metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
hits = [l for l in metrics.splitlines() if l.startswith("vllm:prefix_cache_hits_total")]
print(f"AIPerf: {int(count)} requests, 0 errors, TTFT avg {ttft:.1f} ms, "
      f"cached prompt tokens {int(cache)} ({d['overall_usage_prompt_cache_read_pct']['avg']:.0f}%)")
print("vllm-sim:", hits[0] if hits else "no prefix cache metric")
EOF
say "sim-clients: all checks passed"
