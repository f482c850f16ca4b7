"""Canonical-grid commitments: the 32 bytes a stage commits to for each token's output row.

The seed (Test Case v1 §4) fixes the idea: cast to float16, snap to a grid of 1/64, clamp to ±100,
hash the little-endian bytes with SHA-256. Two machines can only agree on a hash if every detail is
the same, so this module pins the details the seed leaves open (docs/verification.md, "Commitment"):

- the float16 cast is IEEE round-to-nearest-even, straight from the input's own dtype; finite
  values beyond float16's range become ±inf there and are then clamped like any large value;
- NaN or ±Inf in the input is refused with NonFiniteActivation: a stage that emits them is broken
  or cheating, and a hash of them would pass it silently;
- y*grid is computed exactly (float64) and rounded half to even (numpy rint, Python round);
- what is hashed is the integer grid index k = clip(round(y*grid), -clamp*grid, clamp*grid) as
  little-endian int16 when clamp*grid <= 32767 (the default's 6,400) and int32 otherwise, not
  k/grid as float16: float16 cannot hold every k/64 above 32 (50.015625 would become 50.0), and
  integers have no -0.0;
- one commitment per token row, rows in order; each hash starts with a header naming the grid
  config and the row width, so two configs never produce the same digest for the same indices.

`seed_commit_rows` keeps the seed's literal byte layout (float16 values, no header) for comparison
with implementations that follow the seed to the letter.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import consortium.native

__all__ = [
    "CanonicalGrid", "NonFiniteActivation", "NonCanonicalTensor", "DEFAULT_GRID",
    "canonical_rows", "cell_bounds", "commit_canonical", "commit_rows", "commit_arrays", "seed_commit_rows", "row_header",
    "index_dtype",
]

ROW_DOMAIN = b"consortium.commit.row.v2"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_MAX_STEPS = 2**31 - 1


class NonFiniteActivation(ValueError):
    """A tensor to be committed or compared holds NaN or ±Inf."""


class NonCanonicalTensor(ValueError):
    """A tensor claimed to be canonical (grid indices) is not: wrong shape, dtype or range."""


@dataclass(frozen=True)
class CanonicalGrid:
    """Per-session canonicalization settings (InferenceSession spec.canonicalGrid)."""

    dtype: str = "float16"
    grid: int = 64
    clamp: float = 100.0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 1 <= self.grid <= 2**20:
            # 2**20 keeps a float32 value times the grid exact in float64 (24 + 20 bits < 53).
            raise ValueError(f"grid must be an integer in [1, 2**20], got {self.grid!r}")
        clamp = float(self.clamp)
        if not math.isfinite(clamp) or clamp <= 0:
            raise ValueError(f"clamp must be finite and positive, got {self.clamp!r}")
        steps = clamp * self.grid
        # Clipping the index and clipping the value agree only when the clamp lies on the grid.
        if steps != math.floor(steps) or steps > _MAX_STEPS:
            raise ValueError(f"clamp*grid must be an integer <= {_MAX_STEPS}, got {steps!r}")
        object.__setattr__(self, "clamp", clamp)

    @property
    def clamp_steps(self) -> int:
        """The largest grid index: clamp * grid."""
        return int(self.clamp * self.grid)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "grid": self.grid, "clamp": self.clamp}

    @classmethod
    def from_json(cls, obj: dict) -> "CanonicalGrid":
        return cls(dtype=str(obj["dtype"]), grid=int(obj["grid"]), clamp=float(obj["clamp"]))


DEFAULT_GRID = CanonicalGrid()


def row_header(grid: CanonicalGrid, width: int) -> bytes:
    """The bytes hashed before a row's indices: domain, dtype, grid, clamp steps, row width."""
    dtype = grid.dtype.encode("ascii")
    return (struct.pack("<I", len(ROW_DOMAIN)) + ROW_DOMAIN
            + struct.pack("<I", len(dtype)) + dtype
            + struct.pack("<III", grid.grid, grid.clamp_steps, width))


def _as_rows(x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"expected a [n_tokens, width] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"expected a floating-point array, got {a.dtype}")
    if not np.isfinite(a).all():
        r, c = np.argwhere(~np.isfinite(a))[0]
        raise NonFiniteActivation(f"non-finite value {a[r, c]!r} at row {r}, column {c}")
    return a


def canonical_rows(x, grid: CanonicalGrid = DEFAULT_GRID) -> np.ndarray:
    """Grid indices k (int32, shape [n, d]) of a [n, d] activation array; the value is k / grid."""
    k = _native_indices(x, grid, np.int32)
    if k is not None:
        return k
    a = _as_rows(x)
    if (grid.dtype == "float16" and a.dtype == np.float32 and a.shape[1] >= _ARITHMETIC_WIDTH
            and grid.grid <= 2**13 and grid.clamp <= _FLOAT16_MAX):
        return _float32_float16_indices(a, grid)
    with np.errstate(over="ignore"):  # beyond float16's range -> ±inf, clamped below
        cast = a.astype(_DTYPES[grid.dtype])
    if grid.dtype == "float16":
        # A float16 grid index depends on the value's 16 bits alone: look it up in a table made by
        # the arithmetic below (a 49,152-wide logit row: about 0.35 ms against 0.9 ms of arithmetic).
        return _float16_index_table(grid).take(cast.view(np.uint16))
    return _grid_indices(cast, grid)


def cell_bounds(k, grid: CanonicalGrid = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (float64 arrays lo, hi) that hold every float32 value whose grid index is k: the
    canonical value k/grid, widened by half a grid step and by the rounding to the grid's dtype
    (taken at twice the magnitude, which covers a value rounding up into the next binade). An index
    at the clamp holds every larger value: its bound is infinite on that side."""
    k = np.asarray(k, dtype=np.int64)
    step = 0.5 / grid.grid
    magnitude = np.minimum((np.abs(k) + 0.5) / grid.grid * 2, np.finfo(_DTYPES[grid.dtype]).max)
    quantum = np.spacing(magnitude.astype(_DTYPES[grid.dtype])).astype(np.float64)
    widen = step + quantum / 2
    lo, hi = k / grid.grid - widen, k / grid.grid + widen
    lo = np.where(k <= -grid.clamp_steps, -np.inf, lo)
    hi = np.where(k >= grid.clamp_steps, np.inf, hi)
    return lo, hi


def _native_indices(x, grid: CanonicalGrid, dtype) -> np.ndarray | None:
    """canonical_rows through canonical.c, as int32 or int16, for float32 rows under a float16 grid
    (the activations of every stage); None where that path does not apply or cannot be built."""
    a = np.asarray(x)
    if not (a.ndim == 2 and a.dtype == np.float32 and grid.dtype == "float16" and grid.grid <= 2**13
            and grid.clamp_steps < 2**22):
        return None
    native = _native_functions()
    if native is None:
        return None
    a = np.ascontiguousarray(a)
    k = np.empty(a.shape, dtype=dtype)
    if native[np.dtype(dtype).itemsize](a.ctypes.data, k.ctypes.data, a.size, grid.grid, grid.clamp_steps):
        _as_rows(a)   # raises NonFiniteActivation naming the row and column
    return k


@functools.cache
def _native_functions():
    """canonical.c's functions by index size in bytes (a 49,152-wide logit row in about 0.03 ms
    against 0.08 in numpy); None where it cannot be built."""
    lib = consortium.native.helper("canonical")
    if lib is None:
        return None
    functions = {4: lib.consortium_grid_indices_i32, 2: lib.consortium_grid_indices_i16}
    for fn in functions.values():
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float]
        fn.restype = ctypes.c_int
    return functions


_FLOAT16_MAX = 65504.0
# Below this width the cast and the table cost less: measured right after a forward step, with the
# caches cold, a 576-wide hidden row took 75 us that way against 160 us in a dozen numpy calls.
_ARITHMETIC_WIDTH = 8192


def _float32_float16_indices(a: np.ndarray, grid: CanonicalGrid) -> np.ndarray:
    """The same indices for float32 input, without numpy's float16 cast (one element at a time,
    about 4 ns each): the round to float16 is done in float32 by scaling each value to float16's
    quantum at its magnitude, rounding half to even and scaling back, all exact (powers of two).
    A 49,152-wide logit row in 0.11 ms instead of 0.25 (0.33 against 0.44 right after a forward
    step, when the caches are cold). Equal to the cast for every finite
    float32 (all 2^32 patterns checked at the default grid; tests check a sample at several).

    Beyond float16's range the cast gives ±inf and this a larger finite value; both clip to the
    clamp, which is why the clamp must lie in range. With grid <= 2^13 the product of an 11-bit
    float16 value and the grid is exact in float32."""
    e = a.view(np.uint32) & np.uint32(0x7F800000)   # the exponent field, left in place
    np.maximum(e, np.uint32(113 << 23), out=e)       # float16 subnormals all have the quantum 2^-24
    e -= np.uint32(10 << 23)                         # 2^(exponent - 10): float16's quantum there
    inverse = np.uint32(254 << 23) - e
    with np.errstate(over="ignore"):                 # values far beyond the clamp may reach inf
        y = a * inverse.view(np.float32)
        np.rint(y, out=y)
        y *= e.view(np.float32)                      # the float16 value, exactly
        y *= np.float32(grid.grid)
    np.rint(y, out=y)
    np.clip(y, -grid.clamp_steps, grid.clamp_steps, out=y)
    return y.astype(np.int32)


def _grid_indices(cast: np.ndarray, grid: CanonicalGrid) -> np.ndarray:
    # The product must be exact. float16 has 11 significant bits and a grid <= 2**13 at most 13, so
    # float32 (24 bits) holds it; float32 input needs float64.
    wide = np.float32 if cast.dtype == np.float16 and grid.grid <= 2**13 else np.float64
    scaled = cast.astype(wide) * wide(grid.grid)
    k = np.clip(np.rint(scaled), -grid.clamp_steps, grid.clamp_steps)  # rint: ties to even
    return k.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _float16_index_table(grid: CanonicalGrid) -> np.ndarray:
    """The grid index of every float16 bit pattern (NaN patterns, never looked up, map to 0)."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.where(np.isnan(values), np.float16(0), values)
    return _grid_indices(finite, grid)


@functools.lru_cache(maxsize=16)
def _row_hash_head(grid: CanonicalGrid, width: int):
    """SHA-256 fed with a row's header; each row's hash continues a copy of it."""
    return hashlib.sha256(row_header(grid, width))


def _check_indices(k, grid: CanonicalGrid) -> np.ndarray:
    a = np.asarray(k)
    if a.ndim != 2:
        raise NonCanonicalTensor(f"expected [n_tokens, width] grid indices, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise NonCanonicalTensor(f"grid indices must be integers, got {a.dtype}")
    if a.size and (a.min() < -grid.clamp_steps or a.max() > grid.clamp_steps):
        raise NonCanonicalTensor(f"grid index outside ±{grid.clamp_steps}")
    return a.astype("<i4", copy=False)


def commit_canonical(k, grid: CanonicalGrid = DEFAULT_GRID) -> list[bytes]:
    """SHA-256 commitments of [n, d] grid indices, one 32-byte digest per row, rows in order."""
    return _commit_indices(_check_indices(k, grid), grid)


def index_dtype(grid: CanonicalGrid) -> np.dtype:
    """How indices are hashed: int16 when every index fits (the default grid's ±6,400 does), which
    halves the bytes SHA-256 reads; int32 otherwise. The header's clamp steps say which."""
    return np.dtype("<i2") if grid.clamp_steps <= 2**15 - 1 else np.dtype("<i4")


def _hash_indices(x, grid: CanonicalGrid) -> np.ndarray:
    """canonical_rows of activations, in the dtype they are hashed in."""
    k = _native_indices(x, grid, index_dtype(grid))
    return canonical_rows(x, grid) if k is None else k


def _commit_indices(a: np.ndarray, grid: CanonicalGrid) -> list[bytes]:
    a = np.ascontiguousarray(a, dtype=index_dtype(grid))
    base = _row_hash_head(grid, a.shape[1])
    out = []
    for row in a:
        h = base.copy()
        h.update(row)  # the buffer itself: no copy of a logit row's bytes
        out.append(h.digest())
    return out


# Elements canonicalized per pass. Larger arrays go in blocks of rows, and rows wider than this in
# pieces hashed one after another: numpy's temporaries then stay in cache and below malloc's mmap
# threshold. Sixteen logit rows of 49,152 in one pass took 11-12 ms, 3,000 page faults per call,
# against 4 ms in blocks.
_BLOCK_ELEMENTS = 1 << 16


def commit_rows(x, grid: CanonicalGrid = DEFAULT_GRID) -> list[bytes]:
    """Commitments of a [n_tokens, width] activation array: one 32-byte digest per token row."""
    a = np.asarray(x)
    if a.ndim != 2 or a.size <= _BLOCK_ELEMENTS:
        return _commit_indices(_hash_indices(a, grid), grid)  # indices made here need no range check
    n, width = a.shape
    try:
        if width <= _BLOCK_ELEMENTS:
            rows = _BLOCK_ELEMENTS // width
            return [c for i in range(0, n, rows) for c in _commit_indices(_hash_indices(a[i:i + rows], grid), grid)]
        out = []
        for row in a:
            h = _row_hash_head(grid, width).copy()
            for j in range(0, width, _BLOCK_ELEMENTS):
                piece = _hash_indices(row[None, j:j + _BLOCK_ELEMENTS], grid)
                h.update(np.ascontiguousarray(piece, dtype=index_dtype(grid)))
            out.append(h.digest())
        return out
    except NonFiniteActivation:
        _as_rows(a)   # the same refusal, naming the row and column in the whole array
        raise


def commit_arrays(arrays: Sequence, grid: CanonicalGrid = DEFAULT_GRID) -> list[bytes]:
    """commit_rows of several [n_i, width] arrays, rows in order: small ones together in one pass (a
    576-wide hidden row costs mostly numpy's per-call overhead), larger ones one by one (copying
    them together would cost more than the calls)."""
    if len(arrays) > 1 and sum(np.asarray(a).size for a in arrays) <= _BLOCK_ELEMENTS:
        return commit_rows(np.concatenate(arrays), grid)
    return [c for a in arrays for c in commit_rows(a, grid)]


def seed_commit_rows(x, grid: CanonicalGrid = DEFAULT_GRID) -> list[bytes]:
    """The seed's literal digest per row: float16 values round(y*g)/g clipped, no header.

    Arithmetic stays in the grid dtype as the seed's numpy one-liner would do it, so k/64 above 32
    is rounded again by float16. The pinned details that don't change the layout still apply:
    non-finite input refused, ties to even, -0.0 written as +0.0.
    """
    a = _as_rows(x)
    t = _DTYPES[grid.dtype]
    with np.errstate(over="ignore"):
        y = a.astype(t)
        g = np.round(y * t(grid.grid)) / t(grid.grid)
    c = np.clip(g, t(-grid.clamp), t(grid.clamp)) + t(0.0)  # -0.0 + 0.0 == +0.0
    le = c.astype(np.dtype(t).newbyteorder("<"))
    return [hashlib.sha256(np.ascontiguousarray(row).tobytes()).digest() for row in le]
