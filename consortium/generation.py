"""The token loop, written once for every way of running the stages.

A pipeline turns the rows of one sequence at a position into the final stage's logits for the last
row; in process (node_agent.engine.pipeline.LocalPipeline) or over the network (the session driver).
This module prefills the prompt, samples, feeds each token back, and keeps the figures a report
needs: per-token latency, per-stage time, prefill time and decode rate.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Protocol

import numpy as np

from consortium.sampling import SamplingParams, sample


class ContextFull(ValueError):
    """The prompt alone is longer than the context the stages hold."""


class Pipeline(Protocol):
    n_stages: int

    def forward(self, seq: int, position: int, tokens: np.ndarray) -> np.ndarray:
        """Logits [n_vocab] of the last row of `tokens`, placed at `position`.. of sequence `seq`."""

    def stage_ms(self) -> list[float]:
        """Milliseconds each stage spent in the last forward call."""

    # Optional: forward_token(seq, position, tokens, sampling) -> the token sampled at
    # position + len(tokens), where the pipeline samples it itself (the session driver asks the
    # final stage's node); generate() then uses it instead of forward() and sample().
    # Optional: context_positions() -> how many positions a sequence can hold on every stage (None:
    # unknown); generation stops there ("context_full") instead of sending a step no stage can take.


@dataclasses.dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill_ms: float
    # Wall time of each token this run generated (the first includes prefill), and per stage: after
    # `resume`, the tokens an earlier run generated have none, so these hold the last ones only.
    token_ms: list[float]
    stage_ms: list[list[float]]
    stopped: str                           # "max_tokens", "end_of_generation", "context_full" or stop()'s reason
    rewinds: int = 0                       # rollbacks that regenerated from an earlier position

    @property
    def decode_s(self) -> float:
        return sum(self.token_ms[1:]) / 1000.0

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first this run generated over the time they took (prefill
        excluded)."""
        n = len(self.token_ms) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def per_stage_mean_ms(self) -> list[float]:
        rows = self.stage_ms[1:] or self.stage_ms
        return [float(np.mean(col)) for col in zip(*rows)] if rows else []

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt_tokens),
            "tokens": self.tokens,
            "text": self.text,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "token_ms": [round(x, 3) for x in self.token_ms],
            "per_stage_ms": [round(x, 3) for x in self.per_stage_mean_ms()],
            "stopped": self.stopped,
        }


def generate(pipeline: Pipeline, prompt_tokens: list[int], max_tokens: int, *,
             sampling: SamplingParams = SamplingParams(), is_end: Callable[[int], bool] | None = None,
             detokenize: Callable[[list[int]], str] | None = None, seq: int = 0,
             progress: Callable[[int, int, float], None] | None = None,
             resume: list[int] | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             stop: Callable[[], str | None] | None = None) -> GenerationResult:
    """Greedy or seeded sampling of up to max_tokens after the prompt.

    resume: tokens an earlier run of the same session already generated (the pipeline's stages hold
    the KV of every position but the last token's): generation goes on from there instead of
    prefilling again. on_token: called with the tokens so far after each one (and after a rewind), so
    a caller can save progress. stop: asked before each token; a reason it gives ends generation
    there, as `stopped`.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not prompt_tokens:
        raise ValueError("the prompt is empty")
    context = getattr(pipeline, "context_positions", None)
    limit = context() if context else None
    if limit is not None and len(prompt_tokens) > limit:
        raise ContextFull(f"the prompt's {len(prompt_tokens)} tokens do not fit the {limit} positions a sequence "
                          f"can hold on the stages")
    tokens: list[int] = []
    token_ms: list[float] = []
    stage_ms: list[list[float]] = []
    position = 0
    feed = np.asarray(prompt_tokens, dtype=np.int32)
    if resume:
        tokens = [int(t) for t in resume]
        position = len(prompt_tokens) + len(tokens) - 1
        feed = np.asarray(tokens[-1:], dtype=np.int32)
    prefill_ms = 0.0
    stopped = "end_of_generation" if resume and is_end is not None and is_end(int(resume[-1])) else "max_tokens"
    # A pipeline that audits (the session driver) may ask to regenerate from an earlier position
    # after a rollback; it is asked after every token and, waiting for its audits, at the end.
    rewind = getattr(pipeline, "rewind_position", None)
    forward_token = getattr(pipeline, "forward_token", None)
    rewinds = 0
    while True:
        limit = context() if context else None   # a failover may have placed a stage on a smaller node
        full = limit is not None and position + len(feed) > limit
        if full and stopped != "end_of_generation" and len(tokens) < max_tokens:
            stopped = "context_full"
        if stop is not None and stopped == "max_tokens" and len(tokens) < max_tokens:
            stopped = stop() or stopped
        if len(tokens) >= max_tokens or stopped != "max_tokens":
            q = rewind(wait=True) if rewind else None
            if q is None:
                break
        else:
            t0 = time.perf_counter()
            if forward_token is not None:
                token = forward_token(seq, position, feed, sampling)
                position += len(feed)
            else:
                logits = pipeline.forward(seq, position, feed)
                position += len(feed)
                token = sample(logits, position, sampling)  # position: where the new token will sit
            dt = (time.perf_counter() - t0) * 1000.0
            if not tokens:
                prefill_ms = dt
            tokens.append(token)
            token_ms.append(dt)
            stage_ms.append(pipeline.stage_ms())
            if progress:
                progress(len(tokens), max_tokens, dt)
            if on_token:
                on_token(list(tokens))
            if is_end is not None and is_end(token):
                stopped = "end_of_generation"
            feed = np.asarray([token], dtype=np.int32)
            q = rewind(wait=False) if rewind else None
            if q is None:
                continue
        # Rows from position q on were wrong: keep the tokens up to the one at q and go on from there.
        rewinds += 1
        stopped = "max_tokens"
        keep = max(0, q - len(prompt_tokens) + 1) if q >= len(prompt_tokens) else 0
        earlier = len(tokens) - len(token_ms)   # tokens a resumed run was given, without timings
        del tokens[keep:], token_ms[max(0, keep - earlier):], stage_ms[max(0, keep - earlier):]
        if q < len(prompt_tokens) or not tokens:
            position, feed = 0, np.asarray(prompt_tokens, dtype=np.int32)
            del tokens[:], token_ms[:], stage_ms[:]
        else:
            # The token at q is kept and fed again; the one after it is sampled again.
            position, feed = q, np.asarray([(list(prompt_tokens) + tokens)[q]], dtype=np.int32)
        if on_token:
            on_token(list(tokens))
    text = detokenize(tokens) if detokenize else ""
    return GenerationResult(list(prompt_tokens), tokens, text, prefill_ms, token_ms, stage_ms, stopped, rewinds)


@dataclasses.dataclass(frozen=True)
class StopSequences:
    """OpenAI's `stop`: strings whose appearance in the generated text ends generation. The token
    loop stops after the token that completes one; an answer shows the text before it."""
    sequences: tuple[str, ...] = ()

    @classmethod
    def of(cls, sequences) -> "StopSequences":
        return cls(tuple(s for s in sequences or () if s))

    def __bool__(self) -> bool:
        return bool(self.sequences)

    @property
    def tokens_to_decode(self) -> int:
        """How many of the last tokens hold every character a sequence could span: a token decodes
        to at least one byte, a character takes at most four."""
        return 4 * max(map(len, self.sequences), default=0) + 8

    def found(self, text: str) -> tuple[int, str] | None:
        """The first place in `text` where a sequence begins, and which (None: none does)."""
        hits = [(i, s) for s in self.sequences if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def in_tail(self, tokens: list[int], detokenize: Callable[[list[int]], str]) -> str | None:
        """The sequence that the last tokens' text contains, if any (checked after each token, so
        only the tail is decoded)."""
        hit = self.found(detokenize(tokens[-self.tokens_to_decode:])) if self and tokens else None
        return hit[1] if hit else None

    def shown(self, text: str, final: bool) -> str:
        """What of the text so far an answer may show: up to the first sequence; while generating,
        not a tail that may yet become one."""
        hit = self.found(text)
        if hit:
            return text[:hit[0]]
        if final:
            return text
        held = max((k for s in self.sequences for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - held]


def terminal_progress(label: str) -> Callable[[int, int, float], None] | None:
    """A one-line progress display on a terminal; nothing when output is redirected."""
    if not sys.stderr.isatty():
        return None
    start = time.perf_counter()

    def show(done: int, total: int, _ms: float) -> None:
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{label}: {done}/{total} tokens, {rate:.1f} tok/s\x1b[K{end}")
        sys.stderr.flush()

    return show
