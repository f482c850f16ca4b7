"""Receipt objects from the agents' signed windows.

The driver checks every window the agents sign (signature under the node's key, Merkle root of the
commitments it received, session, stage and the epoch it sent) and flushes one receipt per window,
or a shorter one when a failover or rollback cut the window. This module writes each verified one as
a Receipt named `<session>-s<stage>-e<epoch>-p<start>-<root>` (so a resumed operator finds the ones it wrote
before and never writes one twice), owned by the session. Anything that does not verify, including
a response that carried another epoch than the one the stage was at, is discarded, never written.
"""
from __future__ import annotations

import base64
import hashlib
import logging

from consortium import kube
from consortium import resources as r

log = logging.getLogger("consortium.operator.receipts")


def receipt_name(session: str, stage: int, epoch: int, start: int, merkle_hex: str) -> str:
    # The root's prefix tells apart a window signed again after a rollback truncated it.
    return f"{session}-s{stage}-e{epoch}-p{start}-{merkle_hex[:8]}"


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def receipt_body(session: dict, entry: dict, public_key_b64: str) -> dict:
    rc = entry["receipt"]
    md = session["metadata"]
    spec = r.ReceiptSpec(
        session=md["name"], stage=entry["stage"], node=entry["node"], epoch=entry["epoch"],
        window=r.Window(start=rc["windowStart"], count=rc["count"]),
        commitments=[_hex(c) for c in rc["commitments"]], merkle_root=_hex(rc["merkleRoot"]),
        input_digest=_hex(rc["inputDigest"]), grid=r.CanonicalGrid(**{k: v for k, v in rc["grid"].items()
                                                                      if k in ("dtype", "grid", "clamp")}),
        signature=rc["signature"],
        public_key_fingerprint=hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()).to_k8s()
    return {"apiVersion": r.API_VERSION, "kind": "Receipt",
            "metadata": {"name": receipt_name(md["name"], entry["stage"], entry["epoch"], rc["windowStart"],
                                                 spec["merkleRoot"]),
                         "namespace": md["namespace"],
                         "labels": {f"{r.GROUP}/session": md["name"], f"{r.GROUP}/stage": str(entry["stage"]),
                                    f"{r.GROUP}/node": entry["node"]},
                         "ownerReferences": [{"apiVersion": r.API_VERSION, "kind": "InferenceSession",
                                              "name": md["name"], "uid": md["uid"]}]},
            "spec": spec}


class ReceiptWriter:
    def __init__(self, session: dict):
        self.session = session
        self.index: dict[str, dict] = {}   # name -> {stage, node, epoch, start, count}
        self._seen = 0
        self.discarded = 0

    def load_existing(self) -> None:
        """The receipts an earlier run of the operator wrote for this session."""
        md = self.session["metadata"]
        items = kube.api().list_namespaced_custom_object(
            r.GROUP, r.VERSION, md["namespace"], "receipts",
            label_selector=f"{r.GROUP}/session={md['name']}").get("items", [])
        for it in items:
            s = it["spec"]
            self.index[it["metadata"]["name"]] = {"stage": s["stage"], "node": s["node"], "epoch": s["epoch"],
                                                  "start": s["window"]["start"], "count": s["window"]["count"]}

    def publish(self, driver) -> int:
        """Write the receipts the driver flushed since the last call; returns how many were written."""
        from kubernetes.client.exceptions import ApiException

        with driver._lock:
            new = list(driver.receipts[self._seen:])
            self._seen = len(driver.receipts)
        written = 0
        md = self.session["metadata"]
        for e in new:
            if not e["verified"] or e["epoch"] > driver.state.epochs[e["stage"]]:
                self.discarded += 1
                kube.event(self.session, "ReceiptDiscarded",
                           f"stage {e['stage']} window at {e['start']} from {e['node']} epoch {e['epoch']}: "
                           f"{'; '.join(e['reasons']) or 'did not verify'}", type_="Warning")
                continue
            body = receipt_body(self.session, e, driver.public_keys.get(e["node"], ""))
            name = body["metadata"]["name"]
            if name in self.index:
                continue
            try:
                kube.api().create_namespaced_custom_object(r.GROUP, r.VERSION, md["namespace"], "receipts", body)
                written += 1
            except ApiException as ex:
                if ex.status != 409:
                    raise
            self.index[name] = {"stage": e["stage"], "node": e["node"], "epoch": e["epoch"], "start": e["start"],
                                "count": e["count"]}
        return written
