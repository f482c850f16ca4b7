"""The local control plane is a real Kubernetes: version, namespaces, garbage collection, RBAC, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from consortium import cluster as lc

pytestmark = pytest.mark.k8s


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_server_and_client_report_pinned_version(cluster):
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    pinned = lc.versions()["KUBERNETES_VERSION"]
    assert out["serverVersion"]["gitVersion"] == pinned
    assert out["clientVersion"]["gitVersion"] == pinned
    major, minor = pinned.lstrip("v").split(".")[:2]
    assert (out["serverVersion"]["major"], out["serverVersion"]["minor"]) == (major, minor)
    # helm's default .Capabilities.KubeVersion (used by `helm template` and `helm lint`) is the pin too.
    helm = cluster.helm("version", "--short").stdout
    assert helm.startswith(lc.versions()["HELM_VERSION"])


def test_namespace_create_and_delete(cluster):
    cluster.kubectl("create", "namespace", "ns-life")
    cluster.kubectl("create", "configmap", "c", "-n", "ns-life", "--from-literal=a=b")
    # --wait=false: the namespace controller, not kubectl, has to empty and finalize it.
    cluster.kubectl("delete", "namespace", "ns-life", "--wait=false")
    wait_for(lambda: cluster.kubectl("get", "namespace", "ns-life", check=False).returncode != 0,
             what="namespace ns-life to be finalized")


def test_owner_reference_garbage_collection(cluster):
    ns = "gc"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "configmap", "owner", "-n", ns)
    uid = cluster.kubectl("get", "configmap", "owner", "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "namespace": ns,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
        "data": {"k": "v"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "configmap", "owner", "-n", ns)
    wait_for(lambda: cluster.kubectl("get", "configmap", "child", "-n", ns, check=False).returncode != 0,
             what="the garbage collector to delete the owned ConfigMap")


def test_rbac_enforced_for_service_account_tokens(cluster):
    ns = "rbac"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
    cluster.kubectl("create", "secret", "generic", "s", "-n", ns, "--from-literal=k=v")
    token = cluster.create_token("reader", ns)
    assert token.count(".") == 2  # a JWT from the TokenRequest API

    whoami = cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", token=token)
    assert whoami.stdout == f"system:serviceaccount:{ns}:reader"

    denied = cluster.kubectl("get", "secrets", "-n", ns, token=token, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()

    cluster.kubectl("create", "role", "secret-reader", "-n", ns, "--verb=get,list", "--resource=secrets")
    cluster.kubectl("create", "rolebinding", "reader-secrets", "-n", ns, "--role=secret-reader",
                    f"--serviceaccount={ns}:reader")
    allowed = cluster.kubectl("get", "secrets", "-n", ns, "-o", "name", token=token)
    assert "secret/s" in allowed.stdout.split()
    # The binding is namespaced: other namespaces stay forbidden.
    assert cluster.kubectl("get", "secrets", "-n", "default", token=token, check=False).returncode != 0


def test_cli_up_status_down(tmp_path):
    state = tmp_path / "cli-cluster"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "consortium.cli", "cluster", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, env=env, timeout=300)

    up = cli("up")
    assert up.returncode == 0, up.stderr
    last = up.stdout.strip().splitlines()[-1]
    assert last == f"KUBECONFIG={state / 'kubeconfig'}"
    try:
        again = cli("up")
        assert again.returncode == 0 and "already up" in again.stdout
        assert again.stdout.strip().splitlines()[-1] == last

        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.strip().splitlines()[-1] == last

        # The processes outlived the `up` command: the API server answers with that kubeconfig.
        c = lc.LocalCluster(state)
        assert c.is_running()
        ns = subprocess.run([str(c.bin_dir / "kubectl"), "get", "namespace", "default", "-o", "name"],
                            capture_output=True, text=True, env={**env, "KUBECONFIG": last.split("=", 1)[1]})
        assert ns.stdout.strip() == "namespace/default", ns.stderr
        pids = c.pids
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not any(lc._pid_alive(p) for p in pids.values())
    after = cli("status")
    assert after.returncode == 1
