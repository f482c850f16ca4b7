#!/usr/bin/env bash
# Builds the local Kubernetes control plane from the Go module proxy and caches it by version:
#   kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes), etcd, helm.
# Versions come from scripts/k8s-versions.env. A warm cache returns at once.
#   scripts/k8s-binaries.sh                  build if needed
#   scripts/k8s-binaries.sh --print-bin-dir  build if needed, then print the bin dir on stdout
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=k8s-versions.env
. "$here/k8s-versions.env"

print_bin_dir=0
case "${1:-}" in
    --print-bin-dir) print_bin_dir=1 ;;
    "") ;;
    *) echo "usage: $0 [--print-bin-dir]" >&2; exit 2 ;;
esac

CACHE="${CONSORTIUM_CACHE:-$HOME/.cache/consortium}"
key="${KUBERNETES_VERSION}-etcd${ETCD_VERSION#v}-helm${HELM_VERSION#v}"
root="$CACHE/k8s/$key"
bin="$root/bin"
binaries=(kube-apiserver kube-controller-manager kubectl etcd helm)

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }

all_present() {
    local b
    for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

done_() {
    [ "$print_bin_dir" = 1 ] && printf '%s\n' "$bin"
    exit 0
}

all_present && done_

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[ -x "$GO" ] || { log "Go not found (set GO=/path/to/go)"; exit 1; }
# k8s.io/kubernetes names the Go release it needs in its go line; let Go fetch it if this one is older.
export GOTOOLCHAIN=auto
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

mkdir -p "$root"
# One build per cache key at a time (setup.sh and a test run may race).
if command -v flock >/dev/null; then  # util-linux; absent on macOS, where builds are rarely concurrent
    exec 9>"$root/.lock"
    flock 9
fi
all_present && done_

start=$(date +%s)
work="$root/src"
mkdir -p "$work" "$bin"

k_ver="$KUBERNETES_VERSION"
k_major="$(echo "${k_ver#v}" | cut -d. -f1)"
k_minor="$(echo "${k_ver#v}" | cut -d. -f2)"
staging_ver="v0.${k_minor}.$(echo "${k_ver#v}" | cut -d. -f3)"

# --- kube-apiserver, kube-controller-manager, kubectl ---------------------------------------------
need_k8s=0
for b in kube-apiserver kube-controller-manager kubectl; do [ -x "$bin/$b" ] || need_k8s=1; done
if [ "$need_k8s" = 1 ]; then
    log "resolving k8s.io/kubernetes $k_ver"
    gomod="$("$GO" mod download -json "k8s.io/kubernetes@$k_ver" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [ -f "$gomod" ] || { log "no go.mod for k8s.io/kubernetes@$k_ver"; exit 1; }
    kdir="$work/kubernetes"
    mkdir -p "$kdir"
    # k8s.io/kubernetes points its staging modules at ./staging/...; those directories are not in
    # the module zip, so a wrapper module maps each one to its published v0.Y.Z release instead.
    {
        echo "module consortium.local/k8s-build"
        echo
        grep -m1 '^go ' "$gomod"
        grep '^godebug' "$gomod" || true
        echo
        echo "require k8s.io/kubernetes $k_ver"
        echo
        echo "replace ("
        sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\t\1 => \1 '"$staging_ver"'#p' "$gomod"
        echo ")"
    } > "$kdir/go.mod"
    log "wrapper go.mod maps $(grep -c ' => ' "$kdir/go.mod") staging modules to $staging_ver"

    ver_pkg=k8s.io/component-base/version
    cg_pkg=k8s.io/client-go/pkg/version
    ldflags="-s -w"
    for p in $ver_pkg $cg_pkg; do
        ldflags="$ldflags -X $p.gitVersion=$k_ver -X $p.gitMajor=$k_major -X $p.gitMinor=$k_minor"
        ldflags="$ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    log "building kube-apiserver, kube-controller-manager, kubectl $k_ver (the long part: tens of minutes on 2 cores)"
    t0=$(date +%s)
    # -mod=mod lets go record the dependency checksums the wrapper needs in its own go.sum.
    (cd "$kdir" && "$GO" build -mod=mod -trimpath -ldflags "$ldflags" -o "$kdir/out/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kubectl)
    mv "$kdir"/out/kube-apiserver "$kdir"/out/kube-controller-manager "$kdir"/out/kubectl "$bin/"
    log "kubernetes binaries built in $(( $(date +%s) - t0 ))s"
fi

# --- etcd ---------------------------------------------------------------------------------------
if [ ! -x "$bin/etcd" ]; then
    edir="$work/etcd"
    mkdir -p "$edir"
    # server/go.mod replaces its sibling modules with ../api etc.; as a dependency of a wrapper
    # those replaces are ignored and the released siblings at the same version are used.
    printf 'module consortium.local/etcd-build\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' \
        "$ETCD_VERSION" > "$edir/go.mod"
    log "building etcd $ETCD_VERSION"
    t0=$(date +%s)
    (cd "$edir" && "$GO" build -mod=mod -trimpath -ldflags "-s -w" -o "$edir/etcd" go.etcd.io/etcd/server/v3)
    mv "$edir/etcd" "$bin/etcd"
    log "etcd built in $(( $(date +%s) - t0 ))s"
fi

# --- helm ---------------------------------------------------------------------------------------
if [ ! -x "$bin/helm" ]; then
    log "building helm $HELM_VERSION"
    t0=$(date +%s)
    hdir="$work/helm"
    mkdir -p "$hdir"
    # Helm's own Makefile sets these: its version, and the Kubernetes version `helm template` and
    # `helm lint` assume for .Capabilities.KubeVersion (otherwise a chart's kubeVersion check sees the
    # version Helm was compiled against).
    hl="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    hl="$hl -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$k_major -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k_minor"
    hl="$hl -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$k_major -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k_minor"
    GOBIN="$hdir" "$GO" install -trimpath -ldflags "$hl" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv "$hdir/helm" "$bin/helm"
    log "helm built in $(( $(date +%s) - t0 ))s"
fi

rm -rf "$work"
log "all binaries in $bin (build took $(( $(date +%s) - start ))s)"
done_
