"""Fraud proofs from the driver's audits.

An audit whose verdict is Fraud becomes a signed `FraudProof` (consortium.verification.proofs) as
soon as the worker's signed window covering the position is in hand as a receipt. A window often
closes after some of its units are audited (a window of 16 positions closes at its 16th, or when a
failover or rollback cuts it), so a unit waits here until the receipt that covers it is flushed.

The reveal is the worker's own output row, the one it sent downstream and the driver kept for the
audit: its canonical form hashes to the commitment the worker signed, so it is the worker's by the
hash and no Reveal signature is needed. When it does not hash (the worker signed one row and sent
another), the driver has no signed word of the worker's about that row, and no proof is made: the
response was already judged Fraud on its face when it arrived. (The agent's Reveal RPC would sign a
reveal of the row it kept, which a cheater that sends one row and commits another need not give.)

Who signs: the coordinator, the process that runs the driver (standalone: the test case; Kubernetes:
the operator), with its own key. The recomputed row comes from the auditing node over the Audit RPC,
which that node does not sign, so a proof carries the coordinator's claim that this is the auditing
node's recomputation (the entry names the auditor; the proof's verifierId is the coordinator). A
third party checks the claim by re-running the stage on the input whose digest the proof names.

A final stage's token that its own logit row does not sample (the driver checks each one as the row
arrives) becomes a `SamplingFraudProof` in the same way (a `SamplingUnit` waiting for the receipt
whose statement signs that token): it rests on the worker's signed words alone.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from consortium.verification import canonical, proofs, receipts, signing
from consortium.verification.canonical import CanonicalGrid
from consortium.verification.verdicts import Tolerance

log = logging.getLogger("consortium.driver.proofs")

# The driver's digests of what it fed a stage at given positions; None when it no longer holds them.
InputDigests = Callable[[int, Sequence[int]], "list[bytes] | None"]


@dataclasses.dataclass
class FraudUnit:
    """An audited unit judged Fraud, waiting for the receipt that covers it."""
    stage: int
    position: int
    node: str
    epoch: int
    commitment: bytes
    worker_row: np.ndarray       # the row the worker sent
    recomputed: np.ndarray       # the auditing node's row
    tolerance: Tolerance
    auditor: str

    def to_json(self) -> dict:
        return {"stage": self.stage, "position": self.position, "node": self.node, "epoch": self.epoch,
                "commitment": base64.b64encode(self.commitment).decode(), "worker_row": _row_json(self.worker_row),
                "recomputed": _row_json(self.recomputed), "tolerance": self.tolerance.to_json(),
                "auditor": self.auditor}

    @classmethod
    def from_json(cls, o: dict) -> "FraudUnit":
        return cls(int(o["stage"]), int(o["position"]), o["node"], int(o["epoch"]), base64.b64decode(o["commitment"]),
                   _row_from_json(o["worker_row"]), _row_from_json(o["recomputed"]),
                   Tolerance.from_json(o["tolerance"]), o["auditor"])


@dataclasses.dataclass
class SamplingUnit:
    """A token the final stage answered that its logit row does not sample, waiting for the receipt
    that signs it. `position` is the row's (the token is the one at position + 1)."""
    stage: int
    position: int
    node: str
    epoch: int
    commitment: bytes
    worker_row: np.ndarray       # the logit row the worker sent
    token: int                   # the token it answered
    auditor: str | None = None   # none: nobody recomputed anything, the row is the worker's own

    def to_json(self) -> dict:
        return {"kind": "sampling", "stage": self.stage, "position": self.position, "node": self.node,
                "epoch": self.epoch, "commitment": base64.b64encode(self.commitment).decode(),
                "worker_row": _row_json(self.worker_row), "token": self.token}

    @classmethod
    def from_json(cls, o: dict) -> "SamplingUnit":
        return cls(int(o["stage"]), int(o["position"]), o["node"], int(o["epoch"]), base64.b64decode(o["commitment"]),
                   _row_from_json(o["worker_row"]), int(o["token"]))


def _unit_from_json(o: dict) -> "FraudUnit | SamplingUnit":
    return SamplingUnit.from_json(o) if o.get("kind") == "sampling" else FraudUnit.from_json(o)


def _row_json(row: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()


def _row_from_json(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


class ProofBook:
    """Fraud units waiting for their receipts, and the proofs made from them.

    Each entry of `entries` is {"session", "stage", "position", "node", "epoch", "auditor",
    "verifier", "holds", "reasons", "proof"}: "proof" the FraudProof's JSON, or None (with the
    reason in "reasons") when the unit could not be proven.
    """

    def __init__(self, session: str, grid: CanonicalGrid, key: signing.Ed25519PrivateKey | None = None,
                 signer: str | None = None):
        # Without a key given, one for this driver alone: its proofs still check, and name its public key.
        self.key = key or signing.generate_private_key()
        self.signer = signer or signing.node_id_for(self.key)
        self.session, self.grid = session, grid
        self.pending: list[FraudUnit | SamplingUnit] = []
        self.entries: list[dict] = []

    @property
    def public_key_text(self) -> str:
        return signing.public_key_text(self.key)

    def add(self, unit: FraudUnit | SamplingUnit, flushed: Sequence[dict], public_keys: dict[str, str],
            input_digests: InputDigests) -> None:
        """A Fraud verdict: prove it now when a flushed receipt covers it, else keep it pending."""
        for entry in reversed(flushed):
            if self._covers(entry, unit):
                self._prove(unit, receipts.Receipt.from_json(entry["receipt"]), public_keys, input_digests)
                return
        self.pending.append(unit)

    def offer(self, entry: dict, public_keys: dict[str, str], input_digests: InputDigests) -> None:
        """A receipt just flushed (a driver.receipts entry): prove the pending units it covers."""
        if not self.pending:
            return
        covered = [u for u in self.pending if self._covers(entry, u)]
        if not covered:
            return
        self.pending = [u for u in self.pending if u not in covered]
        r = receipts.Receipt.from_json(entry["receipt"])
        for u in covered:
            self._prove(u, r, public_keys, input_digests)

    @staticmethod
    def _covers(entry: dict, u: FraudUnit | SamplingUnit) -> bool:
        if (entry["stage"], entry["node"], entry["epoch"]) != (u.stage, u.node, u.epoch):
            return False
        i = u.position - entry["start"]
        return 0 <= i < entry["count"] and base64.b64decode(entry["receipt"]["commitments"][i]) == u.commitment

    def _prove(self, u: FraudUnit | SamplingUnit, r: receipts.Receipt, public_keys: dict[str, str],
               input_digests: InputDigests) -> None:
        entry = {"session": self.session, "stage": u.stage, "position": u.position, "node": u.node,
                 "epoch": u.epoch, "auditor": u.auditor, "verifier": self.signer, "holds": False,
                 "reasons": [], "proof": None}
        self.entries.append(entry)
        revealed = canonical.canonical_rows(u.worker_row[None, :], self.grid)[0]
        if canonical.commit_canonical(revealed[None, :], self.grid)[0] != u.commitment:
            entry["reasons"] = ["the row the worker sent does not hash to its signed commitment, and the "
                                "worker signed no reveal of it: nothing of the worker's to prove with"]
            return
        try:
            if isinstance(u, SamplingUnit):
                proof = proofs.make_sampling_proof(r, u.position, public_keys.get(u.node, ""), revealed, self.key,
                                                   self.signer)
            else:
                digests = input_digests(u.stage, list(r.statement.positions))
                if digests is None:
                    entry["reasons"] = ["the driver no longer holds the window's inputs"]
                    return
                proof = proofs.make_fraud_proof(r, u.position, digests, public_keys.get(u.node, ""), u.recomputed,
                                                u.tolerance, self.key, self.signer, revealed=revealed)
        except ValueError as e:
            entry["reasons"] = [str(e)]
            log.warning("no fraud proof for %s stage %d position %d: %s", u.node, u.stage, u.position, e)
            return
        holds, why = proofs.check_proof(proof)
        entry.update(holds=holds, reasons=why, proof=proof.to_json())
        (log.info if holds else log.warning)("fraud proof for %s stage %d position %d: %s", u.node, u.stage,
                                             u.position, "holds" if holds else "does not hold: " + "; ".join(why))

    def to_json(self, entries: Sequence[dict] | None = None) -> dict:
        """What a restarted coordinator needs to finish the book's work: the given entries (default
        all; the operator passes those not yet in the API) and the units still waiting for a receipt."""
        return {"entries": list(self.entries if entries is None else entries),
                "pending": [u.to_json() for u in self.pending]}

    def restore(self, saved: dict) -> None:
        """Take back what to_json saved (a coordinator resuming a session): its entries to publish
        again, its units to prove once a receipt covers them."""
        self.entries += [dict(e) for e in saved.get("entries", ())]
        self.pending += [_unit_from_json(u) for u in saved.get("pending", ())]

    def report(self) -> list[dict]:
        """The entries as a report lists them: each with the file name its proof is written under,
        and the units still waiting for a receipt (none after a finished session) as unproven."""
        out = [{**e, "file": proof_file_name(e) if e["proof"] else None} for e in self.entries]
        out += [{"session": self.session, "stage": u.stage, "position": u.position, "node": u.node,
                 "epoch": u.epoch, "auditor": u.auditor, "verifier": self.signer, "holds": False,
                 "reasons": ["the window covering this position was never flushed as a receipt"],
                 "proof": None, "file": None} for u in self.pending]
        return out


def proof_file_name(entry: dict) -> str:
    session = entry["session"].replace("/", "_")   # namespace/name/uid under the operator
    return f"{session}-s{entry['stage']}-p{entry['position']}-{entry['node']}.json"


def write_proof_files(entries: Sequence[dict], folder) -> list[str]:
    """One file per proof, the form `consortium verify-proof FILE` reads; returns the names written."""
    folder = Path(folder)
    names = []
    for e in entries:
        if e.get("proof"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / proof_file_name(e)).write_text(proofs.proof_from_json(e["proof"]).dumps() + "\n")
            names.append(proof_file_name(e))
    return names


def recheck(entries: Sequence[dict], verifier_key: str | None = None) -> list[tuple[dict, bool, list[str]]]:
    """Each entry's proof checked again from its JSON alone (not from the stated "holds"), and
    against the session's proof key when one is given."""
    out = []
    for e in entries:
        if not e.get("proof"):
            out.append((e, False, list(e.get("reasons") or ["no proof"])))
            continue
        try:
            holds, why = proofs.check_proof(proofs.proof_from_json(e["proof"]), verifier_key)
        except (KeyError, TypeError, ValueError) as err:
            holds, why = False, [f"unreadable proof: {err}"]
        out.append((e, holds, why))
    return out
