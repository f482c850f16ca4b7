"""The data lane (consortium.wire.lane): the same steps as Forward calls, the same refusals with the
same reasons, deadlines kept, mutual TLS, and an agent that goes on serving whatever it is sent."""
import logging
import socket
import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest

from consortium import tls, wire
from consortium.driver.client import LaneClient, NodeClient, RpcLog
from consortium.wire import lane, pb
from node_agent import server
from node_agent.datalane import DataLane
from node_agent.identity import NodeIdentity

from .test_agent import PROMPT, load, malformed_requests, ref


def lane_of(service) -> LaneClient:
    return LaneClient("test-node", "127.0.0.1", service.data_port)


def steps(forward, session, position, tokens):
    """One step through the three stages with `forward(request)`; the three responses."""
    r0 = forward(pb.ForwardRequest(ref=ref(session, 0), position=position, tokens=tokens))
    r1 = forward(pb.ForwardRequest(ref=ref(session, 1), position=position, hidden=r0.output))
    r2 = forward(pb.ForwardRequest(ref=ref(session, 2), position=position, hidden=r1.output))
    return r0, r1, r2


def test_lane_gives_what_forward_calls_give(agent, model_path):
    stub, service, _ = agent
    assert service.data_port > 0
    lane_client = lane_of(service)
    try:
        got = {}
        for name, forward in (("call", stub.Forward), ("lane", lambda r: lane_client.step(r, 30.0))):
            load(stub, model_path, f"same-{name}")
            got[name] = [*steps(forward, f"same-{name}", 0, PROMPT), *steps(forward, f"same-{name}", len(PROMPT), [42])]
        for want, have in zip(got["call"], got["lane"]):
            assert want.output == have.output and list(want.commitments) == list(have.commitments)
            # the same windows signed (for another session name, so with other signatures)
            assert [w.merkle_root for w in want.windows] == [w.merkle_root for w in have.windows]
            assert len(have.windows) == len(want.windows) and all(w.signature for w in have.windows)
    finally:
        lane_client.close()


def test_lane_refuses_what_forward_refuses_and_goes_on(agent, model_path):
    stub, service, _ = agent
    load(stub, model_path, "mf")
    c = lane_of(service)
    try:
        before = service.rejected
        n = 0
        for method, req, reason in malformed_requests(model_path):
            if method != "Forward":
                continue
            with pytest.raises(grpc.RpcError) as e:
                c.step(req, 30.0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (reason, e.value.details())
            assert reason.lower() in e.value.details().lower(), (reason, e.value.details())
            n += 1
        with pytest.raises(grpc.RpcError) as e:   # a stale epoch
            c.step(pb.ForwardRequest(ref=ref("mf", 0, 0), position=0, tokens=PROMPT), 30.0)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in e.value.details()
        assert service.rejected - before == n + 1
        steps(lambda r: c.step(r, 30.0), "mf", 0, PROMPT)   # the same connection, still serving
    finally:
        c.close()


def raw_lane(service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.data_port), timeout=10)


def answer(sock) -> tuple[grpc.StatusCode, bytes]:
    n, code = lane.RESPONSE_HEAD.unpack(lane.recv_exact(sock, lane.RESPONSE_HEAD.size))
    return lane.CODES[code], bytes(lane.recv_exact(sock, n))


def test_lane_fuzz_random_frames_truncations_and_oversized_lengths(agent, model_path):
    stub, service, _ = agent
    load(stub, model_path, "lz")
    rng = np.random.default_rng(3)
    with raw_lane(service) as s:
        for _ in range(300):   # random bodies: whatever protobuf makes of them, a status with a reason
            body = bytes(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8))
            s.sendall(lane.request_frame(body))
            code, reason = answer(s)
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), reason
            assert reason
    with raw_lane(service) as s:   # a length over the limit: refused, and the connection closed
        s.sendall(lane.REQUEST_HEAD.pack(wire.MAX_MESSAGE_BYTES + 1))
        code, reason = answer(s)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and b"over the limit" in reason
        assert s.recv(1) == b""
    for cut in (2, 7):   # connections dropped mid-frame leave nothing behind
        with raw_lane(service) as s:
            s.sendall(lane.request_frame(b"\x0a\x05hello")[:cut])
    c = lane_of(service)
    try:
        steps(lambda r: c.step(r, 30.0), "lz", 0, PROMPT)
    finally:
        c.close()


def test_a_lane_that_does_not_answer_misses_its_deadline():
    """A listener that never answers (as a hung agent's kernel completes the TCP handshake for it):
    DEADLINE_EXCEEDED, not a hang."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        c = LaneClient("hung", "127.0.0.1", silent.getsockname()[1])
        with pytest.raises(grpc.RpcError) as e:
            c.step(pb.ForwardRequest(ref=ref("x", 0), position=0, tokens=[1]), 0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        c.close()


def test_an_unreachable_lane_falls_back_to_forward_calls(agent, model_path, caplog):
    stub, service, _ = agent
    load(stub, model_path, "fb")
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()   # nothing listens there now
    client = NodeClient("test-node", stub.endpoint, RpcLog(), 30.0)
    try:
        client.use_data_lane(dead_port)
        with caplog.at_level(logging.WARNING, logger="consortium.driver"):
            r0, _, r2 = steps(client.forward, "fb", 0, PROMPT)
        assert "unreachable" in caplog.text and r2.output.shape[0] == 1
        assert client.lane_address is None   # for good
        forwards = [r for r in client.log.records if r.method == "Forward"]
        assert [r.ok for r in forwards] == [False, True, True, True]   # the lane tried once
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    ca = tls.CertificateAuthority.create()
    node = tls.Credentials(*ca.issue("n1"), ca.cert_pem)
    driver = tls.Credentials(*ca.issue(tls.DRIVER_NAME, server=False), ca.cert_pem)
    other = tls.Credentials(*ca.issue("n2"), ca.cert_pem)
    ident = NodeIdentity.load_or_create(tmp_path_factory.mktemp("key") / "node.pem", "n1")
    srv, service, _ = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="n1", threads=1, n_ctx=64),
                                   tls=node)
    yield service, driver, other
    srv.stop(None)


def test_lane_under_mutual_tls_answers_the_driver_only(tls_agent):
    service, driver, other = tls_agent
    req = pb.ForwardRequest(ref=ref("nobody", 0), position=0, tokens=[1])

    def step(name, creds):
        c = LaneClient(name, "127.0.0.1", service.data_port, creds)
        try:
            return c.step(req, 10.0)
        finally:
            c.close()
    with pytest.raises(grpc.RpcError) as e:   # through the handshake, to the agent's own refusal
        step("n1", driver)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown session" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:   # another agent's certificate may not call
        step("n1", other)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    with pytest.raises(grpc.RpcError) as e:   # the agent is not the node the driver expects
        step("n2", driver)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "certificate" in e.value.details().lower()
    with socket.create_connection(("127.0.0.1", service.data_port), timeout=10) as s:   # no TLS at all
        s.sendall(lane.request_frame(req.SerializeToString()))
        try:
            reply = s.recv(64)
        except ConnectionResetError:
            reply = b""
        assert reply[:1] in (b"", b"\x15")   # closed, or a TLS alert record: never an answer
    with pytest.raises(grpc.RpcError) as e:   # and the agent still answers the driver
        step("n1", driver)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_long_declared_frame_reserves_memory_only_as_its_bytes_arrive():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 5000)
        a.close()
        tracemalloc.start()
        try:
            with pytest.raises(lane.LaneClosed, match="after 5000 of 209715200 bytes"):
                lane.recv_exact(b, 200 * 1024 * 1024)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * lane.EAGER_BYTES
    c, d = socket.socketpair()
    with c, d:   # and a long frame that does arrive is read whole
        body = np.random.default_rng(1).integers(0, 256, 3 * lane.EAGER_BYTES + 7, dtype=np.uint8).tobytes()
        t = threading.Thread(target=c.sendall, args=(body,))
        t.start()
        assert lane.recv_exact(d, len(body)) == body
        t.join()


def test_a_full_lane_closes_new_connections_and_the_driver_goes_on_with_forward_calls(agent, model_path, caplog,
                                                                                      monkeypatch):
    stub, service, _ = agent
    load(stub, model_path, "full")
    monkeypatch.setattr(DataLane, "max_connections", 2)
    held = [raw_lane(service), raw_lane(service)]
    try:
        with raw_lane(service) as third:
            assert third.recv(1) == b""   # closed at once
        client = NodeClient("test-node", stub.endpoint, RpcLog(), 30.0)
        try:
            client.use_data_lane(service.data_port)
            with caplog.at_level(logging.WARNING, logger="consortium.driver"):
                r0, _, r2 = steps(client.forward, "full", 0, PROMPT)
            assert "unreachable" in caplog.text and r2.output.shape[0] == 1
            assert client.lane_address is None
        finally:
            client.close()
    finally:
        for s in held:
            s.close()
    c = lane_of(service)   # the slots come back once their connections are gone
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c.step(pb.ForwardRequest(ref=ref("full", 0), position=len(PROMPT), tokens=[5]), 10.0)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        c.close()
