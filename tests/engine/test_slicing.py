"""Stage files: renumbered blocks, per-layer attributes kept, cached by (model sha256, range)."""
from __future__ import annotations

import json

import gguf
import numpy as np

from consortium.layers import LayerRange, even_split
from node_agent.engine.slicing import describe_stage_file, read_model_info, stage_file


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_stage_file_holds_its_blocks_renumbered_and_raw(default_model, tmp_path):
    src, _ = _fields(default_model)
    path = stage_file(default_model, LayerRange(10, 19), cache_dir=tmp_path)
    out, kv = _fields(path)
    assert kv["llama.block_count"] == 10
    assert describe_stage_file(path)["consortium.stage.first_layer"] == 10
    blocks = sorted({int(t.name.split(".")[1]) for t in out.tensors if t.name.startswith("blk.")})
    assert blocks == list(range(10))
    by_name = {t.name: t for t in src.tensors}
    for t in out.tensors:
        if t.name.startswith("blk."):
            il, rest = t.name.split(".", 2)[1:]
            orig = by_name[f"blk.{int(il) + 10}.{rest}"]
            assert t.tensor_type == orig.tensor_type  # still quantized, same type
            assert np.array_equal(np.asarray(t.data), np.asarray(orig.data))  # same bytes
    assert stage_file(default_model, LayerRange(10, 19), cache_dir=tmp_path) == path  # cached


def test_gemma3_stage_writes_its_sliding_window_pattern(gemma_model, tmp_path):
    path = stage_file(gemma_model, LayerRange(7, 12), cache_dir=tmp_path)
    _, kv = _fields(path)
    # Layers 7..12 of an 18-layer Gemma 3: layer 11 (every sixth, counting from 0) is global.
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, True, True, True, False, True]


def test_even_split_covers_the_model(default_model):
    info = read_model_info(default_model)
    ranges = even_split(info.n_layers, 4)
    assert [r.count for r in ranges] == [8, 8, 7, 7]
    assert ranges[0].first == 0 and ranges[-1].last == info.n_layers - 1


def test_a_stages_weight_bytes_are_those_its_file_holds(default_model, tmp_path):
    """What placement counts per stage (read from the tensor index alone) is what the stage file it
    loads holds: the embedding on the first and final stage, the blocks, a one-row stand-in between."""
    from node_agent.engine.slicing import stage_weight_bytes

    info = read_model_info(default_model)
    got = []
    for r in (LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29), LayerRange(0, 29)):
        out, _ = _fields(stage_file(default_model, r, cache_dir=tmp_path))
        assert stage_weight_bytes(info, r) == sum(int(t.n_bytes) for t in out.tensors), r
        got.append(stage_weight_bytes(info, r))
    assert got[0] > 2 * got[1] and got[2] > 2 * got[1]   # the 49152-token embedding outweighs ten blocks
    assert got[3] == sum(info.block_bytes) + info.embd_bytes + info.output_bytes + info.other_bytes


def test_a_middle_stage_carries_no_vocabulary(default_model, tmp_path):
    _, kv = _fields(stage_file(default_model, LayerRange(10, 19), cache_dir=tmp_path))
    assert kv["tokenizer.ggml.model"] == "none" and kv["llama.vocab_size"] == 1
    assert "tokenizer.ggml.tokens" not in kv
    _, first = _fields(stage_file(default_model, LayerRange(0, 9), cache_dir=tmp_path))
    assert first["tokenizer.ggml.model"] != "none" and len(first["tokenizer.ggml.tokens"]) == 49152


def test_model_info_is_parsed_once_per_file_on_this_machine(default_model, tmp_path, monkeypatch):
    from node_agent.engine import slicing

    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path))
    slicing._read_model_info.cache_clear()
    first = read_model_info(default_model)
    [memo] = (tmp_path / "model-info").iterdir()

    # Another process (an empty in-process cache) reads the memo instead of parsing the file.
    def no_parse(path):
        raise AssertionError(f"{path} parsed again")
    slicing._read_model_info.cache_clear()
    monkeypatch.setattr(slicing, "_parse_model_info", no_parse)
    assert read_model_info(default_model) == first and first.n_layers == 30 and first.file_type == "Q4_1"

    # A damaged memo is parsed again and rewritten.
    memo.write_text("{not json")
    slicing._read_model_info.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path))
    assert read_model_info(default_model) == first
    assert json.loads(memo.read_text())["n_layers"] == 30
    slicing._read_model_info.cache_clear()   # later tests find infos under the real cache again
