"""The agent's registrar against an API server that has gone silent (a cut link: the connection is
accepted, nothing ever comes back): its periodic requests give up on their own, so the loop tries
again and the agent fences stale stages soon after the link heals, not when TCP gives up."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from kubernetes import client

from node_agent.registration import Registrar


@pytest.fixture()
def silent_api_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)   # the kernel completes the handshakes; nobody ever reads or answers
    saved = client.Configuration.get_default_copy()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{srv.getsockname()[1]}"
    client.Configuration.set_default(cfg)
    try:
        yield
    finally:
        client.Configuration.set_default(saved)
        srv.close()


@pytest.mark.parametrize("call", ["renew_lease", "reconcile_assignments"])
def test_periodic_requests_give_up_on_a_silent_api_server(silent_api_server, call):
    reg = Registrar(None, name="n0", endpoint="127.0.0.1:1", labels={}, namespace="consortium-system",
                    renew_seconds=0.5)
    outcome = {}

    def run():
        t0 = time.monotonic()
        try:
            getattr(reg, call)()
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - whatever the client raises for a timeout
            outcome["error"] = e
        outcome["s"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), f"{call} still waiting after 30 s"
    assert outcome["error"] is not None and "timed out" in str(outcome["error"]).lower(), outcome
    assert outcome["s"] >= reg.request_timeout_s * 0.9
