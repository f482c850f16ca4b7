"""An independent, element-by-element implementation of the commitment spec (docs/verification.md).

Written from the spec text with the standard library only (struct, hashlib, Python's round), no
numpy, so that it shares no code path with consortium.verification.canonical. It generates the
published vectors (run this file) and the tests check the numpy implementation against them.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

VECTORS = Path(__file__).resolve().parents[2] / "consortium" / "verification" / "vectors" / "commitments.json"
_FMT = {"float16": "<e", "float32": "<f", "float64": "<d"}


def to_dtype(v: float, dtype: str) -> float:
    """IEEE round-to-nearest-even into dtype; overflow becomes a signed infinity."""
    if math.isinf(v) or dtype == "float64":
        return v
    try:
        return struct.unpack(_FMT[dtype], struct.pack(_FMT[dtype], v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def index(v: float, dtype: str, grid: int, clamp: float) -> int:
    if math.isnan(v) or math.isinf(v):
        raise ValueError("non-finite input")
    steps = int(clamp * grid)
    s = to_dtype(v, dtype) * grid
    if math.isinf(s):
        return steps if s > 0 else -steps
    k = round(s)  # Python rounds half to even
    return max(-steps, min(steps, k))


def header(dtype: str, grid: int, clamp: float, width: int) -> bytes:
    domain = b"consortium.commit.row.v2"
    return (struct.pack("<I", len(domain)) + domain + struct.pack("<I", len(dtype)) + dtype.encode()
            + struct.pack("<I", grid) + struct.pack("<I", int(clamp * grid)) + struct.pack("<I", width))


def digest(row: list[float], dtype: str, grid: int, clamp: float) -> tuple[list[int], bytes]:
    ks = [index(v, dtype, grid, clamp) for v in row]
    h = hashlib.sha256(header(dtype, grid, clamp, len(row)))
    fmt = "<h" if int(clamp * grid) <= 32767 else "<i"
    for k in ks:
        h.update(struct.pack(fmt, k))
    return ks, h.digest()


def seed_digest(row: list[float], dtype: str, grid: int, clamp: float) -> bytes:
    """float16 arithmetic at every step, as the seed's numpy one-liner does it."""
    out = b""
    for v in row:
        y = to_dtype(v, dtype)
        t = to_dtype(y * grid, dtype)
        r = t if math.isinf(t) else float(round(t))
        q = to_dtype(r / grid, dtype)
        c = max(-clamp, min(clamp, q))
        if c == 0:
            c = 0.0  # -0.0 is written as +0.0
        out += struct.pack(_FMT[dtype], c)
    return hashlib.sha256(out).digest()


def store_exactly(v: float, dtype: str) -> float:
    """The value an input array of dtype holds for the literal v (so JSON carries it exactly)."""
    if dtype == "float64":
        return v
    r = to_dtype(v, dtype)
    if math.isinf(r):
        raise ValueError(f"{v} does not fit {dtype}")
    return r


TIE = 2.0 ** -7  # y*64 == 0.5
CASES = [
    # (name, grid (dtype, grid, clamp), input dtype, rows)
    ("zeros", ("float16", 64, 100.0), "float32", [[0.0, 0.0, 0.0, 0.0]]),
    ("signed-zero", ("float16", 64, 100.0), "float32", [[-0.0, 0.0, -0.0, 1.0]]),
    ("round-to-negative-zero", ("float16", 64, 100.0), "float32", [[-0.003, -TIE, TIE, -1e-30]]),
    ("ties-to-even", ("float16", 64, 100.0), "float32",
     [[TIE, 3 * TIE, 5 * TIE, -3 * TIE, -5 * TIE, 1.0 + 65 / 128, -(7.0 + 1 / 128), 15.0 + 3 / 128]]),
    ("float16-cast-ties", ("float16", 64, 100.0), "float32",
     [[1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 0.0078126, 0.00782, -0.00782, 0.0078124]]),
    ("near-32", ("float16", 64, 100.0), "float32",
     [[31.99, 31.984375, 32.0, 32.0078125, 32.015625, 32.03125, -32.046875]]),
    ("near-50", ("float16", 64, 100.0), "float32", [[50.015625, 50.03125, 49.984375, -50.015625, 50.046875]]),
    ("near-clamp", ("float16", 64, 100.0), "float32",
     [[99.96875, 100.0, 100.03125, 100.0625, -100.0625, 150.0, -1000.0, 99.9]]),
    ("large", ("float16", 64, 100.0), "float32",
     [[1000.0, 65504.0, 65519.0, 65520.0, 1e30, -3.0e38, 1023.99, 1024.0]]),
    ("subnormals", ("float16", 64, 100.0), "float32",
     [[1e-40, -1e-45, 2.0 ** -24, 2.0 ** -14, -(2.0 ** -25), 2.0 ** -25 * 1.5]]),
    ("typical-row", ("float16", 64, 100.0), "float32",
     [[0.1234, -0.5678, 1.9, -2.25, 3.14159, -7.389, 0.0001, 12.5, -15.999, 16.02, 0.75, -0.015625,
       0.33333, 4.4, -0.046875, 8.0]]),
    ("row-order", ("float16", 64, 100.0), "float32",
     [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]),
    ("width-1", ("float16", 64, 100.0), "float32", [[0.5]]),
    ("float16-input", ("float16", 64, 100.0), "float16", [[0.0078125, -2.5, 65504.0, -0.0, 6.1e-5]]),
    ("float16-cast-ties-fine-grid", ("float16", 2048, 16.0), "float32",
     [[1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -10, -(1.0 + 2 ** -11), 2.0 ** -12, 3 * 2.0 ** -12]]),
    # Via float32 first, 1 + 2**-11 + 2**-40 would become the tie 1 + 2**-11 and then 1.0.
    ("float64-input-no-double-rounding", ("float16", 2048, 16.0), "float64",
     [[1.0 + 2 ** -11 + 2 ** -40, 1.0 + 2 ** -11, 1e300, -1e-300]]),
    ("grid16-clamp8", ("float16", 16, 8.0), "float32", [[0.03125, 0.09375, 7.97, 8.0, 8.03, -9.0, 0.5]]),
    ("grid1024-clamp64", ("float16", 1024, 64.0), "float32", [[2.0 ** -11, 3 * 2.0 ** -11, 0.001, 63.99, 70.0]]),
    ("float32-grid", ("float32", 64, 100.0), "float32",
     [[50.015625, 0.0078125, 0.0234375, 1.0 + 2 ** -11, 99.99, 100.01, -0.0, 3.0e38]]),
    ("same-input-float16", ("float16", 64, 100.0), "float32", [[0.5, 1.5, -2.5, 3.75]]),
    ("same-input-float32", ("float32", 64, 100.0), "float32", [[0.5, 1.5, -2.5, 3.75]]),
    ("same-input-clamp50", ("float16", 64, 50.0), "float32", [[0.5, 1.5, -2.5, 3.75]]),
    # The widest config hashed as int16, and the narrowest hashed as int32.
    ("clamp-steps-32767", ("float16", 1, 32767.0), "float32", [[32752.0, -32752.0, 32766.0, 32768.0, -40000.0, 1e6, 0.5, 1.5]]),
    ("clamp-steps-32768", ("float16", 1, 32768.0), "float32", [[32752.0, -32752.0, 32766.0, 32768.0, -40000.0, 1e6, 0.5, 1.5]]),
]


def build() -> dict:
    vectors = []
    for name, (dtype, grid, clamp), input_dtype, rows in CASES:
        rows = [[store_exactly(v, input_dtype) for v in row] for row in rows]
        entry = {"name": name, "grid": {"dtype": dtype, "grid": grid, "clamp": clamp},
                 "input_dtype": input_dtype, "rows": rows,
                 "rows_hex": ["".join(struct.pack(_FMT[input_dtype], v).hex() for v in row) for row in rows],
                 "indices": [], "digests": [], "seed_digests": []}
        for row in rows:
            ks, d = digest(row, dtype, grid, clamp)
            entry["indices"].append(ks)
            entry["digests"].append(d.hex())
            entry["seed_digests"].append(seed_digest(row, dtype, grid, clamp).hex())
        vectors.append(entry)
    return {
        "about": "Commitment test vectors; the spec is docs/verification.md (Commitment). rows are the "
                 "input arrays (rows_hex: the same values as little-endian bytes of input_dtype); "
                 "indices are the canonical grid indices; digests the pinned per-row commitments; "
                 "seed_digests the seed's literal float16 layout. Generated by "
                 "tests/verification/reference_commit.py, an element-by-element implementation.",
        "version": 2,
        "vectors": vectors,
    }


if __name__ == "__main__":
    text = json.dumps(build(), indent=1) + "\n"
    if "--check" in sys.argv:
        sys.exit(0 if VECTORS.read_text() == text else 1)
    VECTORS.write_text(text)
    print(f"wrote {VECTORS}")
