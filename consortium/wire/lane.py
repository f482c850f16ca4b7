"""The data lane: Forward steps as length-prefixed protobuf frames on one mutual-TLS socket.

Python's gRPC hands every message between several threads on each side: on loopback a unary call
costs 0.9 ms with a hidden row back and 1.7 ms with a logit row, against 0.14 and 0.38 ms for the same
bytes on a TLS socket that the calling thread writes and reads itself. A token crosses three such
hops, so the session driver sends its Forward steps over this lane when the agent offers one
(LoadStageResponse.data_port), and as Forward calls when it does not or the lane cannot be reached.

Frames, little-endian:
  request:  u32 n, then n bytes of a ForwardRequest
  response: u32 n, u8 code, then n bytes: a ForwardResponse when code is 0 (OK), else the reason
            (UTF-8) for that gRPC status code: the status and reason a Forward call would get
A response with row_follows (the final stage's sampled token alone) is followed by a second response
frame: the step's whole ForwardResponse, logit row included.
A request over MAX_MESSAGE_BYTES is answered with an error and the connection closed (its bytes
cannot be skipped safely); any other bad request gets its error and the lane goes on.
"""
from __future__ import annotations

import socket
import struct

import grpc

__all__ = ["REQUEST_HEAD", "RESPONSE_HEAD", "CODES", "EAGER_BYTES", "LaneClosed", "recv_exact", "request_frame",
           "response_frame", "error_frame"]

REQUEST_HEAD = struct.Struct("<I")
RESPONSE_HEAD = struct.Struct("<IB")
CODES = {c.value[0]: c for c in grpc.StatusCode}


class LaneClosed(ConnectionError):
    """The other side closed the connection (mid-frame or between frames)."""


EAGER_BYTES = 1 << 20   # frames up to this size are read into a buffer allocated up front


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """n bytes from sock. A larger frame's buffer grows as its bytes arrive, so a length prefix
    alone (up to MAX_MESSAGE_BYTES, from anyone on a plaintext lane) reserves no memory."""
    if n > EAGER_BYTES:
        return _recv_growing(sock, n)
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise LaneClosed(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def _recv_growing(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), EAGER_BYTES))
        if not chunk:
            raise LaneClosed(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def request_frame(body: bytes) -> bytes:
    return REQUEST_HEAD.pack(len(body)) + body


def response_frame(body: bytes) -> bytes:
    return RESPONSE_HEAD.pack(len(body), 0) + body


def error_frame(code: grpc.StatusCode, reason: str) -> bytes:
    data = (reason or code.name).encode()[:64 * 1024]
    return RESPONSE_HEAD.pack(len(data), code.value[0]) + data
