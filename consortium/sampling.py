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


def cannot_sample(lo: np.ndarray, hi: np.ndarray, token: int, position: int,
                  params: SamplingParams = SamplingParams()) -> str | None:
    """Why no row of logits with each entry i in [lo[i], hi[i]] samples `token` at `position`, or
    None where some row might. Conservative: None is also the answer when the bounds are too loose
    to tell. With bounds from a committed canonical row (canonical.cell_bounds) a reason proves that
    the token did not come from the row behind that commitment.

    Greedy: some other entry's lower bound is above the token's upper bound. Seeded: with u the
    draw sample() makes at this position, the token is chosen only when the probability of the tokens
    ranked above it, over the kept mass, is at most u, and the probability of those ranked at or
    above it is over u times the kept mass, which is at least top_p. So it is never chosen when the
    entries sure to rank above it hold more than min(u, top_p) of the probability in every row of
    the box, or when those that might rank at or above it hold less than u * top_p in every row."""
    lo = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi = np.asarray(hi, dtype=np.float64).reshape(-1)
    if not 0 <= token < len(lo) or len(hi) != len(lo) or np.isnan(lo).any() or np.isnan(hi).any():
        return None
    others = np.arange(len(lo)) != token
    if params.greedy:
        best = int(np.argmax(np.where(others, lo, -np.inf)))
        if lo[best] > hi[token]:
            return (f"greedy: token {best}'s logit is at least {lo[best]:.6g}, above token {token}'s "
                    f"at most {hi[token]:.6g}")
        return None
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None   # an entry at the clamp could be anything beyond it
    a, b = lo / params.temperature, hi / params.temperature
    # A margin far above float64 rounding keeps the ranking and the sums on the safe side.
    eps = 1e-9 * max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    margin = 1e-9
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([params.seed & 0xFFFFFFFF, position]))).random()
    shift = float(b.max())
    ea, eb = np.exp(a - shift), np.exp(b - shift)
    above = others & (a > b[token] + eps)            # rank above the token in every row of the box
    least_above = ea[above].sum() / (ea[above].sum() + eb[~above].sum())
    if least_above > min(u, params.top_p) + margin:
        return (f"seeded: tokens ranked above {token} hold at least {least_above:.6g} of the probability, "
                f"over the draw {u:.6g}" + (f" or top_p {params.top_p:g}" if params.top_p < 1 else ""))
    maybe = ~others | (b >= a[token] - eps)          # might rank at or above it
    most_maybe = eb[maybe].sum() / (eb[maybe].sum() + ea[~maybe].sum())
    if most_maybe < u * params.top_p - margin:
        return (f"seeded: token {token} and those that may rank above it hold at most {most_maybe:.6g} of "
                f"the probability, under the draw {u:.6g}" + (f" times top_p {params.top_p:g}" if params.top_p < 1 else ""))
    return None
