"""Bad input gets a clear error naming the problem, and the stage keeps working afterwards."""
from __future__ import annotations

import re

import numpy as np
import pytest

from consortium.layers import LayerRange, LayerSplitError, parse_split, validate_split
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.slicing import (ModelChecksumError, UnsupportedModelError, read_model_info, stage_file,
                                       verify_sha256)
from node_agent.engine.stage import Stage, StageConfig, StageInputError


@pytest.mark.parametrize("split, message", [
    ("0-10,10-29", "overlap at layer 10"),
    ("0-12,9-29", "overlap at layers 9-12"),
    ("0-9,12-29", "layers 10-11 are in no stage"),
    ("0-9,10-19,20-31", "runs past the model: it has 30 layers (0-29)"),
    ("0-9,10-19", "layers 20-29 are in no stage"),
    ("3-29", "layers 0-2 are in no stage"),
    ("10-19,0-9,20-29", "out of order"),
    ("9-0", "reversed"),
    ("a-b", "cannot read layer range"),
    ("", "empty layer split"),
])
def test_bad_splits_are_refused_with_the_layers_at_fault(split, message):
    with pytest.raises(LayerSplitError, match=re.escape(message)):
        validate_split(parse_split(split), 30)


def test_a_bad_split_is_refused_before_anything_loads(default_model):
    with pytest.raises(LayerSplitError, match="overlap"):
        LocalPipeline(default_model, parse_split("0-10,10-29"))


def test_cli_reports_a_bad_split_as_an_error(default_model, capsys):
    from consortium.cli import main

    assert main(["generate", "--prompt", "hi", "--max-tokens", "2", "--split", "0-9,12-29"]) == 2
    assert "layers 10-11 are in no stage" in capsys.readouterr().err


@pytest.mark.parametrize("arch,why", [("gpt2", "architecture 'gpt2' is not supported"),
                                      ("gemma2", "architecture 'gemma2' cannot be split: .* sqrt\\(n_embd\\)")])
def test_unsupported_architecture_is_refused_by_name(tmp_path, arch, why):
    import gguf

    path = tmp_path / f"tiny-{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=why):
        stage_file(path, LayerRange(0, 0), cache_dir=tmp_path / "cache")


def test_sha256_mismatch_is_refused(default_model, tmp_path):
    with pytest.raises(ModelChecksumError, match="sha256"):
        verify_sha256(default_model, "0" * 64, cache_dir=tmp_path)
    with pytest.raises(ModelChecksumError):
        LocalPipeline(default_model, None, model_sha256="ab" * 32)


@pytest.fixture(scope="module")
def middle_stage(default_model):
    info = read_model_info(default_model)
    r = LayerRange(10, 19)
    stage = Stage(stage_file(default_model, r), r, info.n_layers, StageConfig(threads=2, n_ctx=256))
    yield stage
    stage.close()


def test_wrong_hidden_states_are_refused_and_the_stage_keeps_serving(middle_stage):
    s = middle_stage
    good = np.random.default_rng(0).standard_normal((3, s.n_embd)).astype(np.float32)
    cases = [
        (dict(hidden=good[:, :100]), "width 100, stage 10-19 expects 576"),
        (dict(hidden=good.reshape(-1)), "must be \\[tokens, 576\\]"),
        (dict(hidden=np.zeros((0, s.n_embd), np.float32)), "must be \\[tokens, 576\\]"),
        (dict(hidden=good.astype(np.float64)), "must be float32"),
        (dict(hidden=np.where(good > 1, np.nan, good).astype(np.float32)), "NaN or Inf"),
        (dict(tokens=np.array([1, 2, 3])), "takes hidden states of width 576, not token ids"),
    ]
    for kwargs, message in cases:
        with pytest.raises(StageInputError, match=message):
            s.forward(0, 0, **kwargs)
    out = s.forward(0, 0, hidden=good)
    assert out.shape == (3, s.n_embd) and np.isfinite(out).all()
    with pytest.raises(StageInputError, match="continues at position 3, not 7"):
        s.forward(0, 7, hidden=good[:1])
    with pytest.raises(StageInputError, match="sequence 9 out of range"):
        s.forward(9, 0, hidden=good)
    with pytest.raises(StageInputError, match="do not fit the context of 256"):
        s.forward(0, 3, hidden=np.zeros((300, s.n_embd), np.float32))
    s.truncate(0, 1)
    assert s.next_position(0) == 1
    np.testing.assert_array_equal(s.forward(0, 1, hidden=good[1:]), out[1:])  # replay after truncation


def test_first_stage_refuses_hidden_states_and_unknown_tokens(default_model):
    info = read_model_info(default_model)
    r = LayerRange(0, 9)
    with Stage(stage_file(default_model, r), r, info.n_layers, StageConfig(threads=2, n_ctx=64)) as s:
        with pytest.raises(StageInputError, match="first stage: it takes token ids"):
            s.forward(0, 0, hidden=np.zeros((1, s.n_embd), np.float32))
        with pytest.raises(StageInputError, match="outside the vocabulary"):
            s.forward(0, 0, tokens=np.array([5, info.n_vocab]))
        assert s.forward(0, 0, tokens=np.array([5, 6])).shape == (2, s.n_embd)
