"""A session ends cleanly where its stages' context runs out (stopped "context_full"), also when a
failover moved a stage onto a node that holds fewer positions; a prompt longer than the context is
refused before any step. Real agents on loopback in this process."""
import pytest

from consortium import generation
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from node_agent import server
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig
from node_agent.identity import NodeIdentity

SPLIT = [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)]
PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]


def baseline(model_path, n_ctx: int, max_tokens: int) -> generation.GenerationResult:
    with LocalPipeline(model_path, None, StageConfig(threads=1, n_ctx=n_ctx)) as pipe:
        return generation.generate(pipe, PROMPT, max_tokens)


def test_the_single_node_stops_where_its_context_ends(model_path):
    r = baseline(model_path, 24, 100)
    assert r.stopped == "context_full" and len(r.tokens) == 24 - len(PROMPT) + 1
    assert baseline(model_path, 24, 5).stopped == "max_tokens"
    with pytest.raises(generation.ContextFull, match="prompt's 8 tokens do not fit the 6 positions"):
        baseline(model_path, 6, 5)


def test_a_resumed_run_goes_on_where_the_earlier_stopped_and_times_its_own_tokens(model_path):
    """generate(resume=...) on stages that hold the earlier run's keys and values: the tokens of one
    uninterrupted run, and the timings (and the decode rate) of the tokens this run generated only."""
    whole = baseline(model_path, 64, 12)
    with LocalPipeline(model_path, None, StageConfig(threads=1, n_ctx=64)) as pipe:
        first = generation.generate(pipe, PROMPT, 5)
        rest = generation.generate(pipe, PROMPT, 12, resume=first.tokens)
    assert rest.tokens == whole.tokens and first.tokens == whole.tokens[:5]
    assert len(rest.token_ms) == 7 and rest.tokens_per_s == pytest.approx(6 / (sum(rest.token_ms[1:]) / 1000))


def test_a_session_stops_at_the_smallest_context_its_nodes_hold_after_a_failover(tmp_path, model_path):
    contexts = {"A": 64, "B": 64, "C": 64, "D": 40}   # D, stage 1's backup, holds fewer positions
    servers, endpoints = {}, {}
    for n, ctx in contexts.items():
        srv, _, port = server.serve(NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n), "127.0.0.1:0",
                                    server.AgentConfig(node_id=n, threads=1, n_ctx=ctx))
        servers[n], endpoints[n] = srv, f"127.0.0.1:{port}"
    state = SessionState(session="context", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=0.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["D", "C", "B", "A"]),
                           rpc_timeout_s=10.0, receipt_window=4)
    kill_position = len(PROMPT) + 5 - 1

    def on_stage(s, position):
        if s == 1 and position == kill_position and "B" in servers:
            servers.pop("B").stop(None)
    driver.on_stage = on_stage
    try:
        driver.start()
        assert driver.context_positions() == 64
        got = generation.generate(driver, PROMPT, 100)
        assert driver.context_positions() == 40
    finally:
        driver.close()
        for srv in servers.values():
            srv.stop(None)
    assert [(f["stage"], f["to"]) for f in state.failovers] == [(1, "D")]
    # Before: the step at position 40 was refused INVALID_ARGUMENT and the session failed.
    assert got.stopped == "context_full" and len(got.tokens) == 40 - len(PROMPT) + 1
    assert got.tokens == baseline(model_path, 40, 100).tokens
    assert state.done == [40, 40, 40]
    assert driver.receipts and all(r["verified"] for r in driver.receipts)
