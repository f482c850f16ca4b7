"""Fraud proofs: construction, JSON and CLI round trip, and refusal of tampered proofs."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from consortium import cli
from consortium.commands import verify_proof
from consortium.verification import canonical, proofs, receipts, signing
from consortium.verification.verdicts import Limits, Tolerance

TOL = Tolerance(honest=Limits(relative_l2=0.1, cosine=0.99), decisive=Limits(relative_l2=1.0, cosine=0.5))
D = 64


@pytest.fixture(scope="module")
def world():
    """A cheating worker (random output) signs a window 16..31; the verifier recomputes honestly."""
    rng = np.random.default_rng(3)
    worker_key, verifier_key = signing.generate_private_key(), signing.generate_private_key()
    honest = rng.standard_normal((16, D)).astype(np.float32)
    sent = rng.standard_normal((16, D)).astype(np.float32)  # what the cheater actually emitted
    inputs = [receipts.token_input_digest(t) for t in range(100, 116)]
    signer = receipts.WindowSigner(worker_key, session="sky", stage=0, node_id=signing.node_id_for(worker_key),
                                   epoch=2)
    signer.add_batch(16, inputs, canonical.commit_rows(sent))
    return dict(worker_key=worker_key, verifier_key=verifier_key, honest=honest, sent=sent, inputs=inputs,
                receipt=signer.receipt())


def make(world, position=21, **kw):
    i = position - 16
    args = dict(revealed=canonical.canonical_rows(world["sent"][i:i + 1])[0])
    args.update(kw)
    return proofs.make_fraud_proof(world["receipt"], position, world["inputs"], world["worker_key"].public_key(),
                                   world["honest"][i], TOL, world["verifier_key"], **args)


def run_cli(path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    verify_proof.add_arguments(parser)
    return verify_proof.run(parser.parse_args([str(path), *extra]))


def test_proof_holds_and_survives_json_and_cli(world, tmp_path, capsys):
    p = make(world)
    holds, reasons = proofs.check_proof(p)
    assert holds, reasons
    assert any("beyond the decisive threshold" in r for r in reasons)
    path = tmp_path / "proof.json"
    path.write_text(p.dumps())
    back = proofs.FraudProof.from_json(json.loads(path.read_text()))
    assert back.signed_bytes() == p.signed_bytes()
    assert proofs.check_proof(back)[0]
    assert run_cli(path) == 0
    out = capsys.readouterr().out
    assert out.startswith("HOLDS\n") and "worker" in out


def test_the_session_proof_key_is_checked_when_given(world, tmp_path, capsys):
    path = tmp_path / "proof.json"
    path.write_text(make(world).dumps())
    assert run_cli(path) == 0
    out = capsys.readouterr().out
    assert f"the verifier key is {signing.public_key_text(world['verifier_key'])}" in out
    assert run_cli(path, "--verifier-key", signing.public_key_text(world["verifier_key"])) == 0
    assert "the verifier key is the session's proof key" in capsys.readouterr().out
    # A proof that holds in itself but was signed by someone else than the session's coordinator.
    other = signing.public_key_text(signing.generate_private_key())
    assert run_cli(path, "--verifier-key", other) == 1
    out = capsys.readouterr().out
    assert out.startswith("DOES NOT HOLD\n") and f"not the session's proof key {other}" in out
    assert run_cli(path, "--verifier-key", "not-a-key") == 2
    assert "--verifier-key is not a base64 Ed25519 public key" in capsys.readouterr().err


def test_cli_is_registered():
    assert cli.SUBCOMMANDS["verify-proof"][0] == "consortium.commands.verify_proof"


def rewrite(path, proof_json: dict) -> None:
    path.write_text(json.dumps(proof_json))


@pytest.mark.parametrize("field, value", [
    ("position", 22),
    ("stage", 1),
    ("figures", {"relative_l2": 9.0, "frac_gt_1": 1, "frac_gt_2": 1, "frac_gt_4": 1, "max_abs_steps": 1,
                 "cosine": 0, "topk_agreement": 0}),
    ("verifierId", "someone-else"),
])
def test_tampered_proof_json_is_refused_by_cli(world, tmp_path, capsys, field, value):
    o = make(world).to_json()
    o[field] = value
    path = tmp_path / "p.json"
    rewrite(path, o)
    assert run_cli(path) == 1
    out = capsys.readouterr().out
    assert out.startswith("DOES NOT HOLD") and "verifier's signature" in out


def resign(world, p: proofs.FraudProof) -> proofs.FraudProof:
    # A dishonest verifier can sign anything; the re-check must still catch what it changed.
    return dataclasses.replace(p, verifier_signature=signing.sign(world["verifier_key"], p.signed_bytes()))


def test_lying_verifier_caught_on_figures(world):
    p = make(world)
    lie = resign(world, dataclasses.replace(p, figures=dataclasses.replace(p.figures, relative_l2=5.0)))
    holds, reasons = proofs.check_proof(lie)
    assert not holds and reasons == ["the stated figures differ from those recomputed from the tensors"]


def test_lying_verifier_caught_on_recomputation_near_the_reveal(world):
    p = make(world)
    near = (p.revealed.astype(np.float32) / 64 + 0.002).astype(np.float32)
    holds, reasons = proofs.check_proof(resign(world, dataclasses.replace(p, recomputed=near)))
    assert not holds and any("not Fraud" in r for r in reasons)


def test_wrong_position_or_inputs_caught(world):
    p = make(world)
    holds, reasons = proofs.check_proof(resign(world, dataclasses.replace(p, position=22)))
    assert not holds and any("inclusion proof" in r for r in reasons)
    other_inputs = (receipts.token_input_digest(999),) + p.window_input_digests[1:]
    holds, reasons = proofs.check_proof(resign(world, dataclasses.replace(p, window_input_digests=other_inputs)))
    assert not holds and any("input digests" in r for r in reasons)


def test_statement_signed_by_another_key_caught(world):
    p = make(world)
    forger = signing.generate_private_key()
    st = dataclasses.replace(p.statement, epoch=p.statement.epoch + 1)
    forged = dataclasses.replace(p, statement=st, worker_signature=signing.sign(forger, st.encode()))
    holds, reasons = proofs.check_proof(resign(world, forged))
    assert not holds and "worker's signature" in reasons[0]


def test_reveal_that_does_not_match_needs_the_workers_signature(world):
    i = 21 - 16
    wrong = canonical.canonical_rows(world["honest"][i:i + 1])[0]  # not what the worker committed to
    unsigned = make(world, revealed=wrong)
    holds, reasons = proofs.check_proof(unsigned)
    assert not holds and any("did not sign that reveal" in r for r in reasons)
    sig = proofs.sign_reveal(world["worker_key"], world["receipt"].statement, 21, wrong)
    signed = make(world, revealed=wrong, reveal_signature=sig)
    holds, reasons = proofs.check_proof(signed)
    assert holds and any("does not hash to the signed commitment" in r for r in reasons)


def test_no_fraud_no_proof(world):
    i = 21 - 16
    with pytest.raises(ValueError, match="no fraud to prove"):
        proofs.make_fraud_proof(world["receipt"], 21, world["inputs"], world["worker_key"].public_key(),
                                world["sent"][i], TOL, world["verifier_key"],
                                revealed=canonical.canonical_rows(world["sent"][i:i + 1])[0])
    with pytest.raises(ValueError, match="not in the receipt's window"):
        proofs.make_fraud_proof(world["receipt"], 40, world["inputs"], world["worker_key"].public_key(),
                                world["honest"][0], TOL, world["verifier_key"])


def test_unreadable_input_exits_2(tmp_path, capsys):
    assert run_cli(tmp_path / "missing.json") == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run_cli(bad) == 2
    bad.write_text(json.dumps({"kind": "FraudProof", "version": 1}))
    assert run_cli(bad) == 2
    assert "cannot read" in capsys.readouterr().err
