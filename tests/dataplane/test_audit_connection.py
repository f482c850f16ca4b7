"""Audits travel on a connection of their own: on a slow link, a session's small call is not held
behind the megabytes an audit's answer puts in the socket (it used to wait there until its
deadline: a chaos trial lost the last receipt of a slowed node that way)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from consortium import netlab, wire
from consortium.driver.client import AUDIT_METHODS, NodeClient, RpcLog

pytestmark = pytest.mark.skipif(netlab.available() is not None, reason=str(netlab.available()))

# A node that answers Audit with three final-stage logit rows (590 KB), and Health.
SERVER = """
import sys, time
from concurrent import futures
import grpc, numpy as np
from consortium import wire

class Node(wire.pb_grpc.NodeAgentServicer):
    def Audit(self, request, context):
        resp = wire.pb.AuditResponse()
        wire.put_tensor(resp.rows, np.ones((3, 49152), np.float32))
        return resp

    def Health(self, request, context):
        return wire.pb.HealthResponse()

server = grpc.server(futures.ThreadPoolExecutor(4), options=wire.CHANNEL_OPTIONS)
wire.pb_grpc.add_NodeAgentServicer_to_server(Node(), server)
server.add_insecure_port(sys.argv[1] + ":7777")
server.start()
print("serving", flush=True)
time.sleep(300)
"""


def test_audit_methods_have_their_own_connection():
    c = NodeClient("n", "127.0.0.1:1", RpcLog())
    try:
        assert AUDIT_METHODS == {"Audit", "States"}
        assert c.audit_channel is not c.channel
        assert c._stub("Audit") is c._stub("States") is not c._stub("Commitments") is c.stub
    finally:
        c.close()


def test_a_small_call_is_not_held_behind_an_audit_on_a_slow_link():
    with netlab.Lab(["slow"]) as lab:
        host = lab.hosts["slow"]
        server = subprocess.Popen(host.prefix() + [sys.executable, "-c", SERVER, host.address],
                                  stdout=subprocess.PIPE, text=True)
        client = NodeClient("slow", f"{host.address}:7777", RpcLog(), timeout_s=60)
        try:
            assert server.stdout.readline().strip() == "serving"
            client.call("Health", wire.pb.HealthRequest())
            host.slow(384)
            audit: dict = {}

            def run_audit():
                t0 = time.monotonic()
                audit["rows"] = wire.decode_tensor(client.call_while("Audit", wire.pb.AuditRequest(),
                                                                     lambda: True).rows, ndim=2)
                audit["s"] = time.monotonic() - t0

            th = threading.Thread(target=run_audit)
            th.start()
            time.sleep(1.0)   # its answer is on the wire
            t0 = time.monotonic()
            client.call("Health", wire.pb.HealthRequest())
            health_s = time.monotonic() - t0
            th.join(120)
            assert audit["rows"].shape == (3, 49152)
            # 590 KB at 384 kbit/s take about 13 s; behind them on one connection the call took
            # 0.6-0.8 of the audit's time, on its own about 0.02.
            assert health_s < 0.25 * audit["s"], (health_s, audit["s"])
        finally:
            client.close()
            server.kill()
            server.wait()
