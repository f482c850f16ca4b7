"""A restarted operator's AuditPublisher takes what the saved state holds as published: no Event is
announced twice and no node's record is counted twice (operator.audits.AuditPublisher.resumed).

A real API server (the session-wide control plane), ComputeNodes of the test's own that no session
uses, and a real SessionDriver built from a saved state, as a resumed operator builds it."""
from __future__ import annotations

import json
import uuid

import pytest

from consortium import kube, testbed
from consortium import resources as r
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from consortium.models import resolve_model
from consortium.verification import signing
from consortium_operator.audits import AuditPublisher

pytestmark = pytest.mark.k8s

NS = "publisher-resume"
WORKER, LIAR, OTHER = "pr-worker", "pr-liar", "pr-other"


def saved_state() -> dict:
    """What the operator before the restart saved: a Mismatch on the worker that stood, the liar's
    accusation overruled by another verifier, and the liar quarantined for it."""
    st = SessionState(session=f"{NS}/pr", prompt_tokens=[1, 2, 3, 4], nodes=[WORKER] * 3, epochs=[1, 1, 1])
    audit = {"stage": 0, "epoch": 1, "reasons": [], "figures": None, "hash_equal": False}
    st.audits = [{**audit, "position": 1, "node": WORKER, "verifier": OTHER, "verdict": "Mismatch"},
                 {**audit, "position": 2, "node": WORKER, "verifier": OTHER, "verdict": "Passed",
                  "first_verifier": LIAR}]
    st.overruled = [{"stage": 0, "position": 2, "node": WORKER, "verifier": LIAR, "first_verdict": "Fraud",
                     "overruled_by": OTHER, "verdict": "Passed"}]
    st.quarantined = [LIAR]
    return st.to_json()


def test_a_resumed_publisher_announces_nothing_again_and_counts_no_record_twice(bed):
    kube.load_config(bed.cluster.kubeconfig)
    bed.cluster.kubectl("create", "namespace", NS)
    for n in (WORKER, LIAR, OTHER):
        body = {"apiVersion": r.API_VERSION, "kind": "ComputeNode", "metadata": {"name": n},
                "spec": {"endpoint": "127.0.0.1:9", "publicKey": signing.public_key_text(signing.generate_private_key())}}
        bed.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    session = {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
               "metadata": {"name": "pr", "namespace": NS, "uid": str(uuid.uuid4())}}
    # A Receipt the index names (its status patch finds no object here; its AuditFailed Event is
    # announced all the same, which is what is counted).
    index = {"pr-window-0": {"stage": 0, "node": WORKER, "epoch": 1, "start": 0, "count": 4}}

    def driver() -> SessionDriver:
        return SessionDriver(session=f"{NS}/pr", model_path=str(resolve_model(None)), n_layers=30, endpoints={},
                             state=SessionState.from_json(saved_state()), policy=LocalPolicy([WORKER]),
                             split=[LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)])

    def reasons() -> list[str]:
        return sorted(e["reason"] for e in bed.events(NS, "pr"))

    def records() -> dict:
        return {n: (bed.get("computenode", n).get("status") or {}) for n in (WORKER, LIAR, OTHER)}

    try:
        before = driver()   # the operator before the restart
        try:
            AuditPublisher(session).publish(before, index)
        finally:
            before.close()
        testbed.wait_until(lambda: len(reasons()) >= 3, 30, "the Events")
        announced = reasons()
        assert announced == ["AuditFailed", "NodeQuarantined", "VerdictOverruled"], announced
        written = records()
        assert written[WORKER]["auditRecord"] == {"audits": 2, "mismatches": 1, "frauds": 0}
        assert written[LIAR]["verifierRecord"] == {"verdicts": 1, "overruled": 1}
        assert kube.condition_true(bed.get("computenode", LIAR), "Quarantined")

        after = driver()    # the restarted one, from the same saved state
        try:
            publisher = AuditPublisher(session)
            publisher.resumed(after, index)
            publisher.publish(after, index)
        finally:
            after.close()
        assert reasons() == announced
        assert records() == written
    finally:
        for n in (WORKER, LIAR, OTHER):
            bed.cluster.kubectl("delete", "computenode", n, "--ignore-not-found")
        bed.cluster.kubectl("delete", "namespace", NS, "--wait=false")

