"""The operator's fraud proofs in the API (operator/proofs.py) against a real kube-apiserver: a proof
lands in its Receipt's status.fraudProofs (the CRD's schema takes it) with a FraudProven Event, one
too large for the status says so, and a unit that could not be proven gets FraudUnproven."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from consortium import resources as r
from consortium.driver.proofs import FraudUnit, ProofBook
from consortium.verification import canonical, proofs, receipts, signing
from consortium.verification.verdicts import Limits, Tolerance
from consortium_operator import proofs as op_proofs
from consortium_operator.receipts import receipt_body
from consortium.testbed import ROOT

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


@pytest.mark.k8s
def test_proofs_land_on_their_receipt_with_events(api, cluster, monkeypatch):
    rng = np.random.default_rng(2)
    key = signing.generate_private_key()
    inputs = [rng.standard_normal(48).astype(np.float32) for _ in range(3)]
    sent = rng.standard_normal((3, 48)).astype(np.float32)
    signer = receipts.WindowSigner(key, session="proof-pub", stage=1, node_id="n2", epoch=1)
    signer.add_batch(0, [receipts.hidden_input_digest(x) for x in inputs], canonical.commit_rows(sent))
    rc = signer.receipt()
    entry = {"stage": 1, "node": "n2", "epoch": 1, "start": 0, "count": 3, "receipt": rc.to_json()}
    session = {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
               "metadata": {"name": "proof-pub", "namespace": NS, "uid": "00000000-0000-0000-0000-000000000001"}}
    body = receipt_body(session, entry, signing.public_key_text(key))
    body["metadata"].pop("ownerReferences")   # no such session object: nothing to own it
    name = body["metadata"]["name"]
    cluster.kubectl("delete", "receipt", name, "-n", NS, "--ignore-not-found")
    api.create_namespaced_custom_object(r.GROUP, r.VERSION, NS, "receipts", body)

    book = ProofBook("proof-pub", canonical.CanonicalGrid())
    keys = {"n2": signing.public_key_text(key)}
    digests = lambda s, ps: [receipts.hidden_input_digest(inputs[p]) for p in ps]  # noqa: E731
    for p in (0, 1):
        book.add(FraudUnit(1, p, "n2", 1, rc.commitments[p], sent[p], rng.standard_normal(48).astype(np.float32),
                           TOL, "n0"), [entry], keys, digests)
    book.add(FraudUnit(1, 2, "n2", 1, rc.commitments[2], sent[2] + 5, sent[2], TOL, "n0"), [entry], keys, digests)
    assert [e["holds"] for e in book.entries] == [True, True, False]
    one = len(json.dumps(book.entries[0]["proof"], sort_keys=True, separators=(",", ":")))
    monkeypatch.setattr(r, "MAX_PROOF_BYTES", one + one // 2)   # room for one proof of the two

    pub = op_proofs.ProofPublisher(session)
    pub.publish(_Driver(book), {})                 # the receipt is not written yet: nothing but the unproven
    got = api.get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "receipts", name)
    assert not (got.get("status") or {}).get("fraudProofs")
    pub.publish(_Driver(book), {name: entry})
    pub.publish(_Driver(book), {name: entry})      # again: nothing new to write or announce
    got = api.get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "receipts", name)
    [text] = got["status"]["fraudProofs"]
    assert proofs.check_proof(proofs.FraudProof.from_json(json.loads(text)))[0]
    events = json.loads(cluster.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    mine = sorted((e["reason"], e["message"]) for e in events if e["involvedObject"].get("name") == "proof-pub")
    assert [m[0] for m in mine] == ["FraudProven", "FraudProven", "FraudUnproven"], mine
    assert sum(f"in receipt {name} status.fraudProofs" in m for _, m in mine) == 1
    assert sum("too large" in m for _, m in mine) == 1
    assert "does not hash" in mine[2][1]
    cluster.kubectl("delete", "receipt", name, "-n", NS)
