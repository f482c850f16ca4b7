"""A fraud proof finds its Receipt by name: the one the receipt writer gives the same signed window;
and the operator refuses a proof key others can read."""
import numpy as np

from consortium_operator import main as operator_main

from consortium.driver.proofs import FraudUnit, ProofBook, proof_file_name
from consortium.verification import canonical, receipts, signing
from consortium.verification.verdicts import Limits, Tolerance
from consortium_operator.proofs import proof_receipt
from consortium_operator.receipts import receipt_body


def test_a_proof_names_the_receipt_of_its_window():
    """Under the operator the signed session is namespace/name/uid; the Receipt is named by the name
    and the uid's first part."""
    rng = np.random.default_rng(1)
    key = signing.generate_private_key()
    inputs = [rng.standard_normal(32).astype(np.float32) for _ in range(4)]
    sent = rng.standard_normal((4, 32)).astype(np.float32)
    uid = "6f1c2a9e-0b7d-4c55-9a3e-2d8f1b7c4e01"
    sid = f"default/sky-is-blue/{uid}"
    signer = receipts.WindowSigner(key, session=sid, stage=1, node_id="n2", epoch=2)
    signer.add_batch(32, [receipts.hidden_input_digest(x) for x in inputs], canonical.commit_rows(sent))
    r = signer.receipt()
    entry = {"stage": 1, "node": "n2", "epoch": 2, "start": 32, "count": 4, "receipt": r.to_json()}
    book = ProofBook(sid, canonical.CanonicalGrid())
    tol = Tolerance(honest=Limits(relative_l2=0.1), decisive=Limits(relative_l2=1.0))
    book.add(FraudUnit(1, 33, "n2", 2, r.commitments[1], sent[1], rng.standard_normal(32).astype(np.float32),
                       tol, "n0"),
             [entry], {"n2": signing.public_key_text(key)},
             lambda s, ps: [receipts.hidden_input_digest(inputs[p - 32]) for p in ps])
    [e] = book.entries
    assert e["holds"], e["reasons"]
    session = {"metadata": {"name": "sky-is-blue", "namespace": "default", "uid": uid}}
    body = receipt_body(session, entry, signing.public_key_text(key))
    root = r.statement.merkle_root.hex()
    name = f"sky-is-blue-6f1c2a9e-s1-e2-p32-{root[:8]}"
    assert proof_receipt(e["proof"], uid) == body["metadata"]["name"] == name
    # A session made again under the same name signs the same window: its Receipt has another name.
    assert proof_receipt(e["proof"], "0d3e" + uid[4:]) != name
    assert proof_file_name(e) == f"default_sky-is-blue_{uid}-s1-p33-n2.json"


def test_the_operator_refuses_an_unsafe_proof_key(tmp_path, capsys):
    from node_agent.identity import NodeIdentity

    path = tmp_path / "proofs.pem"
    NodeIdentity.load_or_create(path)
    path.chmod(0o644)
    assert operator_main.main(["--proof-key", str(path), "--plaintext"]) == 2
    err = capsys.readouterr().err
    assert "--proof-key" in err and "mode 0644" in err


def test_the_proof_key_can_come_from_the_environment(tmp_path, monkeypatch, capsys):
    """The chart passes proof.pem of the operator's Secret as CONSORTIUM_PROOF_KEY_PEM: a Secret's
    files are group-readable under the pod's fsGroup, which a key file may not be."""
    from node_agent.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(tmp_path / "proof.pem")
    pem = (tmp_path / "proof.pem").read_text()
    got = operator_main.proof_identity(None, pem)
    assert got.public_key_text == ident.public_key_text and got.node_id == "consortium-operator"
    assert operator_main.proof_identity(None, None) is None
    # A file given on the command line wins over the environment.
    other = tmp_path / "other.pem"
    assert operator_main.proof_identity(str(other), pem).public_key_text != ident.public_key_text
    monkeypatch.setenv("CONSORTIUM_PROOF_KEY_PEM", "not a key")
    assert operator_main.main(["--plaintext"]) == 2
    assert "CONSORTIUM_PROOF_KEY_PEM is not an unencrypted PEM private key" in capsys.readouterr().err
