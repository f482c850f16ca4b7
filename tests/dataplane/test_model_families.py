"""The data plane on the other supported families' shapes: Qwen 2.5 (QKV biases, NEOX rope, tied
head) and Qwen 3 (per-head QK norms, attention wider than the residual stream), synthetic weights.

Four real agents on loopback ports in this process, half the units audited on another node. Stage 1's
agent stops mid-generation, and in a second session stage 1 skips a layer (a cheater): each session
ends with the single node's tokens, the cheater caught, rolled back and quarantined.
"""
import pytest

from consortium import generation
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from consortium.models import resolve_model
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig
from tests.dataplane.test_failover import generate_then_stop, start_agents

SPLIT = [LayerRange(0, 1), LayerRange(2, 4), LayerRange(5, 5)]   # stage 1 wide enough to skip a layer of
PROMPT = [151935, 17, 4002, 88000, 123, 99999, 42, 7]
MAX_TOKENS = 12
KILL_TOKEN = 5


def _run(tmp_path, model: str, faults: dict[str, str | None], on_stage=None) -> tuple[list[int], SessionState]:
    """The session's tokens and state once it ran on agents named and faulted by `faults` (A, B, C
    serving)."""
    tmp_path.mkdir()
    servers, endpoints = start_agents(tmp_path, faults)
    state = SessionState(session=tmp_path.name, prompt_tokens=PROMPT, nodes=["A", "B", "C"],
                         epochs=[1, 1, 1], audit_probability=0.5, audit_seed=3)
    driver = SessionDriver(session=state.session, model_path=model, split=SPLIT, n_layers=6, endpoints=endpoints,
                           state=state, policy=LocalPolicy(["D", "C", "B", "A"]), rpc_timeout_s=30.0)
    if on_stage:
        driver.on_stage = lambda s, position: on_stage(s, position, servers)
    return generate_then_stop(driver, servers, PROMPT, MAX_TOKENS), state


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_session_survives_a_dead_stage_and_a_cheater(tmp_path, family):
    model = str(resolve_model(f"synthetic-{family}"))
    with LocalPipeline(model, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS).tokens

    kill_position, killed = len(PROMPT) + KILL_TOKEN - 1, []

    def kill_b(s, position, servers):   # just before stage 1's hop at that token, its agent dies
        if s == 1 and position == kill_position and not killed:
            servers["B"].stop(None)
            killed.append("B")

    got, state = _run(tmp_path / "kill", model, dict.fromkeys("ABCD"), kill_b)
    assert killed == ["B"] and got == want
    assert [(f["stage"], f["from"]) for f in state.failovers] == [(1, "B")]
    assert state.audits and all(a["verdict"] == "Passed" for a in state.audits), state.audits
    assert all(a["verifier"] != a["node"] for a in state.audits)
    assert {a["stage"] for a in state.audits} == {0, 1, 2}
    assert state.quarantined == []

    got, state = _run(tmp_path / "cheat", model, {"A": None, "B": "skip-layer", "C": None, "D": None})
    assert got == want
    # A synthetic model has no calibration of its own: under the default tolerance a skipped layer
    # lands between honest and decisive (relative L2 about 0.5), so B is caught by its Mismatch
    # count (the binomial test) rather than by one Fraud; either way it is rolled back.
    assert state.quarantined == ["B"] and state.rollbacks
    assert any(a["node"] == "B" and a["verdict"] in ("Mismatch", "Fraud") for a in state.audits)
    assert not any(a["node"] != "B" and a["verdict"] in ("Fraud", "Mismatch") for a in state.audits)
