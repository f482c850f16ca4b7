"""A stage's KV state for a range of positions, out of one context and into another.

The point: a node that holds the states of the windows before a given window can replay that window
alone and get the rows the original stage gave, bit for bit (same stage file and build), instead of
replaying every earlier position.
"""
from __future__ import annotations

import numpy as np
import pytest

from consortium.layers import LayerRange
from node_agent.engine.slicing import read_model_info, stage_file
from node_agent.engine.stage import Stage, StageConfig, StageInputError

CONFIG = StageConfig(threads=1, n_seq_max=2)
PROMPT, WINDOW = 32, 16


@pytest.fixture(scope="module")
def run(default_model):
    """Stage 0 of the default model feeds stages 10-19 and 20-29, prompt in one batch, then one row
    per step, as a session runs; each stage keeps what it output."""
    info = read_model_info(default_model)
    ranges = [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)]
    stages = [Stage(stage_file(default_model, r), r, info.n_layers, CONFIG) for r in ranges]
    n = PROMPT + 3 * WINDOW
    tokens = np.random.default_rng(5).integers(100, 20000, size=n).astype(np.int32)
    steps = [(0, PROMPT)] + [(p, 1) for p in range(PROMPT, n)]
    inputs, outputs = [tokens], []
    for i, st in enumerate(stages):
        x = inputs[-1]
        rows = [st.forward(0, p, **({"tokens": x[p:p + k]} if i == 0 else {"hidden": x[p:p + k]}),
                           all_logits=True) for p, k in steps]
        outputs.append(np.concatenate(rows))
        inputs.append(outputs[-1])
    yield {"model": default_model, "info": info, "ranges": ranges, "stages": stages, "inputs": inputs,
           "outputs": outputs, "steps": steps, "n": n}
    for st in stages:
        st.close()


def _fresh(run, i) -> Stage:
    r = run["ranges"][i]
    return Stage(stage_file(run["model"], r), r, run["info"].n_layers, CONFIG)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_a_window_replayed_from_the_earlier_windows_states_is_bit_identical(run, i):
    worker = run["stages"][i]
    cuts = [0, PROMPT, PROMPT + WINDOW, PROMPT + 2 * WINDOW, run["n"]]
    states = [worker.export_state(0, a, b) for a, b in zip(cuts, cuts[1:])]
    with _fresh(run, i) as auditor:
        # The last window (positions 64..79) alone, after the states of the prompt and the two windows before.
        assert auditor.import_state(1, states[:3]) == cuts[3]
        x = run["inputs"][i]
        kw = (lambda p: {"tokens": x[p:p + 1]}) if i == 0 else (lambda p: {"hidden": x[p:p + 1]})
        rows = np.concatenate([auditor.forward(1, p, **kw(p), all_logits=True) for p in range(cuts[3], cuts[4])])
        assert np.array_equal(rows, run["outputs"][i][cuts[3]:cuts[4]])
        # ... and the keys and values it wrote for that window are the worker's, byte for byte.
        assert auditor.export_state(1, cuts[3], cuts[4]) == states[3]


def test_states_must_cover_the_sequence_in_order_and_fit_the_stage(run):
    worker = run["stages"][1]
    a, b = worker.export_state(0, 0, PROMPT), worker.export_state(0, PROMPT, PROMPT + WINDOW)
    with _fresh(run, 1) as auditor:
        assert auditor.import_state(1, [a]) == PROMPT
        with pytest.raises(StageInputError, match=f"holds positions {PROMPT}..{PROMPT + WINDOW - 1}, the sequence continues at 0"):
            auditor.import_state(1, [b, a])
        assert auditor.next_position(1) == 0   # never half a prefix
        with pytest.raises(StageInputError, match="does not fit this stage"):
            auditor.import_state(1, [a[:len(a) // 2]])
        # Another layer count is refused. A stage of the same shape (0-9 for 10-19) is not: llama.cpp's
        # state names no model, so whoever passes states on must bind them to the stage by their digest.
        with Stage(stage_file(run["model"], LayerRange(0, 0)), LayerRange(0, 0), run["info"].n_layers, CONFIG) as one:
            one.forward(0, 0, tokens=run["inputs"][0][:4])
            with pytest.raises(StageInputError, match="does not fit this stage"):
                auditor.import_state(1, [one.export_state(0, 0, 4)])
        assert auditor.import_state(1, []) == 0
        with pytest.raises(StageInputError, match="not all in sequence"):
            worker.export_state(0, 5, run["n"] + 1)
        with pytest.raises(StageInputError, match="not all in sequence"):
            worker.export_state(0, 7, 7)


def test_the_window_audit_benchmark_replays_bit_identically_for_a_fraction_of_the_full_replay(default_model):
    from node_agent.engine.benchmark import window_audit

    rows = window_audit(default_model, [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)], contexts=(96,),
                        window=8, prompt_len=32)
    assert [r["layers"] for r in rows] == ["0-9", "10-19", "20-29"]
    for r in rows:
        assert r["bit_identical"], r
        # 8 rows against 104: even on a noisy machine the window costs well under the full replay.
        assert 0 < r["window_from_state_cpu_ms"] < r["full_replay_cpu_ms"] and r["window_over_full"] < 0.6, r
        assert r["state_bytes_per_position"] > 0 and r["projected_audit20_cpu_ratio"] > 0


def test_gemma3_states_carry_both_its_caches(gemma_model):
    """Gemma 3 keeps sliding-window and global layers in two KV caches; a state must hold both."""
    info = read_model_info(gemma_model)
    r = LayerRange(6, 11)   # layer 11 is global, the others slide
    path = stage_file(gemma_model, r)
    h = np.random.default_rng(7).standard_normal((PROMPT + 2 * WINDOW, info.n_embd)).astype(np.float32)
    with Stage(path, r, info.n_layers, CONFIG) as worker, Stage(path, r, info.n_layers, CONFIG) as auditor:
        rows = [worker.forward(0, 0, hidden=h[:PROMPT])]
        rows += [worker.forward(0, p, hidden=h[p:p + 1]) for p in range(PROMPT, len(h))]
        ref = np.concatenate(rows)
        states = [worker.export_state(0, 0, PROMPT), worker.export_state(0, PROMPT, PROMPT + WINDOW)]
        assert auditor.import_state(0, states) == PROMPT + WINDOW
        got = np.concatenate([auditor.forward(0, p, hidden=h[p:p + 1]) for p in range(PROMPT + WINDOW, len(h))])
        assert np.array_equal(got, ref[PROMPT + WINDOW:])
    from consortium.verification import kvstate

    both = kvstate.parse(states[1])   # the global layers' cache, then the sliding ones'
    assert list(both.positions) == 2 * list(range(PROMPT, PROMPT + WINDOW)) and len(both.keys) == r.count


@pytest.mark.parametrize("audit", ["replay", "from-state"])
def test_a_sequence_keeps_its_bits_while_another_of_the_stage_comes_and_goes(run, audit):
    """An audit replayed on the node that serves the same layers (as after a failover) is emptied and
    filled again between the worker's steps. In a KV cache the two shared, the worker's next rows took
    the cells it freed, before the worker's own, and its rows drifted 1-6% off the single node's."""
    i = 1
    x, ref = run["inputs"][i], run["outputs"][i]
    state = run["stages"][i].export_state(0, 0, PROMPT)
    with _fresh(run, i) as shared:
        rows = [shared.forward(0, 0, hidden=x[:PROMPT])]
        for p in range(PROMPT, run["n"]):
            if p % 8 == 0:
                shared.clear(1)
                if p % 16:   # dropped (its context freed, as a released slot's is) and made again
                    shared.drop(1)
                    assert shared.next_position(1) == 0
                if p % 16 == 0:   # filled again at every other clear: some of its cells stay free
                    k = 1 + p % 5
                    if audit == "replay":
                        got = shared.forward(1, 0, hidden=x[:PROMPT + k])
                    else:
                        shared.import_state(1, [state])
                        got = shared.forward(1, PROMPT, hidden=x[PROMPT:PROMPT + k])
                    assert np.array_equal(got[-1], ref[PROMPT + k - 1])
            rows.append(shared.forward(0, p, hidden=x[p:p + 1]))
        assert np.array_equal(np.concatenate(rows), ref)


def test_states_parse_into_keys_and_values_per_layer(run):
    from consortium.verification import kvstate

    worker = run["stages"][1]
    data = worker.export_state(0, PROMPT, PROMPT + WINDOW)
    st = kvstate.parse(data)
    assert list(st.positions) == list(range(PROMPT, PROMPT + WINDOW))
    assert len(st.keys) == len(st.values) == 10 and all(k.shape[0] == WINDOW for k in st.keys + st.values)
    assert kvstate.relative_l2(st, kvstate.parse(data)) == 0.0
    # The same positions replayed from another input differ by value; other positions are refused.
    other = np.random.default_rng(9).standard_normal(run["inputs"][1].shape).astype(np.float32)
    with _fresh(run, 1) as auditor:
        auditor.import_state(1, [worker.export_state(0, 0, PROMPT)])
        for p in range(PROMPT, PROMPT + WINDOW):
            auditor.forward(1, p, hidden=other[p:p + 1])
        assert kvstate.relative_l2(st, kvstate.parse(auditor.export_state(1, PROMPT, PROMPT + WINDOW))) > 0.1
        with pytest.raises(kvstate.StateFormatError, match="other positions"):
            kvstate.relative_l2(st, kvstate.parse(auditor.export_state(1, 0, WINDOW)))
    with pytest.raises(kvstate.StateFormatError, match="truncated"):
        kvstate.parse(data[:len(data) - 100])
