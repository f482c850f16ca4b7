"""A node agent fetching a model by URL (FetchModel, and LoadStage's model_url) from a real HTTP server
on loopback: refused while it fetches, saying how far; loaded once the bytes hash to the pin; a
file that hashes otherwise is refused with both digests, and malformed requests with the reason."""
from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from consortium import fetch, wire
from consortium.layers import LayerRange
from consortium.wire import pb
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.slicing import sha256_file
from node_agent.engine.stage import StageConfig


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(model_path, agent, tmp_path):
    """The model's folder over HTTP, and the agent fetching into a cache of this test's own."""
    _, service, _ = agent
    handler = functools.partial(QuietHandler, directory=str(Path(model_path).parent))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    kept, service.fetches = service.fetches, fetch.Fetches(tmp_path)
    yield f"http://127.0.0.1:{srv.server_address[1]}/{Path(model_path).name}"
    service.fetches = kept
    srv.shutdown()
    srv.server_close()


def until(call, done, timeout=120):
    deadline = time.monotonic() + timeout
    while not done(r := call()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return r


def test_an_agent_fetches_a_model_by_url_and_loads_it_once_pinned(agent, model_path, served):
    stub, _, _ = agent
    sha = sha256_file(model_path)
    load = pb.LoadStageRequest(ref=pb.StageRef(session="fetched", stage=0, epoch=1), model_path="/not/here.gguf",
                               model_sha256=sha, model_url=served, first_layer=0, last_layer=9)
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadStage(load)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "fetching the model" in e.value.details()

    got = until(lambda: stub.FetchModel(pb.FetchModelRequest(url=served, sha256=sha)), lambda r: r.done or r.error)
    assert got.done and not got.error and got.bytes == got.total == Path(model_path).stat().st_size
    assert stub.LoadStage(load).n_layers_total == 30
    # What the operator, which read the header alone, asks: the digest of the verified file's first bytes.
    length, digest = fetch.header_digest(Path(model_path))
    said = stub.FetchModel(pb.FetchModelRequest(url=served, sha256=sha, header_bytes=length))
    assert said.done and said.header_sha256 == digest
    out = stub.Forward(pb.ForwardRequest(ref=load.ref, position=0, tokens=[1, 504, 3458]))
    with LocalPipeline(model_path, [LayerRange(0, 9), LayerRange(10, 29)], StageConfig(threads=1)) as pipe:
        want = pipe.stages[0].forward(0, 0, tokens=np.array([1, 504, 3458], np.int32))
    assert np.array_equal(wire.decode_tensor(out.output, ndim=2), want)   # the same bytes, the same rows


def test_a_fetch_that_hashes_otherwise_or_a_malformed_one_is_refused(agent, served):
    stub, _, _ = agent
    wrong = "1" * 64
    got = until(lambda: stub.FetchModel(pb.FetchModelRequest(url=served, sha256=wrong)), lambda r: r.done or r.error)
    assert not got.done and f"not the {wrong}" in got.error
    for url, sha, words in (("file:///etc/hostname", wrong, "not an http(s) URL"), (served, "abc", "64 lower-case hex")):
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchModel(pb.FetchModelRequest(url=url, sha256=sha))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.FetchModel(pb.FetchModelRequest(url=served, sha256=wrong, header_bytes=-1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header_bytes" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadStage(pb.LoadStageRequest(ref=pb.StageRef(session="unpinned", stage=0, epoch=1), model_url=served,
                                           first_layer=0, last_layer=9))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pins it" in e.value.details()
    assert stub.Health(pb.HealthRequest()).node_id   # and it keeps serving
