"""An independent reference implementation of the llama, qwen2 and qwen3 architectures' layers, in numpy.

It shares nothing with llama.cpp but the GGUF file: weights are read and dequantized with gguf-py,
and every operation (RMSNorm, rotary embedding, grouped-query causal attention, SwiGLU) is written
out here from the architecture's definition (qwen2 adds biases to the query, key and value
projections; qwen3 an RMSNorm over each query and key head, and heads of their own width; both
rotate in NEOX mode). Two uses:

- Proving the slicing right. A stage file for layers a..b, run by llama.cpp, must compute what the
  reference computes for layers a..b of the whole model; a slice that is off by one layer or that
  lost a per-layer attribute is far outside the tolerance (tests/engine/test_reference.py).
- A second "hardware". Its float results differ from llama.cpp's CPU kernels (which round
  activations to 8 bits for quantized dot products and keep the KV cache in f16) the way Metal's
  differ from CUDA's, which is what verification tolerances must absorb.

Arithmetic is float64 (weights are dequantized to float32, exactly as stored, and widened), so the
reference's own rounding is negligible beside llama.cpp's and the measured difference is llama.cpp's.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

# Layer tensors every implemented architecture needs, and those each one adds (anything else is
# refused, not ignored).
_LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_ARCH_TENSORS = {
    "llama": (),
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": ("attn_q_norm.weight", "attn_k_norm.weight"),
}
# llama.cpp's rope mode per architecture: "normal" rotates adjacent pairs (2i, 2i+1), "neox" the
# pairs (i, i + n_rot/2).
_ROPE_MODE = {"llama": "normal", "qwen2": "neox", "qwen3": "neox"}


class ReferenceError(ValueError):
    """The model is outside what the reference implements."""


@dataclasses.dataclass
class KVCache:
    """Keys (after rotation) and values per absolute layer index, for incremental decoding.

    Every layer that a run touches must hold the same number of positions: rows are appended at
    position `length(layer)`, exactly like one llama.cpp sequence.
    """
    keys: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)    # [pos, n_head_kv, head_dim]
    values: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def length(self, layer: int) -> int:
        k = self.keys.get(layer)
        return 0 if k is None else k.shape[0]


class ReferenceModel:
    def __init__(self, model_path: str | os.PathLike):
        import gguf

        self.path = Path(model_path)
        self._reader = gguf.GGUFReader(str(model_path), "r")
        fields = self._reader.fields

        def get(key, default=None):
            f = fields.get(key)
            return default if f is None else f.contents()

        arch = get("general.architecture")
        if arch not in _ARCH_TENSORS:
            raise ReferenceError(f"the reference implements the {', '.join(_ARCH_TENSORS)} architectures, "
                                 f"not {arch!r}")
        self.arch = arch
        self.n_layers = int(get(f"{arch}.block_count"))
        self.n_embd = int(get(f"{arch}.embedding_length"))
        self.n_head = int(get(f"{arch}.attention.head_count"))
        n_head_kv = get(f"{arch}.attention.head_count_kv", self.n_head)
        if isinstance(n_head_kv, list):
            raise ReferenceError("per-layer head_count_kv is not implemented")
        self.n_head_kv = int(n_head_kv)
        self.head_dim = int(get(f"{arch}.attention.key_length", self.n_embd // self.n_head))
        if int(get(f"{arch}.attention.value_length", self.head_dim)) != self.head_dim:
            raise ReferenceError("values of another width than keys are not implemented")
        self.n_rot = int(get(f"{arch}.rope.dimension_count", self.head_dim))
        self.rope_mode = _ROPE_MODE[arch]
        self.eps = float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_base = float(get(f"{arch}.rope.freq_base", 10000.0))
        scaling = get(f"{arch}.rope.scaling.type", "none")
        factor = float(get(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
        if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
            raise ReferenceError(f"rope scaling {scaling!r} is not implemented")
        self.rope_freq_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0

        self._tensors = {t.name: t for t in self._reader.tensors}
        self._cache: dict[str, np.ndarray] = {}  # dequantized weights, filled as layers are used
        wanted = _LAYER_TENSORS + _ARCH_TENSORS[arch]
        for il in range(self.n_layers):
            for name in wanted:
                if f"blk.{il}.{name}" not in self._tensors:
                    raise ReferenceError(f"blk.{il}.{name} is missing")
            extra = [n for n in self._tensors if n.startswith(f"blk.{il}.") and n.split(".", 2)[2] not in wanted]
            if extra:
                raise ReferenceError(f"tensors the reference does not implement: {', '.join(extra)}")
        self.tied_output = "output.weight" not in self._tensors
        self.n_vocab = int(self._tensors["token_embd.weight"].shape[1])

        ff = self._tensors.get("rope_freqs.weight")
        self._freq_factors = None if ff is None else self._weight("rope_freqs.weight").astype(np.float64)

    # -- weights ---------------------------------------------------------------------------------

    def _weight(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32 in numpy order: GGUF's (ne0, ne1) becomes shape (ne1, ne0)."""
        w = self._cache.get(name)
        if w is None:
            import gguf

            t = self._tensors[name]
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
            self._cache[name] = w
        return w

    def _layer(self, il: int, name: str, kind: str = "weight") -> np.ndarray:
        return self._weight(f"blk.{il}.{name}.{kind}")

    def _project(self, il: int, h: np.ndarray, name: str, heads: int) -> np.ndarray:
        """h times a Q, K or V projection (plus its bias where the architecture has one), split in heads."""
        out = h @ self._layer(il, name).T
        if f"blk.{il}.{name}.bias" in self._tensors:
            out = out + self._layer(il, name, "bias")
        return out.reshape(h.shape[0], heads, self.head_dim)

    # -- the model -------------------------------------------------------------------------------

    def embed(self, token_ids) -> np.ndarray:
        """Rows of token_embd for the ids: the input of layer 0 (none of these architectures scales it)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token ids must be a non-empty 1-D array in [0, {self.n_vocab})")
        return self._weight("token_embd.weight")[ids].astype(np.float32)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm and LM head (output.weight, or token_embd when the head is tied)."""
        x = self._rms_norm(np.asarray(hidden, dtype=np.float64), self._weight("output_norm.weight"))
        head = self._weight("token_embd.weight" if self.tied_output else "output.weight")
        return x @ head.T.astype(np.float64)

    def run_layers(self, hidden_in: np.ndarray, first: int, last: int, start_pos: int | None = None,
                   kv_cache: KVCache | None = None) -> np.ndarray:
        """Run rows of hidden states (one per token, consecutive positions) through layers first..last.

        Without a cache the rows are a whole prefill starting at start_pos (default 0), attending only
        to each other. With a cache they continue what it holds: start_pos, if given, must equal the
        number of positions cached, and their keys and values are appended.
        Returns float32 [n, n_embd]: the output of layer `last` (llama.cpp's l_out-<last>).
        """
        x = np.asarray(hidden_in, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_embd or x.shape[0] == 0:
            raise ValueError(f"hidden states must be [n, {self.n_embd}], got {x.shape}")
        if not 0 <= first <= last < self.n_layers:
            raise ValueError(f"layers {first}-{last} are outside the model's 0-{self.n_layers - 1}")
        cached = kv_cache.length(first) if kv_cache is not None else 0
        if kv_cache is not None and any(kv_cache.length(il) != cached for il in range(first, last + 1)):
            raise ValueError(f"the cache holds different lengths for layers {first}-{last}")
        if start_pos is None:
            start_pos = cached
        elif kv_cache is not None and start_pos != cached:
            raise ValueError(f"the cache continues at position {cached}, not {start_pos}")
        positions = np.arange(start_pos, start_pos + x.shape[0])
        cos, sin = self._rope_tables(positions)
        for il in range(first, last + 1):
            x = self._block(il, x, positions, cos, sin, kv_cache)
        return x.astype(np.float32)

    def _block(self, il: int, x: np.ndarray, positions: np.ndarray, cos, sin, kv_cache: KVCache | None):
        n = x.shape[0]
        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        h = self._rms_norm(x, self._layer(il, "attn_norm"))
        q = self._project(il, h, "attn_q", nh)
        k = self._project(il, h, "attn_k", nkv)
        v = self._project(il, h, "attn_v", nkv)
        if self.arch == "qwen3":   # RMSNorm over each head's own width, before the rotation
            q = self._rms_norm(q, self._layer(il, "attn_q_norm"))
            k = self._rms_norm(k, self._layer(il, "attn_k_norm"))
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        if kv_cache is not None:
            if il in kv_cache.keys:
                k = np.concatenate([kv_cache.keys[il], k], axis=0)
                v = np.concatenate([kv_cache.values[il], v], axis=0)
            kv_cache.keys[il], kv_cache.values[il] = k, v
        key_pos = np.arange(positions[0] - (k.shape[0] - n), positions[-1] + 1)
        # Query head j reads KV head j // (nh / nkv): consecutive query heads share one KV head.
        group = nh // nkv
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(key_pos[None, None, :] <= positions[None, :, None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", p, v).reshape(n, nh * hd)
        x = x + attn @ self._layer(il, "attn_output").T
        h = self._rms_norm(x, self._layer(il, "ffn_norm"))
        gate = h @ self._layer(il, "ffn_gate").T
        up = h @ self._layer(il, "ffn_up").T
        return x + (gate / (1.0 + np.exp(-gate)) * up) @ self._layer(il, "ffn_down").T

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope_tables(self, positions: np.ndarray):
        # Pair i of the n_rot/2 rotated pairs turns by pos * base^(-2i/n_rot), divided by
        # rope_freqs[i] when the model has it (Llama 3.1's long-context factors). Which dimensions
        # form pair i is the mode's business (_rope).
        inv = self.rope_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        inv = inv * self.rope_freq_scale
        if self._freq_factors is not None:
            inv = inv / self._freq_factors
        theta = positions[:, None].astype(np.float64) * inv[None, :]
        return np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # [n, 1, n_rot/2]

    def _rope(self, x: np.ndarray, cos, sin) -> np.ndarray:
        # "normal" (llama: converters permute Q and K so that adjacent pairs equal HF's form): pair i
        # is dimensions (2i, 2i+1). "neox" (qwen2, qwen3, HF's rotate_half): (i, i + n_rot/2).
        if self.rope_mode == "normal":
            first, second = slice(0, self.n_rot, 2), slice(1, self.n_rot, 2)
        else:
            first, second = slice(0, self.n_rot // 2), slice(self.n_rot // 2, self.n_rot)
        out = x.copy()
        x0, x1 = x[..., first], x[..., second]
        out[..., first] = x0 * cos - x1 * sin
        out[..., second] = x0 * sin + x1 * cos
        return out  # dimensions past n_rot (if any) pass unrotated


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: how far `a` is from `b`, relative to the size of `b`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def row_relative_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """relative_l2 of each row (token) on its own.

    Needed beside the whole-tensor figure: in the middle of a llama model the first token's hidden
    state (the attention sink) can be 100 times larger than the others, so a whole-tensor figure
    measures that one row and barely sees the rest.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


__all__ = ["ReferenceModel", "KVCache", "ReferenceError", "relative_l2", "row_relative_l2"]
