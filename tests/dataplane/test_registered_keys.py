"""Signatures verify under the key registered for a node (its ComputeNode's spec.publicKey), not
under the key an agent reports: an agent that answers with another key is refused, at the start of a
session and as a failover backup. So is an agent that hashes rows another way (another version).
Real agents in this process; one stage holding every layer."""
import pytest

from consortium.driver.policy import LocalPolicy
from consortium.driver.session import IncompatibleAgent, KeyMismatch, SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from node_agent import server
from node_agent.engine.slicing import read_model_info
from node_agent.identity import NodeIdentity


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Agents a, b, c with their own keys: {name: (endpoint, public key)}."""
    out, servers = {}, []
    for name in ("a", "b", "c"):
        ident = NodeIdentity.load_or_create(tmp_path_factory.mktemp("key") / "node.pem", name)
        srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=name, threads=1, n_ctx=64))
        servers.append(srv)
        out[name] = (f"127.0.0.1:{port}", ident.public_key_text)
    yield out
    for s in servers:
        s.stop(None)


def driver(nodes, model_path, registered, first="a", session="keys"):
    n_layers = read_model_info(model_path).n_layers
    state = SessionState(session=session, prompt_tokens=[1, 2, 3], nodes=[first], epochs=[1],
                         audit_probability=0.0, audit_seed=1)
    return SessionDriver(session=session, model_path=model_path, split=[LayerRange(0, n_layers - 1)], n_layers=n_layers,
                         endpoints={n: ep for n, (ep, _) in nodes.items()}, state=state,
                         policy=LocalPolicy(["b", "c", "a"]), registered_keys=registered)


def test_agent_signing_with_another_key_is_refused(nodes, model_path):
    keys = {n: k for n, (_, k) in nodes.items()}
    d = driver(nodes, model_path, {**keys, "a": keys["b"]})   # the registry says a's key is b's
    try:
        with pytest.raises(KeyMismatch, match=r"a signs with key .*, not the key registered for it"):
            d.start()
        assert "a" in d.dead and "a" not in d.public_keys
    finally:
        d.close()


def test_backup_with_another_key_is_passed_over(nodes, model_path):
    keys = {n: k for n, (_, k) in nodes.items()}
    d = driver(nodes, model_path, {**keys, "b": keys["c"]})   # b, the preferred backup, does not match
    try:
        d.start()
        assert d.public_keys["a"] == keys["a"]
        assert d._failover(0, "test: stage 0 lost") == "c"
        assert "b" in d.dead and d.public_keys["c"] == keys["c"] and "b" not in d.public_keys
    finally:
        d.close()


def test_agent_hashing_rows_another_way_is_refused(nodes, model_path, monkeypatch):
    """An agent of another version, whose commitments hash rows another way, would have every row it
    sends read as Fraud: it is refused before it computes anything, with the reason."""
    import types

    from consortium.verification import canonical

    older = types.SimpleNamespace(**{**vars(canonical), "ROW_DOMAIN": b"consortium.commit.row.v1"})
    monkeypatch.setattr(server, "canonical", older)   # the agents in this process answer as v1 would
    d = driver(nodes, model_path, {n: k for n, (_, k) in nodes.items()}, session="versions")
    try:
        with pytest.raises(IncompatibleAgent, match="a hashes rows as consortium.commit.row.v1, this driver as "
                                                    "consortium.commit.row.v2: run one Consortium version"):
            d.start()
        assert "a" in d.dead
    finally:
        d.close()


def test_a_window_signed_under_another_key_is_caught_when_it_closes(nodes, model_path, caplog):
    """Statements are verified once per window, when the last one becomes a receipt: a node whose
    signatures stop verifying (here: the key expected for it changes mid-session) is caught then,
    quarantined and rolled back, and the session goes on elsewhere."""
    from consortium import generation

    keys = {n: k for n, (_, k) in nodes.items()}
    d = driver(nodes, model_path, keys, session="late-key")
    try:
        d.start()
        d.public_keys["a"] = keys["b"]
        with caplog.at_level("WARNING", logger="consortium.driver"):
            generation.generate(d, [1, 2, 3], 16)
        assert d.state.quarantined == ["a"] and d.state.nodes == ["b"]
        assert any("a" == r["node"] and not r["verified"] for r in d.receipts)
        # The final stage commits from the prompt's last row (position 2) on.
        assert "stage 0: the window at 2 does not verify: the signature does not verify" in caplog.text
    finally:
        d.close()
