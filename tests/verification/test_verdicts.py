"""Per-unit verdicts and their figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from consortium.verification import canonical, verdicts
from consortium.verification.canonical import CanonicalGrid, NonFiniteActivation
from consortium.verification.verdicts import Limits, Tolerance, Verdict

GRID = CanonicalGrid()
TOL = Tolerance(honest=Limits(relative_l2=0.1, cosine=0.99), decisive=Limits(relative_l2=1.0, cosine=0.5))


def test_figures_by_hand():
    a = np.array([64, 0, 3, -10])
    b = np.array([64, 2, 0, -10])
    f = verdicts.figures(a, b, topk=2)
    # |a-b| = [0, 2, 3, 0]; |a-b|^2 = 13; |b|^2 = 4096 + 4 + 100; a.b = 4096 + 100; |a|^2 = 4096 + 9 + 100.
    assert f.relative_l2 == pytest.approx(math.sqrt(13 / 4200), rel=1e-15)
    assert (f.frac_gt_1, f.frac_gt_2, f.frac_gt_4, f.max_abs_steps) == (0.5, 0.25, 0.0, 3.0)
    assert f.cosine == pytest.approx(4196 / math.sqrt(4205 * 4200), rel=1e-15)
    assert f.topk_agreement == 1.0  # both top-2 by magnitude: entries 0 and 3
    assert verdicts.figures(a, b, topk=3).topk_agreement == pytest.approx(2 / 3)  # {0,3,2} vs {0,3,1}


def test_figures_of_zero_rows():
    z = np.zeros(4, dtype=np.int32)
    assert verdicts.figures(z, z).cosine == 1.0 and verdicts.figures(z, z).relative_l2 == 0.0
    f = verdicts.figures(np.array([1, 0, 0, 0]), z)
    assert f.relative_l2 == math.inf and f.cosine == 0.0
    assert verdicts.Figures.from_json(json.loads(json.dumps(f.to_json()))) == f


def worker_and_verifier(scale: float, seed: int = 1, d: int = 512):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d).astype(np.float32)
    y = (x + scale * rng.standard_normal(d)).astype(np.float32)
    revealed = canonical.canonical_rows(x[None, :], GRID)[0]
    commitment = canonical.commit_canonical(revealed[None, :], GRID)[0]
    return commitment, revealed, y


def test_passed_when_hashes_equal():
    c, rev, _ = worker_and_verifier(0.0)
    x = rev.astype(np.float32) / 64
    r = verdicts.judge_unit(c, x, grid=GRID, tolerance=TOL, revealed=rev)
    assert r.verdict is Verdict.PASSED and r.figures.relative_l2 == 0.0
    assert verdicts.judge_unit(c, x, grid=GRID, tolerance=TOL).verdict is Verdict.PASSED


@pytest.mark.parametrize("scale, want", [(0.003, Verdict.PASSED_WITHIN_TOLERANCE), (0.3, Verdict.MISMATCH),
                                         (3.0, Verdict.FRAUD)])
def test_distance_decides_when_hashes_differ(scale, want):
    c, rev, y = worker_and_verifier(scale)
    r = verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL, revealed=rev)
    assert r.verifier_commitment != c  # the hash alone would have accused an honest worker at 0.003
    assert r.verdict is want, r.reasons


def test_hash_differs_without_reveal_is_mismatch_not_fraud():
    c, _, y = worker_and_verifier(0.003)
    r = verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL)
    assert r.verdict is Verdict.MISMATCH and "no revealed tensor" in r.reasons[0]


def test_reveal_not_matching_commitment_is_fraud():
    c, rev, y = worker_and_verifier(0.0)
    other = rev.copy()
    other[5] += 1
    r = verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL, revealed=other)
    assert r.verdict is Verdict.FRAUD and "does not hash" in r.reasons[0]


def test_non_canonical_reveal_is_fraud():
    c, rev, y = worker_and_verifier(0.0)
    bad = rev.astype(np.int64)
    bad[0] = 10_000  # beyond the clamp: no honest canonicalization makes this
    r = verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL, revealed=bad)
    assert r.verdict is Verdict.FRAUD and "not canonical" in r.reasons[0]


def test_bad_signature_is_fraud():
    c, rev, y = worker_and_verifier(0.0)
    r = verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL, revealed=rev, signature_ok=False)
    assert r.verdict is Verdict.FRAUD and "signature" in r.reasons[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_recomputation_raises(bad):
    c, rev, y = worker_and_verifier(0.0)
    y[3] = bad
    with pytest.raises(NonFiniteActivation):
        verdicts.judge_unit(c, y, grid=GRID, tolerance=TOL, revealed=rev)


def test_default_tolerance_file_is_calibrated_for_the_default_split():
    from consortium.cache import cache_dir
    from consortium.layers import even_split
    from consortium.models import resolve_model
    from node_agent.engine.slicing import read_model_info, sha256_file

    t = Tolerance.load()
    assert "consortium calibrate" in t.about
    assert Tolerance.from_json(json.loads(json.dumps(t.to_json()))) == t
    model = resolve_model(None)
    sha = sha256_file(model, cache_dir())
    for r in even_split(read_model_info(model).n_layers, 3):
        own = t.for_stage(sha, r)
        assert own is not t, f"no calibrated limits for the default model's stage {r}"
        assert own.honest.relative_l2 is not None and own.decisive.relative_l2 > own.honest.relative_l2
        assert 0 < own.honest_mismatch_rate < 0.2
        assert own.state_relative_l2 is not None and 0 < own.state_limit < own.decisive.relative_l2


def test_stage_limits_round_trip_and_fall_back_to_the_pooled_ones():
    stage = Tolerance(honest=Limits(relative_l2=0.03), decisive=Limits(relative_l2=0.3), honest_mismatch_rate=0.04)
    t = Tolerance(honest=TOL.honest, decisive=TOL.decisive, stages={("ab" * 32, "0-9"): stage})
    back = Tolerance.from_json(json.loads(json.dumps(t.to_json())))
    assert back.for_stage("ab" * 32, "0-9") == stage
    assert back.for_stage("ab" * 32, "10-19") is back and back.for_stage("cd" * 32, "0-9") is back
    # 0.05 is within the pooled limit but beyond this stage's own.
    fig = verdicts.Figures(relative_l2=0.05, frac_gt_1=0, frac_gt_2=0, frac_gt_4=0, max_abs_steps=1, cosine=0.999,
                           topk_agreement=1.0)
    assert back.classify(fig)[0] == Verdict.PASSED_WITHIN_TOLERANCE
    assert back.for_stage("ab" * 32, "0-9").classify(fig)[0] == Verdict.MISMATCH


def test_the_state_limit_is_its_own_or_the_honest_row_limit():
    t = Tolerance(honest=Limits(relative_l2=0.03), decisive=Limits(relative_l2=0.3))
    assert t.state_relative_l2 is None and t.state_limit == 0.03
    own = Tolerance(honest=Limits(relative_l2=0.03), decisive=Limits(relative_l2=0.3), state_relative_l2=0.06,
                    stages={("ab" * 32, "0-9"): t})
    back = Tolerance.from_json(json.loads(json.dumps(own.to_json())))
    assert back == own and back.state_limit == 0.06 and back.for_stage("ab" * 32, "0-9").state_limit == 0.03
    with pytest.raises(ValueError):
        Tolerance(honest=Limits(relative_l2=0.03), decisive=Limits(), state_relative_l2=-1.0)


def test_decisive_inside_honest_refused():
    with pytest.raises(ValueError, match="inside the honest"):
        Tolerance(honest=Limits(relative_l2=0.5), decisive=Limits(relative_l2=0.1))
    with pytest.raises(ValueError, match="unknown figures"):
        Limits.from_json({"l2": 1})
