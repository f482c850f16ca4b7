"""A small GGUF with Llama 3's shape and random weights, for tests that must not download 5 GB.

What Llama-3-8B Q4_K_M has and the default model lacks: an untied LM head (output.weight), a
128256-token vocabulary, grouped-query attention (8 KV heads for 32 query heads), Llama 3.1's
rope_freqs tensor, a large rope base (500000), and K-quant weights throughout (its width is a
multiple of 256). This model has all of them at a width of 256 and 6 layers, so slicing, the untied
head on the final stage only, the vocabulary-sized logits buffers and GQA are exercised in seconds.

There is no tokenizer (`tokenizer.ggml.model = "none"`): llama.cpp loads it with dummy tokens and
takes the vocabulary size from `llama.vocab_size`. Tests feed token ids and decode greedily.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

import consortium.cache

# Bumped when the generator changes, so cached files made by an older generator are not reused.
_GENERATOR_VERSION = 1
# Llama 3's values, fixed (part of the generator, hence of _GENERATOR_VERSION).
_N_CTX_TRAIN = 8192
_ROPE_BASE = 500000.0
_RMS_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SyntheticLlama3:
    n_layers: int = 6
    n_embd: int = 256
    n_head: int = 8
    n_head_kv: int = 2
    n_ff: int = 512
    n_vocab: int = 128256
    rope_freqs: bool = True  # Llama 3.1's per-frequency scaling factors
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({"v": _GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _llama31_freq_factors(head_dim: int, base: float) -> np.ndarray:
    """Llama 3.1's rope scaling written as factors that divide each frequency (factor 8, 8192 ctx)."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor,
                                                          1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def write_synthetic_llama3(path: str | os.PathLike, *, n_layers: int = 6, n_embd: int = 256, n_head: int = 8,
                           n_head_kv: int = 2, n_ff: int = 512, n_vocab: int = 128256, seed: int = 0,
                           rope_freqs: bool = True, ftype: str = "F32") -> Path:
    """Write the model to `path` as F32, or quantized with llama.cpp (ftype "Q4_K_M", ...)."""
    spec = SyntheticLlama3(n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                           n_vocab=n_vocab, seed=seed, rope_freqs=rope_freqs)
    if ftype.upper() == "F32":
        return _write_f32(spec, Path(path))
    from node_agent.engine.quantize import requantize

    tmp = Path(f"{path}.f32.tmp{os.getpid()}")
    try:
        _write_f32(spec, tmp)
        return requantize(tmp, path, ftype, allow_requantize=False)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_f32(s: SyntheticLlama3, path: Path) -> Path:
    import gguf

    if s.n_embd % s.n_head or s.n_head % s.n_head_kv:
        raise ValueError("n_embd must divide into n_head heads, and n_head into n_head_kv groups")
    head_dim = s.n_embd // s.n_head
    rng = np.random.default_rng(s.seed)

    def linear(n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        # Unit-variance inputs give unit-variance outputs: activations neither explode nor vanish.
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * (gain / np.sqrt(n_in))).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(s.n_embd, dtype=np.float32)).astype(np.float32)

    # Each layer's two writes into the residual stream are scaled down so that after all layers the
    # stream has grown by a bounded factor rather than by sqrt(2 * n_layers) per unit input.
    resid_gain = 1.0 / np.sqrt(2 * s.n_layers)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-llama3")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(_N_CTX_TRAIN)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_ROPE_BASE)
    w.add_layer_norm_rms_eps(_RMS_EPS)
    w.add_vocab_size(s.n_vocab)
    w.add_tokenizer_model("none")

    # Tensors are given in numpy's (rows=out, cols=in) order; GGUFWriter reverses the shape to
    # GGUF's (ne0=in, ne1=out) as llama.cpp expects.
    w.add_tensor("token_embd.weight", rng.standard_normal((s.n_vocab, s.n_embd), dtype=np.float32))
    if s.rope_freqs:
        w.add_tensor("rope_freqs.weight", _llama31_freq_factors(head_dim, _ROPE_BASE))
    for il in range(s.n_layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm())
        w.add_tensor(p + "attn_q.weight", linear(s.n_head * head_dim, s.n_embd))
        w.add_tensor(p + "attn_k.weight", linear(s.n_head_kv * head_dim, s.n_embd))
        w.add_tensor(p + "attn_v.weight", linear(s.n_head_kv * head_dim, s.n_embd))
        w.add_tensor(p + "attn_output.weight", linear(s.n_embd, s.n_head * head_dim, resid_gain))
        w.add_tensor(p + "ffn_norm.weight", norm())
        w.add_tensor(p + "ffn_gate.weight", linear(s.n_ff, s.n_embd))
        w.add_tensor(p + "ffn_up.weight", linear(s.n_ff, s.n_embd))
        # silu(gate) * up has a variance well below 1; the extra gain brings the FFN's write to the
        # same order as the attention's.
        w.add_tensor(p + "ffn_down.weight", linear(s.n_embd, s.n_ff, 2.0 * resid_gain))
    w.add_tensor("output_norm.weight", norm())
    # Logits with a standard deviation of about 4: the greedy token stands clear of the runner-up
    # more often than with unit logits over 128256 candidates.
    w.add_tensor("output.weight", linear(s.n_vocab, s.n_embd, 4.0))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def synthetic_llama3(ftype: str = "Q4_K_M", *, cache_dir: Path | None = None, **params) -> Path:
    """The synthetic model for `params` (see SyntheticLlama3) in `ftype`, made once into the cache."""
    spec = SyntheticLlama3(**params)
    cache_dir = cache_dir or consortium.cache.cache_dir()
    out = cache_dir / "models" / f"synthetic-llama3-{spec.key()}-{ftype.upper()}.gguf"
    return consortium.cache.made_once(out, lambda tmp: write_synthetic_llama3(tmp, ftype=ftype, **dataclasses.asdict(spec)))


__all__ = ["SyntheticLlama3", "write_synthetic_llama3", "synthetic_llama3"]
