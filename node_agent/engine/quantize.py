"""Re-quantizing a GGUF with llama.cpp's own quantizer (llama_model_quantize).

Test models come from here: the default model is shipped as Q4_1, but most real deployments run
Q4_K_M (Llama-3-8B Q4_K_M is the target), so a Q4_K_M copy of it exercises the K-quant kernels on a
model small enough for CI. A cheaper quantization of the same weights (Q2_K, Q3_K_S) is also what a
"cheap-quant" cheater would serve, which calibration needs to tell apart from an honest node.

Re-quantizing an already quantized file dequantizes and quantizes again, so the result is not the
original model at higher fidelity: it is a different model, fine for tests of the engine.
"""
from __future__ import annotations

import os
from pathlib import Path

import consortium.cache
from node_agent.engine.slicing import sha256_file


class QuantizeError(RuntimeError):
    """llama.cpp's quantizer refused or failed."""


def ftype_code(ftype: str) -> int:
    """llama.cpp's LLAMA_FTYPE_* value for a name such as "Q4_K_M", "q2_k" or "F32"."""
    import llama_cpp

    name = ftype.upper()
    for attr in (f"LLAMA_FTYPE_MOSTLY_{name}", f"LLAMA_FTYPE_ALL_{name}"):
        if hasattr(llama_cpp, attr):
            return int(getattr(llama_cpp, attr))
    known = sorted(a.removeprefix("LLAMA_FTYPE_MOSTLY_") for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_"))
    raise ValueError(f"unknown quantization type {ftype!r} (known: F32, {', '.join(known)})")


def requantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str = "Q4_K_M", *,
               allow_requantize: bool = True, threads: int = 0) -> Path:
    """Quantize `src` to `ftype` into `dst` with llama.cpp (written in place; see requantized())."""
    import llama_cpp

    from node_agent.engine import llama as ll

    if not os.path.isfile(src):
        raise FileNotFoundError(f"model file not found: {src}")
    ll.init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_code(ftype)
    params.allow_requantize = bool(allow_requantize)
    params.nthread = int(threads)  # 0: llama.cpp uses every core
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise QuantizeError(f"llama.cpp could not quantize {src} to {ftype} (code {rc}); "
                            "a quantized source needs allow_requantize=True")
    return Path(dst)


def requantized(model_path: str | os.PathLike, ftype: str, *, cache_dir: Path | None = None,
                threads: int = 0) -> Path:
    """`model_path` quantized to `ftype`, made once and cached by (source sha256, ftype)."""
    cache_dir = cache_dir or consortium.cache.cache_dir()
    digest = sha256_file(model_path, cache_dir)
    out = cache_dir / "models" / f"{digest[:16]}-{ftype.upper()}.gguf"
    return consortium.cache.made_once(out, lambda tmp: requantize(model_path, tmp, ftype, threads=threads))


__all__ = ["QuantizeError", "ftype_code", "requantize", "requantized"]
