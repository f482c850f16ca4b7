"""Deferred commitments: the agent answers with the rows, commits and signs them afterwards, and the
signed commitments come with the stage's next response (per window: the response after the window's
last step) or from Commitments."""
import grpc
import pytest

from consortium import wire
from consortium.verification import canonical, receipts, signing
from consortium.wire import pb

SPLIT = [(0, 9), (10, 19), (20, 29)]
PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]


def ref(session, stage, epoch=1):
    return pb.StageRef(session=session, stage=stage, epoch=epoch)


def forward(stub, session, stage, position, x, defer=True, per_window=False):
    req = pb.ForwardRequest(ref=ref(session, stage), position=position, defer_commitments=defer,
                            sign_per_window=per_window)
    if stage == 0:
        req.tokens.extend(x)
    else:
        req.hidden.CopyFrom(x)
    return stub.Forward(req)


def check_signed(ident, d: pb.DeferredCommitments, rows, known: dict):
    """d's commitments are the canonical hashes of `rows`, and its last window signs them (with the
    commitments of its window's earlier positions, `known` by position)."""
    assert list(d.commitments) == canonical.commit_rows(rows)
    known.update({d.position + i: c for i, c in enumerate(d.commitments)})
    w = wire.window_from_pb(d.windows[-1])
    assert signing.verify_signature(ident.public_key_text, w.statement.encode(), w.signature)
    assert w.statement.merkle_root == receipts.merkle.merkle_root([known[p] for p in w.statement.positions])


def test_deferred_commitments_come_with_the_next_response(agent, model_path):
    stub, _, ident = agent
    for i, (a, b) in enumerate(SPLIT):
        stub.LoadStage(pb.LoadStageRequest(ref=ref("df", i), model_path=model_path, first_layer=a, last_layer=b))
    r0 = forward(stub, "df", 0, 0, PROMPT)
    assert not r0.commitments and not r0.windows and not r0.earlier.commitments
    r1 = forward(stub, "df", 1, 0, r0.output)
    r2 = forward(stub, "df", 2, 0, r1.output)
    assert r2.output_position == len(PROMPT) - 1 and not r2.commitments

    # The next step carries the prompt step's commitments, signed.
    n = len(PROMPT)
    known = [{}, {}, {}]
    r0b = forward(stub, "df", 0, n, [42])
    assert r0b.earlier.position == 0 and len(r0b.earlier.commitments) == n
    check_signed(ident, r0b.earlier, wire.decode_tensor(r0.output, ndim=2), known[0])
    r1b = forward(stub, "df", 1, n, r0b.output)
    check_signed(ident, r1b.earlier, wire.decode_tensor(r1.output, ndim=2), known[1])
    r2b = forward(stub, "df", 2, n, r1b.output)
    assert r2b.earlier.position == n - 1
    check_signed(ident, r2b.earlier, wire.decode_tensor(r2.output, ndim=2), known[2])

    # What no response carried yet comes from Commitments, once.
    d = stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1)))
    assert d.position == n
    check_signed(ident, d, wire.decode_tensor(r1b.output, ndim=2), known[1])
    assert not stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1))).commitments
    # Asked from a position, as often as asked: an answer lost on the way can be had again, with the
    # latest statement of each window the commitments touch.
    for _ in range(2):
        again = stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1), from_position=n))
        assert again == d
    whole = stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1), from_position=0))
    assert list(whole.commitments) == [known[1][p] for p in range(n + 1)] and list(whole.windows) == list(d.windows)
    assert not stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1), from_position=n + 1)).commitments
    with pytest.raises(grpc.RpcError) as e:
        stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1), from_position=-1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "negative" in e.value.details()
    # Reveal waits for the deferred job: the last row is revealable at once.
    rv = stub.Reveal(pb.RevealRequest(ref=ref("df", 2), position=n))
    assert rv.commitment == canonical.commit_rows(wire.decode_tensor(r2b.output, ndim=2))[0]

    # A synchronous step after deferred ones: its own commitments inline, the pending ones in earlier.
    r0c = forward(stub, "df", 0, n + 1, [43], defer=False)
    assert len(r0c.commitments) == 1 and r0c.earlier.position == n and len(r0c.earlier.commitments) == 1
    # Truncate forgets undelivered commitments, also those before the position (a driver resuming
    # after a crash could not check their windows).
    forward(stub, "df", 1, n + 1, r0c.output)
    stub.Truncate(pb.TruncateRequest(ref=ref("df", 1), position=n + 2))
    assert not stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 1))).commitments

    with pytest.raises(grpc.RpcError) as e:
        stub.Commitments(pb.CommitmentsRequest(ref=ref("no-such-session", 0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.Commitments(pb.CommitmentsRequest(ref=ref("df", 0, epoch=0)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_signed_once_per_window(agent, model_path):
    stub, service, ident = agent
    stub.LoadStage(pb.LoadStageRequest(ref=ref("pw", 0), model_path=model_path, first_layer=0, last_layer=9))
    rows = {}

    def step(position, tokens, **kw):
        r = forward(stub, "pw", 0, position, tokens, per_window=True, **kw)
        out = wire.decode_tensor(r.output, ndim=2)
        rows.update({position + i: out[i] for i in range(len(out))})
        return r

    known = {}

    def held(d, first, last):   # d delivers [first, last], signed once in the window of 16 that holds them
        assert d.position == first and len(d.commitments) == last - first + 1 and len(d.windows) == 1
        assert list(d.commitments) == canonical.commit_rows([rows[p] for p in range(first, last + 1)])
        known.update({first + i: c for i, c in enumerate(d.commitments)})
        w = wire.window_from_pb(d.windows[0])
        assert list(w.statement.positions) == list(range(first - first % 16, last + 1))
        assert signing.verify_signature(ident.public_key_text, w.statement.encode(), w.signature)
        assert w.statement.merkle_root == receipts.merkle.merkle_root([known[p] for p in w.statement.positions])

    try:
        # Nothing is committed until a step completes the window 0-15: no response carries anything.
        assert not step(0, PROMPT).earlier.commitments
        for p in range(len(PROMPT), 16):
            assert not step(p, [42 + p]).earlier.commitments
        held(step(16, [7]).earlier, 0, 15)   # the step after the window's last carries all of it
        step(17, [8])
        # Reveal and Commitments commit and sign what is held, as far as it goes.
        rv = stub.Reveal(pb.RevealRequest(ref=ref("pw", 0), position=17))
        assert rv.commitment == canonical.commit_rows(rows[17][None, :])[0]
        held(stub.Commitments(pb.CommitmentsRequest(ref=ref("pw", 0))), 16, 17)
        # A step that is not deferred commits the held ones first; they come in its `earlier`.
        step(18, [9])
        r = step(19, [10], defer=False)
        assert len(r.commitments) == 1 and len(r.windows) == 1
        held(r.earlier, 18, 18)
        # Truncate forgets held rows too.
        step(20, [11])
        stub.Truncate(pb.TruncateRequest(ref=ref("pw", 0), position=20))
        assert not stub.Commitments(pb.CommitmentsRequest(ref=ref("pw", 0))).commitments
    finally:
        service.release_session("pw")


def test_driver_receipts_cover_every_position_with_or_without_deferral(tmp_path, model_path):
    from consortium import generation
    from consortium.driver.policy import LocalPolicy
    from consortium.driver.session import SessionDriver
    from consortium.driver.state import SessionState
    from consortium.layers import LayerRange
    from node_agent import server
    from node_agent.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(tmp_path / "n.pem", "n")
    srv, service, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(threads=1, n_ctx=256))
    runs = {}
    try:
        # (deferred, signed per window, receipt window)
        for how in (("step", False, 16), ("window", True, 16), (False, False, 16), ("window-of-5", True, 5)):
            defer, per_window, window = how
            state = SessionState(session=f"cover-{defer}", prompt_tokens=PROMPT, nodes=["n"] * 3, epochs=[1] * 3,
                                 audit_probability=0.0)
            driver = SessionDriver(session=state.session, model_path=model_path,
                                   split=[LayerRange(a, b) for a, b in SPLIT], n_layers=30,
                                   endpoints={"n": f"127.0.0.1:{port}"}, state=state, policy=LocalPolicy(["n"]),
                                   defer_commitments=bool(defer), sign_per_window=per_window, receipt_window=window)
            try:
                driver.start()
                tokens = generation.generate(driver, PROMPT, 20).tokens
            finally:
                driver.close(release=True)
            runs[how] = tokens, driver.receipts, list(state.done)
        assert not service.held() and not service.sessions()   # each driver released its session
    finally:
        srv.stop(None)
    assert len({tuple(tokens) for tokens, _, _ in runs.values()}) == 1
    for (defer, _, window), (_, recs, done) in runs.items():
        assert recs and all(r["verified"] for r in recs), defer
        # Receipts follow the session's window: each within one window of that size.
        assert all(r["count"] <= window and r["start"] // window == (r["start"] + r["count"] - 1) // window
                   for r in recs), defer
        assert any(r["count"] == window for r in recs), defer
        for s in range(3):
            covered = sorted(p for r in recs if r["stage"] == s for p in range(r["start"], r["start"] + r["count"]))
            # Every position a stage computed is in exactly one receipt (the final stage: one per step).
            first = 0 if s < 2 else len(PROMPT) - 1
            assert covered == list(range(first, done[s])), (defer, s)
    # The same commitments every way: deferral and the window move the signing, not what is signed.
    commits = {how: {(r["stage"], r["start"] + i): c for r in recs for i, c in enumerate(r["receipt"]["commitments"])}
               for how, (_, recs, _) in runs.items()}
    assert len({tuple(sorted(c.items())) for c in commits.values()}) == 1


def test_commitments_lost_on_the_way_are_computed_again_not_taken_for_a_lie(tmp_path, model_path):
    """A response whose deferred commitments never reach the driver (a message lost on a slow link):
    the node's next window statement covers positions the driver holds no commitment for. That is
    nobody's proven fault: the driver rewinds to the first of them, and every position ends up in a
    verified receipt, with the tokens of an undisturbed run and no node accused."""
    from consortium import generation
    from consortium.driver.policy import LocalPolicy
    from consortium.driver.session import SessionDriver
    from consortium.driver.state import SessionState
    from consortium.layers import LayerRange
    from node_agent import server
    from node_agent.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(tmp_path / "n.pem", "n")
    srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(threads=1, n_ctx=256))
    runs = {}
    try:
        for lose in (False, True):
            state = SessionState(session=f"lost-{lose}", prompt_tokens=PROMPT, nodes=["n"] * 3, epochs=[1] * 3,
                                 audit_probability=0.0)
            driver = SessionDriver(session=state.session, model_path=model_path,
                                   split=[LayerRange(a, b) for a, b in SPLIT], n_layers=30,
                                   endpoints={"n": f"127.0.0.1:{port}"}, state=state, policy=LocalPolicy(["n"]))
            honest, lost = driver._check_response, []

            def check_response(s, node, epoch, resp, out, honest=honest, lost=lost, lose=lose):
                if lose and s == 1 and resp.output_position == len(PROMPT) + 3 and not lost:
                    lost.extend(resp.earlier.position + i for i in range(len(resp.earlier.commitments)))
                    resp.ClearField("earlier")
                honest(s, node, epoch, resp, out)
            driver._check_response = check_response
            try:
                driver.start()
                res = generation.generate(driver, PROMPT, 12)
            finally:
                driver.close(release=True)
            runs[lose] = res, lost, driver, state
    finally:
        srv.stop(None)
    (plain, _, _, _), (res, lost, driver, state) = runs[False], runs[True]
    assert lost == [len(PROMPT) + 2]
    assert res.tokens == plain.tokens and res.rewinds == 1
    assert [r["to_position"] for r in state.rollbacks] == lost and "lost on the way" in state.rollbacks[0]["reason"]
    assert state.quarantined == [] and state.failovers == []
    assert_every_position_in_a_receipt(driver, state)


class _Lost(grpc.RpcError):
    """An answer that never arrived: the call ran on the agent, its response went nowhere."""

    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "answer lost on the way (test)"


def test_a_lost_answer_to_commitments_is_asked_for_again(tmp_path, model_path):
    """The session's end asks each stage for the commitments of its last deferred step. The agent
    answers and the answer is lost: the driver asks again from the same position, gets the same
    commitments, and every position of every stage ends up in a verified receipt."""
    from consortium import generation
    from consortium.driver.policy import LocalPolicy
    from consortium.driver.session import SessionDriver
    from consortium.driver.state import SessionState
    from consortium.layers import LayerRange
    from node_agent import server
    from node_agent.identity import NodeIdentity

    ident = NodeIdentity.load_or_create(tmp_path / "n.pem", "n")
    srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(threads=1, n_ctx=256))
    try:
        state = SessionState(session="lost-answer", prompt_tokens=PROMPT, nodes=["n"] * 3, epochs=[1] * 3,
                             audit_probability=0.0)
        driver = SessionDriver(session=state.session, model_path=model_path, split=[LayerRange(a, b) for a, b in SPLIT],
                               n_layers=30, endpoints={"n": f"127.0.0.1:{port}"}, state=state, policy=LocalPolicy(["n"]))
        client, asked = driver.clients["n"], []
        real_call = client.call

        def call(method, request, timeout=None):
            resp = real_call(method, request, timeout=timeout)
            if method == "Commitments":
                asked.append((request.ref.stage, request.from_position, len(resp.commitments)))
                if len(asked) == 1:
                    raise _Lost()
            return resp
        client.call = call
        try:
            driver.start()
            generation.generate(driver, PROMPT, 6)
        finally:
            driver.close(release=True)
    finally:
        srv.stop(None)
    # Stage 0 was asked twice from the same position, and answered the same both times.
    assert asked[0] == asked[1] and asked[0][0] == 0 and asked[0][2] >= 1, asked
    assert state.rollbacks == [] and state.quarantined == []
    assert_every_position_in_a_receipt(driver, state)


def assert_every_position_in_a_receipt(driver, state) -> None:
    """Each stage's positions (the final stage's from the prompt's last row), as far as the stage got,
    are in verified receipts."""
    for s in range(3):
        covered = {p for r in driver.receipts if r["stage"] == s and r["verified"]
                   for p in range(r["start"], r["start"] + r["count"])}
        first = 0 if s < 2 else len(PROMPT) - 1
        assert set(range(first, state.done[s])) <= covered, (s, sorted(set(range(first, state.done[s])) - covered))
