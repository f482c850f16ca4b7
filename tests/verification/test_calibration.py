"""consortium calibrate (--quick, end to end) and the cheaters of node_agent.faults on real stages."""
from __future__ import annotations

import json

import numpy as np
import pytest

from consortium import cli
from consortium.commands import calibrate
from consortium.layers import LayerRange
from consortium.models import resolve_model
from consortium.tokenizer import Tokenizer
from consortium.verification.verdicts import Tolerance, figures
from node_agent.engine.slicing import stage_file
from node_agent.engine.stage import Stage, StageConfig
from node_agent.faults import CheatingStage, Fault, apply_fault, parse_fault, skipped_layer

CONFIG = StageConfig(threads=2, n_ctx=256, n_seq_max=1)
CORE = ("skip-layer", "cheap-quant", "replay", "random")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick calibration, with a running node agent (repacking off: the other "hardware") as a
    third honest pair, the way CUDA and Metal nodes are calibrated against each other."""
    from node_agent import server
    from node_agent.identity import NodeIdentity

    d = tmp_path_factory.mktemp("calibrate")
    out, png, tol = d / "calib.json", d / "calib.png", d / "tolerance.json"
    ident = NodeIdentity.load_or_create(d / "verifier.pem", "verifier")
    srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="verifier", threads=1, n_ctx=512,
                                                                       repack=False))
    try:
        rc = cli.main(["calibrate", "--quick", "--threads", "2", "--json", str(out), "--plot", str(png),
                       "--tolerance-out", str(tol), "--verifier-agent", f"verifier=127.0.0.1:{port}", "--plaintext"])
    finally:
        srv.stop(None)
    assert rc == 0
    return json.loads(out.read_text()), png, tol


def test_a_running_agent_is_an_honest_pair_that_computes_what_the_same_kernels_do_here(quick):
    rep, _, _ = quick
    [meta] = rep["about"]["models"]
    assert meta["honest_pairs"] == ["repack-off", "reference", "agent:verifier"]
    assert meta["agents"]["verifier"].startswith("cpu ")
    by_stage = rep["honest"]["by_stage"]
    model = meta["model"]
    for stage in (0, 1):   # one batch, as the worker's: the same bits as repacking off in this process
        here, there = by_stage[f"{model} repack-off stage {stage}"], by_stage[f"{model} agent:verifier stage {stage}"]
        assert there["comparisons"] == here["comparisons"] > 0
        assert there["hash_equal"] == here["hash_equal"], (stage, here, there)
    # The final stage row by row on both sides (an Audit gives logits at batch ends only), as a
    # session decodes: in one shape the two kernel families still agree bit for bit on some rows
    # (29 of 102 measured; 1 of 102, and 13 Mismatch, against the worker's one batch).
    last = by_stage[f"{model} agent:verifier stage 2"]
    assert last["comparisons"] == 102 and last["hash_equal"] > 0 and last["fraud"] == 0


def test_quick_report_has_the_keys_and_consistent_counts(quick):
    rep, _, _ = quick
    for key in ("honest", "cheaters", "tolerance", "grid_sweep", "noise_breakpoint"):
        assert key in rep
    h = rep["honest"]
    for key in ("comparisons", "hash_equal", "within_tolerance", "mismatch", "false_fraud"):
        assert isinstance(h[key], int) and h[key] >= 0
    assert h["comparisons"] >= 300  # one held-out prompt of ~100 tokens x 3 stages x 2 honest pairs
    assert h["hash_equal"] + h["within_tolerance"] + h["mismatch"] + h["fraud_verdicts"] == h["comparisons"]
    # The reference pair never hashes equal, so most honest comparisons must reach the tolerance.
    assert h["hash_equal"] < h["comparisons"] / 2
    assert set(rep["cheaters"]) >= set(CORE) | {"noise-0.001", "noise-1"}
    pairs = len(h["by_pair"])
    for c, v in rep["cheaters"].items():
        assert v["audits"] == h["comparisons"] // pairs, c
        assert 0 <= v["detected"] <= v["audits"]
    assert [g["grid"] for g in rep["grid_sweep"]] == [16, 32, 64, 128, 256, 512, 1024]
    assert all(0.0 <= g["hash_match_rate"] <= 1.0 for g in rep["grid_sweep"])


def test_quick_run_accuses_no_honest_pair_and_catches_the_cheaters(quick):
    rep, _, _ = quick
    assert rep["honest"]["false_fraud"] == 0
    assert rep["honest"]["fraud_verdicts"] == 0
    for c in CORE + ("noise-1",):
        assert rep["cheaters"][c]["detection_rate"] >= 0.95, (c, rep["cheaters"][c])
    # Noise far below the grid step is indistinguishable from honest hardware.
    assert rep["cheaters"]["noise-0.001"]["detection_rate"] < 0.5


def test_quick_window_states_keep_honest_nodes_trusted_and_catch_the_cheap_cheater(quick):
    rep, _, _ = quick
    st = rep["states"]
    assert 0 < st["pooled_limit"] < 0.2
    for key in ("heldout", "calibration"):
        got = st[key]
        assert {k.rsplit(" ", 1)[1] for k in got} == {"repack-off", "cheap-quant"}
        for k, v in got.items():
            assert v["windows"] >= 2, k
            if v["honest"]:   # every honest window state within the limit: the node stays trusted
                assert v["beyond_limit"] == 0 and v["max"] <= v["limit"], (k, v)
            else:             # the cheap quantization's keys and values lie far beyond it
                assert v["beyond_limit"] == v["windows"] and v["min"] > 3 * v["limit"], (k, v)


def test_quick_outputs_load(quick):
    rep, png, tol_path = quick
    tol = Tolerance.load(tol_path)
    assert tol.to_json() == rep["tolerance"]
    assert tol.state_relative_l2 == rep["states"]["pooled_limit"]
    assert 0 < tol.honest_mismatch_rate < 0.2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_figures_equal_verdicts_figures():
    rng = np.random.default_rng(3)
    a = rng.integers(-40, 40, size=(12, 300))
    b = a + rng.integers(-3, 4, size=a.shape)
    a[0], b[1] = 0, 0          # all-zero rows: cosine and relative L2 edge cases
    b[2] = a[2]                # identical
    a[3, :40] = 7              # ties in magnitude at the top-k border
    b[3, :40] = -7
    got = calibrate.batch_figures(a, b, topk=16)
    for i in range(len(a)):
        want = figures(a[i], b[i], 16)
        for k, v in want.to_json().items():
            assert float(got[k][i]) == float(v), (i, k)


def test_upper_bound_and_breakpoint():
    assert calibrate.upper_bound(0, 1000) == pytest.approx(0.002991, rel=1e-3)  # 1 - 0.05**(1/1000)
    assert 0.02 < calibrate.upper_bound(20, 1000) < 0.03
    brk = calibrate.noise_breakpoint({"noise-0.01": {"detection_rate": 0.1}, "noise-0.1": {"detection_rate": 0.9},
                                      "noise-1": {"detection_rate": 1.0}})
    assert brk["largest_scale_below_50pct"] == 0.01
    assert brk["crossing_50pct"] == pytest.approx(10 ** -1.5)


def test_parse_fault():
    assert parse_fault("noise-0.01") == Fault("noise", 0.01)
    assert parse_fault("noise-1").name == "noise-1"
    assert parse_fault("skip-layer").name == "skip-layer"
    for bad in ("noise-0", "noise-x", "skip", "noise--1"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    with pytest.raises(ValueError):
        skipped_layer(LayerRange(3, 4))
    assert skipped_layer(LayerRange(0, 9)) == 5


def test_replay_shifts_by_one_token():
    y = np.arange(12, dtype=np.float32).reshape(4, 3)
    r = apply_fault("replay", y)
    assert np.array_equal(r[1:], y[:-1]) and not r[0].any()
    r2 = apply_fault("replay", y, previous=y[-1])
    assert np.array_equal(r2[0], y[-1])


@pytest.fixture(scope="module")
def smollm2_stage():
    model = resolve_model("smollm2-135m-q4_k_m")
    tok = Tokenizer(model)
    ids = np.asarray(tok.encode("A short test prompt about the weather in the mountains in spring."), np.int32)
    tok.close()
    r = LayerRange(0, 9)
    with Stage(stage_file(model, r), r, 30, CONFIG) as honest:
        yield model, r, ids, honest


@pytest.mark.parametrize("kind", ["skip-layer", "cheap-quant", "noise-0.01", "noise-1", "replay", "random"])
def test_every_cheater_class_has_the_honest_shape_and_differs(smollm2_stage, kind):
    model, r, ids, honest = smollm2_stage
    honest.clear(0)
    want = honest.forward(0, 0, tokens=ids)
    with CheatingStage(kind, model, r, 30, CONFIG, honest=honest) as cheat:
        cheat.clear(0)
        got = cheat.forward(0, 0, tokens=ids)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.isfinite(got).all()
        assert not np.array_equal(got, want)
        # Cheaters keep per-sequence state like a stage: the next token continues the sequence.
        nxt = cheat.forward(0, len(ids), tokens=ids[:1])
        assert nxt.shape == (1, want.shape[1])
        if kind == "replay":
            assert np.array_equal(nxt[0], want[-1])
