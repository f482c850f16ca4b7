"""Window statements, their signatures, and receipts.

A node agent signs, with every forward response, the statement of its current window so far:
(session, stage, node id, epoch, window start, count, Merkle root of the window's per-token
commitments, hash chain of the window's per-token input digests, grid config). A window cut short by
a crash or an epoch change is therefore still proven by the last response's signature, and is
written as a shorter receipt. (A session may instead have its agents sign once per window, when it
is complete or asked for: the rows a node held uncommitted when it died are then signed only by the
node that replays them.) A Receipt is that statement, the per-token commitments and the
signature; the commitments stay in it so a dead node's work can still be audited.

A final stage that samples the next token (ForwardRequest.sample) also signs, in the statement of
the window holding the logit row, the token it sampled from that row and the parameters it sampled
with (`SampledTokens`; the statement is then encoded under "consortium.window.v2"). Its own signed
words then say which token it gave for which committed row, so a token its row cannot sample is
provable (consortium.verification.proofs.SamplingFraudProof).

Windows are aligned: a window closes after position p when (p + 1) % window == 0, so receipts of
different nodes and epochs cover predictable position ranges (a node that starts at 20 signs 20..31).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import canonical, merkle, signing
from .canonical import CanonicalGrid

__all__ = [
    "WindowStatement", "SignedStatement", "SampledTokens", "Receipt", "WindowSigner", "verify_receipt",
    "token_input_digest", "hidden_input_digest", "input_chain", "receipt_bytes_per_token", "DEFAULT_WINDOW",
    "DEFAULT_STATE_WINDOW",
]

DEFAULT_WINDOW = 16
# Positions per state window (audits from window states): an audit replays one whole state window, so
# a short one keeps the replay small and gives a cheater many windows' odds of being drawn.
DEFAULT_STATE_WINDOW = 4
STATEMENT_DOMAIN = "consortium.window.v1"
SAMPLED_STATEMENT_DOMAIN = "consortium.window.v2"   # a statement holding sampled tokens
STATE_DOMAIN = "consortium.state.v1"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def token_input_digest(token_id: int) -> bytes:
    """Input digest of a stage-0 position: the token id."""
    return hashlib.sha256(signing.encode_fields("consortium.input.token.v1", int(token_id))).digest()


def hidden_input_digest(row: np.ndarray) -> bytes:
    """Input digest of a later stage's position: the exact bytes of the hidden-state row it was fed."""
    a = np.asarray(row)
    if a.ndim != 1 or a.dtype.kind != "f":
        raise ValueError(f"expected one floating-point row, got {a.dtype} {a.shape}")
    le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    h = _hidden_digest_head(a.dtype.name, a.shape[0]).copy()
    h.update(le)   # the row's own buffer: encode_fields' last field without copying it twice
    return h.digest()


@functools.lru_cache(maxsize=16)
def _hidden_digest_head(dtype: str, width: int):
    """SHA-256 fed with encode_fields(domain, dtype, width, <row>) up to the row's bytes."""
    head = signing.encode_fields("consortium.input.hidden.v1", dtype, width)
    itemsize = np.dtype(dtype).itemsize
    return hashlib.sha256(head + struct.pack("<I", width * itemsize))


def state_message(session: str, stage: int, node_id: str, epoch: int, window_start: int, count: int,
                  digest: bytes) -> bytes:
    """What a node signs for a window's KV state: the SHA-256 of its keys and values at the
    window's positions as the stage engine exports them (docs/verification.md, "State statement")."""
    return signing.encode_fields(STATE_DOMAIN, session, stage, node_id, epoch, window_start, count, digest)


_CHAIN_SEED = hashlib.sha256(signing.encode_fields("consortium.input.chain.v1")).digest()


def _chain_step(c: bytes, d: bytes) -> bytes:
    if len(d) != 32:
        raise ValueError("input digests are 32 bytes")
    return hashlib.sha256(c + bytes(d)).digest()


def input_chain(digests: Sequence[bytes]) -> bytes:
    """Hash chain over a window's per-token input digests: c = SHA-256(c || d), from a domain seed."""
    c = _CHAIN_SEED
    for d in digests:
        c = _chain_step(c, d)
    return c


@dataclass(frozen=True)
class SampledTokens:
    """The tokens a final stage sampled in one window: (position of the logit row, token) pairs in
    position order, and the sampling parameters (consortium.sampling.SamplingParams' fields), which
    are the session's and the same for every token."""
    temperature: float
    top_p: float
    seed: int
    tokens: tuple[tuple[int, int], ...] = ()

    def encode_fields(self) -> tuple:
        out: list = [struct.pack("<d", self.temperature), struct.pack("<d", self.top_p), self.seed, len(self.tokens)]
        for p, t in self.tokens:
            out += [p, t]
        return tuple(out)

    def token_at(self, position: int) -> int | None:
        return next((t for p, t in self.tokens if p == position), None)

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "topP": self.top_p, "seed": self.seed,
                "tokens": [{"position": p, "token": t} for p, t in self.tokens]}

    @classmethod
    def from_json(cls, o: dict) -> "SampledTokens":
        """From to_json's form, which a Receipt's spec.sampled also has."""
        return cls(float(o["temperature"]), float(o["topP"]), int(o["seed"]),
                   tuple((int(t["position"]), int(t["token"])) for t in o["tokens"]))


@dataclass(frozen=True)
class WindowStatement:
    session: str
    stage: int
    node_id: str
    epoch: int
    window_start: int
    count: int
    merkle_root: bytes
    input_digest: bytes
    grid: CanonicalGrid = field(default_factory=CanonicalGrid)
    sampled: SampledTokens | None = None   # final stage, sampling: the tokens it gave

    @classmethod
    def for_window(cls, *, session: str, stage: int, node_id: str, epoch: int, window_start: int,
                   commitments: Sequence[bytes], input_digests: Sequence[bytes],
                   grid: CanonicalGrid = CanonicalGrid()) -> "WindowStatement":
        """The statement a driver rebuilds from the commitments it received and the inputs it sent."""
        if len(commitments) != len(input_digests):
            raise ValueError("one input digest per commitment")
        return cls(session, stage, node_id, epoch, window_start, len(commitments),
                   merkle.merkle_root(commitments), input_chain(input_digests), grid)

    def encode(self) -> bytes:
        """The signed bytes (docs/verification.md, "Window statement")."""
        fields = (self.session, self.stage, self.node_id, self.epoch, self.window_start, self.count,
                  self.merkle_root, self.input_digest, self.grid.dtype, self.grid.grid, self.grid.clamp_steps)
        if self.sampled is None:
            return signing.encode_fields(STATEMENT_DOMAIN, *fields)
        return signing.encode_fields(SAMPLED_STATEMENT_DOMAIN, *fields, *self.sampled.encode_fields())

    @property
    def positions(self) -> range:
        return range(self.window_start, self.window_start + self.count)

    def to_json(self) -> dict:
        out = {"session": self.session, "stage": self.stage, "nodeId": self.node_id, "epoch": self.epoch,
               "windowStart": self.window_start, "count": self.count, "merkleRoot": _b64(self.merkle_root),
               "inputDigest": _b64(self.input_digest), "grid": self.grid.to_json()}
        if self.sampled is not None:
            out["sampled"] = self.sampled.to_json()
        return out

    @classmethod
    def from_json(cls, o: dict) -> "WindowStatement":
        return cls(str(o["session"]), int(o["stage"]), str(o["nodeId"]), int(o["epoch"]), int(o["windowStart"]),
                   int(o["count"]), _unb64(o["merkleRoot"]), _unb64(o["inputDigest"]),
                   CanonicalGrid.from_json(o["grid"]),
                   SampledTokens.from_json(o["sampled"]) if o.get("sampled") is not None else None)


@dataclass(frozen=True)
class SignedStatement:
    statement: WindowStatement
    signature: bytes


@dataclass(frozen=True)
class Receipt:
    statement: WindowStatement
    commitments: tuple[bytes, ...]
    signature: bytes

    def to_json(self) -> dict:
        """Kubernetes-style JSON (camelCase); every byte string is standard base64 with padding."""
        return {"version": 1, **self.statement.to_json(),
                "commitments": [_b64(c) for c in self.commitments], "signature": _b64(self.signature)}

    @classmethod
    def from_json(cls, o: dict) -> "Receipt":
        if o.get("version") != 1:
            raise ValueError(f"unsupported receipt version {o.get('version')!r}")
        return cls(WindowStatement.from_json(o), tuple(_unb64(c) for c in o["commitments"]),
                   _unb64(o["signature"]))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def verify_receipt(receipt: Receipt, public_key: signing.PublicKeyLike) -> tuple[bool, list[str]]:
    """Check the commitments against the signed root and the signature; (ok, reasons it is not)."""
    st, reasons = receipt.statement, []
    if st.count < 1:
        reasons.append(f"count {st.count} < 1")
    if len(receipt.commitments) != st.count:
        reasons.append(f"{len(receipt.commitments)} commitments for a signed count of {st.count}")
    if any(len(c) != 32 for c in receipt.commitments):
        reasons.append("a commitment is not 32 bytes")
    elif receipt.commitments and merkle.merkle_root(receipt.commitments) != st.merkle_root:
        reasons.append("the commitments do not hash to the signed Merkle root")
    try:
        key = signing.public_key(public_key)
    except ValueError as e:
        reasons.append(f"unusable public key: {e}")
    else:
        if not signing.verify_signature(key, st.encode(), receipt.signature):
            reasons.append(f"the signature does not verify under the public key of {st.node_id!r}")
    return not reasons, reasons


class WindowSigner:
    """Agent side: keeps the open window of one (session, stage, epoch) and signs it after each token."""

    def __init__(self, private_key: signing.Ed25519PrivateKey, *, session: str, stage: int, node_id: str,
                 epoch: int, grid: CanonicalGrid = CanonicalGrid(), window: int = DEFAULT_WINDOW):
        if window < 1:
            raise ValueError("window must be >= 1")
        self._key = private_key
        self.session, self.stage, self.node_id, self.epoch = session, stage, node_id, epoch
        self.grid, self.window = grid, window
        self.reset()

    def reset(self, *, epoch: int | None = None) -> None:
        """Drop the open window (after a KV truncation, or with a new epoch after fencing)."""
        if epoch is not None:
            self.epoch = epoch
        self._start: int | None = None
        self._last: SignedStatement | None = None
        self._open_window()

    def _open_window(self) -> None:
        # The window's root and input chain grow with it: signing after every token stays O(log n).
        self._commitments: list[bytes] = []
        self._tree = merkle.MerkleAccumulator()
        self._chain = _CHAIN_SEED
        self._sampled: SampledTokens | None = None

    def _closed(self) -> bool:
        return self._start is None or (self._start + len(self._commitments)) % self.window == 0

    def _append(self, position: int, input_digest: bytes, commitment: bytes, sampled=None) -> None:
        """`sampled`: (SamplingParams, token) when the token was sampled from this row."""
        if len(commitment) != 32 or len(input_digest) != 32:
            raise ValueError("commitments and input digests are 32 bytes")
        if self._closed():
            self._start = position
            self._open_window()
        elif position != self._start + len(self._commitments):
            raise ValueError(f"position {position} does not continue the window at "
                             f"{self._start + len(self._commitments)}; reset() first")
        if sampled is not None:
            params, token = sampled
            s = self._sampled or SampledTokens(float(params.temperature), float(params.top_p), int(params.seed))
            if (s.temperature, s.top_p, s.seed) != (params.temperature, params.top_p, params.seed):
                raise ValueError("a window's tokens are sampled with one set of parameters")
            self._sampled = dataclasses.replace(s, tokens=s.tokens + ((position, int(token)),))
        self._commitments.append(bytes(commitment))
        self._tree.add(commitment)
        self._chain = _chain_step(self._chain, input_digest)

    def _sign(self) -> SignedStatement:
        st = WindowStatement(self.session, self.stage, self.node_id, self.epoch, self._start, len(self._commitments),
                             self._tree.root(), self._chain, self.grid, self._sampled)
        self._last = SignedStatement(st, signing.sign(self._key, st.encode()))
        return self._last

    def add(self, position: int, input_digest: bytes, commitment: bytes, sampled=None) -> SignedStatement:
        """Record one token's commitment (and the token sampled from its row: (SamplingParams, token))
        and return the signed statement of its window so far."""
        self._append(position, input_digest, commitment, sampled)
        return self._sign()

    def add_batch(self, start: int, input_digests: Sequence[bytes], commitments: Sequence[bytes],
                  sampled: dict | None = None) -> list[SignedStatement]:
        """Record consecutive positions; one signed statement per window touched, signed once each.
        `sampled`: position -> (SamplingParams, token) for rows a token was sampled from."""
        if len(input_digests) != len(commitments):
            raise ValueError("one input digest per commitment")
        sampled = sampled or {}
        out = []
        for i, (d, c) in enumerate(zip(input_digests, commitments)):
            self._append(start + i, d, c, sampled.get(start + i))
            if self._closed() or i == len(commitments) - 1:
                out.append(self._sign())
        return out

    def commit_steps(self, steps: Sequence[tuple], *, token_inputs: bool) -> tuple[list[bytes], list[SignedStatement]]:
        """Commit the output rows of one or more steps, each (position of its first row, rows [n, d],
        what was fed at each row's position: token ids if token_inputs, else hidden rows[, the token
        sampled from its last row with its SamplingParams: (params, token), or None]), whose rows
        continue one another, and sign each window they touch once."""
        digests: list[bytes] = []
        sampled = {}
        for first, rows, inputs, *token in steps:
            digests += ([token_input_digest(int(t)) for t in inputs] if token_inputs
                        else [hidden_input_digest(r) for r in inputs])
            if token and token[0] is not None:
                sampled[first + len(rows) - 1] = token[0]
        commitments = canonical.commit_arrays([step[1] for step in steps], self.grid)
        return commitments, self.add_batch(steps[0][0], digests, commitments, sampled)

    @property
    def last(self) -> SignedStatement | None:
        return self._last

    def receipt(self) -> Receipt | None:
        """The receipt of the open (or just closed) window, as last signed."""
        if self._last is None:
            return None
        n = self._last.statement.count
        return Receipt(self._last.statement, tuple(self._commitments[:n]), self._last.signature)


def receipt_bytes_per_token(window: int = DEFAULT_WINDOW, *, session: str = "sky-is-blue",
                            node_id: str = "node-0123456789abcdef") -> dict[str, float]:
    """Measured size of a full receipt per token per stage: its JSON and its raw binary form.

    Independent of hidden size: a token costs one 32-byte commitment whatever the width. Binary is
    the signed statement encoding + 32 bytes per commitment + the 64-byte signature.
    """
    key = signing.generate_private_key()
    signer = WindowSigner(key, session=session, stage=1, node_id=node_id, epoch=1, window=window)
    for p in range(window):
        signer.add(p, hashlib.sha256(b"in%d" % p).digest(), hashlib.sha256(b"out%d" % p).digest())
    r = signer.receipt()
    binary = len(r.statement.encode()) + 32 * len(r.commitments) + len(r.signature)
    return {"window": window, "json_bytes": len(r.dumps()), "json_per_token": len(r.dumps()) / window,
            "binary_bytes": binary, "binary_per_token": binary / window}
