"""Shared by tests/k8s and tests/operator: the `cluster` fixture: one real control plane (etcd, kube-apiserver, kube-controller-manager) per
test session, in a temporary state dir, stopped at the end.

    @pytest.mark.k8s
    def test_x(cluster):
        cluster.kubectl("get", "ns")                    # admin (system:masters)
        token = cluster.create_token("sa", "ns")        # kubectl create token
        cluster.kubectl("get", "pods", "-n", "ns", token=token, check=False)
        cluster.helm("install", "rel", "chart/")
        cluster.write_kubeconfig(path, token=token)     # for an operator or agent process
"""
from __future__ import annotations

import pytest

from consortium import cluster as lc


def pytest_collection_modifyitems(session, config, items):
    # A cold build takes far longer than any test timeout, so it happens here, before tests run
    # (scripts/setup.sh normally did it already and this is a no-op).
    # The operator test bed (tests/operator's `bed`) keeps an operator reconciling every namespace of
    # the shared control plane until the session ends, so the tests that read the API server with no
    # operator acting (tests/k8s) run before any test that starts it, whatever order they were named in.
    items.sort(key=lambda item: "bed" in getattr(item, "fixturenames", ()))
    if config.option.collectonly:
        return
    if any(item.get_closest_marker("k8s") for item in items) and not lc.binaries_present():
        lc.ensure_binaries(build=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = lc.LocalCluster(tmp_path_factory.mktemp("k8s") / "cluster")
    c.start(timeout=300)
    try:
        yield c
    finally:
        c.stop()
