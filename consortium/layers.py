"""Layer ranges: which transformer blocks each pipeline stage runs.

Ranges are written the way people say them, inclusive on both ends ("0-9,10-19,20-29"). A split is
valid only if its ranges cover every layer of the model exactly once, in order; anything else is
refused with a message that names the layers at fault, because a silently wrong split would still
produce fluent text.
"""
from __future__ import annotations

import dataclasses
import re


class LayerSplitError(ValueError):
    """A layer split that does not cover the model's layers exactly once, in order."""


@dataclasses.dataclass(frozen=True, order=True)
class LayerRange:
    first: int
    last: int  # inclusive

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise LayerSplitError(f"bad layer range {self.first}-{self.last}: need 0 <= first <= last")

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, text: str) -> "LayerRange":
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
        if not m:
            raise LayerSplitError(f"cannot read layer range {text!r}: write it as FIRST-LAST, e.g. 0-9")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise LayerSplitError(f"layer range {text.strip()!r} is reversed: write it as {last}-{first}")
        return cls(first, last)


def parse_split(text: str) -> list[LayerRange]:
    """Parse "0-9,10-19,20-29" into ranges (not yet checked against a model)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise LayerSplitError("empty layer split: give ranges such as 0-9,10-19,20-29")
    return [LayerRange.parse(p) for p in parts]


def validate_split(ranges: list[LayerRange], n_layers: int) -> list[LayerRange]:
    """Check that `ranges` cover layers 0..n_layers-1 exactly once, in order; return them."""
    if not ranges:
        raise LayerSplitError("a split needs at least one stage")
    for i, r in enumerate(ranges):
        if r.last >= n_layers:
            raise LayerSplitError(
                f"stage {i} ({r}) runs past the model: it has {n_layers} layers (0-{n_layers - 1})")
    for i in range(1, len(ranges)):
        prev, cur = ranges[i - 1], ranges[i]
        if cur.first <= prev.last:
            if cur.first < prev.first:
                raise LayerSplitError(f"stages are out of order: stage {i} ({cur}) starts before stage {i - 1} ({prev})")
            lo, hi = cur.first, min(prev.last, cur.last)
            raise LayerSplitError(
                f"stages {i - 1} ({prev}) and {i} ({cur}) overlap at layer{'s' if hi > lo else ''} "
                f"{lo}{'-' + str(hi) if hi > lo else ''}")
        if cur.first > prev.last + 1:
            raise LayerSplitError(
                f"layers {LayerRange(prev.last + 1, cur.first - 1)} are in no stage "
                f"(gap between stage {i - 1} ({prev}) and stage {i} ({cur}))")
    if ranges[0].first != 0:
        raise LayerSplitError(f"layers {LayerRange(0, ranges[0].first - 1)} are in no stage: the first stage must start at layer 0")
    if ranges[-1].last != n_layers - 1:
        raise LayerSplitError(
            f"layers {LayerRange(ranges[-1].last + 1, n_layers - 1)} are in no stage: "
            f"the last stage must end at layer {n_layers - 1}")
    return ranges


def even_split(n_layers: int, n_stages: int) -> list[LayerRange]:
    """Split n_layers into n_stages contiguous ranges whose sizes differ by at most one."""
    if not 1 <= n_stages <= n_layers:
        raise LayerSplitError(f"cannot split {n_layers} layers into {n_stages} stages")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        size = base + (1 if i < extra else 0)
        out.append(LayerRange(start, start + size - 1))
        start += size
    return out


def weighted_split(n_layers: int, weights: list[float]) -> list[LayerRange]:
    """Split n_layers into len(weights) contiguous ranges sized in proportion to the weights (each at
    least one layer; largest remainders first, ties to the earlier stage). Equal weights, or any
    weight not above 0 (a node that declares no memory), give even_split's ranges."""
    n = len(weights)
    if not 1 <= n <= n_layers:
        raise LayerSplitError(f"cannot split {n_layers} layers into {n} stages")
    if any(not w > 0 for w in weights):
        return even_split(n_layers, n)
    total = float(sum(weights))
    ideal = [n_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < n_layers:
        counts[max(range(n), key=lambda i: (ideal[i] - counts[i], -i))] += 1
    while sum(counts) > n_layers:   # the minimum of one layer took more than there were
        counts[max((i for i in range(n) if counts[i] > 1), key=lambda i: (counts[i] - ideal[i], i))] -= 1
    out, start = [], 0
    for c in counts:
        out.append(LayerRange(start, start + c - 1))
        start += c
    return out


def format_split(ranges: list[LayerRange]) -> str:
    return ",".join(str(r) for r in ranges)
