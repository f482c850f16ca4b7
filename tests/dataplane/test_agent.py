"""The node agent over real gRPC on loopback with real llama.cpp stages."""
import grpc
import numpy as np
import pytest

from consortium import wire
from consortium.layers import LayerRange
from consortium.verification import canonical, receipts, signing
from consortium.wire import pb
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig

SPLIT = [(0, 9), (10, 19), (20, 29)]
PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]


def ref(session, stage, epoch=1):
    return pb.StageRef(session=session, stage=stage, epoch=epoch)


def load(stub, model, session, epoch=1):
    for i, (a, b) in enumerate(SPLIT):
        stub.LoadStage(pb.LoadStageRequest(ref=ref(session, i, epoch), model_path=model, first_layer=a, last_layer=b))


def step(stub, session, position, tokens, epoch=1):
    r0 = stub.Forward(pb.ForwardRequest(ref=ref(session, 0, epoch), position=position, tokens=tokens))
    r1 = stub.Forward(pb.ForwardRequest(ref=ref(session, 1, epoch), position=position, hidden=r0.output))
    r2 = stub.Forward(pb.ForwardRequest(ref=ref(session, 2, epoch), position=position, hidden=r1.output))
    return r0, r1, r2


def test_round_trip_matches_in_process_pipeline_and_is_signed(agent, model_path):
    stub, service, ident = agent
    load(stub, model_path, "rt")
    with LocalPipeline(model_path, [LayerRange(a, b) for a, b in SPLIT], StageConfig(threads=1)) as pipe:
        want = pipe.forward(0, 0, np.array(PROMPT, np.int32))
        want2 = pipe.forward(0, len(PROMPT), np.array([42], np.int32))
    r0, r1, r2 = step(stub, "rt", 0, PROMPT)
    assert np.array_equal(wire.decode_tensor(r2.output)[0], want)  # bit-identical logits
    _, _, r2b = step(stub, "rt", len(PROMPT), [42])
    assert np.array_equal(wire.decode_tensor(r2b.output)[0], want2)
    # Commitments are the canonical hashes of the rows sent, and the window is signed by the node.
    h = wire.decode_tensor(r1.output, ndim=2)
    assert list(r1.commitments) == canonical.commit_rows(h)
    w = wire.window_from_pb(r1.windows[-1])
    assert w.statement.count == len(PROMPT) and w.statement.node_id == ident.node_id
    assert signing.verify_signature(ident.public_key_text, w.statement.encode(), w.signature)
    assert w.statement.merkle_root == receipts.merkle.merkle_root(list(r1.commitments))
    # Resend gives back exactly what was sent; Reveal hashes to the commitment.
    chunks = list(stub.Resend(pb.ResendRequest(ref=ref("rt", 0), from_position=0, to_position=len(PROMPT))))
    assert np.array_equal(np.concatenate([wire.decode_tensor(c.output) for c in chunks]),
                          wire.decode_tensor(r0.output))
    rv = stub.Reveal(pb.RevealRequest(ref=ref("rt", 1), position=3))
    k = wire.decode_tensor(rv.canonical, dtype="int32", ndim=1)
    assert canonical.commit_canonical(k[None, :])[0] == r1.commitments[3] == rv.commitment
    # An audit on the agent's own copy of the layers recomputes the same rows.
    a = stub.Audit(pb.AuditRequest(ref=ref("rt", 1), model_path=model_path, first_layer=10, last_layer=19,
                                   start_position=0, hidden=r0.output, batch_sizes=[len(PROMPT)], positions=[2, 5]))
    assert np.array_equal(wire.decode_tensor(a.rows), h[[2, 5]])
    # Counters: each position computed once by a forward step.
    counts = [c for c in stub.Health(pb.HealthRequest()).counters if c.session == "rt"]
    assert len(counts) == 3 * (len(PROMPT) + 1) and all(c.forward == 1 and c.replay == 0 for c in counts)


def test_stale_epoch_refused_and_fence(agent, model_path):
    stub, _, _ = agent
    load(stub, model_path, "ep", epoch=2)
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.ForwardRequest(ref=ref("ep", 0, 1), position=0, tokens=PROMPT))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch 1" in e.value.details()
    stub.Forward(pb.ForwardRequest(ref=ref("ep", 0, 2), position=0, tokens=PROMPT))
    stub.Fence(pb.FenceRequest(ref=ref("ep", 0, 3)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.ForwardRequest(ref=ref("ep", 0, 2), position=len(PROMPT), tokens=[5]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "fenced at epoch 3" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a fenced node cannot even reload the old epoch
        stub.LoadStage(pb.LoadStageRequest(ref=ref("ep", 0, 2), model_path=model_path, first_layer=0, last_layer=9))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_truncate_then_replay_gives_same_rows(agent, model_path):
    stub, _, _ = agent
    load(stub, model_path, "tr")
    r0, r1, _ = step(stub, "tr", 0, PROMPT)
    nxt = stub.Truncate(pb.TruncateRequest(ref=ref("tr", 1), position=4)).next_position
    assert nxt == 4
    h = wire.decode_tensor(r0.output)
    again = stub.Forward(pb.ForwardRequest(ref=ref("tr", 1), position=4, hidden=wire.encode_tensor(h[4:])))
    assert np.array_equal(wire.decode_tensor(again.output), wire.decode_tensor(r1.output)[4:])


def test_one_replay_call_rebuilds_many_batches_in_their_shapes(agent, model_path):
    """A backup's KV rebuilt by one Replay call per stage, batch by batch: the same commitments as
    the original steps, one signed window per window, and the next step gives the same rows."""
    stub, service, _ = agent
    load(stub, model_path, "rb")
    tokens, rs, pos = list(PROMPT), [step(stub, "rb", 0, PROMPT)], len(PROMPT)
    for _ in range(4):
        tokens.append(int(np.argmax(wire.decode_tensor(rs[-1][2].output)[-1])))
        rs.append(step(stub, "rb", pos, tokens[-1:]))
        pos += 1
    sizes = [len(PROMPT)] + [1] * 4
    load(stub, model_path, "rb2")
    inputs = [pb.ForwardRequest(tokens=tokens)] + [
        pb.ForwardRequest(hidden=wire.encode_tensor(np.concatenate([wire.decode_tensor(r[s].output) for r in rs])))
        for s in (0, 1)]
    for s, req in enumerate(inputs):
        req.ref.CopyFrom(ref("rb2", s))
        req.batch_sizes.extend(sizes)
        got = stub.Replay(req)
        assert got.rows == len(tokens) and len(got.windows) == 1
        assert list(got.commitments) == [c for r in rs for c in r[s].commitments]
    again = step(stub, "rb2", pos, [7])
    for a, b in zip(again, step(stub, "rb", pos, [7])):
        assert np.array_equal(wire.decode_tensor(a.output), wire.decode_tensor(b.output))
    # The final stage with commit_from: rows ending earlier only rebuild the KV (no LM head, nothing
    # committed), the rest commit as before, and the next step's logits are the same.
    load(stub, model_path, "rb3")
    req = pb.ForwardRequest(ref=ref("rb3", 2), position=0, hidden=inputs[2].hidden, batch_sizes=sizes,
                            commit_from=len(PROMPT) + 2)
    got = stub.Replay(req)
    assert got.rows == len(tokens) and list(got.commitments) == [c for r in rs[3:] for c in r[2].commitments]
    nxt = stub.Forward(pb.ForwardRequest(ref=ref("rb3", 2), position=pos, hidden=again[1].output))
    assert np.array_equal(wire.decode_tensor(nxt.output), wire.decode_tensor(again[2].output))
    for session in ("rb", "rb2", "rb3"):   # the module's agent has 8 sequence slots per stage
        service.release_session(session)


def test_a_backup_that_loaded_ahead_replays_decode_steps_merged_with_the_same_bits(agent, model_path):
    """Prepare checks which merged batch sizes keep the stage's bits; a Replay then computes runs of
    decode steps in those sizes: the same commitments as the original one-row steps, and the next
    step the same rows. Before the check, or with exact_shapes, the batches stay as given."""
    stub, service, _ = agent
    decode = 13
    load(stub, model_path, "mg")
    tokens, rs, pos = list(PROMPT), [step(stub, "mg", 0, PROMPT)], len(PROMPT)
    for _ in range(decode):
        tokens.append(int(np.argmax(wire.decode_tensor(rs[-1][2].output)[-1])))
        rs.append(step(stub, "mg", pos, tokens[-1:]))
        pos += 1
    sizes = [len(PROMPT)] + [1] * decode
    inputs = [pb.ForwardRequest(tokens=tokens)] + [
        pb.ForwardRequest(hidden=wire.encode_tensor(np.concatenate([wire.decode_tensor(r[s].output) for r in rs])))
        for s in (0, 1, 2)]
    commit_from = len(PROMPT) + 8   # the final stage commits from here: only the rows before it merge

    def replay(session, s, exact=False):
        req = pb.ForwardRequest()
        req.CopyFrom(inputs[s])
        req.ref.CopyFrom(ref(session, s))
        req.batch_sizes.extend(sizes)
        req.exact_shapes = exact
        if s == 2:
            req.commit_from = commit_from
        got = stub.Replay(req)
        want = [c for r in rs for c in r[s].commitments] if s < 2 else \
            [c for r in rs[commit_from - len(PROMPT) + 1:] for c in r[2].commitments]
        assert got.rows == len(tokens) and list(got.commitments) == want
        return got.merged_rows

    load(stub, model_path, "mg-cold")
    assert [replay("mg-cold", s) for s in range(3)] == [0, 0, 0]   # not checked yet: the shapes as given
    for a, b in SPLIT:   # the checks run in the background (a Replay waits a while for one under way)
        stub.Prepare(pb.PrepareRequest(model_path=model_path, first_layer=a, last_layer=b))
    load(stub, model_path, "mg-merged")
    for s in range(3):   # here without a deadline: a busy machine must not make the test flaky
        assert service.engines.replay_sizes(service._assignments[("mg-merged", s)].engine, wait_s=120) == {2, 4, 8, 16}
    # 13 decode steps as 8 + 4 + 1; on the final stage the 8 up to commit_from's row as one batch (its
    # end needs no logits), the 5 that commit one by one.
    assert [replay("mg-merged", s) for s in range(3)] == [12, 12, 8]
    load(stub, model_path, "mg-exact")
    assert [replay("mg-exact", s, exact=True) for s in range(3)] == [0, 0, 0]
    for session in ("mg-merged", "mg-exact"):
        again = step(stub, session, pos, [7])
        for a, b in zip(again, step(stub, "mg" if session == "mg-merged" else "mg-cold", pos, [7])):
            assert np.array_equal(wire.decode_tensor(a.output), wire.decode_tensor(b.output))
    for session in ("mg", "mg-cold", "mg-merged", "mg-exact"):
        service.release_session(session)


def test_a_backup_takes_over_its_own_audit_replay_of_the_stage(agent, model_path):
    """A Replay with adopt_upto on a node that audited the stage from position 0 takes the positions
    its audit sequence holds (up to a batch end) from its audit process, keys and values and rows,
    and replays the rest: the same commitments as the original steps, and the next step the same
    rows. Without an audit of the session's stage it replays everything."""
    stub, service, _ = agent
    decode, P = 10, len(PROMPT)
    load(stub, model_path, "ad")
    tokens, rs, pos = list(PROMPT), [step(stub, "ad", 0, PROMPT)], P
    for _ in range(decode):
        tokens.append(int(np.argmax(wire.decode_tensor(rs[-1][2].output)[-1])))
        rs.append(step(stub, "ad", pos, tokens[-1:]))
        pos += 1
    sizes = [P] + [1] * decode
    hidden = [None] + [np.concatenate([wire.decode_tensor(r[s].output) for r in rs]) for s in (0, 1)]
    commit_from = P + 7

    def audit(session, s, upto):   # the verifier's replay of positions [0, upto), one batch end audited
        req = pb.AuditRequest(ref=ref(session, s), model_path=model_path, first_layer=SPLIT[s][0],
                              last_layer=SPLIT[s][1], start_position=0, batch_sizes=[P] + [1] * (upto - P),
                              positions=[upto - 1], hidden=wire.encode_tensor(hidden[s][:upto]))
        assert stub.Audit(req).replayed_rows == upto

    def replay(session, s, adopt_upto):
        req = pb.ForwardRequest(ref=ref(session, s), position=0, batch_sizes=sizes, adopt_upto=adopt_upto,
                                commit_from=commit_from if s == 2 else 0)
        if s == 0:
            req.tokens.extend(tokens)
        else:
            req.hidden.CopyFrom(wire.encode_tensor(hidden[s]))
        got = stub.Replay(req)
        want = [c for r in rs for c in r[s].commitments] if s < 2 else \
            [c for r in rs[commit_from - P + 1:] for c in r[2].commitments]
        assert got.rows == len(tokens) and list(got.commitments) == want
        return got.adopted_rows

    audit("ad-b", 1, P + 6)
    audit("ad-b", 2, P + 9)
    load(stub, model_path, "ad-b")
    # Stage 0 was not audited here. Stage 1: as far as the audit went. The final stage: up to
    # commit_from, whose rows need logits.
    assert replay("ad-b", 0, adopt_upto=P + 8) == 0
    assert replay("ad-b", 1, adopt_upto=P + 8) == P + 6
    assert replay("ad-b", 2, adopt_upto=P + 9) == P + 7
    resent = np.concatenate([wire.decode_tensor(c.output) for c in
                             stub.Resend(pb.ResendRequest(ref=ref("ad-b", 1), from_position=0, to_position=pos))])
    assert np.array_equal(resent, hidden[2])   # the rows taken over are kept for a later resend
    nxt = step(stub, "ad-b", pos, [7])
    for a, b in zip(nxt, step(stub, "ad", pos, [7])):
        assert np.array_equal(wire.decode_tensor(a.output), wire.decode_tensor(b.output))
    load(stub, model_path, "ad-c")   # never audited here: every row replayed
    assert replay("ad-c", 1, adopt_upto=P + 8) == 0
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.ForwardRequest(ref=ref("ad-c", 0), position=0, tokens=PROMPT, adopt_upto=4))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adopt_upto" in e.value.details()
    for session in ("ad", "ad-b", "ad-c"):
        service.release_session(session)


def test_an_audit_gives_way_to_a_handover_and_the_sequence_stays_whole(model_path, monkeypatch):
    """In the audit process: while the agent's gate is set (a failover is taking over a sequence),
    an audit is refused ABORTED before its next batch; what the sequence holds stays consistent,
    and the handover gives its state and rows; with the gate clear the audit runs."""
    import threading

    from node_agent import audit_gate, server

    gate = threading.Event()
    monkeypatch.setattr(audit_gate, "GIVE_WAY", gate)
    seqs = server._AuditSequences(server.AgentConfig(threads=1, n_ctx=256))
    path = str(server.stage_file(model_path, LayerRange(0, 9)))
    key = ("gate", 0, path)
    req = pb.AuditRequest(ref=ref("gate", 0), model_path=model_path, first_layer=0, last_layer=9, start_position=0,
                          tokens=PROMPT, batch_sizes=[4, 1, 1, 1, 1], positions=[7])
    gate.set()
    with pytest.raises(server.Refused) as e:
        seqs.audit(key, req.SerializeToString(), 0, 9, 30)
    assert e.value.code == grpc.StatusCode.ABORTED
    assert seqs.handover(key, [4, 8]) == (0, b"", b"")   # nothing replayed yet
    gate.clear()
    got = pb.AuditResponse.FromString(seqs.audit(key, req.SerializeToString(), 0, 9, 30))
    assert got.replayed_rows == len(PROMPT)
    n, state, rows = seqs.handover(key, [4, 5, 6])
    assert n == 6 and state and len(rows) == 6 * 576 * 4
    seqs.release([key])
    assert seqs.handover(key, [4]) == (0, b"", b"")


def test_merged_replay_plans():
    from node_agent.server import merged_replay

    allowed = frozenset({2, 4, 8, 16})
    # Other stages: every run of one-row batches merged, other batches as given, every row output.
    plan, merged = merged_replay([5, 1, 1, 1, 1, 1, 3, 1], 0, None, allowed)
    assert plan == [(5, True), (4, True), (1, True), (3, True), (1, True)] and merged == 4
    # The final stage: batches ending at keep_from or later keep their shapes and their logits.
    plan, merged = merged_replay([5] + [1] * 10, 0, 12, allowed)
    assert plan == [(5, False), (4, False), (2, False), (1, False), (1, True), (1, True), (1, True)]
    assert merged == 6
    assert merged_replay([1] * 4, 10, 0, allowed) == ([(1, True)] * 4, 0)   # commit_from 0: every batch end
    assert merged_replay([1] * 4, 10, None, frozenset()) == ([(1, True)] * 4, 0)


def malformed_requests(model_path, width=576):
    good = wire.encode_tensor(np.zeros((1, width), np.float32))
    nan = wire.encode_tensor(np.full((1, width), np.nan, np.float32))
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=pb.Tensor(dtype="float32", shape=[1, width], data=b"\0" * 7)), "bytes"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=wire.encode_tensor(np.zeros((1, 3), np.float32))), "width"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=nan), "NaN"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, tokens=[1, 2]), "not token ids"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 0), position=0, tokens=[10 ** 9]), "vocabulary"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 0), position=5, tokens=[1]), "continues at position"
    yield "Forward", pb.ForwardRequest(ref=ref("nobody", 0), position=0, tokens=[1]), "unknown session"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=pb.Tensor(dtype="float64", shape=[1, width], data=good.data)), "dtype"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=pb.Tensor(dtype="float32", shape=[0, width])), "empty"
    yield "Forward", pb.ForwardRequest(ref=pb.StageRef(session="", stage=0, epoch=1), position=0, tokens=[1]), "no session"
    yield "Resend", pb.ResendRequest(ref=ref("mf", 0), from_position=0, to_position=99), "no stored output"
    yield "Reveal", pb.RevealRequest(ref=ref("mf", 1), position=3), "no stored output"
    yield "Truncate", pb.TruncateRequest(ref=ref("mf", 0), position=-1), "negative"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path="/nonexistent.gguf", first_layer=0, last_layer=3), "does not exist"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=5, last_layer=2), "bad layer range"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=0, last_layer=99), "run past"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=0, last_layer=3, receipt_window=-2), "receipt_window"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=0, last_layer=3, receipt_window=1025), "receipt_window"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=0, last_layer=3, window_states=True, state_window=-4), "state_window"
    yield "LoadStage", pb.LoadStageRequest(ref=ref("mf2", 0), model_path=model_path, first_layer=0, last_layer=3, window_states=True, state_window=2048), "state_window"
    yield "Audit", pb.AuditRequest(ref=ref("mf", 1), model_path=model_path, first_layer=10, last_layer=19, hidden=good, batch_sizes=[2], positions=[0]), "batch sizes"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 0), position=0, tokens=[1, 2], batch_sizes=[1, 1]), "batch_sizes is for Replay"
    yield "Replay", pb.ForwardRequest(ref=ref("mf", 0), position=0, tokens=[1, 2], batch_sizes=[1, 2]), "do not add up"
    yield "Replay", pb.ForwardRequest(ref=ref("mf", 2), position=0, hidden=wire.encode_tensor(np.zeros((3, width), np.float32)), batch_sizes=[1, 2]), "consecutive positions"
    yield "Replay", pb.ForwardRequest(ref=ref("mf", 1), position=0, hidden=good, commit_from=3), "commit_from is for"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 0), position=0, tokens=[1], sample=pb.Sampling(top_p=1)), "final stage"
    yield "Replay", pb.ForwardRequest(ref=ref("mf", 2), position=0, hidden=good, sample=pb.Sampling(top_p=1)), "final stage"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 2), position=0, hidden=good, sample=pb.Sampling(top_p=0)), "top_p"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 2), position=0, hidden=good, sample=pb.Sampling(temperature=-1, top_p=1)), "temperature"
    yield "Forward", pb.ForwardRequest(ref=ref("mf", 2), position=0, hidden=good, sample=pb.Sampling(temperature=float("nan"), top_p=1)), "temperature"


def call(stub, method, req):
    if method == "Resend":
        return list(stub.Resend(req))
    return getattr(stub, method)(req)


def test_malformed_requests_answered_with_reasons_and_agent_keeps_serving(agent, model_path):
    stub, _, _ = agent
    load(stub, model_path, "mf")
    for method, req, reason in malformed_requests(model_path):
        with pytest.raises(grpc.RpcError) as e:
            call(stub, method, req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, reason, e.value.details())
        assert reason.lower() in e.value.details().lower(), (reason, e.value.details())
    step(stub, "mf", 0, PROMPT)  # still serving, and the session is intact


def test_fuzz_many_malformed_requests(agent, model_path):
    """~1000 random corruptions of valid requests: every one refused with a reason, no crash."""
    stub, service, _ = agent
    load(stub, model_path, "fz")
    rng = np.random.default_rng(1)
    before = service.rejected
    n = 0
    for i in range(1000):
        kind = i % 6
        if kind == 0:  # truncated or padded bytes
            data = bytes(rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8))
            req = pb.ForwardRequest(ref=ref("fz", 1), position=0,
                                    hidden=pb.Tensor(dtype="float32", shape=[1, 576], data=data))
        elif kind == 1:  # wrong shapes
            shape = [int(x) for x in rng.integers(-2, 700, int(rng.integers(0, 4)))]
            req = pb.ForwardRequest(ref=ref("fz", 1), position=0, hidden=pb.Tensor(dtype="float32", shape=shape))
        elif kind == 2:  # NaN/Inf somewhere
            h = rng.normal(size=(2, 576)).astype(np.float32)
            h[int(rng.integers(0, 2)), int(rng.integers(0, 576))] = rng.choice([np.nan, np.inf, -np.inf])
            req = pb.ForwardRequest(ref=ref("fz", 1), position=0, hidden=wire.encode_tensor(h))
        elif kind == 3:  # unknown sessions / stages
            req = pb.ForwardRequest(ref=pb.StageRef(session=f"s{rng.integers(1e9)}", stage=int(rng.integers(-5, 9)),
                                                    epoch=int(rng.integers(0, 9))), position=0, tokens=[1])
        elif kind == 4:  # stale epochs
            req = pb.ForwardRequest(ref=ref("fz", int(rng.integers(0, 3)), 0), position=0, tokens=[1])
        else:  # bad positions and token ids
            req = pb.ForwardRequest(ref=ref("fz", 0), position=int(rng.integers(1, 10 ** 6)),
                                    tokens=[int(x) for x in rng.integers(-10, 10 ** 6, 3)])
        with pytest.raises(grpc.RpcError) as e:
            stub.Forward(req)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert e.value.details()
        n += 1
    assert service.rejected - before == n
    step(stub, "fz", 0, PROMPT)


def test_undecodable_bytes_to_every_method_are_refused(agent, model_path):
    """Raw random bytes as the request of every RPC: whatever protobuf makes of them, the agent
    answers with a status (never UNKNOWN, gRPC's code for an exception the agent did not handle)."""
    stub, _, _ = agent
    load(stub, model_path, "raw")
    rng = np.random.default_rng(2)
    methods = wire.pb.DESCRIPTOR.services_by_name["NodeAgent"].methods
    for m in methods:
        path = f"/{m.containing_service.full_name}/{m.name}"
        call_raw = (stub.channel.unary_stream if m.server_streaming else stub.channel.unary_unary)(path)
        for _ in range(40):
            data = bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))
            try:
                out = call_raw(data, timeout=10)
                list(out) if m.server_streaming else out
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNKNOWN, (m.name, e.details())
                assert e.details(), m.name
    step(stub, "raw", 0, PROMPT)   # still serving, the session intact


def test_agent_flags_default_to_the_charts_environment(monkeypatch, tmp_path):
    """The DaemonSet runs plain `node-agent`: port and key location come from its environment."""
    from node_agent.main import build_parser

    monkeypatch.setenv("CONSORTIUM_AGENT_PORT", "50123")
    monkeypatch.setenv("CONSORTIUM_DATA_PORT", "50124")
    monkeypatch.setenv("CONSORTIUM_IDENTITY_DIR", str(tmp_path))
    args = build_parser().parse_args([])
    assert args.listen == "0.0.0.0:50123"
    assert args.data_port == 50124 and not args.no_data_lane
    assert args.key_file == str(tmp_path / "node.pem")
    monkeypatch.setenv("CONSORTIUM_DATA_PORT", "0")   # the chart's agent.dataPort: 0, no lane
    assert build_parser().parse_args([]).no_data_lane
    monkeypatch.delenv("CONSORTIUM_DATA_PORT")
    monkeypatch.delenv("CONSORTIUM_AGENT_PORT")
    monkeypatch.delenv("CONSORTIUM_IDENTITY_DIR")
    assert build_parser().parse_args(["--key-file", "k.pem"]).listen == "127.0.0.1:50051"
    with pytest.raises(SystemExit):
        build_parser().parse_args([])   # no key file and no identity dir


def test_a_lying_verifier_can_only_change_its_audits_rows(tmp_path, capsys):
    """--audit-fault takes the output faults only (a skipped layer is a worker's cheat, not a row to
    answer); the refusal is an exit 2 with the reason, before any key or port is made."""
    from node_agent import server
    from node_agent.identity import NodeIdentity
    from node_agent.main import main

    assert main(["--key-file", str(tmp_path / "k.pem"), "--audit-fault", "skip-layer"]) == 2
    assert "only noise-<scale>, replay and random" in capsys.readouterr().err
    assert not (tmp_path / "k.pem").exists()
    with pytest.raises(ValueError, match="only noise"):
        server.NodeAgentService(NodeIdentity.load_or_create(tmp_path / "n.pem", "n"),
                                server.AgentConfig(audit_fault="cheap-quant"))


def test_an_audit_stall_limit_is_a_positive_number_of_seconds(tmp_path, capsys):
    from node_agent.main import main

    for bad in ("0", "-5", "nan"):
        assert main(["--key-file", str(tmp_path / "k.pem"), "--audit-stall-s", bad]) == 2
        assert "--audit-stall-s must be a positive number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "k.pem").exists()


def test_a_released_session_gives_back_its_slots_and_stays_fenced(agent, model_path):
    stub, service, _ = agent

    def load_one(session):
        stub.LoadStage(pb.LoadStageRequest(ref=ref(session, 0), model_path=model_path, first_layer=0, last_layer=4))
    n = service.config.n_seq_max
    for i in range(n):   # layers 0-4: a stage file no other test uses, so all its slots are free
        load_one(f"slots-{i}")
    with pytest.raises(grpc.RpcError) as e:
        load_one("slots-late")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "slots-0" in service.sessions()
    stub.Forward(pb.ForwardRequest(ref=ref("slots-0", 0), position=0, tokens=PROMPT))
    counted = stub.Health(pb.HealthRequest(session="slots-0")).counters
    assert counted and {c.session for c in counted} == {"slots-0"}
    assert service.release_session("slots-0") == 1 and "slots-0" not in service.sessions()
    assert not stub.Health(pb.HealthRequest(session="slots-0")).counters   # forgotten with the session
    load_one("slots-late")
    with pytest.raises(grpc.RpcError) as e:   # the released session's epoch is fenced, not forgotten
        stub.Forward(pb.ForwardRequest(ref=ref("slots-0", 0), position=0, tokens=PROMPT))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch 1" in e.value.details()


def test_release_frees_a_stage_and_its_audit_slot_and_fences_it(agent, model_path):
    """Release, as a driver outside Kubernetes calls it at its end (SessionDriver.close(release=True))."""
    stub, service, _ = agent
    stub.LoadStage(pb.LoadStageRequest(ref=ref("rel", 0, 2), model_path=model_path, first_layer=0, last_layer=9))
    assert list(stub.Health(pb.HealthRequest(session="rel")).held_stages) == [0]   # loaded, nothing computed yet
    assert not stub.Health(pb.HealthRequest()).held_stages                          # only for a session asked
    stub.Forward(pb.ForwardRequest(ref=ref("rel", 0, 2), position=0, tokens=PROMPT))
    # An audit of the stage on this agent holds a slot of its own.
    stub.Audit(pb.AuditRequest(ref=ref("rel", 0, 2), model_path=model_path, first_layer=0, last_layer=9,
                               start_position=0, tokens=PROMPT, batch_sizes=[len(PROMPT)], positions=[3]))
    with pytest.raises(grpc.RpcError) as e:
        stub.Release(pb.ReleaseRequest(ref=ref("rel", 0, 1)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch 1" in e.value.details()
    assert stub.Release(pb.ReleaseRequest(ref=ref("rel", 0, 2))).slots == 2
    assert ("rel", 0) not in service.held() and "rel" not in service.sessions()
    assert not stub.Health(pb.HealthRequest(session="rel")).counters
    assert not stub.Health(pb.HealthRequest(session="rel")).held_stages
    for call in (lambda: stub.Forward(pb.ForwardRequest(ref=ref("rel", 0, 2), position=len(PROMPT), tokens=[5])),
                 lambda: stub.LoadStage(pb.LoadStageRequest(ref=ref("rel", 0, 2), model_path=model_path,
                                                            first_layer=0, last_layer=9))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Release(pb.ReleaseRequest(ref=ref("rel", 0, 2))).slots == 0   # again: nothing left


def test_window_states_are_signed_kept_served_and_audited_from(agent, model_path):
    """With window_states an agent signs each state window's KV state as it closes (windows of their
    own, shorter than the receipt window here) and serves the states; a verifier that imports them
    replays a window alone and writes the same state."""
    import hashlib

    stub, service, ident = agent
    layers = [(0, 2), (3, 6)]   # stage files no other test uses: the module's agent has 8 slots per stage
    for i, (a, b) in enumerate(layers):
        stub.LoadStage(pb.LoadStageRequest(ref=ref("ws", i), model_path=model_path, first_layer=a, last_layer=b,
                                           receipt_window=16, window_states=True, state_window=4))
    outs, stmts = [], []
    for p, toks in [(0, PROMPT)] + [(len(PROMPT) + k, [40 + k]) for k in range(4)]:
        r0 = stub.Forward(pb.ForwardRequest(ref=ref("ws", 0), position=p, tokens=toks))
        r1 = stub.Forward(pb.ForwardRequest(ref=ref("ws", 1), position=p, hidden=r0.output))
        outs.append((r0, r1))
        stmts += list(r1.states)
    # The prompt (8 rows) closed windows 0 and 4 at once; the fourth step closed window 8.
    assert [(s.window_start, s.count) for s in stmts] == [(0, 4), (4, 4), (8, 4)]
    for s in stmts:
        msg = receipts.state_message("ws", 1, ident.node_id, 1, s.window_start, s.count, s.digest)
        assert signing.verify_signature(ident.public_key_text, msg, s.signature)
    got = stub.States(pb.StatesRequest(ref=ref("ws", 1), upto=8))
    assert [hashlib.sha256(b).digest() for b in got.states] == [s.digest for s in stmts[:2]]
    # Window 8 replayed on the verifier from the states of windows 0 and 4: the worker's rows and state.
    hidden = np.concatenate([wire.decode_tensor(r0.output, ndim=2) for r0, _ in outs[1:]])
    a = stub.Audit(pb.AuditRequest(ref=ref("ws", 1), model_path=model_path, first_layer=3, last_layer=6,
                                   start_position=8, hidden=wire.encode_tensor(hidden), batch_sizes=[1] * 4,
                                   positions=[9, 11], prefix_states=list(got.states), export_state=True))
    rows = np.concatenate([wire.decode_tensor(r1.output, ndim=2) for _, r1 in outs[1:]])
    assert np.array_equal(wire.decode_tensor(a.rows), rows[[1, 3]]) and a.replayed_rows == 4
    assert hashlib.sha256(a.state).digest() == stmts[2].digest
    # Refusals, each with its reason.
    bad = [(pb.StatesRequest(ref=ref("ws", 1), upto=6), grpc.StatusCode.INVALID_ARGUMENT, "not a window start"),
           (pb.StatesRequest(ref=ref("ws", 1), upto=16), grpc.StatusCode.FAILED_PRECONDITION, "no state kept"),
           (pb.StatesRequest(ref=ref("ws", 0, 0), upto=4), grpc.StatusCode.FAILED_PRECONDITION, "stale epoch")]
    for req, code, why in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.States(req)
        assert e.value.code() == code and why in e.value.details(), e.value.details()
    for prefix, why in ((list(got.states)[:1], "end at position 4"), ([b"junk"], "prefix states")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Audit(pb.AuditRequest(ref=ref("ws", 1), model_path=model_path, first_layer=3, last_layer=6,
                                       start_position=8, hidden=wire.encode_tensor(hidden), batch_sizes=[1] * 4,
                                       positions=[9], prefix_states=prefix))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), e.value.details()
    # A truncation drops the states of the windows it cuts.
    stub.Truncate(pb.TruncateRequest(ref=ref("ws", 1), position=10))
    assert len(stub.States(pb.StatesRequest(ref=ref("ws", 1), upto=8)).states) == 2
    with pytest.raises(grpc.RpcError) as e:
        stub.States(pb.StatesRequest(ref=ref("ws", 1), upto=12))
    assert "no state kept for the window(s) starting at [8]" in e.value.details()
    # A stage loaded without window_states keeps none.
    stub.LoadStage(pb.LoadStageRequest(ref=ref("nows", 0), model_path=model_path, first_layer=0, last_layer=2))
    with pytest.raises(grpc.RpcError) as e:
        stub.States(pb.StatesRequest(ref=ref("nows", 0), upto=0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "without window_states" in e.value.details()
    for session in ("ws", "nows"):
        service.release_session(session)


def test_prepare_loads_a_stage_ahead_that_a_later_load_stage_finds(agent, model_path):
    """A likely backup loads layers with Prepare and holds no assignment; LoadStage then finds them."""
    stub, service, _ = agent
    prep = pb.PrepareRequest(model_path=model_path, first_layer=3, last_layer=7)   # no other test's range
    assert stub.Prepare(prep).load_ms > 0
    assert stub.Prepare(prep).load_ms == 0   # loaded already
    assert not any(k[0] == "prep" for k in service._assignments)
    with pytest.raises(grpc.RpcError) as e:   # nothing is served from prepared layers
        stub.Forward(pb.ForwardRequest(ref=ref("prep", 0), position=0, tokens=PROMPT))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown session" in e.value.details()
    r = stub.LoadStage(pb.LoadStageRequest(ref=ref("prep", 0), model_path=model_path, first_layer=3, last_layer=7))
    assert r.found_loaded
    fresh = stub.LoadStage(pb.LoadStageRequest(ref=ref("prep", 1), model_path=model_path, first_layer=4, last_layer=7))
    assert not fresh.found_loaded
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(pb.PrepareRequest(model_path=model_path, model_sha256="0" * 64, first_layer=3, last_layer=7))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in e.value.details()


def test_audits_replay_on_their_own_thread_count(tmp_path, model_path, monkeypatch):
    """Audit replays run on AgentConfig.audit_threads llama.cpp threads, by default the cores the
    sessions' steps leave free: on the cores a step uses, they would hold it up."""
    from node_agent import server
    from node_agent.identity import NodeIdentity

    for cores, threads, audit, want in ((16, 0, 0, 1), (16, 16, 0, 1), (16, 12, 0, 4), (16, 12, 2, 2), (2, 1, 0, 1)):
        monkeypatch.setattr(server, "usable_cores", lambda: cores)
        assert server.AgentConfig(threads=threads, audit_threads=audit).resolved_audit_threads() == want
    monkeypatch.undo()

    ident = NodeIdentity.load_or_create(tmp_path / "node.pem", "threads-node")
    srv, service, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(threads=1, audit_threads=2, n_ctx=256))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS)
    try:
        stub = wire.pb_grpc.NodeAgentStub(channel)
        load(stub, model_path, "thr")
        r0, r1, _ = step(stub, "thr", 0, PROMPT)
        a = stub.Audit(pb.AuditRequest(ref=ref("thr", 1), model_path=model_path, first_layer=10, last_layer=19,
                                       start_position=0, hidden=r0.output, batch_sizes=[len(PROMPT)], positions=[1, 7]))
        # Computed on two threads, the rows are still the ones the session's one-thread step gave.
        assert np.array_equal(wire.decode_tensor(a.rows), wire.decode_tensor(r1.output, ndim=2)[[1, 7]])
        assert [t for k, t in service.audits.threads().items() if k[0] == "thr"] == [2]
        session = service._assignments[("thr", 1)]
        assert session.engine.threads(session.seq) == 1
    finally:
        channel.close()
        srv.stop(None)


def _audit_request(session, model_path):
    return pb.AuditRequest(ref=ref(session, 0), model_path=model_path, first_layer=0, last_layer=9,
                           start_position=0, tokens=PROMPT, batch_sizes=[len(PROMPT)], positions=[3])


def test_audits_run_in_a_process_that_ends_with_the_agent(tmp_path, model_path):
    """Audits replay in a process of the agent's own; an agent killed outright does not leave it behind.
    (And its /metrics count the audit.)"""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from consortium.cluster import free_port

    port_file, metrics_port = tmp_path / "port", free_port()
    agent = subprocess.Popen([sys.executable, "-m", "node_agent.main", "--listen", "127.0.0.1:0", "--plaintext",
                              "--port-file", str(port_file), "--key-file", str(tmp_path / "node.pem"),
                              "--threads", "1", "--no-data-lane", "--metrics-port", str(metrics_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():   # waiting for the agent to bind its port
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{int(port_file.read_text())}", options=wire.CHANNEL_OPTIONS)
        stub = wire.pb_grpc.NodeAgentStub(channel)
        a = stub.Audit(_audit_request("gone", model_path))
        assert wire.decode_tensor(a.rows).shape == (1, 576)
        channel.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "\nconsortium_agent_audits_total 1.0\n" in text and "consortium_agent_info{" in text
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        audit_processes = [p for p in children if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(audit_processes) == 1
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{audit_processes[0]}") and time.monotonic() < deadline:
            time.sleep(0.1)   # it notices its agent gone within a second
        gone = not os.path.exists(f"/proc/{audit_processes[0]}") or \
            open(f"/proc/{audit_processes[0]}/stat").read().split(")")[1].split()[0] == "Z"
        assert gone
    finally:
        if agent.poll() is None:
            agent.kill()


def test_an_audit_process_that_dies_is_replaced(agent, model_path):
    stub, service, _ = agent
    stub.Audit(_audit_request("phoenix", model_path))
    for p in list(service.audits._pool._processes.values()):
        p.kill()
        p.join()
    with pytest.raises(grpc.RpcError) as e:
        stub.Audit(_audit_request("phoenix", model_path))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "audit process exited" in e.value.details()
    a = stub.Audit(_audit_request("phoenix", model_path))   # a new process, a new audit sequence
    assert wire.decode_tensor(a.rows).shape == (1, 576)
    service.release_session("phoenix")


@pytest.mark.parametrize("model", ["smollm2-135m", "smollm2-135m-q4_k_m"], ids=["q4_1", "repacked-q4_k_m"])
def test_a_verifier_merges_decode_steps_only_where_that_keeps_the_bits(model):
    """Audit replays merge one-row batches into batches of the sizes Stage.batch_invariant_sizes
    passed for on the stage (2-8 on Q4_1; on repacked Q4_K_M, whose kernels change at 4 rows, fewer):
    either way the rows and keys and values are those of the original shapes."""
    from consortium.models import resolve_model
    from node_agent import server
    from node_agent.engine.slicing import stage_file

    path = str(resolve_model(model))
    f = stage_file(path, LayerRange(0, 9))
    tokens = list(range(100, 130))
    sizes = [8] + [1] * 22

    def audit(seqs, session, exact):
        req = pb.AuditRequest(ref=ref(session, 0), model_path=path, first_layer=0, last_layer=9, start_position=0,
                              tokens=tokens, batch_sizes=sizes, positions=[7, 12, 29], export_state=True,
                              exact_shapes=exact)
        return pb.AuditResponse.FromString(seqs.audit((session, 0, str(f)), req.SerializeToString(), 0, 9, 30))

    seqs = server._AuditSequences(server.AgentConfig(threads=1, n_ctx=256))
    merged, exact = audit(seqs, "merged", False), audit(seqs, "exact", True)
    assert wire.decode_tensor(merged.rows).tobytes() == wire.decode_tensor(exact.rows).tobytes()
    assert merged.state == exact.state and exact.merged_rows == 0
    allowed = seqs.merge_sizes[str(f)]
    if model == "smollm2-135m":
        assert allowed == set(range(2, 9)) and merged.merged_rows == 22   # positions 8..29: 8 + 8 + 6
    else:
        assert 4 not in allowed and merged.merged_rows == (22 - 22 % max(allowed) if allowed else 0)
    seqs.release([("merged", 0, str(f)), ("exact", 0, str(f))])


def test_a_cheating_node_is_fenced_and_gives_back_its_slot(tmp_path, model_path):
    """A failover fences the node it leaves; a cheater's stage (node-agent --fault) is released as an
    honest one is, so Fence answers and the slot is free again. (It once failed UNKNOWN, and the
    fenced sequence's slot was lost.)"""
    from node_agent import server
    from node_agent.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(tmp_path / "cheat.pem", "cheat")
    srv, service, port = server.serve(ident, "127.0.0.1:0",
                                      server.AgentConfig(threads=1, n_ctx=64, fault="skip-layer"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS)
    stub = wire.pb_grpc.NodeAgentStub(channel)

    def load_one(session, epoch=1):
        stub.LoadStage(pb.LoadStageRequest(ref=ref(session, 0, epoch), model_path=model_path, first_layer=0,
                                           last_layer=9))
    try:
        load_one("fenced")
        stub.Forward(pb.ForwardRequest(ref=ref("fenced", 0), position=0, tokens=PROMPT))
        assert stub.Fence(pb.FenceRequest(ref=ref("fenced", 0, 2))).epoch == 2
        assert ("fenced", 0) not in service.held()
        for i in range(service.config.n_seq_max):   # every slot, the fenced one's included
            load_one(f"after-{i}")
    finally:
        channel.close()
        srv.stop(None)
