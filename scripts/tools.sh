#!/usr/bin/env bash
# Installs the developer tools that the Kubernetes tests use beyond the control plane, built from the
# Go module proxy at pinned versions and cached by version:
#   - actionlint, which checks .github/workflows/*.yml.
# Prints the folder holding the binaries. Safe to run again; a warm run takes milliseconds.
# Without Go it installs nothing and says so; the tests that need a tool then skip with a reason.
set -euo pipefail

CACHE="${CONSORTIUM_CACHE:-$HOME/.cache/consortium}"
ACTIONLINT_VERSION=v1.7.12
bin="$CACHE/tools/bin"

log() { printf '[tools] %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
    log "go not found: actionlint not installed"
    exit 0
fi
mkdir -p "$bin"
marker="$bin/.actionlint-$ACTIONLINT_VERSION"
if [ ! -x "$bin/actionlint" ] || [ ! -e "$marker" ]; then
    log "building actionlint $ACTIONLINT_VERSION"
    GOBIN="$bin" CGO_ENABLED=0 go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
    rm -f "$bin"/.actionlint-*
    touch "$marker"
fi
echo "$bin"
