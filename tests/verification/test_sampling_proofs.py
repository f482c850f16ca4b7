"""Signed tokens: a final stage's windows sign the tokens it sampled, and a token its own committed
logit row cannot sample is a SamplingFraudProof that holds on the worker's words alone."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import numpy as np
import pytest

from consortium import wire
from consortium.commands import verify_proof
from consortium.sampling import SamplingParams, cannot_sample, sample
from consortium.verification import canonical, proofs, receipts, signing
from consortium.verification.canonical import CanonicalGrid

SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
VOCAB = 3000


def logit_rows(rng, n: int) -> np.ndarray:
    """Rows shaped like a language model's: a broad spread and a few clear favourites."""
    rows = (rng.standard_normal((n, VOCAB)) * 3).astype(np.float32)
    for row in rows:
        row[rng.integers(VOCAB, size=3)] += rng.uniform(3, 12)
    return rows


def test_a_statement_with_tokens_signs_them_and_one_without_is_encoded_as_before():
    plain = receipts.WindowStatement("ab", 2, "n", 7, 16, 3, b"\x11" * 32, b"\x22" * 32, CanonicalGrid())
    assert plain.encode().startswith(b"\x14\x00\x00\x00consortium.window.v1")
    sampled = dataclasses.replace(plain, sampled=receipts.SampledTokens(0.8, 0.95, 11, ((16, 5), (18, 9))))
    enc = sampled.encode()
    assert enc.startswith(b"\x14\x00\x00\x00consortium.window.v2") and enc.endswith(
        signing.encode_fields("", 2, 16, 5, 18, 9)[4:])
    for other in (receipts.SampledTokens(0.8, 0.95, 11, ((16, 5), (18, 8))),
                  receipts.SampledTokens(0.8, 0.95, 12, ((16, 5), (18, 9))),
                  receipts.SampledTokens(0.8, 0.9, 11, ((16, 5), (18, 9))),
                  receipts.SampledTokens(0.8, 0.95, 11, ((16, 5),))):
        assert dataclasses.replace(plain, sampled=other).encode() != enc
    assert receipts.WindowStatement.from_json(json.loads(json.dumps(sampled.to_json()))) == sampled
    assert "sampled" not in plain.to_json()


def test_the_signer_signs_each_token_with_its_row_and_the_wire_carries_them():
    key = signing.generate_private_key()
    signer = receipts.WindowSigner(key, session="s", stage=2, node_id="n", epoch=1, window=4)
    rows = logit_rows(np.random.default_rng(1), 3)
    steps = [(5 + i, rows[i:i + 1], [rows[i][:8]], (SEEDED, 40 + i) if i != 1 else None) for i in range(3)]
    commitments, signed = signer.commit_steps(steps, token_inputs=False)
    assert [s.statement.positions for s in signed] == [range(5, 8)]
    st = signed[-1].statement
    assert st.sampled == receipts.SampledTokens(0.8, 0.95, 11, ((5, 40), (7, 42)))
    assert receipts.verify_receipt(signer.receipt(), key.public_key()) == (True, [])
    assert wire.window_from_pb(wire.window_to_pb(signed[-1])) == signed[-1]
    assert not wire.window_to_pb(signed[-1]).HasField("sampling") or st.sampled is not None
    # A new window starts without tokens; one set of parameters per window.
    nxt = signer.add(8, hashlib.sha256(b"x").digest(), hashlib.sha256(b"y").digest())
    assert nxt.statement.sampled is None and not wire.window_to_pb(nxt).HasField("sampling")
    with pytest.raises(ValueError, match="one set of parameters"):
        signer.add(9, hashlib.sha256(b"x").digest(), hashlib.sha256(b"y").digest(), (SEEDED, 1))
        signer.add(10, hashlib.sha256(b"x").digest(), hashlib.sha256(b"y").digest(), (SamplingParams(), 1))


@pytest.mark.parametrize("grid", [CanonicalGrid(), CanonicalGrid(grid=8, clamp=30.0), CanonicalGrid(dtype="float32")])
def test_cell_bounds_hold_every_value_with_that_canonical_form(grid):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(20000) * s for s in (0.01, 1, 10, 40, 200)]).astype(np.float32)
    k = canonical.canonical_rows(x[None, :], grid)[0]
    lo, hi = canonical.cell_bounds(k, grid)
    assert (lo <= x).all() and (x <= hi).all()
    inside = np.abs(k) < grid.clamp_steps
    assert (hi - lo)[inside].max() < 0.2 and np.isinf(hi[k == grid.clamp_steps]).all()


@pytest.mark.parametrize("params", [SamplingParams(), SEEDED, SamplingParams(1.0, 1.0, 3), SamplingParams(0.3, 0.5, 5)],
                         ids=["greedy", "seeded", "plain", "narrow"])
def test_a_token_said_unsampleable_never_comes_from_a_row_in_the_cell(params):
    rng = np.random.default_rng(4)
    proven = 0
    for trial, row in enumerate(logit_rows(rng, 40)):
        k = canonical.canonical_rows(row[None, :])[0]
        lo, hi = canonical.cell_bounds(k)
        position = 100 + trial
        honest = sample(row, position, params)
        assert cannot_sample(lo, hi, honest, position, params) is None
        order = np.argsort(-row)
        # The runner-up and random tokens; each said impossible is tried against rows within the
        # bounds (which hold the cell), the corner most in the token's favour included.
        for t in [int(order[1]), int(order[2]), *map(int, rng.integers(VOCAB, size=8))]:
            if cannot_sample(lo, hi, t, position, params) is None:
                continue
            proven += 1
            corner = np.where(np.arange(VOCAB) == t, hi, lo)
            favoured = np.nextafter(corner.astype(np.float32), row)   # float32, just within the bounds
            tries = [favoured] + [rng.uniform(lo, hi).astype(np.float32) for _ in range(10)]
            assert all(sample(x, position, params) != t for x in tries), (trial, t)
    assert proven >= 300   # most wrong tokens are provable


def test_cannot_sample_says_nothing_where_the_cell_allows_either():
    row = np.zeros(10, dtype=np.float32)
    row[3], row[4] = 5.0, 5.0 + 1 / 256   # a tie within one grid step
    lo, hi = canonical.cell_bounds(canonical.canonical_rows(row[None, :])[0])
    assert cannot_sample(lo, hi, 3, 0) is None and cannot_sample(lo, hi, 4, 0) is None
    assert "greedy" in cannot_sample(lo, hi, 0, 0)
    # An entry at the clamp could be anything: seeded sampling cannot be bounded.
    row[7] = 500.0
    lo, hi = canonical.cell_bounds(canonical.canonical_rows(row[None, :])[0])
    assert cannot_sample(lo, hi, 0, 0, SEEDED) is None and "greedy" in cannot_sample(lo, hi, 0, 0)


@pytest.fixture(scope="module")
def lie():
    """A final stage signs window 32..35; at 34 it gives (and signs) a token its row cannot sample."""
    rng = np.random.default_rng(5)
    worker, coordinator = signing.generate_private_key(), signing.generate_private_key()
    rows = logit_rows(rng, 4)
    tokens = [sample(r, 33 + i, SEEDED) for i, r in enumerate(rows)]
    tokens[2] = int(np.argmin(rows[2]))
    signer = receipts.WindowSigner(worker, session="sky", stage=2, node_id=signing.node_id_for(worker), epoch=1,
                                   window=4)
    signer.commit_steps([(32 + i, rows[i:i + 1], [rows[i][:8]], (SEEDED, tokens[i])) for i in range(4)],
                        token_inputs=False)
    return dict(worker=worker, coordinator=coordinator, rows=rows, receipt=signer.receipt())


def make(lie, position=34, row=None):
    row = lie["rows"][position - 32] if row is None else row
    return proofs.make_sampling_proof(lie["receipt"], position, lie["worker"].public_key(),
                                      canonical.canonical_rows(row[None, :])[0], lie["coordinator"], "coordinator")


def run_cli(path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    verify_proof.add_arguments(parser)
    return verify_proof.run(parser.parse_args([str(path), *extra]))


def test_the_proof_holds_survives_json_and_the_cli(lie, tmp_path, capsys):
    p = make(lie)
    holds, reasons = proofs.check_proof(p, signing.public_key_text(lie["coordinator"]))
    assert holds, reasons
    assert any("no row with this canonical form samples it" in r for r in reasons)
    path = tmp_path / "proof.json"
    path.write_text(p.dumps())
    back = proofs.proof_from_json(json.loads(path.read_text()))
    assert isinstance(back, proofs.SamplingFraudProof) and back.signed_bytes() == p.signed_bytes()
    assert run_cli(path) == 0 and capsys.readouterr().out.startswith("HOLDS")


def test_the_row_travels_in_the_width_it_is_hashed_in_and_version_1_proofs_still_hold(lie):
    """Version 2 writes the revealed row as int16 under the default grid (its indices fit, as they do
    when hashed); a version-1 proof (int32) reads back and holds as it was signed."""
    p = make(lie)
    assert p.version == 2 and p.to_json()["revealed"]["dtype"] == "int16"
    old = dataclasses.replace(p, version=1)
    old = dataclasses.replace(old, verifier_signature=signing.sign(lie["coordinator"], old.signed_bytes()))
    assert old.to_json()["revealed"]["dtype"] == "int32"
    assert len(p.dumps()) < 0.6 * len(old.dumps())
    for proof in (p, old):
        back = proofs.proof_from_json(json.loads(proof.dumps()))
        assert back.version == proof.version and (back.revealed == p.revealed).all()
        assert back.signed_bytes() == proof.signed_bytes()
        assert proofs.check_proof(back, signing.public_key_text(lie["coordinator"]))[0]
    wrong = {**p.to_json(), "revealed": old.to_json()["revealed"]}   # int32 data in a version-2 proof
    with pytest.raises(ValueError, match="expected a int16 tensor"):
        proofs.proof_from_json(wrong)


def test_no_proof_for_an_honest_token_or_a_row_that_is_not_the_committed_one(lie):
    with pytest.raises(ValueError, match="might come from a row"):
        make(lie, 33)
    with pytest.raises(ValueError, match="does not hash to the signed commitment"):
        make(lie, 34, lie["rows"][1])
    with pytest.raises(ValueError, match="not in the receipt's window"):
        make(lie, 36, lie["rows"][0])


def test_altered_proofs_do_not_hold(lie, tmp_path, capsys):
    p = make(lie)
    st = p.statement
    honest_token = sample(lie["rows"][2], 35, SEEDED)
    cases = {
        "worker's signature": dataclasses.replace(p, statement=dataclasses.replace(st, sampled=dataclasses.replace(
            st.sampled, tokens=tuple((q, honest_token if q == 34 else t) for q, t in st.sampled.tokens)))),
        "does not hash": dataclasses.replace(p, revealed=p.revealed + 1),
        "inclusion": dataclasses.replace(p, position=33),
        "verifier's signature": dataclasses.replace(p, reasons=("something else",)),
        "names 'other'": dataclasses.replace(p, session="other"),
    }
    for why, bad in cases.items():
        holds, reasons = proofs.check_proof(bad)
        assert not holds and any(why in r for r in reasons), (why, reasons)
    path = tmp_path / "bad.json"
    path.write_text(cases["does not hash"].dumps())
    assert run_cli(path) == 1 and "DOES NOT HOLD" in capsys.readouterr().out
    assert not proofs.check_proof(p, signing.public_key_text(signing.generate_private_key()))[0]
    with pytest.raises(ValueError, match="not a fraud proof"):
        proofs.proof_from_json({"kind": "Receipt"})
