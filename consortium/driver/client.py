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
    # Forward only, for the activation bandwidth of each hop of the star: the stage, the rows sent
    # (token ids or hidden rows) and the serialized bytes driver -> stage (the rest came back).
    stage: int | None = None
    rows: int = 0
    sent: int = 0


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
        if "Forward" in out:
            out["Forward"]["by_stage"] = self.forward_by_stage(recs)
        return out

    @staticmethod
    def forward_by_stage(recs: list[RpcRecord]) -> dict[str, dict]:
        """Per stage, answered Forward calls: rows, bytes each way, and bytes per row each way (the
        hop into the stage carries token ids or hidden rows; the hop back, hidden rows or the final
        stage's logits, plus commitments and signed windows)."""
        out = {}
        for s in sorted({r.stage for r in recs if r.method == "Forward" and r.ok and r.stage is not None}):
            rs = [r for r in recs if r.method == "Forward" and r.ok and r.stage == s]
            rows, sent = sum(r.rows for r in rs), sum(r.sent for r in rs)
            back = sum(r.bytes for r in rs) - sent
            out[str(s)] = {"calls": len(rs), "rows": rows, "bytes_in": sent, "bytes_out": back,
                           "bytes_in_per_row": round(sent / rows, 1) if rows else None,
                           "bytes_out_per_row": round(back / rows, 1) if rows else None}
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
            sent = request.ByteSize()
            size = sent + (resp.ByteSize() if resp is not None else 0)
            hop = {}
            if method == "Forward":
                rows = len(request.tokens) or (request.hidden.shape[0] if request.hidden.shape else 0)
                hop = {"stage": request.ref.stage, "rows": rows, "sent": sent}
            self.log.add(RpcRecord(self.name, method, (time.perf_counter() - t0) * 1000, size, ok, **hop))

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
