"""Batch shapes of a replay: the original run's batches with its decode steps merged.

A replay (an audit on a verifier) may compute consecutive one-row batches, the decode steps, as
larger batches: one pass over the weights per batch instead of per row. Whether that keeps the
bits depends on the kernels; who decides the sizes passes `chunk`.
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence


def merge_decode_steps(sizes: Sequence[int], start: int, must_end: set[int],
                       chunk: Callable[[int], int]) -> list[tuple[int, bool]]:
    """The batches of a replay from the original run's `sizes` starting at position `start`, as
    (rows, merged): each run of one-row batches is cut at the positions in `must_end` (where a batch
    must end, e.g. the final stage's audited rows, whose logits exist at batch ends only) and then
    into pieces of chunk(rows left) rows each; other batches stay as they were."""
    out, run, pos = [], 0, start

    def flush() -> None:
        nonlocal run
        while run:
            k = max(1, min(run, chunk(run)))
            out.append((k, k > 1))
            run -= k

    for n in sizes:
        if n == 1:
            run, pos = run + 1, pos + 1
            if pos - 1 in must_end:
                flush()
            continue
        flush()
        out.append((n, False))
        pos += n
    flush()
    return out


def largest_allowed(allowed: Collection[int]) -> Callable[[int], int]:
    """A `chunk` for merge_decode_steps: the largest of the `allowed` sizes that the rows left fill,
    else 1 (the decode steps as they were)."""
    return lambda run: max((k for k in allowed if k <= run), default=1)
