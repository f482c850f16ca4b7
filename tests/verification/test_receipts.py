"""Window signing, receipts, tampering and forgery, node identity files."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import struct

import numpy as np
import pytest

from consortium.verification import merkle, receipts, signing
from consortium.verification.canonical import CanonicalGrid, commit_rows
from node_agent.identity import NodeIdentity, UnsafeKeyFile


def digests(tag: str, n: int, start: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(start, start + n)]


@pytest.fixture
def key():
    return signing.generate_private_key()


def make_signer(key, **kw):
    args = dict(session="s1", stage=1, node_id=signing.node_id_for(key), epoch=3)
    args.update(kw)
    return receipts.WindowSigner(key, **args)


def test_statement_encoding_by_hand():
    st = receipts.WindowStatement("ab", 2, "n", 7, 16, 3, b"\x11" * 32, b"\x22" * 32, CanonicalGrid())

    def f(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    def u(i: int) -> bytes:
        return f(struct.pack("<Q", i))
    want = (f(b"consortium.window.v1") + f(b"ab") + u(2) + f(b"n") + u(7) + u(16) + u(3)
            + f(b"\x11" * 32) + f(b"\x22" * 32) + f(b"float16") + u(64) + u(6400))
    assert st.encode() == want


def test_each_response_signs_the_window_so_far(key):
    s = make_signer(key)
    ins, outs = digests("in", 5), digests("out", 5)
    for i in range(5):
        signed = s.add(i, ins[i], outs[i])
        assert signed.statement.window_start == 0 and signed.statement.count == i + 1
        r = receipts.Receipt(signed.statement, tuple(outs[: i + 1]), signed.signature)
        assert receipts.verify_receipt(r, key.public_key()) == (True, [])
    # A crash now leaves a provable 5-token window; the driver rebuilds the statement on its own.
    rebuilt = receipts.WindowStatement.for_window(session="s1", stage=1, node_id=signing.node_id_for(key),
                                                  epoch=3, window_start=0, commitments=outs, input_digests=ins)
    assert rebuilt == s.last.statement
    assert signing.verify_signature(key.public_key(), rebuilt.encode(), s.last.signature)


def test_statements_signed_token_by_token_equal_the_statements_rebuilt_from_the_lists(key):
    # The signer grows each window's root and input chain as tokens arrive; the driver rebuilds them.
    s = make_signer(key, window=16)
    ins, outs = digests("in", 40, 3), digests("out", 40, 3)
    for i in range(40):
        st = s.add(3 + i, ins[i], outs[i]).statement
        lo = st.window_start - 3
        assert st == receipts.WindowStatement.for_window(
            session="s1", stage=1, node_id=signing.node_id_for(key), epoch=3, window_start=st.window_start,
            commitments=outs[lo:i + 1], input_digests=ins[lo:i + 1])


def test_windows_are_aligned_and_batches_sign_each_window_once(key):
    s = make_signer(key, window=16)
    n = 40
    signed = s.add_batch(5, digests("in", n, 5), digests("out", n, 5))  # positions 5..44
    assert [(x.statement.window_start, x.statement.count) for x in signed] == [(5, 11), (16, 16), (32, 13)]
    more = s.add(45, digests("in", 1, 45)[0], digests("out", 1, 45)[0])
    assert (more.statement.window_start, more.statement.count) == (32, 14)
    with pytest.raises(ValueError, match="does not continue"):
        s.add(50, b"\0" * 32, b"\0" * 32)
    s.reset(epoch=4)
    again = s.add(50, b"\0" * 32, b"\0" * 32)
    assert (again.statement.window_start, again.statement.count, again.statement.epoch) == (50, 1, 4)


def test_receipt_json_round_trip(key):
    s = make_signer(key)
    s.add_batch(0, digests("in", 16), digests("out", 16))
    r = s.receipt()
    text = r.dumps()
    back = receipts.Receipt.from_json(json.loads(text))
    assert back == r
    assert receipts.verify_receipt(back, signing.public_key_text(key)) == (True, [])
    assert json.loads(text)["commitments"][0] == __import__("base64").b64encode(digests("out", 1)[0]).decode()


@pytest.fixture
def receipt(key):
    s = make_signer(key)
    s.add_batch(0, digests("in", 16), digests("out", 16))
    return s.receipt()


def test_changed_commitment_rejected(receipt, key):
    c = list(receipt.commitments)
    c[7] = hashlib.sha256(b"other").digest()
    ok, reasons = receipts.verify_receipt(dataclasses.replace(receipt, commitments=tuple(c)), key.public_key())
    assert not ok and any("Merkle root" in r for r in reasons)


def test_changed_epoch_rejected(receipt, key):
    st = dataclasses.replace(receipt.statement, epoch=receipt.statement.epoch + 1)
    ok, reasons = receipts.verify_receipt(dataclasses.replace(receipt, statement=st), key.public_key())
    assert not ok and reasons == [f"the signature does not verify under the public key of {st.node_id!r}"]


def test_changed_root_rejected(receipt, key):
    st = dataclasses.replace(receipt.statement, merkle_root=merkle.merkle_root(digests("x", 16)))
    ok, reasons = receipts.verify_receipt(dataclasses.replace(receipt, statement=st), key.public_key())
    assert not ok and len(reasons) == 2  # root does not match, and the signature does not cover it


def test_dropped_commitment_rejected(receipt, key):
    ok, reasons = receipts.verify_receipt(dataclasses.replace(receipt, commitments=receipt.commitments[:-1]),
                                          key.public_key())
    assert not ok and any("signed count" in r for r in reasons)


def test_forged_signature_rejected(receipt, key):
    other = signing.generate_private_key()
    forged = dataclasses.replace(receipt, signature=signing.sign(other, receipt.statement.encode()))
    assert receipts.verify_receipt(forged, other.public_key())[0]  # valid for the forger's key...
    ok, reasons = receipts.verify_receipt(forged, key.public_key())  # ...not for the node's
    assert not ok and "signature does not verify" in reasons[0]


def test_input_digests():
    row = np.arange(8, dtype=np.float32)
    assert receipts.hidden_input_digest(row) == receipts.hidden_input_digest(row.copy())
    assert receipts.hidden_input_digest(row) != receipts.hidden_input_digest(row.astype(np.float16))
    by_hand = hashlib.sha256(signing.encode_fields("consortium.input.hidden.v1", "float32", 8, row.tobytes())).digest()
    for same in (row, row.astype(">f4"), np.repeat(row, 2)[::2]):   # big-endian, strided: the same values
        assert receipts.hidden_input_digest(same) == by_hand
    assert receipts.token_input_digest(1) != receipts.token_input_digest(2)
    a, b = digests("i", 2)
    seed = hashlib.sha256(struct.pack("<I", 25) + b"consortium.input.chain.v1").digest()
    assert receipts.input_chain([a, b]) == hashlib.sha256(hashlib.sha256(seed + a).digest() + b).digest()
    assert receipts.input_chain([a, b]) != receipts.input_chain([b, a])


def test_real_commitments_in_a_receipt(key):
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    s = make_signer(key)
    s.add_batch(0, [receipts.hidden_input_digest(r) for r in x], commit_rows(x))
    assert receipts.verify_receipt(s.receipt(), key.public_key())[0]


def test_bytes_per_token_is_measured():
    m = receipts.receipt_bytes_per_token(16)
    # 32-byte commitments dominate: base64 is 44 chars each, plus per-window overhead spread over 16.
    assert 44 < m["json_per_token"] < 44 + 700 / 16
    assert 32 < m["binary_per_token"] < 32 + 400 / 16


def test_key_file_created_0600_in_0700_dir_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "node.key"
    ident = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = NodeIdentity.load_or_create(path)
    assert again.public_key_text == ident.public_key_text
    assert again.node_id == ident.node_id == signing.node_id_for(ident.private_key)
    assert len(__import__("base64").b64decode(ident.public_key_text)) == 32
    assert NodeIdentity.load_or_create(path, node_id="gpu-1").node_id == "gpu-1"


def test_key_file_readable_by_others_refused(tmp_path):
    path = tmp_path / "node.key"
    NodeIdentity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(UnsafeKeyFile):
        NodeIdentity.load_or_create(path)


def test_docs_state_the_measured_bytes_per_token():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "verification.md").read_text()
    for w in (16, 32):
        m = receipts.receipt_bytes_per_token(w)
        row = (f"| {w} | {m['json_bytes']} B | {m['json_per_token']:.1f} B | {m['binary_bytes']} B "
               f"| {m['binary_per_token']:.1f} B |")
        assert row in doc, row
