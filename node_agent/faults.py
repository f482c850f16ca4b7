"""Cheating on purpose, for tests: an agent started with `--fault KIND` returns wrong stage outputs
and signs them as if they were right, so the audits and the rollback can be shown to catch it.

The kinds are the cheaters of the calibration (DESIGN.md §5):
- skip-layer: the stage really runs on llama.cpp, one layer short (its first layer on a later stage,
  its last on stage 0, which must keep the embeddings);
- cheap-quant: the same layers requantized to Q4_0 and run on llama.cpp;
- noise-<scale>: the honest output plus Gaussian noise of scale x the row's standard deviation;
- replay: each row replaced by the stored output of the position before it (a stale output);
- random: rows of random numbers with the honest row's mean and standard deviation.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from consortium.layers import LayerRange

KINDS = ("skip-layer", "cheap-quant", "noise-<scale>", "replay", "random")


def parse_fault(kind: str | None) -> str | None:
    if not kind:
        return None
    if kind in ("skip-layer", "cheap-quant", "replay", "random"):
        return kind
    m = re.fullmatch(r"noise-([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", kind)
    if m and float(m.group(1)) > 0:
        return kind
    raise ValueError(f"unknown fault {kind!r}: one of {', '.join(KINDS)}")


def engine_range(fault: str | None, layers: LayerRange) -> LayerRange:
    """The layers a cheating engine really runs (skip-layer drops one when the stage has two or more)."""
    if fault != "skip-layer" or layers.count < 2:
        return layers
    if layers.first == 0:
        return LayerRange(layers.first, layers.last - 1)
    return LayerRange(layers.first + 1, layers.last)


def cheap_quant_file(stage_path: str | os.PathLike) -> Path:
    """A Q4_0 requantization of a stage file, made once next to it."""
    import llama_cpp

    src = Path(stage_path)
    out = src.with_name(src.stem + ".cheap-q4_0.gguf")
    if not out.is_file():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not requantize {src} (code {rc})")
        os.replace(tmp, out)
    return out


def tamper(fault: str | None, output: np.ndarray, first_position: int, stored: dict[int, np.ndarray],
           rng: np.random.Generator) -> np.ndarray:
    """The output a cheater sends instead of `output` (rows at first_position..)."""
    if fault is None or fault in ("skip-layer", "cheap-quant"):
        return output  # those cheat inside the engine
    out = np.array(output, dtype=np.float32, copy=True)
    for i in range(out.shape[0]):
        row = out[i]
        sd = float(row.std()) or 1.0
        if fault == "random":
            out[i] = rng.normal(float(row.mean()), sd, row.shape).astype(np.float32)
        elif fault == "replay":
            prev = stored.get(first_position + i - 1)
            if prev is not None and prev.shape == row.shape:
                out[i] = prev
        elif fault.startswith("noise-"):
            scale = float(fault.split("-", 1)[1])
            out[i] = row + (rng.normal(0.0, scale * sd, row.shape)).astype(np.float32)
    return out
