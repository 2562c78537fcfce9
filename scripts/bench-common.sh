# Helpers shared by scripts/bench-*.sh (sourced, not run). Every process a benchmark starts is
# started through these helpers, recorded by pid, and stopped by pid in the EXIT trap, so a
# benchmark leaves nothing behind even when it fails or is interrupted.
#
# Expects ROOT to be set (the repository) and scripts/lib.sh to be sourced.

BENCH_PIDS=()          # every process started (in start order)
BENCH_GROUPS=()        # process groups of foreground clients (bench_run_group)
BENCH_PY=""            # python of the benchmark venv (set by bench_venv)
BENCH_SGL_PY=""        # python of the sglang-router venv (set by bench_sgl_venv)

# The command line of a bench script ($1) with its arguments: --help prints the script's header
# comment; no other argument is accepted (knobs are environment variables).
bench_args() {
    local script=$1
    shift
    case "${1:-}" in
        -h | --help)
            sed -n '2,/^set -euo/p' "$script" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        "") ;;
        *)
            echo "unknown argument: $1 (see --help)" >&2
            exit 2
            ;;
    esac
}

# Start a command in the background, logging to $1; record its pid in BENCH_PIDS and $LAST_PID.
bench_spawn() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    LAST_PID=$!
    BENCH_PIDS+=("$LAST_PID")
}

# Stop one process started by bench_spawn: SIGTERM, then SIGKILL after $2 seconds (default 10).
bench_stop() {
    local pid=$1 secs=${2:-10} i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Stop every process this benchmark started, newest first.
bench_stop_all() {
    local i
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
        bench_stop "${BENCH_PIDS[i]}" 10
    done
    BENCH_PIDS=()
}

# The EXIT trap: stop everything, then make sure nothing we started survives (children of
# nginx and the Python routers included: they are found by their parent pid before it dies).
bench_cleanup() {
    local rc=$?
    set +e
    local kids=()
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kids+=($(pgrep -P "$pid" 2>/dev/null))
    done
    for pid in "${BENCH_GROUPS[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null
    done
    bench_stop_all
    for pid in "${kids[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
    return $rc
}

# Run a client (and every process it forks) in its own process group, log to $2, at most $1
# seconds; return its exit status. The group is killed on timeout and by bench_cleanup.
bench_run_group() {
    local secs=$1 log=$2 pid rc=0 i
    shift 2
    setsid "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    BENCH_GROUPS+=("$pid")
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "timed out after ${secs}s: $1" >&2
        kill -TERM -- "-$pid" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$pid" 2>/dev/null || true
        rc=124
    fi
    wait "$pid" || rc=$?
    # Whatever the client left in its group goes too.
    kill -KILL -- "-$pid" 2>/dev/null || true
    return "$rc"
}

# Wait until http://127.0.0.1:$1$2 answers 200 (or fail after $3 seconds).
wait_http() {
    local port=$1 path=$2 secs=${3:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port$path" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "http://127.0.0.1:$port$path did not answer 200 within ${secs}s" >&2
    return 1
}

# Fail if something already listens on one of the given ports (a leftover of another run).
ports_free() {
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port 127.0.0.1:$port is in use: pick another base port (see the usage text)" >&2
            exit 1
        fi
    done
}

# Release builds of llm-lb and vllm-sim.
bench_build() {
    step "building llm-lb and vllm-sim (release; the first build takes several minutes)"
    (cd "$ROOT" && cargo build --release -q -p llm-lb -p vllm-sim)
    LLMLB_BIN="$ROOT/target/release/llm-lb"
    SIM_BIN="$ROOT/target/release/vllm-sim"
}

# The benchmark venv (AIPerf, matplotlib), shared with scripts/sim-clients.sh.
bench_venv() {
    local venv="${LLMLB_VENV:-$ROOT/target/py-venv}"
    command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
    if [ ! -x "$venv/bin/python" ]; then
        step "creating venv $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" - <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(0 if version("aiperf") == "0.13.0" else 1)
EOF
        step "installing aiperf==0.13.0 and matplotlib into $venv (a few minutes the first time)"
        "$venv/bin/pip" install -q --disable-pip-version-check "aiperf==0.13.0" matplotlib
    fi
    "$venv/bin/python" -c 'import matplotlib' 2>/dev/null ||
        "$venv/bin/pip" install -q --disable-pip-version-check matplotlib
    BENCH_PY="$venv/bin/python"
    BENCH_VENV="$venv"
}

# A venv at $1 holding $2 at version $3 (created or fixed up when it does not).
bench_pinned_venv() {
    local venv=$1 package=$2 version=$3
    if [ ! -x "$venv/bin/python" ]; then
        step "creating venv $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c 'from importlib.metadata import version; import sys; sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)' "$package" "$version" 2>/dev/null; then
        step "installing $package==$version into $venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "$package==$version"
    fi
}

# A separate venv for the SGLang router (its web stack must not disturb AIPerf's).
bench_sgl_venv() {
    local venv="${LLMLB_SGL_VENV:-$ROOT/target/sgl-venv}"
    bench_pinned_venv "$venv" sglang-router 0.3.2
    BENCH_SGL_PY="$venv/bin/python"
}

# Start the SGLang router (0.3.2) on $1 with policy $2 in front of the worker URLs $3...; log $LOGDIR.
start_sglang() {
    local port=$1 policy=$2 log=$3
    shift 3
    # HF_ENDPOINT: the router tries to fetch a tokenizer when a worker reports a model path;
    # keep any such attempt on loopback.
    bench_spawn "$log" env HF_ENDPOINT=http://127.0.0.1:9 "$BENCH_SGL_PY" -m sglang_router.launch_router \
        --host 127.0.0.1 --port "$port" --prometheus-host 127.0.0.1 --prometheus-port $((port + 1)) \
        --policy "$policy" --worker-urls "$@" --shutdown-grace-period-secs 1 \
        --worker-startup-check-interval 1 --log-level warn
    SGL_PID=$LAST_PID
    # Its own /health is 200 with no worker; /readiness waits for a healthy worker.
    wait_http "$port" /readiness 60
}

# A Pingora server file for a run in $1 (pid file and upgrade socket there, short grace).
write_pingora_yaml() {
    local dir=$1
    sed -e "s#/tmp/llm-lb.pid#$dir/llm-lb.pid#" -e "s#/tmp/llm-lb-upgrade.sock#$dir/upgrade.sock#" \
        -e "s#grace_period_seconds: 600#grace_period_seconds: 1#" \
        -e "s#graceful_shutdown_timeout_seconds: 10#graceful_shutdown_timeout_seconds: 1#" \
        "$ROOT/conf/pingora.yaml" >"$dir/pingora.yaml"
}

# A policy file $1 for one llm-lb on port $2 (admin on $2 + 10) with a single pool of any model in
# front of the one endpoint 127.0.0.1:$3, lb_policy $4, lb_config $5 (YAML flow, default {}).
write_policy_yaml() {
    local file=$1 port=$2 upstream_port=$3 policy=$4 lbcfg=${5:-"{}"}
    cat >"$file" <<YAML
listen: 127.0.0.1:$port
admin: 127.0.0.1:$((port + 10))
pools:
  - name: bench
    models: ["*"]
    endpoints: ["127.0.0.1:$upstream_port"]
    health_check: {path: /health, interval_ms: 1000, timeout_ms: 500}
    lb_policy: $policy
    lb_config: $lbcfg
YAML
}

# The fixed streaming chat request of the overhead benchmarks, to $1: model $2, $3 output
# tokens, a ~1 KiB system prompt and a question.
write_chat_body() {
    "${BENCH_PY:-python3}" - "$2" "$3" >"$1" <<'EOF'
import json, sys
system = ("You are a meticulous assistant for a logistics company. Answer with numbered steps, "
          "cite the relevant policy section, and keep a friendly, concise tone. ") * 7
print(json.dumps({"model": sys.argv[1], "stream": True, "max_tokens": int(sys.argv[2]),
                  "messages": [{"role": "system", "content": system},
                               {"role": "user", "content": "A pallet arrived damaged. What now?"}]}))
EOF
}

# oha (the HTTP load generator of the overhead benchmarks) in $OHA: oha on PATH, else
# ~/.cargo/bin/oha, installed with cargo when missing.
ensure_oha() {
    OHA="${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}"
    if [ ! -x "$OHA" ]; then
        step "installing oha (cargo install oha --locked; about 7 minutes on 2 cores)"
        cargo install oha --locked --version 1.16.0
        OHA="$HOME/.cargo/bin/oha"
    fi
}

# Start llm-lb with pingora file $1 and policy file $2, logging to $3; wait for port $4.
start_llmlb() {
    local pingora=$1 policy=$2 log=$3 port=$4
    "$LLMLB_BIN" -c "$pingora" -p "$policy" -t >/dev/null 2>"$log.check" || {
        cat "$log.check" >&2
        echo "llm-lb rejected $policy" >&2
        exit 1
    }
    bench_spawn "$log" env RUST_LOG="${BENCH_RUST_LOG:-warn}" "$LLMLB_BIN" -c "$pingora" -p "$policy"
    LB_PID=$LAST_PID
    wait_port "$port" 30
}

# Start redis-server on port $1 in the foreground of a background job (so we hold its pid).
start_redis() {
    local port=$1 dir=$2
    mkdir -p "$dir"
    bench_spawn "$dir/redis.log" redis-server --port "$port" --bind 127.0.0.1 --save '' \
        --appendonly no --daemonize no --dir "$dir"
    REDIS_PID=$LAST_PID
    wait_port "$port" 30
}

# Start nginx (round robin over the upstreams $3...) listening on $1, files under $2.
start_nginx() {
    local port=$1 dir=$2 servers="" u
    shift 2
    for u in "$@"; do servers="$servers server $u;"; done
    mkdir -p "$dir/logs" "$dir/tmp"
    cat >"$dir/nginx.conf" <<NGINX
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body; proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi; uwsgi_temp_path $dir/tmp/uwsgi; scgi_temp_path $dir/tmp/scgi;
  upstream llm { $servers keepalive 64; }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://llm; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off; proxy_cache off; proxy_read_timeout 3600s;
    }
  }
}
NGINX
    bench_spawn "$dir/nginx.out" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
    NGINX_PID=$LAST_PID
    wait_port "$port" 30
}

# Packages the benchmarks need besides lib.sh's: nginx (nginx-light) and curl.
ensure_bench_packages() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if ((${#missing[@]})); then
        step "installing ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# The command that reproduces this run: every environment variable whose name starts with one
# of the prefixes $2... (the script's knobs) as set now, then the script $1 relative to ROOT.
bench_command() {
    local script=$1 prefix var val out=""
    shift
    for prefix in "$@"; do
        for var in $(compgen -e | grep "^$prefix" | sort); do
            val=${!var}
            if [[ $val =~ ^[A-Za-z0-9_./:=,+-]*$ ]]; then
                out+="$var=$val "
            else
                out+="$var='${val//\'/\'\\\'\'}' "
            fi
        done
    done
    script="$(cd "$(dirname "$script")" && pwd)/$(basename "$script")"
    printf '%s%s' "$out" "${script#"$ROOT"/}"
}

# Write a provenance stamp (JSON) to $1 for a run started by command $2: the commit (full sha),
# whether the work tree had uncommitted changes outside bench/results and docs (which files, and
# a hash of their diff and contents, so two runs from the same dirty tree can be told apart), the
# machine, the date. Extra fields come as JSON on stdin (an object, or nothing). Read-only git
# (no index refresh, no lock), so it never disturbs someone else's git.
bench_stamp() {
    local out=$1 command=$2 extra
    local -a paths=(-- . ':(exclude)bench/results' ':(exclude)docs' ':(exclude)README.md')
    extra=$(cat)
    STAMP_COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    STAMP_CHANGED="$(git --no-optional-locks -C "$ROOT" status --porcelain "${paths[@]}" 2>/dev/null)" \
    STAMP_DIFF="$({
        git --no-optional-locks -C "$ROOT" diff HEAD "${paths[@]}" 2>/dev/null
        git -C "$ROOT" ls-files -z --others --exclude-standard "${paths[@]}" 2>/dev/null |
            while IFS= read -r -d '' f; do printf '%s\n' "$f"; cat "$ROOT/$f" 2>/dev/null; done
    } | sha256sum | cut -c1-16)" \
    STAMP_COMMAND="$command" STAMP_EXTRA="${extra:-{\}}" STAMP_KERNEL="$(uname -srm)" \
        python3 - "$out" <<'PY'
import datetime, json, os, sys
e = os.environ
cpu, mem, distro = "unknown CPU", "", ""
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
for line in open("/proc/meminfo"):
    if line.startswith("MemTotal"):
        mem = f", {int(line.split()[1]) / 1048576:.0f} GiB RAM"
try:
    for line in open("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            distro = ", " + line.split("=", 1)[1].strip().strip('"')
except OSError:
    pass
changed = [l.strip() for l in e["STAMP_CHANGED"].splitlines() if l.strip()]
stamp = {
    "commit": e["STAMP_COMMIT"],
    "dirty": bool(changed),
    "uncommitted_changes": changed,
    "diff_sha256": e["STAMP_DIFF"] if changed else None,
    "machine": f"{os.cpu_count()} vCPU ({cpu}){mem}{distro}, {e['STAMP_KERNEL']}",
    "command": e["STAMP_COMMAND"],
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
}
stamp.update(json.loads(e["STAMP_EXTRA"]))
json.dump(stamp, open(sys.argv[1], "w"), indent=1)
PY
    if grep -q '"dirty": true' "$out"; then
        echo "WARNING: the work tree has uncommitted changes: $out records the run as dirty" >&2
    fi
}

# The first 16 hex digits of the sha256 of file $1 ("null" when there is none), for stamps.
bench_sha16() {
    if [ -f "$1" ]; then sha256sum "$1" | cut -c1-16; else echo null; fi
}

# Finish the stamp $1 that bench_stamp wrote when the run of command $2 started: add the fields of
# the JSON object on stdin (or nothing), the date it finished, and, when the commit or the
# uncommitted changes are no longer those the stamp recorded, `tree_changed_during_run: true` and
# a warning. $3: a scratch file for the second stamp.
bench_stamp_finish() {
    local stamp=$1 command=$2 scratch=$3 extra
    extra=$(cat)
    bench_stamp "$scratch" "$command" </dev/null 2>/dev/null
    STAMP_EXTRA="${extra:-{\}}" python3 - "$stamp" "$scratch" <<'PY'
import json, os, sys
stamp, end = (json.load(open(p)) for p in sys.argv[1:])
stamp.update(json.loads(os.environ["STAMP_EXTRA"]))
stamp["finished"] = end["date"]
key = lambda s: (s["commit"], s["uncommitted_changes"], s["diff_sha256"])
if key(end) != key(stamp):
    stamp["tree_changed_during_run"] = True
    print(f"WARNING: the work tree changed while the benchmark ran (recorded in {sys.argv[1]})",
          file=sys.stderr)
json.dump(stamp, open(sys.argv[1], "w"), indent=1)
PY
}
