"""The verdict on one audited unit (one stage at one position), and the tolerance it is judged by.

Exact hashes of rounded values do not survive cross-hardware float differences, so a hash mismatch is
never a fraud verdict by itself (docs/verification.md, "Verdicts"). When hashes differ, the worker's
revealed canonical tensor (grid indices; it must hash to the signed commitment) is compared with the
canonicalization of the verifier's recomputation. All figures are computed from integer grid
indices with exact integer sums, so anyone re-checking a fraud proof gets the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from . import canonical
from .canonical import CanonicalGrid, NonCanonicalTensor

__all__ = ["Verdict", "Figures", "Limits", "Tolerance", "AuditResult", "figures", "judge_unit",
           "DEFAULT_TOLERANCE_PATH"]

DEFAULT_TOLERANCE_PATH = Path(__file__).with_name("tolerance.default.json")


class Verdict(str, Enum):
    PASSED = "Passed"
    PASSED_WITHIN_TOLERANCE = "PassedWithinTolerance"
    MISMATCH = "Mismatch"
    FRAUD = "Fraud"


# Figures where larger means further apart (limits are maxima); the others are similarities (minima).
_MAX_FIGURES = ("relative_l2", "frac_gt_1", "frac_gt_2", "frac_gt_4", "max_abs_steps")
_MIN_FIGURES = ("cosine", "topk_agreement")


def _num_out(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _num_in(v) -> float:
    return float(v)  # float("inf") parses the strings written above


@dataclass(frozen=True)
class Figures:
    """Distances between the worker's and the verifier's canonical tensors of one row."""

    relative_l2: float      # ||a-b|| / ||b||, b the verifier's; inf if b is all zero and a is not
    frac_gt_1: float        # share of elements more than 1 grid step apart
    frac_gt_2: float
    frac_gt_4: float
    max_abs_steps: float    # largest difference, in grid steps
    cosine: float           # a.b / (|a||b|); 1 if both are zero, 0 if one is
    topk_agreement: float   # |top-k(a) ∩ top-k(b)| / k over largest magnitudes, ties by lower index

    def to_json(self) -> dict:
        return {k: _num_out(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, o: dict) -> "Figures":
        return cls(**{f.name: _num_in(o[f.name]) for f in dataclasses.fields(cls)})


def _topk(x: np.ndarray, k: int) -> set[int]:
    order = np.lexsort((np.arange(x.size), -np.abs(x)))  # by magnitude, then index: deterministic
    return set(order[:k].tolist())


def figures(worker: np.ndarray, verifier: np.ndarray, topk: int = 16) -> Figures:
    """Figures for two rows of grid indices of the same width."""
    a = np.asarray(worker, dtype=np.int64).ravel()
    b = np.asarray(verifier, dtype=np.int64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"rows differ in width or are empty: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    # Integer sums are exact; every later step is one correctly rounded IEEE operation.
    dd, bb, aa, ab = int(d @ d), int(b @ b), int(a @ a), int(a @ b)
    rel = 0.0 if dd == 0 else (math.inf if bb == 0 else math.sqrt(dd) / math.sqrt(bb))
    if aa == 0 and bb == 0:
        cos = 1.0
    elif aa == 0 or bb == 0:
        cos = 0.0
    else:
        cos = ab / (math.sqrt(aa) * math.sqrt(bb))
    k = min(topk, a.size)
    n = a.size
    return Figures(
        relative_l2=rel,
        frac_gt_1=int((d > 1).sum()) / n,
        frac_gt_2=int((d > 2).sum()) / n,
        frac_gt_4=int((d > 4).sum()) / n,
        max_abs_steps=float(d.max()),
        cosine=cos,
        topk_agreement=len(_topk(a, k) & _topk(b, k)) / k,
    )


@dataclass(frozen=True)
class Limits:
    """Thresholds on figures; None means the figure is not used. Maxima for distances, minima for
    cosine and top-k agreement."""

    relative_l2: float | None = None
    frac_gt_1: float | None = None
    frac_gt_2: float | None = None
    frac_gt_4: float | None = None
    max_abs_steps: float | None = None
    cosine: float | None = None
    topk_agreement: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, o: dict) -> "Limits":
        unknown = set(o) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown figures in limits: {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in o.items() if v is not None})

    def _items(self):
        return [(k, v) for k, v in dataclasses.asdict(self).items() if v is not None]

    def violations(self, fig: Figures) -> list[str]:
        """Figures outside these limits (beyond a maximum, below a minimum)."""
        out = []
        for name, limit in self._items():
            v = getattr(fig, name)
            if name in _MAX_FIGURES and v > limit:
                out.append(f"{name} {v:.6g} > {limit:.6g}")
            elif name in _MIN_FIGURES and v < limit:
                out.append(f"{name} {v:.6g} < {limit:.6g}")
        return out


@dataclass(frozen=True)
class Tolerance:
    """Honest tolerance (inside: PassedWithinTolerance), decisive limits (beyond any: Fraud), and the
    honest Mismatch rate the node-level binomial test assumes."""

    honest: Limits
    decisive: Limits
    honest_mismatch_rate: float = 0.02
    topk: int = 16
    about: str = ""
    # Calibrated per stage: (model sha256, "first-last") -> its own Tolerance. Honest disagreement
    # differs a lot between stages (calibration measured <1% to 13% Mismatch at one pooled limit),
    # so a stage that was calibrated is judged by its own limits; anything else by the pooled ones.
    stages: dict = field(default_factory=dict, compare=False)
    # Audits from window states: the largest relative L2 (kvstate.relative_l2, worst layer) between a
    # node's signed keys and values of a window and the verifier's replay of it that still counts as
    # honest; None: the honest row limit stands in. Calibrated apart from the rows: the two differ.
    state_relative_l2: float | None = None

    def __post_init__(self) -> None:
        if not self.honest._items():
            raise ValueError("the honest tolerance must limit at least one figure")
        if not 0 < self.honest_mismatch_rate < 1:
            raise ValueError("honest_mismatch_rate must be in (0, 1)")
        if self.topk < 1:
            raise ValueError("topk must be >= 1")
        if self.state_relative_l2 is not None and not self.state_relative_l2 >= 0:
            raise ValueError("state_relative_l2 must be >= 0")
        # A decisive limit inside the honest tolerance would call a within-tolerance unit Fraud.
        for name, d in self.decisive._items():
            h = getattr(self.honest, name)
            if h is not None and ((name in _MAX_FIGURES and d < h) or (name in _MIN_FIGURES and d > h)):
                raise ValueError(f"decisive {name} {d} lies inside the honest tolerance {h}")

    def to_json(self) -> dict:
        o = {"about": self.about, "honest_mismatch_rate": self.honest_mismatch_rate, "topk": self.topk,
             "honest": self.honest.to_json(), "decisive": self.decisive.to_json()}
        if self.state_relative_l2 is not None:
            o["state_relative_l2"] = self.state_relative_l2
        if self.stages:
            o["stages"] = [{"model_sha256": sha, "layers": layers, **{k: v for k, v in t.to_json().items() if k != "about"},
                            **({"about": t.about} if t.about else {})}
                           for (sha, layers), t in sorted(self.stages.items())]
        return o

    @classmethod
    def from_json(cls, o: dict) -> "Tolerance":
        stages = {(str(e["model_sha256"]), str(e["layers"])): cls.from_json(e) for e in o.get("stages", [])}
        return cls(Limits.from_json(o["honest"]), Limits.from_json(o.get("decisive", {})),
                   float(o.get("honest_mismatch_rate", 0.02)), int(o.get("topk", 16)), str(o.get("about", "")),
                   stages, None if o.get("state_relative_l2") is None else float(o["state_relative_l2"]))

    @property
    def state_limit(self) -> float | None:
        """The limit a differing window state is judged by: the calibrated one, else the honest row limit."""
        return self.state_relative_l2 if self.state_relative_l2 is not None else self.honest.relative_l2

    def for_stage(self, model_sha256: str, layers) -> "Tolerance":
        """The limits calibrated for this model's layer range, or the pooled ones."""
        return self.stages.get((model_sha256, str(layers)), self)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Tolerance":
        """From a JSON file; the shipped default (uncalibrated, conservative) when path is None."""
        return cls.from_json(json.loads(Path(path or DEFAULT_TOLERANCE_PATH).read_text()))

    def classify(self, fig: Figures) -> tuple[Verdict, list[str]]:
        """Verdict for figures of a unit whose reveal matched its commitment but whose hash differed."""
        decisive = self.decisive.violations(fig)
        if decisive:
            return Verdict.FRAUD, ["beyond the decisive threshold: " + r for r in decisive]
        honest = self.honest.violations(fig)
        if honest:
            return Verdict.MISMATCH, ["outside the honest tolerance: " + r for r in honest]
        return Verdict.PASSED_WITHIN_TOLERANCE, ["hashes differ; figures within the honest tolerance"]


@dataclass(frozen=True)
class AuditResult:
    verdict: Verdict
    figures: Figures | None
    reasons: tuple[str, ...]
    verifier_commitment: bytes | None


def judge_unit(commitment: bytes, recomputed: np.ndarray, *, grid: CanonicalGrid, tolerance: Tolerance,
               revealed: np.ndarray | None = None, signature_ok: bool = True) -> AuditResult:
    """Judge one audited unit.

    commitment: the worker's signed 32-byte commitment of this row (check the receipt first and pass
    signature_ok=False if its signature failed). recomputed: the verifier's float output row [d];
    NaN/Inf there raises NonFiniteActivation (the verifier is broken, nobody is accused). revealed: the
    worker's canonical grid indices [d], if it revealed them (for a non-final stage the driver holds the
    output the worker sent, and its canonicalization is the reveal).
    """
    row = np.asarray(recomputed)
    if row.ndim != 1:
        raise ValueError(f"recomputed must be one row [d], got shape {row.shape}")
    mine = canonical.canonical_rows(row[None, :], grid)
    mine_c = canonical.commit_canonical(mine, grid)[0]
    if not signature_ok:
        return AuditResult(Verdict.FRAUD, None, ("the worker's signature over its window does not verify",), mine_c)
    fig = None
    if revealed is not None:
        rev = np.asarray(revealed)
        try:
            if rev.shape != row.shape:
                raise NonCanonicalTensor(f"revealed shape {rev.shape} != recomputed shape {row.shape}")
            rev_c = canonical.commit_canonical(rev[None, :], grid)[0]
        except NonCanonicalTensor as e:
            return AuditResult(Verdict.FRAUD, None, (f"revealed tensor is not canonical: {e}",), mine_c)
        if rev_c != commitment:
            return AuditResult(Verdict.FRAUD, None, ("revealed tensor does not hash to the signed commitment",),
                               mine_c)
        fig = figures(rev, mine[0], tolerance.topk)
    if mine_c == commitment:
        return AuditResult(Verdict.PASSED, fig, ("hashes equal",), mine_c)
    if fig is None:
        # Nothing to measure: one such unit accuses nobody; it counts in the node's record.
        return AuditResult(Verdict.MISMATCH, None, ("hashes differ and no revealed tensor to compare",), mine_c)
    verdict, reasons = tolerance.classify(fig)
    return AuditResult(verdict, fig, tuple(reasons), mine_c)
