"""Fraud proofs: everything a third party needs to re-check a Fraud verdict without trusting anyone.

A proof binds the worker's own signed words (its window statement and signature, the audited
commitment and its inclusion path to the signed root, the inputs' digests) to the verifier's claim
(its recomputation of that row, the figures, the tolerance it applied), all signed by the verifier.
`check_proof` re-derives every part: signatures, inclusion, input chain, the hash of the revealed
tensor, and the figures and verdict from the tensors themselves. What it cannot re-derive is the
recomputation: that is the verifier's signed claim, checkable by re-running the stage on the input
whose digest the proof names.

A revealed tensor that hashes to the signed commitment is the worker's by the hash. One that does not
is only the worker's if the worker signed it (reveal_signature over the reveal statement); without
that, anyone could fabricate a wrong "reveal", so such a proof does not hold.

A `SamplingFraudProof` needs no recomputation: a final stage signs, with a window's commitments, the
token it sampled from each logit row (receipts.SampledTokens), and the proof shows from the worker's
words alone that its row cannot sample that token: the revealed canonical row hashes to the signed
commitment, and no row of float32 logits with that canonical form samples the signed token with
the signed parameters (consortium.sampling.cannot_sample over canonical.cell_bounds).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from consortium.sampling import SamplingParams, cannot_sample

from . import canonical, merkle, receipts, signing, verdicts
from .merkle import InclusionProof
from .receipts import Receipt, WindowStatement
from .verdicts import Figures, Tolerance, Verdict

__all__ = ["FraudProof", "SamplingFraudProof", "make_fraud_proof", "make_sampling_proof", "check_proof",
           "proof_from_json", "reveal_message", "sign_reveal"]

PROOF_DOMAIN = "consortium.fraud-proof.v1"
SAMPLING_PROOF_DOMAIN = "consortium.sampling-fraud-proof.v1"
REVEAL_DOMAIN = "consortium.reveal.v1"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def _array_out(a: np.ndarray, dtype: str) -> dict:
    a = np.asarray(a).astype("<" + np.dtype(dtype).str[1:])
    return {"dtype": dtype, "shape": list(a.shape), "data": _b64(np.ascontiguousarray(a).tobytes())}


def _array_in(o: dict, allowed: str) -> np.ndarray:
    if o["dtype"] != allowed:
        raise ValueError(f"expected a {allowed} tensor, got {o['dtype']!r}")
    shape = tuple(int(s) for s in o["shape"])
    a = np.frombuffer(_unb64(o["data"]), dtype="<" + np.dtype(allowed).str[1:])
    return a.reshape(shape).astype(allowed)


def canonical_json(obj) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, ASCII, no NaN (Python's float repr for numbers)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def reveal_message(statement: WindowStatement, position: int, revealed: np.ndarray) -> bytes:
    """What a worker signs when it reveals its canonical row for one position."""
    k = np.ascontiguousarray(np.asarray(revealed).astype("<i4"))
    return signing.encode_fields(REVEAL_DOMAIN, statement.session, statement.stage, statement.node_id,
                                 statement.epoch, position, k.shape[0], k.tobytes())


def sign_reveal(private_key: signing.Ed25519PrivateKey, statement: WindowStatement, position: int,
                revealed: np.ndarray) -> bytes:
    return signing.sign(private_key, reveal_message(statement, position, revealed))


class _Signed:
    """What both kinds of proof share: the publisher's signature over everything else (body())."""
    domain: ClassVar[str]

    def signed_bytes(self) -> bytes:
        return signing.encode_fields(self.domain, canonical_json(self.body()))

    def to_json(self) -> dict:
        return {**self.body(), "verifierSignature": _b64(self.verifier_signature)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


@dataclass(frozen=True, eq=False)
class FraudProof(_Signed):
    session: str
    stage: int
    position: int
    input_digest: bytes
    window_input_digests: tuple[bytes, ...]
    statement: WindowStatement
    worker_signature: bytes
    worker_public_key: bytes
    commitment: bytes
    inclusion: InclusionProof
    revealed: np.ndarray | None          # int32 [d] grid indices, or None
    reveal_signature: bytes | None
    recomputed: np.ndarray               # float32 [d]
    figures: Figures | None
    reasons: tuple[str, ...]
    tolerance: Tolerance
    verifier_id: str
    verifier_public_key: bytes
    verifier_signature: bytes = b""
    domain: ClassVar[str] = PROOF_DOMAIN

    def body(self) -> dict:
        """Everything but the verifier's signature, as JSON."""
        return {
            "kind": "FraudProof", "version": 1,
            "session": self.session, "stage": self.stage, "position": self.position,
            "inputDigest": _b64(self.input_digest),
            "windowInputDigests": [_b64(d) for d in self.window_input_digests],
            "statement": self.statement.to_json(),
            "workerSignature": _b64(self.worker_signature), "workerPublicKey": _b64(self.worker_public_key),
            "commitment": _b64(self.commitment), "inclusion": self.inclusion.to_json(),
            "revealed": None if self.revealed is None else _array_out(self.revealed, "int32"),
            "revealSignature": None if self.reveal_signature is None else _b64(self.reveal_signature),
            "recomputed": _array_out(self.recomputed, "float32"),
            "figures": None if self.figures is None else self.figures.to_json(),
            "reasons": list(self.reasons), "tolerance": self.tolerance.to_json(),
            "verifierId": self.verifier_id, "verifierPublicKey": _b64(self.verifier_public_key),
        }

    @classmethod
    def from_json(cls, o: dict) -> "FraudProof":
        if o.get("kind") != "FraudProof" or o.get("version") != 1:
            raise ValueError("not a version-1 FraudProof")
        return cls(
            session=str(o["session"]), stage=int(o["stage"]), position=int(o["position"]),
            input_digest=_unb64(o["inputDigest"]),
            window_input_digests=tuple(_unb64(d) for d in o["windowInputDigests"]),
            statement=WindowStatement.from_json(o["statement"]),
            worker_signature=_unb64(o["workerSignature"]), worker_public_key=_unb64(o["workerPublicKey"]),
            commitment=_unb64(o["commitment"]), inclusion=InclusionProof.from_json(o["inclusion"]),
            revealed=None if o["revealed"] is None else _array_in(o["revealed"], "int32"),
            reveal_signature=None if o["revealSignature"] is None else _unb64(o["revealSignature"]),
            recomputed=_array_in(o["recomputed"], "float32"),
            figures=None if o["figures"] is None else Figures.from_json(o["figures"]),
            reasons=tuple(str(r) for r in o["reasons"]), tolerance=Tolerance.from_json(o["tolerance"]),
            verifier_id=str(o["verifierId"]), verifier_public_key=_unb64(o["verifierPublicKey"]),
            verifier_signature=_unb64(o["verifierSignature"]),
        )


@dataclass(frozen=True, eq=False)
class SamplingFraudProof(_Signed):
    """A final stage's signed token that its own committed logit row cannot sample."""
    session: str
    stage: int
    statement: WindowStatement           # the worker's, holding the token (statement.sampled)
    worker_signature: bytes
    worker_public_key: bytes
    position: int                        # the logit row's; the token is the one at position + 1
    commitment: bytes
    inclusion: InclusionProof
    revealed: np.ndarray                 # int32 [vocabulary] grid indices of the row
    reasons: tuple[str, ...]
    verifier_id: str
    verifier_public_key: bytes
    verifier_signature: bytes = b""
    # 2: the row travels in the width its grid hashes it in (int16 for the default grid: half of a
    # 49,152-entry row's 262 KB of base64); 1: always int32. Kept, so a proof re-encodes as signed.
    version: int = 2
    domain: ClassVar[str] = SAMPLING_PROOF_DOMAIN

    @staticmethod
    def _reveal_dtype(version: int, statement: WindowStatement) -> str:
        return "int32" if version == 1 else canonical.index_dtype(statement.grid).name

    def body(self) -> dict:
        return {"kind": "SamplingFraudProof", "version": self.version, "session": self.session, "stage": self.stage,
                "position": self.position,
                "statement": self.statement.to_json(), "workerSignature": _b64(self.worker_signature),
                "workerPublicKey": _b64(self.worker_public_key), "commitment": _b64(self.commitment),
                "inclusion": self.inclusion.to_json(),
                "revealed": _array_out(self.revealed, self._reveal_dtype(self.version, self.statement)),
                "reasons": list(self.reasons), "verifierId": self.verifier_id,
                "verifierPublicKey": _b64(self.verifier_public_key)}

    @classmethod
    def from_json(cls, o: dict) -> "SamplingFraudProof":
        if o.get("kind") != "SamplingFraudProof" or o.get("version") not in (1, 2):
            raise ValueError("not a version-1 or -2 SamplingFraudProof")
        statement = WindowStatement.from_json(o["statement"])
        revealed = _array_in(o["revealed"], cls._reveal_dtype(o["version"], statement)).astype(np.int32)
        return cls(session=str(o["session"]), stage=int(o["stage"]), statement=statement,
                   worker_signature=_unb64(o["workerSignature"]),
                   worker_public_key=_unb64(o["workerPublicKey"]), position=int(o["position"]),
                   commitment=_unb64(o["commitment"]), inclusion=InclusionProof.from_json(o["inclusion"]),
                   revealed=revealed, reasons=tuple(str(r) for r in o["reasons"]),
                   verifier_id=str(o["verifierId"]), verifier_public_key=_unb64(o["verifierPublicKey"]),
                   verifier_signature=_unb64(o["verifierSignature"]), version=int(o["version"]))


def proof_from_json(o: dict) -> "FraudProof | SamplingFraudProof":
    """Either kind of proof from its JSON; ValueError for anything else."""
    kinds = {"FraudProof": FraudProof, "SamplingFraudProof": SamplingFraudProof}
    kind = o.get("kind") if isinstance(o, dict) else None
    if kind not in kinds:
        raise ValueError(f"not a fraud proof (kind {kind!r})")
    return kinds[kind].from_json(o)


def _unsampleable(st: WindowStatement, position: int, revealed: np.ndarray) -> tuple[int | None, str | None]:
    """The token the statement signs for `position` and why the revealed row cannot sample it."""
    token = st.sampled.token_at(position) if st.sampled is not None else None
    if token is None:
        return None, None
    lo, hi = canonical.cell_bounds(revealed, st.grid)
    params = SamplingParams(st.sampled.temperature, st.sampled.top_p, st.sampled.seed)
    return token, cannot_sample(lo, hi, token, position + 1, params)


def _signed_index(receipt: Receipt, position: int, worker_public_key: signing.PublicKeyLike) -> int:
    """The position's index in a receipt that verifies under the worker's key; ValueError otherwise
    (a bad signature proves nothing to a third party: anyone can make one)."""
    st = receipt.statement
    if position not in st.positions:
        raise ValueError(f"position {position} is not in the receipt's window {st.positions}")
    ok, why = receipts.verify_receipt(receipt, worker_public_key)
    if not ok:
        raise ValueError("the receipt does not verify, so it proves nothing about the worker: " + "; ".join(why))
    return position - st.window_start


def make_sampling_proof(receipt: Receipt, position: int, worker_public_key: signing.PublicKeyLike,
                        revealed: np.ndarray, verifier_key: signing.Ed25519PrivateKey,
                        verifier_id: str | None = None) -> SamplingFraudProof:
    """The signed proof that the token the receipt signs for the logit row at `position` is not one
    that row (revealed: its canonical grid indices) can sample. ValueError where it cannot be
    proven: the receipt does not verify, signs no token there, the reveal is not the committed row,
    or some row with that canonical form might sample the token."""
    st = receipt.statement
    i = _signed_index(receipt, position, worker_public_key)
    k = np.asarray(revealed).astype(np.int32).reshape(-1)
    if canonical.commit_canonical(k[None, :], st.grid)[0] != receipt.commitments[i]:
        raise ValueError("the revealed row does not hash to the signed commitment")
    token, reason = _unsampleable(st, position, k)
    if token is None:
        raise ValueError(f"the window signs no token sampled at position {position}")
    if reason is None:
        raise ValueError(f"token {token} might come from a row with this canonical form: nothing to prove")
    proof = SamplingFraudProof(
        session=st.session, stage=st.stage, statement=st, worker_signature=receipt.signature,
        worker_public_key=signing.public_key_bytes(worker_public_key), position=position, commitment=receipt.commitments[i], inclusion=merkle.inclusion_proof(receipt.commitments, i),
        revealed=k, reasons=(f"signed token {token} at position {position + 1}; {reason}",),
        verifier_id=verifier_id or signing.node_id_for(verifier_key),
        verifier_public_key=signing.public_key_bytes(verifier_key))
    return dataclasses.replace(proof, verifier_signature=signing.sign(verifier_key, proof.signed_bytes()))


def make_fraud_proof(receipt: Receipt, position: int, window_input_digests: Sequence[bytes],
                     worker_public_key: signing.PublicKeyLike, recomputed: np.ndarray, tolerance: Tolerance,
                     verifier_key: signing.Ed25519PrivateKey, verifier_id: str | None = None, *,
                     revealed: np.ndarray | None = None, reveal_signature: bytes | None = None) -> FraudProof:
    """Judge one unit of a receipt and, if the verdict is Fraud, return the signed proof of it.

    Raises ValueError when there is no provable fraud (any other verdict, or a bad receipt
    signature, which proves nothing to a third party: anyone can make a bad signature).
    """
    st = receipt.statement
    i = _signed_index(receipt, position, worker_public_key)
    row = np.asarray(recomputed, dtype=np.float32)
    result = verdicts.judge_unit(receipt.commitments[i], row, grid=st.grid, tolerance=tolerance, revealed=revealed)
    if result.verdict is not Verdict.FRAUD:
        raise ValueError(f"no fraud to prove: the verdict is {result.verdict.value} ({'; '.join(result.reasons)})")
    proof = FraudProof(
        session=st.session, stage=st.stage, position=position, input_digest=bytes(window_input_digests[i]),
        window_input_digests=tuple(bytes(d) for d in window_input_digests), statement=st,
        worker_signature=receipt.signature, worker_public_key=signing.public_key_bytes(worker_public_key),
        commitment=receipt.commitments[i], inclusion=merkle.inclusion_proof(receipt.commitments, i),
        revealed=None if revealed is None else np.asarray(revealed).astype(np.int32),
        reveal_signature=reveal_signature, recomputed=row, figures=result.figures, reasons=result.reasons,
        tolerance=tolerance, verifier_id=verifier_id or signing.node_id_for(verifier_key),
        verifier_public_key=signing.public_key_bytes(verifier_key))
    return dataclasses.replace(proof, verifier_signature=signing.sign(verifier_key, proof.signed_bytes()))


def check_proof(proof: "FraudProof | SamplingFraudProof",
                verifier_key: signing.PublicKeyLike | None = None) -> tuple[bool, list[str]]:
    """Re-check every part of a proof. Returns (holds, reasons): the failures if it does not hold,
    otherwise what was checked and what a reader must still compare with the session.

    verifier_key: the key the session's coordinator signs proofs with (an InferenceSession's
    status.proofKey); a proof signed by any other key does not hold. ValueError if it is no key."""
    fail, ok = [], []
    st = proof.statement

    def need(cond: bool, good: str, bad: str) -> bool:
        (ok if cond else fail).append(good if cond else bad)
        return cond

    if isinstance(proof, SamplingFraudProof):
        return _check_sampling_proof(proof, verifier_key, need, ok, fail)
    i = _check_worker_words(proof, verifier_key, need, "the audited commitment")
    if i is not None:
        ins = proof.window_input_digests
        need(len(ins) == st.count and len(set(map(len, ins)) | {32}) == 1
             and receipts.input_chain(ins) == st.input_digest and ins[i] == proof.input_digest,
             "the input digest is the signed window's input at this position",
             "the input digests do not chain to the signed input digest, or not at this position")

    try:
        result = verdicts.judge_unit(proof.commitment, proof.recomputed, grid=st.grid, tolerance=proof.tolerance,
                                     revealed=proof.revealed)
    except (canonical.NonFiniteActivation, ValueError) as e:
        fail.append(f"the verifier's recomputation is unusable: {e}")
        result = None
    if result is not None:
        reveal_bad = result.verdict is Verdict.FRAUD and result.figures is None and proof.revealed is not None
        if reveal_bad:
            # A wrong reveal is only the worker's if the worker signed it.
            signed = proof.reveal_signature is not None and signing.verify_signature(
                proof.worker_public_key, reveal_message(st, proof.position, proof.revealed), proof.reveal_signature)
            need(signed, f"Fraud: {result.reasons[0]}, and the worker signed that reveal",
                 f"{result.reasons[0]}, but the worker did not sign that reveal, so it is not the worker's")
        elif need(result.verdict is Verdict.FRAUD, "Fraud: " + "; ".join(result.reasons),
                  f"re-judged from the tensors the verdict is {result.verdict.value}, not Fraud: "
                  + "; ".join(result.reasons)):
            need(proof.figures == result.figures, "the stated figures are the recomputed ones",
                 "the stated figures differ from those recomputed from the tensors")

    if fail:
        return False, fail
    notes = [f"note: the tolerance applied has SHA-256 {hashlib.sha256(canonical_json(proof.tolerance.to_json())).hexdigest()[:16]}; "
             "compare it with the session's",
             f"note: the recomputation is the verifier's signed claim; re-run stage {st.stage} at position "
             f"{proof.position} on the input with digest {proof.input_digest.hex()[:16]} to check it"]
    if verifier_key is None:
        notes.append(f"note: the verifier key is {signing.public_key_text(proof.verifier_public_key)}; compare it "
                     "with the session's status.proofKey (or give it: --verifier-key)")
    return True, ok + notes + _node_id_note(proof)


def _node_id_note(proof) -> list[str]:
    st = proof.statement
    if signing.node_id_for(proof.worker_public_key) == st.node_id:
        return []
    return [f"note: node id {st.node_id!r} is not derived from the worker key; check the key against that "
            "ComputeNode's public key"]


def _check_worker_words(proof, verifier_key, need, commitment: str) -> int | None:
    """The parts both kinds share: the verifier's key and signature, the worker's statement
    signature, session and stage, the position in the window and its commitment's inclusion.
    Returns the position's index in the window, or None when it lies outside."""
    st = proof.statement
    if verifier_key is not None:
        expected = signing.public_key_bytes(verifier_key)
        need(proof.verifier_public_key == expected, "the verifier key is the session's proof key",
             f"signed with key {signing.public_key_text(proof.verifier_public_key)}, not the session's proof key "
             f"{signing.public_key_text(expected)}")
    need(signing.verify_signature(proof.verifier_public_key, proof.signed_bytes(), proof.verifier_signature),
         f"verifier {proof.verifier_id!r} signed this proof",
         "the verifier's signature does not cover this proof (altered, or signed by another key)")
    need(signing.verify_signature(proof.worker_public_key, st.encode(), proof.worker_signature),
         f"worker {st.node_id!r} signed the window statement",
         "the worker's signature over the window statement does not verify")
    need(proof.session == st.session and proof.stage == st.stage, "session and stage match the statement",
         f"proof names {proof.session!r} stage {proof.stage}, the statement {st.session!r} stage {st.stage}")
    if not need(proof.position in st.positions, f"position {proof.position} lies in the signed window",
                f"position {proof.position} is outside the signed window "
                f"{st.window_start}..{st.window_start + st.count - 1}"):
        return None
    i = proof.position - st.window_start
    need(proof.inclusion.index == i and proof.inclusion.size == st.count
         and merkle.verify_inclusion(proof.commitment, proof.inclusion, st.merkle_root),
         f"{commitment} is in the signed Merkle root",
         f"{commitment}'s inclusion proof does not lead to the signed root at this position")
    return i


def _check_sampling_proof(proof: SamplingFraudProof, verifier_key, need, ok: list, fail: list) -> tuple[bool, list[str]]:
    st = proof.statement
    _check_worker_words(proof, verifier_key, need, "the logit row's commitment")
    try:
        hashes = canonical.commit_canonical(proof.revealed.reshape(1, -1), st.grid)[0] == proof.commitment
    except canonical.NonCanonicalTensor as e:
        hashes = False
        fail.append(f"the revealed row is not canonical: {e}")
    if need(hashes, "the revealed row hashes to the signed commitment",
            "the revealed row does not hash to the signed commitment"):
        token, reason = _unsampleable(st, proof.position, proof.revealed)
        if need(token is not None, f"the worker signed token {token} as sampled from this row",
                f"the statement signs no token sampled at position {proof.position}"):
            need(reason is not None, f"no row with this canonical form samples it: {reason}",
                 f"token {token} might come from a row with this canonical form")
    if fail:
        return False, fail
    notes = []
    if verifier_key is None:
        notes.append(f"note: the proof was published by key {signing.public_key_text(proof.verifier_public_key)}; "
                     "everything it proves is the worker's own signed words")
    return True, ok + notes + _node_id_note(proof)
