"""A split must compute exactly what the whole model computes: identical greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

from consortium.generation import generate
from consortium.layers import parse_split
from consortium.tokenizer import Tokenizer
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig

CONFIG = StageConfig(threads=2)


def run(model, split, prompt_ids, n=64):
    with LocalPipeline(model, parse_split(split) if split else None, CONFIG) as pipe:
        return generate(pipe, prompt_ids, n).tokens  # no end-of-generation stop: always n tokens


def test_default_model_split_in_3_and_5_gives_the_unsplit_tokens(default_model, seed_prompt_ids):
    base = run(default_model, None, seed_prompt_ids)
    assert len(base) == 64
    assert run(default_model, "0-9,10-19,20-29", seed_prompt_ids) == base
    assert run(default_model, "0-5,6-11,12-17,18-23,24-29", seed_prompt_ids) == base
    # Uneven, single-layer and first/last-layer-only stages are ordinary splits too.
    assert run(default_model, "0-0,1-27,28-29", seed_prompt_ids, n=16) == base[:16]


def test_gemma3_split_in_3_and_5_gives_the_unsplit_tokens(gemma_model):
    tok = Tokenizer(gemma_model)
    ids = tok.prompt_tokens("Explain in one paragraph why the sky appears blue.")
    base = run(gemma_model, None, ids)
    assert run(gemma_model, "0-5,6-11,12-17", ids) == base
    assert run(gemma_model, "0-3,4-7,8-11,12-14,15-17", ids) == base


def test_gemma3_off_period_split_with_a_prompt_longer_than_its_window(gemma_model):
    """Gemma 3 makes every sixth layer global; a stage renumbered from 0 must keep each layer's kind.

    Splitting off the period (0-6 / 7-12 / 13-17) with a prompt longer than the 512-token sliding
    window is the case where a slicer that forgets the per-layer pattern gives different logits.
    """
    tok = Tokenizer(gemma_model)
    text = " ".join(f"Sentence {i} says the sky is blue because air scatters short wavelengths." for i in range(60))
    ids = tok.prompt_tokens(text + " Summarize:", raw=True)
    assert len(ids) > 600
    with LocalPipeline(gemma_model, None, StageConfig(threads=2, n_ctx=1024)) as whole, \
            LocalPipeline(gemma_model, parse_split("0-6,7-12,13-17"), StageConfig(threads=2, n_ctx=1024)) as parts:
        a = whole.forward(0, 0, np.asarray(ids, dtype=np.int32))
        b = parts.forward(0, 0, np.asarray(ids, dtype=np.int32))
        np.testing.assert_array_equal(a, b)  # bit-identical logits, not merely the same argmax
        whole.reset(0)
        parts.reset(0)
        assert generate(whole, ids, 16).tokens == generate(parts, ids, 16).tokens


def test_prefill_in_one_batch_equals_token_by_token(default_model, seed_prompt_ids):
    """KV rebuilds replay inputs; on CPU the batch shape must not change a stage's output."""
    ids = np.asarray(seed_prompt_ids, dtype=np.int32)
    with LocalPipeline(default_model, parse_split("0-14,15-29"), CONFIG) as pipe:
        first = pipe.stages[0]
        batch = first.forward(0, 0, tokens=ids)
        single = np.concatenate([first.forward(1, i, tokens=ids[i:i + 1]) for i in range(len(ids))])
        np.testing.assert_array_equal(batch, single)


@pytest.mark.parametrize("n_batch", [7, 64])
def test_rows_over_several_decode_calls_match(default_model, seed_prompt_ids, n_batch):
    ids = np.asarray(seed_prompt_ids, dtype=np.int32)
    with LocalPipeline(default_model, parse_split("0-14,15-29"), StageConfig(threads=2, n_batch=n_batch)) as small, \
            LocalPipeline(default_model, parse_split("0-14,15-29"), StageConfig(threads=2, n_batch=512)) as big:
        np.testing.assert_array_equal(small.stages[0].forward(0, 0, tokens=ids), big.stages[0].forward(0, 0, tokens=ids))


def test_final_stage_rows_without_logits_leave_the_cache_as_it_would_be(default_model, seed_prompt_ids):
    """Audit replays skip the LM head where nothing is audited; the logits after must not change."""
    ids = np.asarray(seed_prompt_ids, dtype=np.int32)
    with LocalPipeline(default_model, parse_split("0-14,15-29"), CONFIG) as pipe:
        first, last = pipe.stages
        hidden = first.forward(0, 0, tokens=ids)
        n = len(ids)
        assert last.forward(0, 0, hidden=hidden[:n - 8], logits=False) is None
        steps = [last.forward(0, n - 8 + i, hidden=hidden[n - 8 + i:n - 7 + i], logits=i % 3 == 2) for i in range(8)]
        every = [last.forward(1, 0, hidden=hidden[:n - 8])] + [
            last.forward(1, n - 8 + i, hidden=hidden[n - 8 + i:n - 7 + i]) for i in range(8)]
        assert [s is None for s in steps] == [i % 3 != 2 for i in range(8)]
        for i in (2, 5):
            np.testing.assert_array_equal(steps[i], every[1 + i])
        assert last.next_position(0) == last.next_position(1) == n
