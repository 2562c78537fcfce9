# Shared helpers for scripts/*.sh (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }

# Install the Debian packages llm-lb needs to build and test, if missing.
ensure_packages() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)                 # llama-server (scripts/engine.sh)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)   # tests/security.rs: TLS certificates
    command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)    # scripts/grafana-check.sh (tests/grafana.rs)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # tests/status_page.rs: a real browser
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
    if ((${#missing[@]})); then
        step "installing ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    fi
}

# Wait until a TCP port on 127.0.0.1 accepts connections (or fail after $2 seconds).
wait_port() {
    local port=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port after ${secs}s" >&2
    return 1
}
