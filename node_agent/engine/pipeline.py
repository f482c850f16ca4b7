"""All stages of a split in one process: the in-process pipeline used by `consortium generate`,
the single-node baseline (one stage holding every layer) and the engine benchmark."""
from __future__ import annotations

import os
import time

import numpy as np

from consortium.layers import LayerRange, validate_split
from node_agent.engine.slicing import check_supported, read_model_info, stage_file, verify_sha256
from node_agent.engine.stage import Stage, StageConfig


class LocalPipeline:
    def __init__(self, model_path: str | os.PathLike, split: list[LayerRange] | None = None,
                 config: StageConfig = StageConfig(), *, model_sha256: str | None = None):
        self.info = read_model_info(model_path)
        check_supported(self.info)
        digest = verify_sha256(model_path, model_sha256) if model_sha256 else None
        self.split = validate_split(split or [LayerRange(0, self.info.n_layers - 1)], self.info.n_layers)
        self.stages: list[Stage] = []
        try:
            for r in self.split:
                path = stage_file(model_path, r, model_sha256=digest)
                self.stages.append(Stage(path, r, self.info.n_layers, config))
        except Exception:
            self.close()
            raise
        self.n_stages = len(self.stages)
        self._last_ms = [0.0] * self.n_stages

    def forward(self, seq: int, position: int, tokens: np.ndarray) -> np.ndarray:
        x = None
        for i, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            x = stage.forward(seq, position, tokens=tokens) if i == 0 else stage.forward(seq, position, hidden=x)
            self._last_ms[i] = (time.perf_counter() - t0) * 1000.0
        return x[-1]

    def stage_ms(self) -> list[float]:
        return list(self._last_ms)

    def context_positions(self) -> int:
        return min(stage.config.n_ctx for stage in self.stages)

    def reset(self, seq: int = 0) -> None:
        for stage in self.stages:
            stage.clear(seq)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.stages = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
