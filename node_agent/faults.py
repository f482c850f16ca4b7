"""Cheaters: deliberately wrong stage work, for calibration and for `--fault KIND` on a node agent.

Fault classes (the names are used everywhere a fault is injected):

    skip-layer      the stage's layers with one block left out: the middle block j = first + count//2
                    is skipped by running two real llama.cpp stages, layers first..j-1 then j+1..last,
                    each sliced from the model with its original per-layer attributes. Saves 1/count
                    of the stage's compute. Needs a stage of at least 3 layers.
    cheap-quant     the same layers from a cheaper quantization of the same model file, made with
                    llama.cpp's quantizer (default Q2_K; see node_agent.engine.quantize).
    noise-<scale>   the honest output times (1 + scale * N(0, 1)) per element, so a row moves by a
                    relative L2 of about `scale` whatever its magnitude (hidden states of these models
                    have outliers in the thousands next to elements below 1, so noise scaled to a row's
                    RMS would swamp the small elements and say little). e.g. noise-0.01, noise-1.
    replay          the previous token's output sent again (row i gets the honest row i-1 of the same
                    batch, row 0 the honest last row of this sequence's previous call, zeros if none).
    random          gaussian rows with the honest row's mean and standard deviation.
    wrong-token     final stage only: honest rows, but every token it samples it gives (and signs)
                    its row's least likely token instead, steering the answer. Not a row fault: the
                    driver's check of each token against its row catches it, and the node's own
                    signed window proves it (SamplingFraudProof).

API:

    fault = parse_fault("noise-0.01")            # Fault(kind="noise", scale=0.01); name "noise-0.01"
    out = apply_fault(fault, honest_rows, previous=last_row, rng=rng)   # noise, replay, random only
    with CheatingStage(fault, model_path, layers, n_layers_total, config) as stage:
        out = stage.forward(seq, position, tokens=ids)   # same contract as engine.stage.Stage

CheatingStage has Stage's forward/truncate/clear/next_position/close, so a node agent swaps it in
for its honest stage. Output-transform faults may wrap an existing honest Stage (honest=...).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

FAULT_CLASSES = ("skip-layer", "cheap-quant", "noise-<scale>", "replay", "random", "wrong-token")
DEFAULT_NOISE_SCALES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
CHEAP_FTYPE = "Q2_K"
_OUTPUT_FAULTS = ("noise", "replay", "random")
_STAGE_FAULTS = ("skip-layer", "cheap-quant")
_TOKEN_FAULTS = ("wrong-token",)


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str                    # skip-layer, cheap-quant, noise, replay, random, wrong-token
    scale: float | None = None   # noise only

    @property
    def name(self) -> str:
        return f"noise-{self.scale:g}" if self.kind == "noise" else self.kind

    @property
    def transforms_output(self) -> bool:
        """True when the fault is a function of the honest output (no stage of its own)."""
        return self.kind in _OUTPUT_FAULTS

    @property
    def changes_rows(self) -> bool:
        """True when the stage computes other rows than an honest one (every kind but wrong-token)."""
        return self.kind not in _TOKEN_FAULTS


def parse_fault(text: str | Fault) -> Fault:
    if isinstance(text, Fault):
        return text
    t = str(text).strip().lower()
    if t in ("skip-layer", "cheap-quant", "replay", "random", "wrong-token"):
        return Fault(t)
    if t.startswith("noise-"):
        try:
            scale = float(t[len("noise-"):])
        except ValueError:
            scale = -1.0
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"bad noise scale in {text!r}: write noise-<positive number>, e.g. noise-0.01")
        return Fault("noise", scale)
    raise ValueError(f"unknown fault {text!r} (known: {', '.join(FAULT_CLASSES)})")


def apply_fault(fault: Fault | str, honest: np.ndarray, *, previous: np.ndarray | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """The cheater's rows for an output-transform fault, given the honest rows [n, d] (float32)."""
    fault = parse_fault(fault)
    y = np.asarray(honest, dtype=np.float32)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"honest output must be [n, d], got shape {y.shape}")
    rng = rng if rng is not None else np.random.default_rng(0)
    if fault.kind == "noise":
        eps = rng.standard_normal(y.shape, dtype=np.float32)
        return (y * (1.0 + np.float32(fault.scale) * eps)).astype(np.float32)
    if fault.kind == "replay":
        first = np.zeros((1, y.shape[1]), np.float32) if previous is None \
            else np.asarray(previous, np.float32).reshape(1, y.shape[1])
        return np.concatenate([first, y[:-1]], axis=0)
    if fault.kind == "random":
        mean = y.mean(axis=1, keepdims=True, dtype=np.float64)
        std = y.std(axis=1, keepdims=True, dtype=np.float64)
        return (mean + std * rng.standard_normal(y.shape)).astype(np.float32)
    raise ValueError(f"{fault.name} is not an output transform: it needs a CheatingStage")


def skipped_layer(layers) -> int:
    """The block skip-layer leaves out: the middle one, so both halves are real stages."""
    if layers.count < 3:
        raise ValueError(f"skip-layer needs a stage of at least 3 layers, got {layers}")
    return layers.first + layers.count // 2


class CheatingStage:
    """A stage that does its work wrong in the way `fault` says; Stage's interface."""

    def __init__(self, fault: Fault | str, model_path: str | os.PathLike, layers, n_layers_total: int,
                 config=None, *, honest=None, seed: int = 0, cheap_ftype: str = CHEAP_FTYPE):
        from consortium.layers import LayerRange
        from node_agent.engine.slicing import stage_file
        from node_agent.engine.stage import Stage, StageConfig

        self.fault = parse_fault(fault)
        self.layers = layers
        self.is_first = layers.first == 0
        self.is_last = layers.last == n_layers_total - 1
        config = config or StageConfig()
        self._rng = np.random.default_rng(seed)
        self._last: dict[int, np.ndarray] = {}  # replay: the last row sent per sequence
        self._owned = []
        self._parts = []
        if self.fault.transforms_output:
            if honest is None:
                honest = Stage(stage_file(model_path, layers), layers, n_layers_total, config)
                self._owned.append(honest)
            self._parts = [honest]
        elif self.fault.kind == "skip-layer":
            j = skipped_layer(layers)
            for r in (LayerRange(layers.first, j - 1), LayerRange(j + 1, layers.last)):
                self._owned.append(Stage(stage_file(model_path, r), r, n_layers_total, config))
            self._parts = list(self._owned)
        elif self.fault.kind == "cheap-quant":
            from node_agent.engine.quantize import requantized

            cheap = requantized(model_path, cheap_ftype)
            self._owned.append(Stage(stage_file(cheap, layers), layers, n_layers_total, config))
            self._parts = list(self._owned)
        else:  # parse_fault admits nothing else
            raise ValueError(self.fault.name)
        self.n_embd = self._parts[0].n_embd
        self.n_vocab = self._parts[-1].n_vocab

    def forward(self, seq: int, position: int, *, tokens=None, hidden=None, all_logits: bool = False,
                logits: bool = True) -> np.ndarray | None:
        if self.fault.kind == "skip-layer":
            x = self._parts[0].forward(seq, position, tokens=tokens, hidden=hidden)
            return self._parts[1].forward(seq, position, hidden=x, all_logits=all_logits, logits=logits)
        out = self._parts[0].forward(seq, position, tokens=tokens, hidden=hidden, all_logits=all_logits,
                                     logits=logits)
        if out is None or not self.fault.transforms_output:
            return out
        cheat = apply_fault(self.fault, out, previous=self._last.get(seq), rng=self._rng)
        # The next call's first row replays this call's last honest row: the previous token's output.
        self._last[seq] = np.array(out[-1:], dtype=np.float32)
        return cheat

    def next_position(self, seq: int) -> int:
        return self._parts[0].next_position(seq)

    def export_state(self, seq: int, start: int, end: int) -> bytes:
        """The KV state it holds: honest under an output fault, the cheap model's under cheap-quant,
        and for skip-layer its two parts' states one after the other, which no honest stage imports."""
        return b"".join(p.export_state(seq, start, end) for p in self._parts)

    def truncate(self, seq: int, position: int) -> None:
        for p in self._parts:
            p.truncate(seq, position)
        if position <= 0:
            self._last.pop(seq, None)

    def clear(self, seq: int) -> None:
        self.truncate(seq, 0)

    def drop(self, seq: int) -> None:
        """Free what `seq` holds, as Stage.drop (a fenced or released slot of a cheater)."""
        for p in self._parts:
            p.drop(seq)
        self._last.pop(seq, None)

    def close(self) -> None:
        for p in self._owned:
            p.close()
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["FAULT_CLASSES", "DEFAULT_NOISE_SCALES", "CHEAP_FTYPE", "Fault", "parse_fault", "apply_fault",
           "skipped_layer", "CheatingStage"]
