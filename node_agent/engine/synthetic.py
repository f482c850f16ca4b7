"""Small GGUFs with the shapes of real model families and random weights, for tests that must not
download gigabytes.

- `llama3`: what Llama-3-8B Q4_K_M has and the default model lacks: an untied LM head
  (output.weight), a 128256-token vocabulary, grouped-query attention (8 KV heads for 32 query
  heads), Llama 3.1's rope_freqs tensor, a large rope base (500000), and K-quant weights throughout
  (its width is a multiple of 256).
- `qwen2`: Qwen 2 and 2.5 (llama.cpp's qwen2 architecture): biases on the query, key and value
  projections, rope in NEOX mode (rotating halves, not adjacent pairs), a 151936-token vocabulary,
  and a head tied to the embedding, as the small Qwen 2.5 models have.
- `qwen3`: Qwen 3 (qwen3): no biases but an RMSNorm on every query and key head before the rotation,
  and heads 128 wide whatever the width, so attention is wider than the residual stream
  (`attention.key_length` says so: Qwen3-0.6B has 16 heads of 128 over a width of 1024).

All at a width of 256 and 6 layers, so slicing, each family's per-layer tensors, the vocabulary-sized
logits buffers and GQA are exercised in seconds.

There is no tokenizer (`tokenizer.ggml.model = "none"`): llama.cpp loads it with dummy tokens and
takes the vocabulary size from `<arch>.vocab_size`. Tests feed token ids and decode greedily.
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
_GENERATOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family's files share whatever their size (part of the generator, hence of its version)."""
    arch: str                 # llama.cpp's architecture name
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    qkv_bias: bool = False    # biases on the Q, K and V projections (Qwen 2)
    qk_norm: bool = False     # RMSNorm over each query and key head before rope (Qwen 3)


FAMILIES = {
    "llama3": Family("llama", 8192, 500000.0, 1e-5),
    "qwen2": Family("qwen2", 32768, 1000000.0, 1e-6, qkv_bias=True),
    "qwen3": Family("qwen3", 40960, 1000000.0, 1e-6, qk_norm=True),
}


@dataclasses.dataclass(frozen=True)
class SyntheticModel:
    family: str = "llama3"
    n_layers: int = 6
    n_embd: int = 256
    n_head: int = 8
    n_head_kv: int = 2
    head_dim: int = 0           # 0: n_embd // n_head (written as key_length when it differs)
    n_ff: int = 512
    n_vocab: int = 128256
    tied_output: bool = False   # no output.weight: the LM head is token_embd
    rope_freqs: bool = True     # Llama 3.1's per-frequency scaling factors (llama only)
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({"v": _GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def head_width(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


# Each family's defaults at test size; any field can be overridden (synthetic_model(family, **params)).
DEFAULTS = {
    "llama3": SyntheticModel(),
    "qwen2": SyntheticModel(family="qwen2", n_head=4, n_head_kv=2, n_vocab=151936, tied_output=True,
                            rope_freqs=False),
    "qwen3": SyntheticModel(family="qwen3", n_head=4, n_head_kv=2, head_dim=128, n_vocab=151936,
                            tied_output=True, rope_freqs=False),
}


def _llama31_freq_factors(head_dim: int, base: float) -> np.ndarray:
    """Llama 3.1's rope scaling written as factors that divide each frequency (factor 8, 8192 ctx)."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor,
                                                          1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def spec_for(family: str = "llama3", **params) -> SyntheticModel:
    """The family's test-size model with `params` changed."""
    if family not in DEFAULTS:
        raise ValueError(f"unknown synthetic family {family!r} (known: {', '.join(DEFAULTS)})")
    spec = dataclasses.replace(DEFAULTS[family], **params)
    if spec.rope_freqs and FAMILIES[family].arch != "llama":
        raise ValueError("rope_freqs factors are Llama 3.1's; other families have none")
    return spec


def write_synthetic(path: str | os.PathLike, spec: SyntheticModel, ftype: str = "F32") -> Path:
    """Write the model to `path` as F32, or quantized with llama.cpp (ftype "Q4_K_M", ...)."""
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


def _write_f32(s: SyntheticModel, path: Path) -> Path:
    import gguf

    fam = FAMILIES[s.family]
    if (not s.head_dim and s.n_embd % s.n_head) or s.n_head % s.n_head_kv:
        raise ValueError("n_embd must divide into n_head heads (or head_dim be given), and n_head into "
                         "n_head_kv groups")
    hd = s.head_width
    q_width, kv_width = s.n_head * hd, s.n_head_kv * hd
    rng = np.random.default_rng(s.seed)

    def linear(n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        # Unit-variance inputs give unit-variance outputs: activations neither explode nor vanish.
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * (gain / np.sqrt(n_in))).astype(np.float32)

    def norm(n: int = s.n_embd) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.5 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    # Each layer's two writes into the residual stream are scaled down so that after all layers the
    # stream has grown by a bounded factor rather than by sqrt(2 * n_layers) per unit input.
    resid_gain = 1.0 / np.sqrt(2 * s.n_layers)

    w = gguf.GGUFWriter(str(path), fam.arch)
    w.add_name(f"synthetic-{s.family}")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(fam.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(fam.rope_base)
    w.add_layer_norm_rms_eps(fam.rms_eps)
    w.add_vocab_size(s.n_vocab)
    w.add_tokenizer_model("none")

    # Tensors are given in numpy's (rows=out, cols=in) order; GGUFWriter reverses the shape to
    # GGUF's (ne0=in, ne1=out) as llama.cpp expects.
    # A tied head scores each token by its own embedding, so the input token's embedding, carried in
    # the residual stream, would outscore every other and the model would repeat its input (measured:
    # 15 distinct tokens of 64 at 0.5 / sqrt(n_embd), 20 at 0.1 / sqrt(n_embd)). Small embeddings keep
    # that term below what the layers write; the final norm's gain gives the logits back a standard
    # deviation of about 4, as the untied head's.
    embd_std = 0.1 / np.sqrt(s.n_embd) if s.tied_output else 1.0
    w.add_tensor("token_embd.weight", (rng.standard_normal((s.n_vocab, s.n_embd), dtype=np.float32)
                                       * np.float32(embd_std)))
    if s.rope_freqs:
        w.add_tensor("rope_freqs.weight", _llama31_freq_factors(hd, fam.rope_base))
    for il in range(s.n_layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm())
        w.add_tensor(p + "attn_q.weight", linear(q_width, s.n_embd))
        w.add_tensor(p + "attn_k.weight", linear(kv_width, s.n_embd))
        w.add_tensor(p + "attn_v.weight", linear(kv_width, s.n_embd))
        if fam.qkv_bias:
            w.add_tensor(p + "attn_q.bias", bias(q_width))
            w.add_tensor(p + "attn_k.bias", bias(kv_width))
            w.add_tensor(p + "attn_v.bias", bias(kv_width))
        if fam.qk_norm:
            w.add_tensor(p + "attn_q_norm.weight", norm(hd))
            w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        w.add_tensor(p + "attn_output.weight", linear(s.n_embd, q_width, resid_gain))
        w.add_tensor(p + "ffn_norm.weight", norm())
        w.add_tensor(p + "ffn_gate.weight", linear(s.n_ff, s.n_embd))
        w.add_tensor(p + "ffn_up.weight", linear(s.n_ff, s.n_embd))
        # silu(gate) * up has a variance well below 1; the extra gain brings the FFN's write to the
        # same order as the attention's.
        w.add_tensor(p + "ffn_down.weight", linear(s.n_embd, s.n_ff, 2.0 * resid_gain))
    w.add_tensor("output_norm.weight", norm() * np.float32(40.0 if s.tied_output else 1.0))
    if not s.tied_output:
        # Logits with a standard deviation of about 4: the greedy token stands clear of the runner-up
        # more often than with unit logits over 128256 candidates.
        w.add_tensor("output.weight", linear(s.n_vocab, s.n_embd, 4.0))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def synthetic_model(family: str = "llama3", ftype: str = "Q4_K_M", *, cache_dir: Path | None = None,
                    **params) -> Path:
    """The synthetic model of `family` with `params` (see SyntheticModel) in `ftype`, made once into
    the cache."""
    spec = spec_for(family, **params)
    cache_dir = cache_dir or consortium.cache.cache_dir()
    out = cache_dir / "models" / f"synthetic-{family}-{spec.key()}-{ftype.upper()}.gguf"
    return consortium.cache.made_once(out, lambda tmp: write_synthetic(tmp, spec, ftype))


__all__ = ["Family", "FAMILIES", "SyntheticModel", "DEFAULTS", "spec_for", "write_synthetic", "synthetic_model"]
