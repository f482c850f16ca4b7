"""The Q4_K_M requantization of the default model and the synthetic models of Llama 3's, Qwen 2.5's
and Qwen 3's shapes: what they are made of, and identical greedy tokens unsplit, split in 3 and split
in 5 (issue: 64 tokens on every supported model)."""
from __future__ import annotations

import time

import gguf
import numpy as np
import pytest

from consortium.generation import generate
from consortium.layers import LayerRange, even_split
from consortium.models import resolve_model
from consortium.tokenizer import Tokenizer, benchmark_prompt
from node_agent.engine import quantize
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.slicing import read_model_info, stage_file
from node_agent.engine.stage import StageConfig

# One thread: the CI machine has 2 cores shared with other jobs, and llama.cpp's spinning
# thread barrier slows down badly when its threads outnumber the free cores.
CONFIG = StageConfig(threads=1, n_ctx=256, n_seq_max=1)
PROMPT = "Explain in one paragraph why the sky appears blue."
MAX_TOKENS = 64


def _tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path), "r").tensors}


def _tokens_per_split(model, prompt_ids, n_layers):
    out = {}
    for n_stages in (1, 3, 5):
        t0 = time.perf_counter()
        with LocalPipeline(model, even_split(n_layers, n_stages), CONFIG) as pipe:
            res = generate(pipe, prompt_ids, MAX_TOKENS)
        print(f"{n_stages} stage(s): {len(res.tokens)} tokens in {time.perf_counter() - t0:.2f}s")
        out[n_stages] = res.tokens
    return out


def test_requantized_default_model_is_q4_k_m():
    src = resolve_model(None)
    model = resolve_model("smollm2-135m-q4_k_m")
    info = read_model_info(model)
    assert info.file_type == "Q4_K_M" and read_model_info(src).file_type == "Q4_1"
    assert (info.n_layers, info.n_embd, info.architecture) == (30, 576, "llama")
    types = _tensor_types(model)
    # Rows 576 wide cannot hold 256-wide K-quant super-blocks, so only ffn_down (rows of 1536) is
    # K-quantized; the rest falls back (Q5_0/Q8_0). None of the source's Q4_1 may remain.
    downs = {v for k, v in types.items() if k.endswith("ffn_down.weight")}
    assert downs <= {"Q4_K", "Q6_K"} and "Q4_K" in downs
    assert "Q4_1" not in types.values()
    # Cached: a second call returns the same file without quantizing again.
    mtime = model.stat().st_mtime_ns
    assert quantize.requantized(src, "Q4_K_M") == model and model.stat().st_mtime_ns == mtime


def test_cheap_quant_differs_from_the_served_model():
    cheap = resolve_model("smollm2-135m-q2_k")
    assert read_model_info(cheap).file_type == "Q2_K"
    assert _tensor_types(cheap)["blk.0.ffn_down.weight"] == "Q3_K"
    assert cheap.stat().st_size < resolve_model(None).stat().st_size


def test_unknown_quantization_type_is_refused():
    with pytest.raises(ValueError, match="unknown quantization type"):
        quantize.ftype_code("Q9_X")


def test_synthetic_llama3_has_llama3s_shape():
    model = resolve_model("synthetic-llama3")
    info = read_model_info(model)
    assert info.architecture == "llama" and info.file_type == "Q4_K_M"
    assert (info.n_vocab, info.n_embd, info.n_layers, info.tied_output) == (128256, 256, 6, False)
    reader = gguf.GGUFReader(str(model), "r")
    assert reader.fields["llama.attention.head_count"].contents() == 8
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "rope_freqs.weight" in types and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"  # width 256: real K-quants, no fallback


@pytest.mark.parametrize("family,extra", [("qwen2", ("attn_q.bias", "attn_k.bias", "attn_v.bias")),
                                          ("qwen3", ("attn_q_norm.weight", "attn_k_norm.weight"))])
def test_synthetic_qwen_models_have_their_familys_shape(family, extra):
    model = resolve_model(f"synthetic-{family}")
    info = read_model_info(model)
    assert info.architecture == family and info.file_type == "Q4_K_M"
    assert (info.n_vocab, info.n_embd, info.n_layers, info.tied_output) == (151936, 256, 6, True)
    reader = gguf.GGUFReader(str(model), "r")
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert all(f"blk.{il}.{name}" in shapes for il in range(6) for name in extra)
    assert "output.weight" not in shapes and "rope_freqs.weight" not in shapes
    if family == "qwen3":   # heads of 128 over a width of 256: attention twice as wide as the stream
        assert reader.fields["qwen3.attention.key_length"].contents() == 128
        assert shapes["blk.0.attn_q.weight"] == [256, 512] and shapes["blk.0.attn_output.weight"] == [512, 256]
    # A stage file keeps its layers' own extra tensors, renumbered from 0.
    stage = stage_file(model, LayerRange(2, 3))
    stage_shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(stage), "r").tensors}
    for name in extra:
        assert stage_shapes[f"blk.0.{name}"] == shapes[f"blk.2.{name}"]
        assert f"blk.2.{name}" not in stage_shapes


def test_a_model_without_a_tokenizer_refuses_text_and_benchmarks_feed_it_ids():
    model = resolve_model("synthetic-llama3")
    tok = Tokenizer(model)
    try:
        assert not tok.has_vocab
        # llama.cpp would abort the process; the tokenizer says why instead.
        with pytest.raises(ValueError, match="no tokenizer"):
            tok.prompt_tokens(PROMPT)
        assert tok.decode([5, 7]) == "5 7"
    finally:
        tok.close()
    ids = benchmark_prompt(model, PROMPT)
    assert len(ids) == len(PROMPT.encode()) and all(0 <= i < 128256 for i in ids)
    tok = Tokenizer(resolve_model(None))
    try:
        assert benchmark_prompt(resolve_model(None), PROMPT) == tok.prompt_tokens(PROMPT)
    finally:
        tok.close()


def test_requantized_default_model_split_gives_identical_tokens():
    model = resolve_model("smollm2-135m-q4_k_m")
    tok = Tokenizer(model)
    prompt_ids = tok.prompt_tokens(PROMPT)
    tok.close()
    runs = _tokens_per_split(model, prompt_ids, 30)
    assert len(runs[1]) == MAX_TOKENS
    assert runs[3] == runs[1]
    assert runs[5] == runs[1]
    assert len(set(runs[1])) > 8  # not a degenerate loop on one token


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_synthetic_models_split_gives_identical_tokens(family):
    model = resolve_model(f"synthetic-{family}")
    n_vocab = read_model_info(model).n_vocab
    # No tokenizer: random ids from the whole vocabulary, including the top end of it.
    prompt_ids = [int(t) for t in np.random.default_rng(3).integers(0, n_vocab, 20)] + [n_vocab - 1]
    runs = _tokens_per_split(model, prompt_ids, 6)
    assert len(runs[1]) == MAX_TOKENS
    assert runs[3] == runs[1]
    assert runs[5] == runs[1]
    assert len(set(runs[1])) > 8
