"""One gRPC connection per node agent, recording every call's time and payload bytes."""
from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np

from consortium import wire


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


class Abandoned(grpc.RpcError):
    """A call given up because its node was declared dead meanwhile; reads as UNAVAILABLE."""

    def __init__(self, node: str):
        super().__init__(f"{node} was declared dead during the call")
        self.node = node

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


class NodeClient:
    def __init__(self, name: str, endpoint: str, log: RpcLog, timeout_s: float = 30.0):
        self.name, self.endpoint, self.log, self.timeout_s = name, endpoint, log, timeout_s
        self.channel = grpc.insecure_channel(endpoint, options=wire.CHANNEL_OPTIONS)
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

    def call_while(self, method: str, request, alive, timeout: float | None = None, every_s: float = 0.25):
        """call() for long requests (audits): abandoned as soon as alive() turns false, instead of
        holding the caller until a long deadline runs out on a node known to be gone."""
        t0 = time.perf_counter()
        resp, ok = None, False
        fut = getattr(self.stub, method).future(request, timeout=timeout or self.timeout_s)
        try:
            while True:
                try:
                    resp = fut.result(timeout=every_s)
                    ok = True
                    return resp
                except grpc.FutureTimeoutError:
                    if not alive():
                        fut.cancel()
                        raise Abandoned(self.name) from None
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
