#!/usr/bin/env bash
# Where llm-lb's time goes on the embedded request path: a CPU flame graph of llm-lb proxying the
# overhead benchmark's load (oha, the same fixed ~1.1 KiB streaming chat body, 32 connections)
# to one instant backend (`vllm-sim --time-scale 0`), with `prefix_cache` on the embedded store.
# llm-lb is built in release mode with debug symbols in its own target directory (target/profile,
# so the normal release build stays as it is), and `perf record` samples the llm-lb process (all
# its threads, user and kernel) while oha drives it.
#
#   ./scripts/profile-embedded.sh             # 20 s of load; the first build takes several minutes
#   PROFILE_SECS=10 PROFILE_POLICY=round_robin ./scripts/profile-embedded.sh
#
# Environment knobs (all optional):
#   PROFILE_PORT_BASE   first port (default 27500; uses BASE+1, +20, +30)
#   PROFILE_SECS        seconds recorded under load (default 20)
#   PROFILE_CONNS       oha connections (default 32)
#   PROFILE_MAX_TOKENS  output tokens per response (default 16)
#   PROFILE_POLICY      lb_policy on the embedded store (default prefix_cache)
#   PROFILE_FREQ        perf sampling frequency, Hz (default 499)
#   PROFILE_CALL_GRAPH  dwarf (default: unwinds through code built without frame pointers) or fp
#                       (cheaper; llm-lb is then built with frame pointers, in target/profile-fp)
#   PROFILE_SVG         the flame graph (default docs/img/flamegraph-embedded.svg)
#   OHA                 oha binary (as in bench-overhead.sh; installed with cargo when missing)
# Needs perf (Debian's linux-perf, installed when missing) and inferno (`cargo install inferno
# --locked` into ~/.cargo/bin when missing, about 2 minutes).
#
# Results (bench/results/profile/): stamp.json (commit, dirty or not, machine, command, knobs,
# oha's figures under profiling, CPU time sampled and per request), top-self.txt (`perf report
# --no-children --sort symbol`: the frames with the most self time), by-dso.txt (self time per
# binary or library; the kernel is [kernel.kallsyms]), groups.txt (the time grouped by owner —
# the innermost Pingora, tokio or llm-lb frame on each stack, kernel and allocator time counted
# for their caller —, by where the CPU was, kernel time by system call, and the share of samples
# under llm-lb's own functions), stacks.folded.gz (every sampled stack, collapsed, weighted by
# CPU time: what the SVG and groups.txt are computed from), oha.json. perf.data itself stays in
# bench/work/profile/. Percentages are of llm-lb's CPU time, not of the machine's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib.sh"
source "$ROOT/scripts/bench-common.sh"

bench_args "$0" "$@"

BASE="${PROFILE_PORT_BASE:-27500}"
SECS="${PROFILE_SECS:-20}"
CONNS="${PROFILE_CONNS:-32}"
MAX_TOKENS="${PROFILE_MAX_TOKENS:-16}"
POLICY="${PROFILE_POLICY:-prefix_cache}"
FREQ="${PROFILE_FREQ:-499}"
CALL_GRAPH="${PROFILE_CALL_GRAPH:-dwarf}"
SVG="${PROFILE_SVG:-$ROOT/docs/img/flamegraph-embedded.svg}"
MODEL="bench/llama-3.1-8b"
SIM_PORT=$((BASE + 1))
LB_PORT=$((BASE + 20))
RESULTS="$ROOT/bench/results/profile"
WORK="$ROOT/bench/work/profile"
COMMAND=$(bench_command "$0" PROFILE_ OHA)
case $CALL_GRAPH in
    dwarf) TARGET_DIR="$ROOT/target/profile" RUSTFLAGS_EXTRA="" ;;
    fp) TARGET_DIR="$ROOT/target/profile-fp" RUSTFLAGS_EXTRA="-C force-frame-pointers=yes" ;;
    *) echo "PROFILE_CALL_GRAPH must be dwarf or fp, not $CALL_GRAPH" >&2; exit 2 ;;
esac

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

ensure_rust
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
if ! command -v perf >/dev/null; then
    step "installing perf (linux-perf)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq linux-perf >/dev/null
fi
ensure_oha
for tool in inferno-collapse-perf inferno-flamegraph; do
    if ! command -v "$tool" >/dev/null && [ ! -x "$HOME/.cargo/bin/$tool" ]; then
        step "installing inferno (cargo install inferno --locked; about 2 minutes on 2 cores)"
        cargo install inferno --locked
        break
    fi
done
INFERNO_COLLAPSE=$(command -v inferno-collapse-perf || echo "$HOME/.cargo/bin/inferno-collapse-perf")
INFERNO_FLAMEGRAPH=$(command -v inferno-flamegraph || echo "$HOME/.cargo/bin/inferno-flamegraph")

step "building llm-lb and vllm-sim (release with debug symbols, in ${TARGET_DIR#"$ROOT"/})"
CARGO_PROFILE_RELEASE_DEBUG=true RUSTFLAGS="${RUSTFLAGS:-} $RUSTFLAGS_EXTRA" \
    cargo build --release -q -p llm-lb -p vllm-sim --target-dir "$TARGET_DIR"
LLMLB_BIN="$TARGET_DIR/release/llm-lb"
SIM_BIN="$TARGET_DIR/release/vllm-sim"

ports_free "$SIM_PORT" "$LB_PORT" $((LB_PORT + 10))
rm -rf "$WORK" "$RESULTS"
mkdir -p "$WORK" "$RESULTS"
write_pingora_yaml "$WORK"
python3 - "$POLICY" "$SECS" "$CONNS" "$MAX_TOKENS" "$FREQ" "$CALL_GRAPH" \
    "$(sha256sum "$LLMLB_BIN" | cut -c1-16)" "$("$OHA" --version | awk '{print $2}')" \
    "$(perf --version)" <<'EOF' | bench_stamp "$RESULTS/stamp.json" "$COMMAND"
import json, sys
policy, secs, conns, tokens, freq, cg, sha, oha, perf = sys.argv[1:]
print(json.dumps({"policy": policy, "store": "embedded", "seconds_recorded": int(secs),
                  "connections": int(conns), "max_tokens": int(tokens),
                  "perf": f"{perf}: perf record -e cpu-clock -F {freq} --call-graph {cg} -p <llm-lb>",
                  "llm_lb_build": "release, CARGO_PROFILE_RELEASE_DEBUG=true"
                                  + (", -C force-frame-pointers=yes" if cg == "fp" else ""),
                  "llm_lb_sha256_16": sha, "oha_version": oha}))
EOF

step "starting vllm-sim --time-scale 0 and llm-lb ($POLICY, embedded store)"
bench_spawn "$WORK/sim.log" "$SIM_BIN" --host 127.0.0.1 --port "$SIM_PORT" --model "$MODEL" \
    --time-scale 0 --max-num-seqs 256 --seed 1
wait_port "$SIM_PORT" 30
write_policy_yaml "$WORK/policy.yaml" "$LB_PORT" "$SIM_PORT" "$POLICY" "{}"
start_llmlb "$WORK/pingora.yaml" "$WORK/policy.yaml" "$WORK/llm-lb.log" "$LB_PORT"
sleep 1.5 # first health-check round

write_chat_body "$WORK/body.json" "$MODEL" "$MAX_TOKENS"
URL="http://127.0.0.1:$LB_PORT/v1/chat/completions"
code=$(curl -s -o "$WORK/check.out" -w '%{http_code}' -H 'content-type: application/json' \
    --data-binary "@$WORK/body.json" "$URL")
grep -q '\[DONE\]' "$WORK/check.out" && [ "$code" = 200 ] ||
    { echo "llm-lb answered $code: $(head -c 300 "$WORK/check.out")" >&2; exit 1; }

OHA_ARGS=(-c "$CONNS" -w --no-tui --output-format json -m POST -T application/json
    -D "$WORK/body.json")
step "warm-up (2 s), then $SECS s of load recorded by perf ($CALL_GRAPH call graphs, $FREQ Hz)"
"$OHA" -z 2s "${OHA_ARGS[@]}" -o "$WORK/warmup.json" "$URL" >/dev/null
# The load runs 1 s before and 2 s after the recording, so perf sees steady state only.
bench_spawn "$WORK/oha.out" "$OHA" -z "$((SECS + 3))s" "${OHA_ARGS[@]}" -o "$RESULTS/oha.json" "$URL"
OHA_PID=$LAST_PID
sleep 1
perf record -e cpu-clock -F "$FREQ" --call-graph "$CALL_GRAPH" -p "$LB_PID" -o "$WORK/perf.data" \
    -- sleep "$SECS" 2>"$WORK/perf-record.log" >/dev/null
wait "$OHA_PID"
bench_stop_all

step "flame graph and reports"
# Sample counts and percentages are of the llm-lb process (every thread), not of the machine.
# perf report's rows (percentage and key), without its header and empty IPC columns.
report() {
    perf report -i "$WORK/perf.data" --no-children -g none --stdio "$@" 2>/dev/null |
        sed -nE 's/^ +([0-9.]+%) +(.*[^ -])[ -]*$/\1  \2/p'
}
{
    echo "# perf report --no-children --sort symbol --percent-limit 0.25"
    echo "# self time, % of llm-lb's sampled CPU time; [k] kernel, [.] user space"
    report --sort symbol --percent-limit 0.25
} >"$RESULTS/top-self.txt"
{
    echo "# perf report --no-children --sort dso: self time per binary or library"
    report --sort dso
} >"$RESULTS/by-dso.txt"
perf script -i "$WORK/perf.data" 2>/dev/null | "$INFERNO_COLLAPSE" --all >"$WORK/stacks.folded"
gzip -9 -c "$WORK/stacks.folded" >"$RESULTS/stacks.folded.gz"
python3 - "$RESULTS/stamp.json" "$RESULTS/oha.json" "$WORK/stacks.folded" <<'EOF' >"$RESULTS/groups.txt"
import json, re, sys
stamp_path, oha_path, folded = sys.argv[1:]
oha = json.load(open(oha_path))
stamp = json.load(open(stamp_path))
rps = oha["summary"]["requestsPerSec"]
stamp["oha_under_profiling"] = {
    "requests_per_s": round(rps, 1),
    "p50_ms": round(1000 * oha["latencyPercentiles"]["p50"], 3),
    "p99_ms": round(1000 * oha["latencyPercentiles"]["p99"], 3),
    "status": oha.get("statusCodeDistribution", {}),
}
# Frames: kernel ones end in _[k] (inferno-collapse-perf --all). Weights are cpu-clock time (ns).
OWNERS = [
    ("llm-lb: request body parsing and prefix hashing (LlmRequest::parse, serde_json, xxh3)",
     r"llm_lb::request::|llm_lb::prefix::"),
    ("llm-lb: response usage scanning (token counts from the stream)", r"llm_lb::usage::"),
    ("llm-lb: state store and policy (pick, release)", r"llm_lb::(store|policy|selection)::"),
    ("llm-lb: logging and metrics", r"llm_lb::telemetry::|\blog::|env_logger::|prometheus::|opentelemetry"),
    ("llm-lb: the rest (proxy callbacks, body reading, routing)", r"llm_lb::"),
    ("Pingora: HTTP/1 reading, parsing and writing, proxy state machine, connection pool",
     r"pingora"),
    ("tokio: scheduler, I/O driver (epoll), timers, channels", r"tokio::|mio::"),
]
# Frames that count for their caller: tokio's and mio's socket plumbing (so a send() issued by
# Pingora is Pingora's), serde and xxh3 (llm-lb's parsers call them); kernel, libc, the
# allocator, std and core match no owner anyway.
PLUMBING = (r"tokio::io::|tokio::net::|mio::net::|mio::io_source::|"
            r"mio::sys::unix::selector::stateless_io_source|tokio::runtime::io::registration|"
            r"serde_json::|serde::|xxhash_rust::")
ALLOC = (r"^(__libc_|__GI___libc_)?(malloc|free|cfree|realloc|calloc)\b|^_int_(malloc|free|realloc)|"
         r"^malloc_consolidate|^unlink_chunk|^tcache|^sysmalloc|^__mem(move|cpy|set|cmp)|^mem(move|cpy|set|cmp)|"
         r"^__rust_(alloc|dealloc|realloc)|^__rdl_|^cfree")
INCLUSIVE = [
    ("LlmRequest::parse (body JSON parse, prefix blocks and hashes)", r"llm_lb::request::LlmRequest::parse"),
    ("llm_lb::store (embedded store)", r"llm_lb::store::"),
    ("llm_lb::policy (pick, release)", r"llm_lb::policy::"),
    ("llm_lb::usage (usage scan of the response stream)", r"llm_lb::usage::"),
    ("llm_lb::telemetry (access log, metrics)", r"llm_lb::telemetry::"),
    ("any llm_lb frame (llm-lb's callbacks and everything they call)", r"llm_lb::"),
]
total = 0
owner, owner_k, where, entry, inclusive = {}, {}, {}, {}, {g: 0 for g, _ in INCLUSIVE}
for line in open(folded):
    stack, _, n = line.rstrip("\n").rpartition(" ")
    n = int(n)
    total += n
    frames = stack.split(";")
    g = "other (thread start-up, libc, std)"
    for f in reversed(frames):
        if f.endswith("_[k]") or re.search(PLUMBING, f):
            continue
        hit = next((name for name, rx in OWNERS if re.search(rx, f)), None)
        if hit:
            g = hit
            break
    owner[g] = owner.get(g, 0) + n
    leaf = frames[-1]
    if leaf.endswith("_[k]"):
        owner_k[g] = owner_k.get(g, 0) + n
        w = "the kernel"
        i = next(i for i, f in enumerate(frames) if f.endswith("_[k]"))
        how = frames[i].removesuffix("_[k]")
        caller = frames[i - 1] if i else "?"
        if how.startswith("entry_SYSCALL"):
            name = re.sub(r"^(__libc_|__GI___libc_|__GI___|__GI_|__)", "", caller)
            if name in ("syscall", "futex_wait"):
                e = "syscall futex (threads parking and waking)"
            elif name.startswith("lll_lock"):
                e = "syscall futex (glibc's internal locks: malloc arenas)"
            else:
                e = f"syscall {name}"
        elif "page_fault" in how:
            e = "page faults"
        else:
            e = "interrupts (timer, IPIs, network softirqs)"
        entry[e] = entry.get(e, 0) + n
    elif re.search(ALLOC, leaf.removesuffix("_[i]")):
        w = "the allocator and memcpy/memmove (glibc)"
    else:
        w = "user code (Pingora, tokio, llm-lb, std)"
    where[w] = where.get(w, 0) + n
    for name, rx in INCLUSIVE:
        if any(re.search(rx, f) for f in frames):
            inclusive[name] += n
cpu_s = total / 1e9
secs = stamp["seconds_recorded"]
stamp["cpu_seconds_sampled"] = round(cpu_s, 2)
stamp["cpu_us_per_request"] = round(1e6 * cpu_s / (rps * secs), 1) if rps else None
json.dump(stamp, open(stamp_path, "w"), indent=1)
pct = lambda v: f"{100 * v / total:5.1f} %"
print(f"llm-lb ({stamp['policy']}, embedded store) under oha: {rps:.0f} req/s during profiling; "
      f"{cpu_s:.1f} s of llm-lb CPU sampled in {secs} s ({cpu_s / secs:.2f} cores), "
      f"about {stamp['cpu_us_per_request']} µs of CPU per request.")
print(f"{stamp['perf']}")
print(f"commit {stamp['commit']}{' + uncommitted changes' if stamp['dirty'] else ''}; {stamp['machine']}")
print(f"command: {stamp['command']}")
print("Percentages are of llm-lb's sampled CPU time (all its threads).\n")
print("By owner: the innermost Pingora, tokio or llm-lb frame on the stack (time in the kernel, libc,")
print("the allocator, std/core and tokio's socket wrappers counts for the code that called them):")
for g, v in sorted(owner.items(), key=lambda kv: -kv[1]):
    print(f"  {pct(v)}  {g}  [in the kernel: {pct(owner_k.get(g, 0)).strip()}]")
print("\nWhere the CPU was (the sampled frame itself):")
for g, v in sorted(where.items(), key=lambda kv: -kv[1]):
    print(f"  {pct(v)}  {g}")
print("\nTime in the kernel by how it was entered:")
for g, v in sorted(entry.items(), key=lambda kv: -kv[1])[:10]:
    print(f"  {pct(v)}  {g}")
print("\nInclusive: samples with the frame anywhere on the stack (they overlap):")
for g, v in inclusive.items():
    print(f"  {pct(v)}  {g}")
EOF
SHORT=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["commit"][:7] + (" + uncommitted changes" if s["dirty"] else ""))' "$RESULTS/stamp.json")
"$INFERNO_FLAMEGRAPH" --colors rust --hash --width 1600 --minwidth 0.5 \
    --title "llm-lb, $POLICY on the embedded store: oha $CONNS connections, one instant vllm-sim ($SECS s, $FREQ Hz, $CALL_GRAPH)" \
    --subtitle "commit $SHORT; $(nproc) vCPU, $(uname -sr); $COMMAND" \
    "$WORK/stacks.folded" >"$SVG"
cat "$RESULTS/groups.txt"
echo
head -40 "$RESULTS/top-self.txt"
step "wrote ${SVG#"$ROOT"/} and ${RESULTS#"$ROOT"/}/"
