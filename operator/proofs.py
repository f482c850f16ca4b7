"""Fraud proofs into the API: each on the Receipt of the window it proves, with an Event.

The driver makes a signed FraudProof for every Fraud verdict once the worker's window is a receipt
(consortium.driver.proofs; the operator signs as the coordinator). This module writes each proof's
JSON text into `status.fraudProofs` of the Receipt that holds the worker's signed window, and posts a
FraudProven Event on the session naming that Receipt, so a user can fetch the proof and check it:

    kubectl get receipt NAME -o jsonpath='{.status.fraudProofs[0]}' > proof.json
    consortium verify-proof proof.json --verifier-key KEY   # KEY: the session's status.proofKey

A Fraud unit the driver could not prove gets a FraudUnproven Event with the reasons instead. A
Receipt the writer has not created yet is tried again at the next publish; a restarted operator adds
to the proofs its predecessor wrote there. A Receipt's proofs stay within r.MAX_PROOF_BYTES together:
one that does not fit goes to the operator's log, and its Event says so. Until a proof is in the API
it rides along in the session's saved state (`unpublished`), with the Fraud units still waiting for
their receipts, so that an operator restarted meanwhile publishes it (ProofBook.restore).
"""
from __future__ import annotations

import base64
import json
import logging

from consortium import kube
from consortium import resources as r
from consortium_operator.receipts import receipt_name

log = logging.getLogger("consortium.operator.proofs")


def proof_receipt(proof: dict, uid: str) -> str:
    """The name of the Receipt holding the window a proof's statement describes, in the session
    with this uid."""
    st = proof["statement"]
    return receipt_name(r.session_name(st["session"]), uid, st["stage"], st["epoch"], st["windowStart"],
                        base64.b64decode(st["merkleRoot"]).hex())


# At most this much of proofs and units rides along in the session's saved state until published
# (a final stage's proof holds two logit rows, about 0.4 MB); the rest goes to the operator's log.
SAVED_PROOF_BYTES = r.MAX_PROOF_BYTES // 2


class ProofPublisher:
    def __init__(self, session: dict):
        self.session = session
        self._done: set[int] = set()   # ids of the book's entries in the API (or announced unproven)
        self._earlier: dict[str, list[str]] = {}   # receipt name -> proofs in its status, as last written
        self._too_large: set[tuple] = set()   # what was left out of the saved state, logged once

    def unpublished(self, driver) -> dict:
        """What the session's saved state must carry (ProofBook.to_json): the entries not yet in the
        API and the units waiting for their receipts, within SAVED_PROOF_BYTES. Called with the
        driver's lock held, as the state is saved."""
        book = driver.proofs
        saved = book.to_json([e for e in book.entries if id(e) not in self._done])
        room = SAVED_PROOF_BYTES
        for kind in ("entries", "pending"):
            kept = []
            for x in saved[kind]:
                n = len(json.dumps(x, separators=(",", ":")))
                if n <= room:
                    kept.append(x)
                    room -= n
                elif (kind, x["stage"], x["position"], x["node"]) not in self._too_large:
                    self._too_large.add((kind, x["stage"], x["position"], x["node"]))
                    log.warning("%s stage %d position %d: fraud %s not saved with the session (%d bytes beyond "
                                "room for %d); an operator restarted before it is published loses it",
                                x["node"], x["stage"], x["position"], "proof" if kind == "entries" else "unit",
                                n, room)
            saved[kind] = kept
        return saved

    def publish(self, driver, receipts_index: dict[str, dict]) -> None:
        with driver._lock:
            entries = [e for e in driver.proofs.entries if id(e) not in self._done]
        by_receipt: dict[str, list[dict]] = {}
        for e in entries:
            if e["proof"] is None:
                kube.event(self.session, "FraudUnproven",
                           f"{e['node']} stage {e['stage']} position {e['position']}: no proof: "
                           + "; ".join(e["reasons"])[:900], type_="Warning")
                self._done.add(id(e))
            else:
                by_receipt.setdefault(proof_receipt(e["proof"], self.session["metadata"]["uid"]), []).append(e)
        md = self.session["metadata"]
        for name, es in by_receipt.items():
            if name not in receipts_index:
                continue
            if name not in self._earlier:
                # A restarted operator adds to what its predecessor wrote: the patch replaces the list.
                try:
                    got = kube.api().get_namespaced_custom_object(r.GROUP, r.VERSION, md["namespace"], "receipts", name)
                except Exception as e:  # noqa: BLE001 - retried on the next publish
                    log.warning("receipt %s not read: %s", name, e)
                    continue
                self._earlier[name] = list((got.get("status") or {}).get("fraudProofs") or [])
            texts, kept = list(self._earlier[name]), []
            for e in es:
                text = json.dumps(e["proof"], sort_keys=True, separators=(",", ":"))
                if text in texts:   # written already, e.g. by the operator before a restart
                    kept.append(id(e))
                # A Receipt's proofs stay within one proof's limit together, far from etcd's object limit.
                elif sum(map(len, texts)) + len(text) <= r.MAX_PROOF_BYTES:
                    texts.append(text)
                    kept.append(id(e))
            try:
                kube.api().patch_namespaced_custom_object_status(
                    r.GROUP, r.VERSION, md["namespace"], "receipts", name, {"status": {"fraudProofs": texts}})
            except Exception as e:  # noqa: BLE001 - retried on the next publish
                log.warning("fraud proofs on receipt %s not written: %s %s", name, e, getattr(e, "body", "")[:600])
                continue
            self._earlier[name] = texts
            for e in es:
                where = f"in receipt {name} status.fraudProofs"
                if id(e) not in kept:
                    where = f"too large for receipt {name}'s status, its JSON in the operator's log"
                    log.warning("fraud proof too large for receipt %s's status; its JSON: %s", name,
                                json.dumps(e["proof"], sort_keys=True, separators=(",", ":")))
                kube.event(self.session, "FraudProven",
                           f"{e['node']} stage {e['stage']} position {e['position']}: signed fraud proof {where} "
                           f"({'holds' if e['holds'] else 'does not hold'})", type_="Warning")
                self._done.add(id(e))
