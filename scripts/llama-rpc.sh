#!/usr/bin/env bash
# Builds llama.cpp's own RPC mode for the anchor benchmark: ggml-rpc-server and llama-bench (which takes
# --rpc and reports prefill and generation tokens/s), from the exact llama.cpp sources vendored in the
# llama-cpp-python sdist the project pins, with GGML_RPC on. Only those two targets are built.
# Cached under ${CONSORTIUM_CACHE:-~/.cache/consortium}/llama-rpc/<version>-<cpu>; prints the bin dir.
# Safe to run again; a warm run takes milliseconds. With --cached it never builds: it prints the bin
# dir if the binaries are there and exits 3 otherwise (the benchmark uses this, so it never compiles).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/build-env.sh
log() { printf '[llama-rpc] %s\n' "$*" >&2; }

bin="$CACHE/llama-rpc/$LLAMA_CPP_PYTHON_VERSION-$cpu_key/bin"

if [ ! -x "$bin/ggml-rpc-server" ] || [ ! -x "$bin/llama-bench" ]; then
    if [ "${1:-}" = --cached ]; then
        log "not built yet: run scripts/llama-rpc.sh"
        exit 3
    fi
    command -v cmake >/dev/null || { log "cmake not found"; exit 1; }
    log "building ggml-rpc-server and llama-bench from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's sources (once)"
    start=$(date +%s)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$src" -B "$tmp/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$tmp/build" --target ggml-rpc-server llama-bench -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
    mkdir -p "$bin"
    cp "$tmp/build/bin/ggml-rpc-server" "$tmp/build/bin/llama-bench" "$bin/"
    log "built in $(( $(date +%s) - start )) s"
fi
echo "$bin"
