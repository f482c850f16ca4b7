"""Merkle roots over a window's per-token commitments, and inclusion proofs for single tokens.

A receipt signs one root for a window of tokens; an audit of one token then needs only that token's
commitment and its path to the root. The tree is RFC 6962's (§2.1): leaf = SHA-256(0x00 || c),
node = SHA-256(0x01 || left || right), split at the largest power of two below n. Equivalently, at
each level pair nodes left to right and carry an odd last node up unchanged (never duplicated, so
no two different leaf lists share a root). The 0x00/0x01 prefixes keep a leaf from passing for a node.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Sequence

__all__ = ["InclusionProof", "MerkleAccumulator", "merkle_root", "inclusion_proof", "verify_inclusion", "leaf_hash",
           "node_hash"]


def leaf_hash(commitment: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + commitment).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _check(commitments: Sequence[bytes]) -> None:
    if not commitments:
        raise ValueError("a Merkle tree needs at least one commitment")
    for c in commitments:
        if not isinstance(c, (bytes, bytearray)) or len(c) != 32:
            raise ValueError("commitments must be 32-byte digests")


def merkle_root(commitments: Sequence[bytes]) -> bytes:
    _check(commitments)
    level = [leaf_hash(bytes(c)) for c in commitments]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class MerkleAccumulator:
    """merkle_root of a list that grows one commitment at a time, in O(log n) hashes per commitment.

    Keeps the roots of the perfect subtrees the tree is made of (sizes: the binary digits of n,
    largest first); the root hashes them together from the right, as RFC 6962's split does."""

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []   # (leaves, subtree root), largest first
        self.size = 0

    def add(self, commitment: bytes) -> None:
        _check([commitment])
        leaves, h = 1, leaf_hash(bytes(commitment))
        while self._peaks and self._peaks[-1][0] == leaves:
            _, left = self._peaks.pop()
            leaves, h = 2 * leaves, node_hash(left, h)
        self._peaks.append((leaves, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            raise ValueError("a Merkle tree needs at least one commitment")
        h = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            h = node_hash(left, h)
        return h


@dataclass(frozen=True)
class InclusionProof:
    """Sibling hashes from leaf `index` up to the root of a tree of `size` leaves, bottom first."""

    index: int
    size: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict:
        return {"index": self.index, "size": self.size,
                "path": [base64.b64encode(p).decode("ascii") for p in self.path]}

    @classmethod
    def from_json(cls, obj: dict) -> "InclusionProof":
        return cls(int(obj["index"]), int(obj["size"]), tuple(base64.b64decode(p, validate=True) for p in obj["path"]))


def inclusion_proof(commitments: Sequence[bytes], index: int) -> InclusionProof:
    _check(commitments)
    if not 0 <= index < len(commitments):
        raise IndexError(f"leaf {index} outside a tree of {len(commitments)}")
    level = [leaf_hash(bytes(c)) for c in commitments]
    i, path = index, []
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):  # else this node is carried up without a sibling
            path.append(level[sibling])
        nxt = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, i = nxt, i // 2
    return InclusionProof(index, len(commitments), tuple(path))


def verify_inclusion(commitment: bytes, proof: InclusionProof, root: bytes) -> bool:
    """True if `commitment` is leaf proof.index of a `proof.size`-leaf tree with this root."""
    if len(commitment) != 32 or not 0 <= proof.index < proof.size:
        return False
    h, i, width, path = leaf_hash(commitment), proof.index, proof.size, list(proof.path)
    while width > 1:
        if i % 2 == 1:
            if not path:
                return False
            h = node_hash(path.pop(0), h)
        elif i + 1 < width:
            if not path:
                return False
            h = node_hash(h, path.pop(0))
        i, width = i // 2, (width + 1) // 2
    return not path and h == root
