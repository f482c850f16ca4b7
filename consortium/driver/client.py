"""Two gRPC connections per node agent (the session's calls; audits, on their own) and its data lane,
recording every call's time and payload bytes."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
import threading
import time

import grpc
import numpy as np

from consortium import wire
from consortium.wire import lane
from consortium.tls import secure_channel

log = logging.getLogger("consortium.driver")


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
        stage's logits, plus commitments and signed windows, and a sampled token)."""
        out = {}
        for s in sorted({r.stage for r in recs if r.method == "Forward" and r.ok and r.stage is not None}):
            rs = [r for r in recs if r.method == "Forward" and r.ok and r.stage == s]
            rows, sent = sum(r.rows for r in rs), sum(r.sent for r in rs)
            # A sampled token's logit row came in a frame of its own (ForwardRow).
            back = sum(r.bytes for r in rs) - sent + sum(r.bytes for r in recs if r.method == "ForwardRow" and r.stage == s)
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


class StepError(grpc.RpcError):
    """A data lane step's failure, read as the gRPC status a Forward call would have ended with."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LaneClient:
    """Forward steps to one agent over its data lane (consortium.wire.lane): the calling thread writes
    the request and reads the answer on one TLS socket, no hand-offs between threads. A step not
    answered within its timeout, or a broken connection, closes the socket (DEADLINE_EXCEEDED,
    UNAVAILABLE); the next step connects again. An agent's refusal leaves the connection usable."""

    CONNECT_TIMEOUT_S = 3.0   # at most, TCP and TLS handshakes: a lane a firewall drops costs this once

    def __init__(self, name: str, host: str, port: int, tls=None):
        self.name, self.address = name, (host.strip("[]"), port)
        self._tls, self._ctx = tls, None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.connected = False   # ever: a lane that never connected may be unreachable from here
        self.answered = False    # on this connection: until then the agent may be refusing it (lane full)
        # A sampled token's answer (row_follows) is followed on the connection by the step's whole
        # response: read by read_row(), or by the next exchange() first and kept, in order, for
        # read_row() (the checker reading rows may be a step or two behind).
        self._row_pending = False
        self._rows: collections.deque[tuple["wire.pb.ForwardResponse", int] | StepError] = collections.deque()

    def step(self, request, timeout: float):
        return self.exchange(request, timeout)[0]

    def exchange(self, request, timeout: float) -> tuple["wire.pb.ForwardResponse", int]:
        """step(), and the response's size in bytes (ByteSize() would serialize a logit row again:
        about 0.24 ms per token)."""
        with self._lock:
            if self._row_pending:
                self._rows.append(self._receive_row(timeout))
            with self._socket_errors(timeout):
                if self._sock is None:
                    self._connect(min(timeout, self.CONNECT_TIMEOUT_S))
                self._sock.settimeout(timeout)
                self._sock.sendall(lane.request_frame(request.SerializeToString()))
            resp, n = self._receive(timeout)
            self._row_pending = resp.row_follows
            return resp, n

    def read_row(self, timeout: float) -> tuple["wire.pb.ForwardResponse", int]:
        """The whole response (logit row included) of the earliest step answered with row_follows
        whose row was not read yet, and its size; StepError if the connection broke before it came."""
        with self._lock:
            if self._rows:
                row = self._rows.popleft()
            elif self._row_pending:
                row = self._receive_row(timeout)
            else:
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION, f"no row of {self.name}'s is awaited")
        if isinstance(row, StepError):
            raise row
        return row

    def _receive_row(self, timeout: float):
        self._row_pending = False
        try:
            with self._socket_errors(timeout):
                self._sock.settimeout(timeout)
            return self._receive(timeout)
        except StepError as e:
            return e

    def _receive(self, timeout: float) -> tuple["wire.pb.ForwardResponse", int]:
        """One answer frame on the connection (under self._lock), its error raised as StepError."""
        with self._socket_errors(timeout):
            n, code = lane.RESPONSE_HEAD.unpack(lane.recv_exact(self._sock, lane.RESPONSE_HEAD.size))
            body = lane.recv_exact(self._sock, n)
            self.answered = True
        if code:
            raise StepError(lane.CODES.get(code, grpc.StatusCode.UNKNOWN), body.decode(errors="replace"))
        return wire.pb.ForwardResponse.FromString(body), n

    @contextlib.contextmanager
    def _socket_errors(self, timeout: float):
        """A socket error on the connection (under self._lock) closes it and is raised as StepError."""
        try:
            yield
        except socket.timeout:
            self._close()
            raise StepError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{self.name} did not answer within {timeout:g} s") from None
        except OSError as e:   # lane.LaneClosed included
            self._close()
            raise StepError(grpc.StatusCode.UNAVAILABLE, f"data lane to {self.name}: {e}") from None

    def _connect(self, timeout: float) -> None:
        sock = socket.create_connection(self.address, timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                if self._ctx is None:
                    self._ctx = self._tls.ssl_context(server=False, peer_name=self.name)
                sock = self._ctx.wrap_socket(sock, server_hostname=self.name)
        except BaseException:
            sock.close()
            raise
        self._sock, self.connected, self.answered = sock, True, False

    def _close(self) -> None:
        if self._row_pending:
            self._rows.append(StepError(grpc.StatusCode.UNAVAILABLE,
                                        f"data lane to {self.name} closed before the row of its token came"))
            self._row_pending = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


# The calls that carry audits' bulk (replayed inputs, recomputed rows, window states).
AUDIT_METHODS = frozenset({"Audit", "States"})


class NodeClient:
    def __init__(self, name: str, endpoint: str, log: RpcLog, timeout_s: float = 30.0, tls=None):
        """`tls` (consortium.tls.Credentials): mutual TLS, the agent must prove it is node `name`;
        None: plaintext (development only)."""
        self.name, self.endpoint, self.log, self.timeout_s = name, endpoint, log, timeout_s

        def channel(extra=()):
            options = [*wire.CHANNEL_OPTIONS, *extra]
            return (secure_channel(endpoint, name, tls, options) if tls is not None
                    else grpc.insecure_channel(endpoint, options=options))
        self.channel = channel()
        self.stub = wire.pb_grpc.NodeAgentStub(self.channel)
        # Audits on a TCP connection of their own (a subchannel pool of the channel's own: channels
        # with equal options share one). Sharing one, a small call waits behind every audit byte
        # already in the socket: on a 384 kbit/s link, 7-10 s behind one final-stage audit's 590 KB
        # of logit rows, against 0.3 s on its own connection (measured), and the session's calls
        # ran into their deadlines while optimistic audits were in flight.
        self.audit_channel = channel([("grpc.use_local_subchannel_pool", 1)])
        self._stubs = dict.fromkeys(AUDIT_METHODS, wire.pb_grpc.NodeAgentStub(self.audit_channel))
        self.tls = tls
        self._lane: LaneClient | None = None

    def _stub(self, method: str):
        return self._stubs.get(method, self.stub)

    def call(self, method: str, request, timeout: float | None = None):
        t0 = time.perf_counter()
        resp, ok = None, False
        try:
            resp = getattr(self._stub(method), method)(request, timeout=timeout or self.timeout_s)
            ok = True
            return resp
        finally:
            if method == "Forward":
                self._log_forward(request, resp.ByteSize() if resp is not None else 0, t0, ok)
            else:
                size = request.ByteSize() + (resp.ByteSize() if resp is not None else 0)
                self.log.add(RpcRecord(self.name, method, (time.perf_counter() - t0) * 1000, size, ok))

    def _log_forward(self, request, received: int, t0: float, ok: bool) -> None:
        sent = request.ByteSize()
        rows = len(request.tokens) or (request.hidden.shape[0] if request.hidden.shape else 0)
        self.log.add(RpcRecord(self.name, "Forward", (time.perf_counter() - t0) * 1000, sent + received, ok,
                               stage=request.ref.stage, rows=rows, sent=sent))

    def use_data_lane(self, port: int, host: str | None = None) -> None:
        """Send Forward steps over the agent's data lane at `port` (from its LoadStageResponse; 0: none,
        steps go as Forward calls) on its endpoint's host, or on `host` (a relay in front of it)."""
        address = ((host or self.endpoint.rsplit(":", 1)[0]).strip("[]"), port)
        if self._lane is not None and self._lane.address == address:
            return
        if self._lane is not None:
            self._lane.close()
        self._lane = LaneClient(self.name, *address, self.tls) if port else None

    @property
    def lane_address(self) -> tuple[str, int] | None:
        """Where Forward steps go over the data lane; None: as Forward calls."""
        lane_ = self._lane
        return lane_.address if lane_ is not None else None

    def forward(self, request: "wire.pb.ForwardRequest", timeout: float | None = None) -> "wire.pb.ForwardResponse":
        """A Forward step over the agent's data lane, or as a Forward call when it offers no lane or
        the lane cannot be reached (then for good: a lane a firewall drops is not tried each step).
        Logged as a Forward call."""
        lane_ = self._lane
        if lane_ is None:
            return self.call("Forward", request, timeout)
        t0 = time.perf_counter()
        received, ok = 0, False
        try:
            resp, received = lane_.exchange(request, timeout or self.timeout_s)
            ok = True
            return resp
        except StepError as e:
            # The agent failed, not the lane, once the connection has answered, or when it connected
            # and then missed the deadline: the caller fails the stage over. A connection closed
            # before any answer is a lane that is full or cut off: Forward calls tell which.
            if lane_.answered or (lane_.connected and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            log.warning("data lane to %s unreachable (%s: %s); Forward steps go as gRPC calls", self.name,
                        e.code().name, e.details())
            self._lane = None
        finally:
            self._log_forward(request, received, t0, ok)
        return self.forward(request, timeout)

    def read_row(self, stage: int, timeout: float | None = None) -> "wire.pb.ForwardResponse":
        """The whole response, logit row included, of this node's last step that answered a sampled
        token alone (LaneClient.read_row). Logged as ForwardRow: its bytes count as the stage's."""
        lane_ = self._lane
        t0, received, ok = time.perf_counter(), 0, False
        try:
            if lane_ is None:
                raise StepError(grpc.StatusCode.UNAVAILABLE, f"the data lane to {self.name} is gone")
            resp, received = lane_.read_row(timeout or self.timeout_s)
            ok = True
            return resp
        finally:
            self.log.add(RpcRecord(self.name, "ForwardRow", (time.perf_counter() - t0) * 1000, received, ok,
                                   stage=stage))

    def call_while(self, method: str, request, alive, timeout: float | None = None, every_s: float = 0.25):
        """call() for long requests (audits): abandoned as soon as alive() turns false, instead of
        holding the caller until a long deadline runs out on a node known to be gone."""
        t0 = time.perf_counter()
        resp, ok = None, False
        fut = getattr(self._stub(method), method).future(request, timeout=timeout or self.timeout_s)
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
            for item in getattr(self._stub(method), method)(request, timeout=timeout or self.timeout_s):
                out.append(item)
            ok = True
            return out
        finally:
            size = request.ByteSize() + sum(x.ByteSize() for x in out)
            self.log.add(RpcRecord(self.name, method, (time.perf_counter() - t0) * 1000, size, ok))

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
        self.channel.close()
        self.audit_channel.close()
