import grpc
import pytest

from consortium import wire
from consortium.models import resolve_model
from node_agent import server
from node_agent.identity import NodeIdentity


@pytest.fixture(scope="module")
def model_path():
    return str(resolve_model(None))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A real node agent on a loopback port, in this process; yields (stub, service, identity)."""
    ident = NodeIdentity.load_or_create(tmp_path_factory.mktemp("key") / "node.pem", "test-node")
    srv, service, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(threads=1, n_ctx=512))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS)
    stub = wire.pb_grpc.NodeAgentStub(channel)
    stub.channel = channel   # for calls with raw bytes instead of messages
    stub.endpoint = f"127.0.0.1:{port}"
    yield stub, service, ident
    channel.close()
    srv.stop(None)
