"""Stage.batch_invariant_sizes: the batch sizes in which decode steps give the rows and keys and values
one-row steps give. A verifier merges audit replays only into sizes that pass, so the check must
leave out the sizes where the kernels change."""
from __future__ import annotations

import numpy as np
import pytest

from consortium.layers import LayerRange
from consortium.models import resolve_model
from node_agent.engine.slicing import stage_file
from node_agent.engine.stage import Stage, StageConfig


@pytest.mark.parametrize("layers", [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)],
                         ids=["first", "middle", "final"])
def test_q4_1_stages_replay_32_rows_as_one_batch_bit_for_bit(default_model, layers):
    with Stage(stage_file(default_model, layers), layers, 30, StageConfig(threads=1, n_ctx=256)) as stage:
        assert stage.batch_invariant_sizes(32) == list(range(2, 33))
        # and in a sequence of its own, as a replay runs it: one batch against one-row steps
        rng = np.random.default_rng(5)
        kw = (lambda a: {"tokens": a}) if layers.first == 0 else (lambda a: {"hidden": a})
        x = rng.integers(0, 49152, size=40).astype(np.int32) if layers.first == 0 else \
            rng.normal(size=(40, 576)).astype(np.float32)
        stage.forward(0, 0, **kw(x[:8]), logits=False)
        one = stage.forward(0, 8, **kw(x[8:40]), all_logits=True)
        stage.forward(1, 0, **kw(x[:8]), logits=False)
        steps = np.concatenate([stage.forward(1, p, **kw(x[p:p + 1]), all_logits=True) for p in range(8, 40)])
        assert one.tobytes() == steps.tobytes()
        assert stage.export_state(0, 8, 40) == stage.export_state(1, 8, 40)
        assert stage.next_position(0) == stage.next_position(1) == 40   # the check left the sequences alone


def test_repacked_q4_k_m_kernels_change_with_the_batch_size():
    # Over repacked Q4_K weights llama.cpp switches kernels from 4 rows on: the check must say so.
    model = resolve_model("smollm2-135m-q4_k_m")
    r = LayerRange(0, 9)
    with Stage(stage_file(model, r), r, 30, StageConfig(threads=1, n_ctx=256, repack=True)) as stage:
        sizes = stage.batch_invariant_sizes(8)
        assert 4 not in sizes and all(k < 4 for k in sizes), sizes
        with pytest.raises(ValueError, match="max_rows must be in 2..64"):
            stage.batch_invariant_sizes(65)


def test_the_final_stage_checks_its_keys_and_values_alone_when_asked(default_model):
    """A failover's replay merges the final stage's rows only where it skips the LM head: the check
    then compares keys and values and leaves the LM head out, sizes as the full check finds them."""
    r = LayerRange(20, 29)
    with Stage(stage_file(default_model, r), r, 30, StageConfig(threads=1, n_ctx=256)) as stage:
        before = stage.forward_steps
        assert stage.batch_invariant_sizes(16, (2, 4, 8, 16), logits=False) == [2, 4, 8, 16]
        assert stage.forward_steps - before == 1 + 16 + 4   # prefix, one-row steps, one batch per size
        assert stage.batch_invariant_sizes(16, (2, 4, 8, 16)) == [2, 4, 8, 16]
