"""Merkle roots against a recursive RFC 6962 implementation written here, and inclusion proofs."""
from __future__ import annotations

import hashlib

import pytest

from consortium.verification import merkle


def rfc6962_root(leaves: list[bytes]) -> bytes:
    # MTH from RFC 6962 §2.1, recursively: split at the largest power of two smaller than n.
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:])).digest()


def commitments(n: int) -> list[bytes]:
    return [hashlib.sha256(bytes([i])).digest() for i in range(n)]


@pytest.mark.parametrize("n", range(1, 34))
def test_root_matches_rfc6962(n):
    assert merkle.merkle_root(commitments(n)) == rfc6962_root(commitments(n))


def test_three_leaves_by_hand():
    c = commitments(3)
    leaf = [hashlib.sha256(b"\x00" + x).digest() for x in c]
    left = hashlib.sha256(b"\x01" + leaf[0] + leaf[1]).digest()
    assert merkle.merkle_root(c) == hashlib.sha256(b"\x01" + left + leaf[2]).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 16, 17])
def test_every_inclusion_proof_verifies(n):
    c = commitments(n)
    root = merkle.merkle_root(c)
    for i in range(n):
        p = merkle.inclusion_proof(c, i)
        assert merkle.verify_inclusion(c[i], p, root)
        assert merkle.InclusionProof.from_json(p.to_json()) == p
        # The same proof fails for another leaf, another index, another size or another root.
        other = c[(i + 1) % n] if n > 1 else hashlib.sha256(b"x").digest()
        assert not merkle.verify_inclusion(other, p, root)
        if n > 1:
            assert not merkle.verify_inclusion(c[i], merkle.InclusionProof((i + 1) % n, n, p.path), root)
        # (The path alone does not bind the size; receipts sign the count, and checks compare it.)
        assert not merkle.verify_inclusion(c[i], p, hashlib.sha256(root).digest())


def test_truncated_or_padded_path_fails():
    c = commitments(6)
    root = merkle.merkle_root(c)
    p = merkle.inclusion_proof(c, 4)
    assert not merkle.verify_inclusion(c[4], merkle.InclusionProof(4, 6, p.path[:-1]), root)
    assert not merkle.verify_inclusion(c[4], merkle.InclusionProof(4, 6, p.path + (root,)), root)


def test_leaf_cannot_pass_for_node():
    # Two leaves whose concatenated hashes form a "commitment" must not collide with a one-level-up tree.
    c = commitments(2)
    assert merkle.merkle_root(c) != merkle.merkle_root([merkle.merkle_root(c)])


def test_empty_and_malformed_refused():
    with pytest.raises(ValueError):
        merkle.merkle_root([])
    with pytest.raises(ValueError):
        merkle.merkle_root([b"short"])


def test_accumulated_root_equals_the_root_of_the_list_at_every_size():
    acc = merkle.MerkleAccumulator()
    with pytest.raises(ValueError):
        acc.root()
    leaves = [hashlib.sha256(b"%d" % i).digest() for i in range(70)]
    for n, c in enumerate(leaves, 1):
        acc.add(c)
        assert acc.size == n and acc.root() == merkle.merkle_root(leaves[:n])
    with pytest.raises(ValueError):
        acc.add(b"short")
