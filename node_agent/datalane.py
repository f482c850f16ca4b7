"""The agent's end of the data lane (consortium.wire.lane): Forward steps on a plain TLS socket, one
thread per connection that reads a frame, runs the step and writes the answer itself."""
from __future__ import annotations

import logging
import socket
import ssl
import threading

from consortium.wire import MAX_MESSAGE_BYTES, lane

HANDSHAKE_TIMEOUT_S = 10.0

log = logging.getLogger("node_agent.datalane")


class DataLane:
    """The listening socket and its connections; each connection is served by a thread of its own
    until the driver hangs up or close() shuts it down.

    A driver holds one connection per agent, so `max_connections` is far more than sessions need;
    beyond it a connection is closed at once (the driver then sends its steps as Forward calls),
    so that a flood of connections cannot take a thread and a buffer each without end."""

    max_connections = 64

    def __init__(self, service, host: str, port: int = 0, tls=None):
        """Listen on host:port (0: any free port) for `service` (a NodeAgentService). `tls`
        (consortium.tls.Credentials): mutual TLS with the same certificate as the gRPC port."""
        self.service = service
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.create_server((host.strip("[]"), port), family=family)
        self.port = self._sock.getsockname()[1]
        self._ctx = tls.ssl_context(server=True) if tls is not None else None
        self._closed = threading.Event()
        self._conns: dict[object, socket.socket] = {}   # one key per connection: its socket, TLS once wrapped
        self._lock = threading.Lock()
        self._refused = 0
        threading.Thread(target=self._accept, name="lane-accept", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the accepting thread; close() alone does not
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            key = object()
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns[key] = conn
                else:
                    self._refused += 1
                    refused = self._refused
            if full:
                conn.close()
                if refused == 1 or refused % 1000 == 0:
                    log.warning("data lane: %d connection(s) refused so far, %d already open", refused,
                                self.max_connections)
                continue
            threading.Thread(target=self._serve, args=(key, conn), name="lane", daemon=True).start()

    def _serve(self, key: object, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                conn = self._ctx.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._conns[key] = conn   # what close() must shut down now
                conn.settimeout(None)
                if not self._caller_allowed(conn):
                    return
            while self._answer(conn):
                pass
        except OSError:   # lane.LaneClosed included
            pass   # the driver went away (or never finished its handshake)
        finally:
            with self._lock:
                self._conns.pop(key, None)
            conn.close()

    def _caller_allowed(self, conn: ssl.SSLSocket) -> bool:
        names = [v for k, v in (conn.getpeercert() or {}).get("subjectAltName", ()) if k == "DNS"]
        refusal = self.service.lane_caller(names)
        if refusal is not None:
            conn.sendall(refusal)   # say why before hanging up
        return refusal is None

    def _answer(self, conn) -> bool:
        """Read one request and write its answer; False once the connection cannot go on."""
        (n,) = lane.REQUEST_HEAD.unpack(lane.recv_exact(conn, lane.REQUEST_HEAD.size))
        if n > MAX_MESSAGE_BYTES:
            conn.sendall(self.service.lane_oversized(n))
            return False
        frames, jobs = self.service.lane_step(lane.recv_exact(conn, n))
        for frame in frames:   # a sampled token's logit row is made once the token is out
            conn.sendall(frame() if callable(frame) else frame)
        for job in jobs:   # the response is out: its commit-and-sign job may start
            job.start()
        return True
