#!/usr/bin/env bash
# Sets up everything Consortium needs on a fresh machine, reusing what earlier runs cached:
#   - a Python virtual environment in .venv with the project installed (editable) and its test extras;
#   - llama-cpp-python built from source once per (version, CPU features, Python), wheel cached;
#   - the local Kubernetes control plane binaries (scripts/k8s-binaries.sh), cached by version.
# Caches live under ${CONSORTIUM_CACHE:-~/.cache/consortium}. Safe to run again; a warm run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/build-env.sh
log() { printf '[setup] %s\n' "$*" >&2; }

py_key=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$py_key-$cpu_key"

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (once; several minutes on 2 cores)"
    tmp=$(mktemp -d)
    "$PYTHON" -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q --upgrade pip
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$tmp/venv/bin/pip" wheel --no-deps -w "$tmp/wheel" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    mkdir -p "$wheel_dir"
    mv "$tmp"/wheel/llama_cpp_python-*.whl "$wheel_dir/"
    rm -rf "$tmp"
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
log "installing the project into .venv"
.venv/bin/pip install -q "$wheel_dir"/llama_cpp_python-*.whl
.venv/bin/pip install -q -e ".[dev]"

if [ -x scripts/k8s-binaries.sh ] && [ "${CONSORTIUM_SKIP_K8S:-0}" != 1 ]; then
    scripts/k8s-binaries.sh
fi
log "ready: .venv/bin/consortium"
