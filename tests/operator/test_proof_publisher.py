"""The operator's fraud proofs in the API (operator/proofs.py) against a real kube-apiserver: a proof
lands in its Receipt's status.fraudProofs (the CRD's schema takes it) with a FraudProven Event, one
too large for the status says so, a unit that could not be proven gets FraudUnproven, a restarted
operator adds to the proofs its predecessor wrote, and proofs and units not yet published ride
along in the session's saved state to a restarted operator."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from consortium import resources as r
from consortium.driver.proofs import FraudUnit, ProofBook
from consortium.testbed import ROOT
from consortium.verification import canonical, proofs, receipts, signing
from consortium.verification.verdicts import Limits, Tolerance
from consortium_operator import proofs as op_proofs
from consortium_operator.receipts import receipt_body

pytestmark = pytest.mark.k8s

NS = "default"
TOL = Tolerance(honest=Limits(relative_l2=0.1), decisive=Limits(relative_l2=1.0))


class _Driver:
    """What the publisher reads of a SessionDriver: its lock and its proof book."""

    def __init__(self, book):
        self._lock, self.proofs = threading.RLock(), book


@pytest.fixture
def api(cluster):
    from kubernetes import client, config

    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/receipts.{r.GROUP}")
    old = client.Configuration.get_default_copy()
    config.load_kube_config(config_file=cluster.kubeconfig)
    try:
        yield client.CustomObjectsApi()
    finally:
        client.Configuration.set_default(old)


def window(api, cluster, session_name: str):
    """n2's signed window 0..2 of stage 1 (cheating rows) as a Receipt in the API; returns what
    the tests need to make proofs of it."""
    rng = np.random.default_rng(2)
    key = signing.generate_private_key()
    inputs = [rng.standard_normal(48).astype(np.float32) for _ in range(3)]
    sent = rng.standard_normal((3, 48)).astype(np.float32)
    signer = receipts.WindowSigner(key, session=session_name, stage=1, node_id="n2", epoch=1)
    signer.add_batch(0, [receipts.hidden_input_digest(x) for x in inputs], canonical.commit_rows(sent))
    rc = signer.receipt()
    entry = {"stage": 1, "node": "n2", "epoch": 1, "start": 0, "count": 3, "receipt": rc.to_json()}
    session = {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
               "metadata": {"name": session_name, "namespace": NS, "uid": "00000000-0000-0000-0000-000000000001"}}
    body = receipt_body(session, entry, signing.public_key_text(key))
    body["metadata"].pop("ownerReferences")   # no such session object: nothing to own it
    name = body["metadata"]["name"]
    cluster.kubectl("delete", "receipt", name, "-n", NS, "--ignore-not-found")
    api.create_namespaced_custom_object(r.GROUP, r.VERSION, NS, "receipts", body)

    keys = {"n2": signing.public_key_text(key)}

    def digests(s, ps):
        return [receipts.hidden_input_digest(inputs[q]) for q in ps]

    def add(book, p, row=None, recomputed=None, flushed=True):
        """A Fraud verdict at p: proven at once, or (flushed False) waiting for the window's receipt."""
        book.add(FraudUnit(1, p, "n2", 1, rc.commitments[p], sent[p] if row is None else row,
                           rng.standard_normal(48).astype(np.float32) if recomputed is None else recomputed,
                           TOL, "n0"),
                 [entry] if flushed else [], keys, digests)

    add.flush = lambda book: book.offer(entry, keys, digests)   # the window's receipt comes
    return session, name, entry, add, sent


def stored(api, name) -> list[str]:
    got = api.get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "receipts", name)
    return (got.get("status") or {}).get("fraudProofs") or []


def events(cluster, session_name: str) -> list[tuple[str, str]]:
    items = json.loads(cluster.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    return sorted((e["reason"], e["message"]) for e in items if e["involvedObject"].get("name") == session_name)


def test_proofs_land_on_their_receipt_with_events(api, cluster, monkeypatch):
    session, name, entry, add, sent = window(api, cluster, "proof-pub")
    book = ProofBook(session["metadata"]["name"], canonical.CanonicalGrid())
    add(book, 0)
    add(book, 1)
    add(book, 2, row=sent[2] + 5, recomputed=sent[2])   # the row sent does not hash to the commitment
    assert [e["holds"] for e in book.entries] == [True, True, False]
    one = len(json.dumps(book.entries[0]["proof"], sort_keys=True, separators=(",", ":")))
    monkeypatch.setattr(r, "MAX_PROOF_BYTES", one + one // 2)   # room for one proof of the two

    pub = op_proofs.ProofPublisher(session)
    pub.publish(_Driver(book), {})                 # the receipt is not written yet: only the unproven
    assert stored(api, name) == []
    pub.publish(_Driver(book), {name: entry})
    pub.publish(_Driver(book), {name: entry})      # again: nothing new to write or announce
    [text] = stored(api, name)
    assert proofs.check_proof(proofs.FraudProof.from_json(json.loads(text)))[0]
    mine = events(cluster, "proof-pub")
    assert [m[0] for m in mine] == ["FraudProven", "FraudProven", "FraudUnproven"], mine
    assert sum(f"in receipt {name} status.fraudProofs" in m for _, m in mine) == 1
    assert sum("too large" in m for _, m in mine) == 1
    assert "does not hash" in mine[2][1]
    cluster.kubectl("delete", "receipt", name, "-n", NS)


def test_a_restarted_operator_adds_to_its_predecessors_proofs(api, cluster):
    session, name, entry, add, _ = window(api, cluster, "proof-restart")
    first, second = (ProofBook("proof-restart", canonical.CanonicalGrid()) for _ in range(2))
    add(first, 0)
    op_proofs.ProofPublisher(session).publish(_Driver(first), {name: entry})
    add(second, 1)
    op_proofs.ProofPublisher(session).publish(_Driver(second), {name: entry})
    got = [json.loads(t) for t in stored(api, name)]
    assert [p["position"] for p in got] == [0, 1]
    assert all(proofs.check_proof(proofs.FraudProof.from_json(p))[0] for p in got)
    cluster.kubectl("delete", "receipt", name, "-n", NS)


def test_unpublished_proofs_and_waiting_units_survive_an_operator_restart(api, cluster, monkeypatch, caplog):
    """What the stopped operator had not written into the API (a proof whose Receipt was not there yet,
    a Fraud unit whose window had not closed) is saved with the session's state; the next operator
    restores it, proves the unit when the window's receipt comes, and publishes both."""
    from consortium.driver.state import SessionState

    session, name, entry, add, _ = window(api, cluster, "proof-saved")
    first = ProofBook("proof-saved", canonical.CanonicalGrid())
    add(first, 0)
    add(first, 1, flushed=False)
    assert len(first.entries) == 1 and len(first.pending) == 1
    pub = op_proofs.ProofPublisher(session)
    pub.publish(_Driver(first), {})   # the Receipt is not in the API yet: nothing written
    state = SessionState(session="default/proof-saved", prompt_tokens=[1], nodes=["n0", "n2", "n1"], epochs=[1, 1, 1])
    state.proofs = pub.unpublished(_Driver(first))
    saved = SessionState.from_json(json.loads(json.dumps(state.to_json())))   # through the status
    assert stored(api, name) == []

    second = ProofBook("proof-saved", canonical.CanonicalGrid())
    second.restore(saved.proofs)
    add.flush(second)   # the recovered window's receipt proves the waiting unit
    assert [e["position"] for e in second.entries] == [0, 1] and not second.pending
    pub2 = op_proofs.ProofPublisher(session)
    pub2.publish(_Driver(second), {name: entry})
    got = [json.loads(t) for t in stored(api, name)]
    assert [p["position"] for p in got] == [0, 1]
    assert all(proofs.check_proof(proofs.FraudProof.from_json(p))[0] for p in got)
    assert pub2.unpublished(_Driver(second)) == {"entries": [], "pending": []}   # nothing left to carry

    # Beyond the room the saved state gives them, proofs are left out with a warning, not the state.
    third = ProofBook("proof-saved", canonical.CanonicalGrid())
    add(third, 2)
    monkeypatch.setattr(op_proofs, "SAVED_PROOF_BYTES", 100)
    with caplog.at_level("WARNING", logger="consortium.operator.proofs"):
        assert op_proofs.ProofPublisher(session).unpublished(_Driver(third)) == {"entries": [], "pending": []}
    assert "not saved with the session" in caplog.text
    cluster.kubectl("delete", "receipt", name, "-n", NS)
