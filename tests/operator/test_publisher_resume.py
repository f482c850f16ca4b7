"""A restarted operator's AuditPublisher publishes what the API does not show yet, and only that: no
Event is announced twice and no node's record is counted twice, and verdicts the operator before it
saved but died before publishing are published (operator.audits.AuditPublisher.resumed).

A real API server (the session-wide control plane), ComputeNodes and a Receipt of the test's own that
no session uses, and a real SessionDriver built from a saved state, as a resumed operator builds it."""
from __future__ import annotations

import hashlib
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
from consortium.verification import receipts, signing
from consortium_operator.audits import AuditPublisher
from consortium_operator.receipts import receipt_body

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


def receipt(session: dict) -> tuple[str, dict]:
    """A Receipt of stage 0's first window, signed by the worker; without an owner (the garbage
    collector would delete it: no such session exists). (name, index entry)"""
    key = signing.generate_private_key()
    signer = receipts.WindowSigner(key, session=f"{NS}/{session['metadata']['name']}", stage=0, node_id=WORKER,
                                   epoch=1, window=4)
    for p in range(4):
        signer.add(p, hashlib.sha256(b"in%d" % p).digest(), hashlib.sha256(b"out%d" % p).digest())
    body = receipt_body(session, {"stage": 0, "node": WORKER, "epoch": 1, "receipt": signer.receipt().to_json()},
                        signing.public_key_text(key))
    body["metadata"].pop("ownerReferences")
    return body["metadata"]["name"], body


def test_a_resumed_publisher_publishes_once_what_the_api_lacks(bed):
    kube.load_config(bed.cluster.kubeconfig)
    bed.cluster.kubectl("create", "namespace", NS)
    for n in (WORKER, LIAR, OTHER):
        body = {"apiVersion": r.API_VERSION, "kind": "ComputeNode", "metadata": {"name": n},
                "spec": {"endpoint": "127.0.0.1:9", "publicKey": signing.public_key_text(signing.generate_private_key())}}
        bed.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))

    def session(name: str) -> tuple[dict, dict]:
        """A session's body and the index of its one Receipt, created in the API."""
        s = {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
             "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4())}}
        rname, body = receipt(s)
        bed.cluster.kubectl("create", "-f", "-", input=json.dumps(body))
        return s, {rname: {"stage": 0, "node": WORKER, "epoch": 1, "start": 0, "count": 4}}

    def driver(name: str) -> SessionDriver:
        return SessionDriver(session=f"{NS}/{name}", model_path=str(resolve_model(None)), n_layers=30, endpoints={},
                             state=SessionState.from_json(saved_state()), policy=LocalPolicy([WORKER]),
                             split=[LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)])

    def resume(s: dict, index: dict) -> None:
        """An operator started on the saved state: resumed from what the API shows, then published."""
        d = driver(s["metadata"]["name"])
        try:
            publisher = AuditPublisher(s)
            publisher.resumed(d, index, {n: bed.get("receipt", n, NS).get("status") or {} for n in index})
            publisher.publish(d, index)
        finally:
            d.close()

    def reasons(name: str) -> list[str]:
        return sorted(e["reason"] for e in bed.events(NS, name))

    def records() -> dict:
        return {n: (bed.get("computenode", n).get("status") or {}) for n in (WORKER, LIAR, OTHER)}

    def verdict(index: dict) -> str | None:
        return (bed.get("receipt", next(iter(index)), NS).get("status") or {}).get("verdict")

    try:
        # Published, then the operator restarts: nothing is announced or counted again.
        s, index = session("pr")
        before = driver("pr")   # the operator before the restart
        try:
            AuditPublisher(s).publish(before, index)
        finally:
            before.close()
        testbed.wait_until(lambda: len(reasons("pr")) >= 3, 30, "the Events")
        announced = reasons("pr")
        assert announced == ["AuditFailed", "NodeQuarantined", "VerdictOverruled"], announced
        written = records()
        assert written[WORKER]["auditRecord"] == {"audits": 2, "mismatches": 1, "frauds": 0}
        assert written[LIAR]["verifierRecord"] == {"verdicts": 1, "overruled": 1}
        assert [x["session"] for x in written[WORKER]["sessionRecords"]] == [f"{NS}/pr"]
        assert kube.condition_true(bed.get("computenode", LIAR), "Quarantined")
        assert verdict(index) == "Mismatch"
        resume(s, index)
        assert reasons("pr") == announced
        assert records() == written

        # Saved, and the operator died before publishing any of it: the restarted one publishes it
        # (the quarantine the node already shows is not announced again), once.
        s, index = session("pr2")
        resume(s, index)
        testbed.wait_until(lambda: len(reasons("pr2")) >= 1, 30, "the Events")
        assert reasons("pr2") == ["AuditFailed"]
        assert verdict(index) == "Mismatch"
        twice = records()
        assert twice[WORKER]["auditRecord"] == {"audits": 4, "mismatches": 2, "frauds": 0}
        assert twice[LIAR]["verifierRecord"] == {"verdicts": 2, "overruled": 2}
        assert [x["session"] for x in twice[WORKER]["sessionRecords"]] == [f"{NS}/pr", f"{NS}/pr2"]
        resume(s, index)
        assert reasons("pr2") == ["AuditFailed"] and records() == twice
    finally:
        for n in (WORKER, LIAR, OTHER):
            bed.cluster.kubectl("delete", "computenode", n, "--ignore-not-found")
        bed.cluster.kubectl("delete", "namespace", NS, "--wait=false")

