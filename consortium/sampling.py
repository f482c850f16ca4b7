"""Choosing the next token from the final stage's logits, identically on every machine.

Greedy by default. Seeded sampling (temperature, top-p) draws its randomness from (seed, position)
alone, so a split run, an unsplit run, a run resumed after an operator restart and a run replayed
after a rollback all sample the same token from the same logits, with no RNG state to save.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):   # NaN fails this too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, position: int, params: SamplingParams = SamplingParams()) -> int:
    """The token at `position` (its index in the whole sequence) from one row of logits."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if not np.isfinite(logits).all():
        raise ValueError(f"logits at position {position} contain NaN or Inf")
    if params.greedy:
        return int(np.argmax(logits))  # ties: the lowest id, as argmax everywhere
    z = logits.astype(np.float64) / params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if params.top_p < 1.0:
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, params.top_p) + 1)
        order = order[:keep]
    q = p[order] / p[order].sum()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([params.seed & 0xFFFFFFFF, position])))
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(q), u, side="right"))
    return int(order[min(idx, len(order) - 1)])


def top2_margin(logits: np.ndarray) -> float:
    """Logit gap between the best and second-best token: how close a position was to flipping."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    a, b = np.partition(row, -2)[-2:]
    return float(abs(b - a))
