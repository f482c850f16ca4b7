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
one that does not fit goes to the operator's log, and its Event says so.
"""
from __future__ import annotations

import base64
import json
import logging

from consortium import kube
from consortium import resources as r
from consortium_operator.receipts import receipt_name

log = logging.getLogger("consortium.operator.proofs")


def proof_receipt(proof: dict) -> str:
    """The name of the Receipt holding the window a proof's statement describes."""
    st = proof["statement"]
    return receipt_name(r.session_name(st["session"]), st["stage"], st["epoch"], st["windowStart"],
                        base64.b64decode(st["merkleRoot"]).hex())


class ProofPublisher:
    def __init__(self, session: dict):
        self.session = session
        self._written: dict[str, int] = {}   # receipt name -> proofs written there
        self._earlier: dict[str, list[str]] = {}   # receipt name -> proofs an earlier operator wrote there
        self._unproven = 0

    def publish(self, driver, receipts_index: dict[str, dict]) -> None:
        with driver._lock:
            entries = list(driver.proofs.entries)
        by_receipt: dict[str, list[dict]] = {}
        unproven = []
        for e in entries:
            if e["proof"] is None:
                unproven.append(e)
            else:
                by_receipt.setdefault(proof_receipt(e["proof"]), []).append(e)
        md = self.session["metadata"]
        for name, es in by_receipt.items():
            if name not in receipts_index or self._written.get(name) == len(es):
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
                if text in texts:
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
            for e in es[self._written.get(name, 0):]:
                where = f"in receipt {name} status.fraudProofs"
                if id(e) not in kept:
                    where = f"too large for receipt {name}'s status, its JSON in the operator's log"
                    log.warning("fraud proof too large for receipt %s's status; its JSON: %s", name,
                                json.dumps(e["proof"], sort_keys=True, separators=(",", ":")))
                kube.event(self.session, "FraudProven",
                           f"{e['node']} stage {e['stage']} position {e['position']}: signed fraud proof {where} "
                           f"({'holds' if e['holds'] else 'does not hold'})", type_="Warning")
            self._written[name] = len(es)
        for e in unproven[self._unproven:]:
            kube.event(self.session, "FraudUnproven",
                       f"{e['node']} stage {e['stage']} position {e['position']}: no proof: "
                       + "; ".join(e["reasons"])[:900], type_="Warning")
        self._unproven = len(unproven)
