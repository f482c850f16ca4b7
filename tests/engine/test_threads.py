"""A sequence's llama.cpp thread count (Stage.set_threads): the agent runs audit replays on fewer
threads than the sessions' steps, which is only sound if the rows do not depend on it."""
from __future__ import annotations

import numpy as np
import pytest

from consortium.layers import LayerRange
from node_agent.engine.slicing import stage_file
from node_agent.engine.stage import Stage, StageConfig


@pytest.mark.parametrize("layers", [LayerRange(10, 19), LayerRange(20, 29)], ids=["middle", "final"])
def test_rows_do_not_depend_on_the_thread_count(default_model, layers):
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(40, 576)).astype(np.float32)
    with Stage(stage_file(default_model, layers), layers, 30, StageConfig(threads=1)) as stage:
        got = {}
        for seq, threads in ((0, 1), (1, 2)):
            stage.set_threads(seq, threads)
            assert stage.threads(seq) == threads
            prefill = stage.forward(seq, 0, hidden=hidden[:32], all_logits=True)
            steps = [stage.forward(seq, p, hidden=hidden[p:p + 1]) for p in range(32, 40)]
            got[threads] = (prefill, steps)
        assert np.array_equal(got[1][0], got[2][0])
        assert all(np.array_equal(a, b) for a, b in zip(got[1][1], got[2][1]))
        with pytest.raises(ValueError, match="threads must be >= 1"):
            stage.set_threads(0, 0)
