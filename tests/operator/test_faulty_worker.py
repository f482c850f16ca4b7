"""`consortium testcase --extension faulty-worker` through Kubernetes: stage 1's agent runs with
--fault skip-layer; the operator must prove its fraud (signed proofs on the Receipts), quarantine it
in the API, roll its work back, fail its stage over, and finish with the baseline's tokens and no
honest node accused.

On a control plane of its own: the session-wide one may hold the operator tests' agents, which
carry the same node names."""
import json

import pytest

from consortium import cluster as lc
from consortium import extensions, kubecase, standalone


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    c = lc.LocalCluster(tmp_path_factory.mktemp("faulty") / "cluster")
    c.start(timeout=300)
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.k8s
@pytest.mark.slow
def test_faulty_worker_is_quarantined_in_the_api(own_cluster):
    opts = standalone.Options(max_tokens=24, threads=1)
    extensions.apply(["faulty-worker"], opts, prompt_given=False, fault_given=False, audit_given=False)
    assert (opts.faulty_stage, opts.fault, opts.kill_stage) == (1, "skip-layer", None)
    r = kubecase.run(opts, cluster=own_cluster)
    extensions.add_figures(["faulty-worker"], r, opts)
    f = r["extensions"]["faulty-worker"]
    assert r["fault"]["node"] == "n2" and f["caught"] and f["quarantined_in_api"]
    assert r["quarantined"] == ["n2"] and r["quarantined_in_api"] == ["n2"]
    assert f["rollbacks"] >= 1 and f["failed_over_to"] == "n0"
    assert {"NodeQuarantined", "AuditFailed", "StageReassigned", "FraudProven"} <= set(r["events"])
    # Proven: signed proofs read back from the Receipts' status, each holding, none naming an honest node.
    proofs = r["fraud_proofs"]
    assert proofs and f["proofs"] == len(proofs) == f["proofs_holding"] and f["proofs_naming_honest_nodes"] == 0
    # ... and each signed with the key the session's status publishes (the recheck compares them).
    assert r["proof_key"] and all(p["proof"]["verifierPublicKey"] == r["proof_key"] for p in proofs)
    assert all(p["holds"] and p["node"] == "n2" and p["verifier"] == "consortium-operator" for p in proofs), proofs
    frauds = {a["position"] for a in r["audits"]["units"] if a["verdict"] == "Fraud"}
    assert {p["position"] for p in proofs} == frauds
    assert r["phase"] == "Completed" and r["exact_match"] and r["false_fraud"] == 0
    assert f["honest_verdicts_all_pass"] and f["ok"] and r["success"]
    # The cheater's windows, rolled back and signed again by its replacement, stand no more.
    assert r["receipts_check"]["ok"] and r["receipts_check"]["superseded"] >= 1, r["receipts_check"]


@pytest.mark.k8s
@pytest.mark.slow
def test_a_lying_verifier_is_quarantined_in_the_api_not_the_workers_it_accuses(own_cluster):
    """n2's agent runs with --audit-fault random: the operator's driver audits each of its accusing
    verdicts again on another node, overrules them, and quarantines n2 (in the API too) instead of
    n0, whose stage n2 verifies."""
    opts = standalone.Options(max_tokens=24, threads=1, kill_stage=None, lying_verifier="N2")
    r = kubecase.run(opts, cluster=own_cluster)
    liar = r["lying_verifier"]
    assert liar["node"] == "n2" and liar["caught"] and liar["quarantined_in_api"], liar
    assert liar["overruled_verdicts"] >= 1
    assert r["quarantined"] == ["n2"] and r["quarantined_in_api"] == ["n2"]
    assert r["audits"]["fraud"] == 0 and not r["fraud_proofs"]
    assert {"NodeQuarantined", "VerdictOverruled"} <= set(r["events"])
    # Its ComputeNode keeps its record as a verifier, across sessions, beside the one as a worker.
    status = json.loads(own_cluster.kubectl("get", "computenode", "n2", "-o", "json").stdout)["status"]
    assert status["verifierRecord"]["overruled"] >= liar["overruled_verdicts"] >= 1, status
    assert status["verifierRecord"]["verdicts"] >= status["verifierRecord"]["overruled"]
    assert r["phase"] == "Completed" and r["exact_match"] and r["false_fraud"] == 0 and r["success"]
