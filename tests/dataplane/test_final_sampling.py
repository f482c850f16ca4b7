"""The final stage samples the token (ForwardRequest.sample): on the data lane it answers the token
alone and its logit row in a second frame, which the driver reads and checks while stage 0 computes.
A node whose token is not what its row samples is caught and rolled back; one that answers a token
and never its row has that token taken back and its stage failed over."""
import dataclasses

import grpc
import numpy as np
import pytest

from consortium import generation, wire
from consortium.driver.client import LaneClient
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.sampling import SamplingParams, sample
from consortium.verification import proofs
from consortium.wire import lane, pb
from node_agent import server
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig
from node_agent.identity import NodeIdentity

from .test_agent import PROMPT, load, ref
from .test_failover import MAX_TOKENS, SPLIT

SAMPLING = SamplingParams(temperature=0.8, top_p=0.95, seed=11)


def sampled(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=params.temperature, top_p=params.top_p, seed=params.seed)


def test_the_token_comes_ahead_of_its_row_on_the_lane_and_with_it_as_a_call(agent, model_path):
    stub, service, _ = agent
    c = LaneClient("test-node", "127.0.0.1", service.data_port)
    try:
        for name, params in (("greedy", SamplingParams()), ("seeded", SAMPLING)):
            got = {}
            for how in ("lane", "call"):
                session = f"fs-{name}-{how}"
                load(stub, model_path, session)
                r0 = stub.Forward(pb.ForwardRequest(ref=ref(session, 0), position=0, tokens=PROMPT))
                r1 = stub.Forward(pb.ForwardRequest(ref=ref(session, 1), position=0, hidden=r0.output))
                req = pb.ForwardRequest(ref=ref(session, 2), position=0, hidden=r1.output, sample=sampled(params))
                if how == "lane":
                    head = c.step(req, 30.0)
                    assert head.row_follows and not head.HasField("output") and head.HasField("token")
                    whole, size = c.read_row(30.0)
                    assert size > 49152 * 4 and not whole.row_follows and whole.token == head.token
                    with pytest.raises(grpc.RpcError, match="no row"):   # one row per token
                        c.read_row(1.0)
                else:
                    whole = stub.Forward(req)
                    assert not whole.row_follows
                row = wire.decode_tensor(whole.output, ndim=2)[-1]
                assert whole.token == sample(row, len(PROMPT), params)
                assert len(whole.commitments) == 1
                got[how] = (whole.token, whole.output.data)
            assert got["lane"] == got["call"]
    finally:
        c.close()


def test_a_bad_sampling_request_is_refused_before_the_step(agent, model_path):
    stub, service, _ = agent
    load(stub, model_path, "fs-bad")
    r0 = stub.Forward(pb.ForwardRequest(ref=ref("fs-bad", 0), position=0, tokens=PROMPT))
    r1 = stub.Forward(pb.ForwardRequest(ref=ref("fs-bad", 1), position=0, hidden=r0.output))
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.ForwardRequest(ref=ref("fs-bad", 2), position=0, hidden=r1.output,
                                       sample=pb.Sampling(temperature=0.5, top_p=1.5)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    # Nothing was computed: the stage still continues at position 0.
    r2 = stub.Forward(pb.ForwardRequest(ref=ref("fs-bad", 2), position=0, hidden=r1.output, sample=pb.Sampling(top_p=1)))
    assert r2.output_position == len(PROMPT) - 1
    # Its windows sign tokens sampled with one set of parameters: a step asking for others is refused.
    row = wire.decode_tensor(r1.output, ndim=2)[-1:]
    step = pb.ForwardRequest(ref=ref("fs-bad", 2), position=len(PROMPT), sample=pb.Sampling(temperature=0.5, top_p=1))
    wire.put_tensor(step.hidden, row)
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(step)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one set of parameters" in e.value.details()
    step.sample.temperature = 0
    assert stub.Forward(step).output_position == len(PROMPT)


def start(tmp_path, names):
    servers, services, endpoints = {}, {}, {}
    for n in names:
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        srv, service, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=n, threads=1, n_ctx=256))
        servers[n], services[n], endpoints[n] = srv, service, f"127.0.0.1:{port}"
    return servers, services, endpoints


def cheat_at(service, position: int, how: str) -> list[int]:
    """Make `service`'s lane cheat once, on the final stage's answer for the token at `position`:
    'token' answers another token than its row samples, 'row' hangs up instead of sending the row."""
    honest = service.lane_step
    done: list[int] = []

    def lane_step(body):
        frames, jobs = honest(body)
        if len(frames) != 2 or done:
            return frames, jobs
        head = pb.ForwardResponse.FromString(bytes(frames[0][lane.RESPONSE_HEAD.size:]))
        if head.output_position + 1 != position:
            return frames, jobs
        done.append(position)
        if how == "token":
            head.token = (head.token + 1) % 49152
            return [lane.response_frame(head.SerializeToString()), frames[1]], jobs

        def hang_up():
            raise ConnectionResetError("hanging up before the row")
        return [frames[0], hang_up], jobs
    service.lane_step = lane_step
    return done


def generate_on(model_path, servers: dict, endpoints: dict, session: str, sampling: SamplingParams):
    """A session on nodes A, B, C (stages 0-2), D the first backup, without audits; every server
    stopped at the end. Returns (driver, result)."""
    state = SessionState(session=session, prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=0.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["D", "A", "B", "C"]),
                           rpc_timeout_s=10.0, warm_backups=False)
    try:
        driver.start()
        res = generation.generate(driver, PROMPT, MAX_TOKENS, sampling=sampling)
    finally:
        driver.close()
        for srv in servers.values():
            srv.stop(None)
    return driver, res


@pytest.mark.parametrize("how", ["token", "row"])
def test_a_final_node_that_lies_about_its_token_or_keeps_its_row_is_rolled_back(tmp_path, model_path, how):
    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS, sampling=SAMPLING).tokens
    servers, services, endpoints = start(tmp_path, ("A", "B", "C", "D"))
    at = len(PROMPT) + 3   # the fourth generated token
    cheated = cheat_at(services["C"], at, how)
    driver, res = generate_on(model_path, servers, endpoints, f"final-{how}", SAMPLING)
    state = driver.state
    assert cheated == [at]
    assert res.tokens == want and res.rewinds == 1
    rows = [r for r in driver.rpc.records if r.method == "ForwardRow"]
    assert len(rows) >= MAX_TOKENS and all(r.stage == 2 for r in rows)
    if how == "token":
        assert state.quarantined == ["C"]
        assert "answered token" in state.rollbacks[0]["reason"]
    else:
        assert state.quarantined == [] and state.rollbacks[0]["to_position"] == at - 1
        assert "not its logit row" in state.rollbacks[0]["reason"]
    # Either way stage 2 went to the backup, and the token at `at` was sampled again from its row.
    assert [(f["stage"], f["from"], f["to"]) for f in state.failovers] == [(2, "C", "D")]
    # The lost message held the deferred commitments of the step before it too: the backup's replay
    # signs those positions, so every position still has a receipt.
    assert_receipts_cover(driver, len(PROMPT) + MAX_TOKENS - 1)


def assert_receipts_cover(driver, last: int) -> None:
    """Verified receipts cover every position each stage was fed (the final stage from the prompt's
    last row) up to `last`."""
    for s in range(3):
        covered = {p for r in driver.receipts if r["stage"] == s and r["verified"]
                   for p in range(r["start"], r["start"] + r["count"])}
        want = set(range(last)) if s < 2 else set(range(len(PROMPT) - 1, last))
        assert want <= covered, (s, sorted(want - covered))


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLING], ids=["greedy", "seeded"])
def test_a_final_node_that_signs_a_token_its_row_cannot_sample_is_proven(tmp_path, model_path, monkeypatch, params):
    """The cheater samples its least likely token and signs it with the row's commitment, as its own
    windows sign every token: the driver rolls it back and publishes a SamplingFraudProof that holds
    on the node's signed words alone, and breaks when those words are altered."""
    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS, sampling=params).tokens
    at = len(PROMPT) + 3
    honest, cheated = server._sample, []

    def lying_sample(logits, position, sampling):
        if position == at and not cheated:
            cheated.append(int(np.argmin(logits)))
            return cheated[-1]
        return honest(logits, position, sampling)
    monkeypatch.setattr(server, "_sample", lying_sample)
    servers, _, endpoints = start(tmp_path, ("A", "B", "C", "D"))
    driver, res = generate_on(model_path, servers, endpoints, "final-signed-lie", params)
    assert len(cheated) == 1 and res.tokens == want and driver.state.quarantined == ["C"]
    [entry] = driver.proofs.report()
    assert (entry["node"], entry["stage"], entry["position"], entry["holds"]) == ("C", 2, at - 1, True), entry
    proof = proofs.proof_from_json(entry["proof"])
    assert isinstance(proof, proofs.SamplingFraudProof)
    assert proof.statement.sampled.token_at(at - 1) == cheated[0]
    assert proofs.check_proof(proof, driver.proofs.public_key_text)[0]
    # C's lie and every token its backup D sampled again from there are in verified receipts.
    signed = {(r["node"], t["position"]): t["token"] for r in driver.receipts if r["verified"] and r["stage"] == 2
              for t in (r["receipt"].get("sampled") or {}).get("tokens", [])}
    assert signed[("C", at - 1)] == cheated[0]
    assert [signed.get(("D", p)) for p in range(at - 1, len(PROMPT) + MAX_TOKENS - 1)] == want[at - len(PROMPT):]
    # The node's words altered (the token it signed put back to the honest one): the proof falls.
    st = proof.statement
    honest_tokens = tuple((p, want[p + 1 - len(PROMPT)] if p == at - 1 else t) for p, t in st.sampled.tokens)
    forged = dataclasses.replace(proof, statement=dataclasses.replace(
        st, sampled=dataclasses.replace(st.sampled, tokens=honest_tokens)))
    holds, why = proofs.check_proof(forged)
    assert not holds and any("worker's signature" in w for w in why)
    assert_receipts_cover(driver, len(PROMPT) + MAX_TOKENS - 1)
