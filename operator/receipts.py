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


def receipt_name(session: str, uid: str, stage: int, epoch: int, start: int, merkle_hex: str) -> str:
    # The session's uid keeps a namesake's receipts apart: a session deleted and made again under the
    # same name signs the same windows, and the garbage collector may not have removed the old ones
    # yet (it took over 20 s on the test control plane), which would have taken the new ones' names.
    # The root's prefix tells apart a window signed again after a rollback truncated it.
    return f"{session}-{uid[:8]}-s{stage}-e{epoch}-p{start}-{merkle_hex[:8]}"



def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def receipt_body(session: dict, entry: dict, public_key_b64: str) -> dict:
    rc = entry["receipt"]
    md = session["metadata"]
    spec = r.ReceiptSpec(
        session=md["name"], stage=entry["stage"], node=entry["node"], node_id=rc["nodeId"], epoch=entry["epoch"],
        window=r.Window(start=rc["windowStart"], count=rc["count"]),
        commitments=[_hex(c) for c in rc["commitments"]], merkle_root=_hex(rc["merkleRoot"]),
        input_digest=_hex(rc["inputDigest"]), grid=r.CanonicalGrid(**{k: v for k, v in rc["grid"].items()
                                                                      if k in ("dtype", "grid", "clamp")}),
        signature=rc["signature"],
        public_key_fingerprint=hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest(),
        sampled=None if rc.get("sampled") is None else r.SampledTokens.model_validate(rc["sampled"]),
        rollbacks=entry.get("rollbacks", 0)).to_k8s()
    return {"apiVersion": r.API_VERSION, "kind": "Receipt",
            "metadata": {"name": receipt_name(md["name"], md["uid"], entry["stage"], entry["epoch"], rc["windowStart"],
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
        self.index: dict[str, dict] = {}   # name -> {stage, node, epoch, start, count, commitments (hex)}
        self.shown: dict[str, dict] = {}   # name -> the status an earlier operator wrote (load_existing)
        self._seen = 0
        self._pending: list[dict] = []   # flushed by the driver, not yet written (the API was away)
        self.discarded = 0

    def load_existing(self) -> None:
        """The receipts an earlier run of the operator wrote for this session (not a deleted namesake's,
        which the garbage collector may not have removed yet)."""
        md = self.session["metadata"]
        items = kube.api().list_namespaced_custom_object(
            r.GROUP, r.VERSION, md["namespace"], "receipts",
            label_selector=f"{r.GROUP}/session={md['name']}").get("items", [])
        for it in [it for it in items if kube.owned_by(it, md["uid"])]:
            s = it["spec"]
            self.index[it["metadata"]["name"]] = {"stage": s["stage"], "node": s["node"], "epoch": s["epoch"],
                                                  "start": s["window"]["start"], "count": s["window"]["count"],
                                                  "commitments": list(s["commitments"]),
                                                  "rollbacks": s.get("rollbacks", 0)}
            self.shown[it["metadata"]["name"]] = it.get("status") or {}

    def publish(self, driver, strict: bool = False) -> int:
        """Write the receipts the driver flushed since the last call, and those an earlier call could
        not (the API away: a control plane restarting); returns how many were written. The first
        write the API refuses for a reason that may pass leaves it and the rest for the next call
        (raised instead with `strict`: the end of a session retries until they are written)."""
        with driver._lock:
            self._pending += driver.receipts[self._seen:]
            self._seen = len(driver.receipts)
        written = 0
        md = self.session["metadata"]
        while self._pending:
            e = self._pending[0]
            if not e["verified"] or e["epoch"] > driver.state.epochs[e["stage"]]:
                self.discarded += 1
                kube.event(self.session, "ReceiptDiscarded",
                           f"stage {e['stage']} window at {e['start']} from {e['node']} epoch {e['epoch']}: "
                           f"{'; '.join(e['reasons']) or 'did not verify'}", type_="Warning")
                self._pending.pop(0)
                continue
            body = receipt_body(self.session, e, driver.public_keys.get(e["node"], ""))
            name = body["metadata"]["name"]
            if name in self.index:
                self._pending.pop(0)
                continue
            try:
                kube.api().create_namespaced_custom_object(r.GROUP, r.VERSION, md["namespace"], "receipts", body)
                written += 1
            except Exception as ex:  # noqa: BLE001 - sorted below
                if kube.transient(ex):
                    if strict:
                        raise
                    log.warning("receipt %s not written yet (%d more wait): %s", name, len(self._pending) - 1,
                                kube.reason(ex))
                    return written
                if getattr(ex, "status", None) is None:
                    raise
                if not kube.is_status(ex, 409):   # 409: an earlier try was written, its answer lost
                    # Refused for good (the object itself): said so, and the others still go out.
                    self._pending.pop(0)
                    self.discarded += 1
                    kube.event(self.session, "ReceiptDiscarded", f"{name}: the API refused it: {kube.reason(ex)}",
                               type_="Warning")
                    continue
            self._pending.pop(0)
            self.index[name] = {"stage": e["stage"], "node": e["node"], "epoch": e["epoch"], "start": e["start"],
                                "count": e["count"], "commitments": list(body["spec"]["commitments"]),
                                "rollbacks": e.get("rollbacks", 0)}
        return written


def signed_by_position(windows, stage: int, node: str, epoch: int) -> dict[int, set[bytes]]:
    """What `node` signed for each position of `stage` at `epoch`, from windows given as (stage,
    node, epoch, start, commitments, rollbacks). A rollback to position q has the rows from q computed
    and signed again, so at each position only the windows with the most rollbacks count: a node
    cannot pass off a row it replaced as the one it signed."""
    latest: dict[int, int] = {}
    out: dict[int, set[bytes]] = {}
    for s, n, e, start, commitments, rollbacks in windows:
        if (s, n, e) != (stage, node, epoch):
            continue
        for p, c in enumerate(commitments, start):
            if rollbacks > latest.get(p, -1):
                latest[p], out[p] = rollbacks, {c}
            elif rollbacks == latest[p]:
                out[p].add(c)
    return out


def written_windows(written: dict[str, dict]) -> list[tuple]:
    """ReceiptWriter.index as signed_by_position takes it."""
    return [(w["stage"], w["node"], w["epoch"], w["start"], [bytes.fromhex(c) for c in w.get("commitments", ())],
             w.get("rollbacks", 0)) for w in written.values()]


def recover_open_windows(driver, written: dict[str, dict]) -> int:
    """After an operator restart, before the stages are truncated: the windows the stopped operator
    never wrote as Receipts: the one each stage was still filling, and any closed one whose receipt
    was still waiting to be published (commitments come in after the answer, so a closed window's
    receipt is flushed and written a few tokens after the window closes). The agent still holds
    them: Reveal gives the signed statement holding a position and that position's commitment, so
    each window past the last written receipt (`written`: ReceiptWriter.index) up to the saved
    position is fetched back, checked (signature, Merkle root) and queued as a receipt like any
    other. Returns how many were queued."""
    import grpc

    from consortium import wire
    from consortium.verification import receipts as vr
    from consortium.wire import pb

    queued = 0
    st = driver.state
    for s, node in enumerate(st.nodes):
        client = driver.clients.get(node)
        if client is None:
            continue
        ref = driver._ref(s)
        ends = [w["start"] + w["count"] for w in written.values() if w["stage"] == s]
        p = max(ends, default=0)
        if s == len(st.nodes) - 1 and not ends:
            p = max(0, len(st.prompt_tokens) - 1)   # the last stage commits the prompt's final row only
        while p < st.done[s]:
            try:
                head = client.call("Reveal", pb.RevealRequest(ref=ref, position=p))
                signed = wire.window_from_pb(head.window)
                stmt = signed.statement
                commitments = [bytes(head.commitment) if q == p else
                               bytes(client.call("Reveal", pb.RevealRequest(ref=ref, position=q)).commitment)
                               for q in stmt.positions]
            except grpc.RpcError as e:
                log.warning("stage %d: the window holding position %d on %s is not recoverable: %s %s", s, p, node,
                            e.code().name, e.details())
                p += 1
                continue
            p = max(p + 1, stmt.window_start + stmt.count)
            if stmt.epoch != st.epochs[s] or stmt.session != driver.session or stmt.stage != s:
                continue
            with driver._lock:
                driver.record_receipt(s, node, stmt.epoch, vr.Receipt(stmt, tuple(commitments), signed.signature))
            queued += 1
    return queued
