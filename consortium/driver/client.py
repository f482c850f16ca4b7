"""One gRPC connection per node agent, recording every call's time and payload bytes."""
from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np

from consortium import wire
from consortium.tls import secure_channel


@dataclasses.dataclass(frozen=True)
class RpcRecord:
    node: str
    method: str
    ms: float
    bytes: int          # serialized request + response(s)
    ok: bool


class RpcLog:
    def __init__(self):
        self._lock = threading.Lock()
        self.records: list[RpcRecord] = []

    def add(self, r: RpcRecord) -> None:
        with self._lock:
            self.records.append(r)

    def summary(self) -> dict:
        """Per method: count, p50_ms, p95_ms, bytes (total) and errors."""
        with self._lock:
            recs = list(self.records)
        out = {}
        for m in sorted({r.method for r in recs}):
            rs = [r for r in recs if r.method == m]
            ms = np.array([r.ms for r in rs])
            out[m] = {"count": len(rs), "p50_ms": round(float(np.percentile(ms, 50)), 3),
                      "p95_ms": round(float(np.percentile(ms, 95)), 3), "bytes": int(sum(r.bytes for r in rs)),
                      "bytes_per_call": int(sum(r.bytes for r in rs) / len(rs)), "errors": sum(not r.ok for r in rs)}
        return out


class NodeClient:
    def __init__(self, name: str, endpoint: str, log: RpcLog, timeout_s: float = 30.0, tls=None):
        """`tls` (consortium.tls.Credentials): mutual TLS, the agent must prove it is node `name`;
        None: plaintext (development only)."""
        self.name, self.endpoint, self.log, self.timeout_s = name, endpoint, log, timeout_s
        self.channel = (secure_channel(endpoint, name, tls, wire.CHANNEL_OPTIONS) if tls is not None
                        else grpc.insecure_channel(endpoint, options=wire.CHANNEL_OPTIONS))
        self.stub = wire.pb_grpc.NodeAgentStub(self.channel)

    def call(self, method: str, request, timeout: float | None = None):
        t0 = time.perf_counter()
        resp, ok = None, False
        try:
            resp = getattr(self.stub, method)(request, timeout=timeout or self.timeout_s)
            ok = True
            return resp
        finally:
            size = request.ByteSize() + (resp.ByteSize() if resp is not None else 0)
            self.log.add(RpcRecord(self.name, method, (time.perf_counter() - t0) * 1000, size, ok))

    def stream(self, method: str, request, timeout: float | None = None) -> list:
        t0 = time.perf_counter()
        out, ok = [], False
        try:
            for item in getattr(self.stub, method)(request, timeout=timeout or self.timeout_s):
                out.append(item)
            ok = True
            return out
        finally:
            size = request.ByteSize() + sum(x.ByteSize() for x in out)
            self.log.add(RpcRecord(self.name, method, (time.perf_counter() - t0) * 1000, size, ok))

    def close(self) -> None:
        self.channel.close()
