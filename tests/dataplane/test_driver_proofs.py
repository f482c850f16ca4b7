"""The driver's fraud proofs (consortium.driver.proofs): a Fraud unit waits for the receipt covering
it, becomes a signed proof that holds and that `consortium verify-proof` accepts, and nothing that
is not the worker's provable fraud becomes a holding proof."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from consortium.commands import verify_proof
from consortium.driver.proofs import FraudUnit, ProofBook, recheck, write_proof_files
from consortium.verification import canonical, receipts, signing
from consortium.verification.canonical import CanonicalGrid
from consortium.verification.verdicts import Limits, Tolerance

TOL = Tolerance(honest=Limits(relative_l2=0.1, cosine=0.99), decisive=Limits(relative_l2=1.0, cosine=0.5))
D = 64
GRID = CanonicalGrid()


@pytest.fixture
def world():
    """Stage 1's worker "w" (epoch 3) cheats with random rows over window 16..31 of hidden inputs."""
    rng = np.random.default_rng(5)
    key = signing.generate_private_key()
    inputs = {p: rng.standard_normal(D).astype(np.float32) for p in range(16, 32)}
    honest = {p: rng.standard_normal(D).astype(np.float32) for p in range(16, 32)}
    sent = {p: rng.standard_normal(D).astype(np.float32) for p in range(16, 32)}
    signer = receipts.WindowSigner(key, session="sky", stage=1, node_id="w", epoch=3, grid=GRID)
    signer.add_batch(16, [receipts.hidden_input_digest(inputs[p]) for p in range(16, 32)],
                     canonical.commit_rows(np.stack([sent[p] for p in range(16, 32)]), GRID))
    r = signer.receipt()
    entry = {"stage": 1, "node": "w", "epoch": 3, "start": 16, "count": 16, "receipt": r.to_json()}

    def digests(stage, positions):
        assert stage == 1
        return [receipts.hidden_input_digest(inputs[p]) for p in positions] if all(p in inputs for p in positions) else None

    def unit(p, row=None, recomputed=None):
        row = sent[p] if row is None else row
        return FraudUnit(1, p, "w", 3, r.commitments[p - 16], row, honest[p] if recomputed is None else recomputed,
                         TOL, "auditor")

    return dict(key=key, entry=entry, digests=digests, unit=unit, keys={"w": signing.public_key_text(key)},
                sent=sent, inputs=inputs)


def book():
    return ProofBook("sky", GRID, signing.generate_private_key(), "coordinator")


def test_a_fraud_waits_for_its_receipt_then_holds_and_verify_proof_accepts_it(world, tmp_path, capsys):
    b = book()
    b.add(world["unit"](21), [], world["keys"], world["digests"])
    assert len(b.pending) == 1 and b.entries == []
    other = dict(world["entry"], epoch=2)     # another epoch's window does not cover it
    b.offer(other, world["keys"], world["digests"])
    assert len(b.pending) == 1
    b.offer(world["entry"], world["keys"], world["digests"])
    assert b.pending == [] and len(b.entries) == 1
    e = b.report()[0]
    assert (e["session"], e["stage"], e["position"], e["node"], e["auditor"], e["verifier"]) == \
        ("sky", 1, 21, "w", "auditor", "coordinator")
    assert e["holds"], e["reasons"]
    assert e["proof"]["verifierPublicKey"] == b.public_key_text
    [(_, holds, _)] = recheck([e])
    assert holds
    assert write_proof_files([e], tmp_path) == [e["file"]]
    parser = argparse.ArgumentParser()
    verify_proof.add_arguments(parser)
    assert verify_proof.run(parser.parse_args([str(tmp_path / e["file"])])) == 0
    assert "HOLDS" in capsys.readouterr().out


def test_a_fraud_after_its_receipt_is_proven_at_once(world):
    b = book()
    b.add(world["unit"](16), [world["entry"]], world["keys"], world["digests"])
    assert b.pending == [] and b.entries[0]["holds"]


def test_what_is_not_the_workers_provable_fraud_makes_no_holding_proof(world):
    b = book()
    flushed = [world["entry"]]
    # The row the worker sent does not hash to what it signed: no signed word of the worker's about it.
    b.add(world["unit"](17, row=world["sent"][17] + 1.0), flushed, world["keys"], world["digests"])
    # An honest recomputation equal to the worker's row: no fraud to prove.
    b.add(world["unit"](18, recomputed=world["sent"][18]), flushed, world["keys"], world["digests"])
    # Under another key than the worker's, the receipt proves nothing about the worker.
    b.add(world["unit"](19), flushed, {"w": signing.public_key_text(signing.generate_private_key())},
          world["digests"])
    # The driver has lost the window's inputs.
    b.add(world["unit"](20), flushed, world["keys"], lambda s, ps: None)
    assert [e["holds"] for e in b.entries] == [False] * 4
    assert all(e["proof"] is None and e["reasons"] for e in b.entries)
    assert "does not hash" in b.entries[0]["reasons"][0]
    assert "no fraud to prove" in b.entries[1]["reasons"][0]
    assert "does not verify" in b.entries[2]["reasons"][0]
    assert "inputs" in b.entries[3]["reasons"][0]


def test_a_tampered_proof_does_not_recheck(world):
    b = book()
    b.add(world["unit"](22), [world["entry"]], world["keys"], world["digests"])
    e = json.loads(json.dumps(b.report()[0]))
    e["proof"]["position"] = 23
    [(_, holds, why)] = recheck([e])
    assert not holds and why


def test_a_unit_never_covered_is_reported_unproven(world):
    b = book()
    b.add(world["unit"](24), [], world["keys"], world["digests"])
    [e] = b.report()
    assert not e["holds"] and e["proof"] is None and "never flushed" in e["reasons"][0]
