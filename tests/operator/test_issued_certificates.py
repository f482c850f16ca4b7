"""Test Case v1 through Kubernetes with the agents' certificates signed by the operator
(`consortium testcase --tls-issuer operator`): every gRPC link then runs on certificates no one
copied onto a machine, the operator's own client certificate included.

On a control plane of its own: the session-wide one may hold the operator tests' agents, which
carry the same node names."""
import pytest

from consortium import cluster as lc
from consortium import kubecase, standalone


@pytest.mark.k8s
@pytest.mark.slow
def test_test_case_runs_on_certificates_the_operator_signed(tmp_path):
    with lc.LocalCluster(tmp_path / "cluster") as cluster:
        opts = standalone.Options(max_tokens=24, threads=1, kill_stage=1, kill_at=12, tls_issuer="operator")
        r = kubecase.run(opts, cluster=cluster)
        requests = cluster.kubectl("get", "csr", "-o", "jsonpath={.items[*].spec.signerName}").stdout.split()
    assert r["transport"] == "mutual TLS, agents' certificates signed by the operator"
    assert requests == ["consortium.io/agent"] * 3   # one per agent, none for the operator itself
    assert r["phase"] == "Completed" and r["exact_match"] and r["false_fraud"] == 0
    assert r["failover"]["completed"] and r["receipts_check"]["ok"] and r["success"], r["failover"]
