"""The keys and values in a stage's KV state (Stage.export_state: llama.cpp's per-sequence state).

A state is llama.cpp's magic (u32) and the sequence id (i32), then one block per KV cache of the
stage (Gemma 3 has two: global layers, then sliding-window layers). A block: u32 stream count; per
stream a u32 cell count and, if it is not 0, per cell its position (i32), its sequence count (u32)
and their ids (i32 each); then u32 v_trans and u32 layer count; per layer the key type (i32), the
key row size (u64) and one key row per cell; then per layer the value type (i32) and either the
value row size (u64) and one row per cell, or (v_trans) the element size (u32), the value width
(u32) and, per element, that element of every cell.

Parsed, so that two states of the same positions can be compared by value where their bytes cannot
be: across kernel paths the keys and values differ in the last bits, as outputs do.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_FLOAT_TYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}   # ggml type ids: F32, F16


class StateFormatError(ValueError):
    """The bytes are not a KV state this parser reads (another format, a quantized cache, truncated)."""


@dataclass(frozen=True)
class KVState:
    positions: np.ndarray        # int32 [cells], per cache block in order
    keys: list[np.ndarray]       # per layer (all caches in order): float32 [cells, width]
    values: list[np.ndarray]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise StateFormatError(f"truncated state: {n} bytes wanted at offset {self.at}, "
                                   f"{len(self.data)} in all")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def floats(self, type_id: int, count: int) -> np.ndarray:
        dt = _FLOAT_TYPES.get(type_id)
        if dt is None:
            raise StateFormatError(f"cache type {type_id} is not F32 or F16: quantized caches are not compared by value")
        return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).astype(np.float32)


def parse(data: bytes) -> KVState:
    rd = _Reader(data)
    rd.u32(), rd.i32()   # llama.cpp's magic, which its import checks; the exporting context's sequence
    positions, keys, values = [], [], []
    while rd.at < len(rd.data):
        n_stream = rd.u32()
        if not 1 <= n_stream <= 256:
            raise StateFormatError(f"{n_stream} streams in a cache block")
        for _ in range(n_stream):
            cells = rd.u32()
            if cells == 0:
                continue
            for _ in range(cells):
                positions.append(rd.i32())
                n_seq = rd.u32()
                if n_seq > 256:
                    raise StateFormatError(f"a cell of {n_seq} sequences")
                rd.take(4 * n_seq)
            v_trans, n_layer = rd.u32(), rd.u32()
            if v_trans > 1 or n_layer > 4096:
                raise StateFormatError(f"v_trans {v_trans}, {n_layer} layers")
            for _ in range(n_layer):
                t, row = rd.i32(), rd.u64()
                width = row // _FLOAT_TYPES[t].itemsize if t in _FLOAT_TYPES else 0
                keys.append(rd.floats(t, cells * width).reshape(cells, width))
            for _ in range(n_layer):
                t = rd.i32()
                if not v_trans:
                    row = rd.u64()
                    width = row // _FLOAT_TYPES[t].itemsize if t in _FLOAT_TYPES else 0
                    values.append(rd.floats(t, cells * width).reshape(cells, width))
                else:
                    rd.u32()   # element size, implied by the type
                    width = rd.u32()
                    values.append(rd.floats(t, width * cells).reshape(width, cells).T.copy())
    return KVState(np.asarray(positions, dtype=np.int32), keys, values)


def relative_l2(a: KVState, b: KVState) -> float:
    """The largest relative L2 distance between the same layer's keys or values in two states of
    the same positions (0.0 for equal states)."""
    if not np.array_equal(a.positions, b.positions) or len(a.keys) != len(b.keys) or len(a.values) != len(b.values):
        raise StateFormatError("the states hold other positions or layers")
    worst = 0.0
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        if x.shape != y.shape:
            raise StateFormatError(f"a layer of shape {x.shape} against {y.shape}")
        ref = float(np.linalg.norm(x))
        worst = max(worst, float(np.linalg.norm(x - y)) / ref if ref else float(np.abs(y).max(initial=0.0)))
    return worst
