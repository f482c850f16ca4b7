"""A loaded pipeline stage: a llama.cpp context over one stage file.

The first stage takes token ids, later stages take float32 hidden states (one row per token, written
into llama_batch.embd). A non-final stage returns the hidden state of its last layer for every row,
captured by an eval callback that also stops the graph there; the final stage returns logits. The
weights are loaded once per stage; each sequence (session, audit replay) gets a llama.cpp context of
its own, made when first used, which can be truncated to a position so that a replay or a rollback
continues from there.

Why a context per sequence: in one KV cache that several sequences share, a sequence's new row takes
the first free cell, and cells that another sequence freed (an audit slot emptied, a session over, a
rollback) lie before the cells of rows already there. llama.cpp sums attention over cells in cell
order, so the same rows in another order give other bits: a stage 10-19 of
the default model read 1-6% relative L2 off the single node's rows from the first such step on.
Alone in its context, a sequence's cells are its positions in order, as in a single-node run.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from typing import Sequence

import llama_cpp
import numpy as np

from consortium.layers import LayerRange
from node_agent.engine import llama as ll


class StageInputError(ValueError):
    """The input does not fit this stage: wrong kind, width, count, position or non-finite values."""


@dataclasses.dataclass(frozen=True)
class StageConfig:
    threads: int = 0              # 0: every core of this machine
    n_ctx: int = 2048             # positions each sequence can hold (the KV cells of its context)
    n_seq_max: int = 4            # sequences (sessions, audit replays) the stage holds at once
    # Rows per llama_decode call. llama.cpp reserves n_vocab floats of logits per output row even on
    # stages that never compute logits, and every row of a non-final stage is an output, so this
    # bounds that memory (64 rows x 128256 vocab x 4 B = 33 MB for Llama 3).
    n_batch: int = 64
    repack: bool = True           # llama.cpp's CPU weight repacking (use_extra_bufts); off = other kernels
    n_gpu_layers: int = -1        # -1: offload every layer when the build has a GPU backend

    def resolved_threads(self) -> int:
        return self.threads or usable_cores()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (a pod's cpuset, a
    taskset), which os.cpu_count() ignores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:   # macOS
        return os.cpu_count() or 1


class Stage:
    def __init__(self, path: str | os.PathLike, layers: LayerRange, n_layers_total: int,
                 config: StageConfig = StageConfig()):
        ll.init_backend()
        self.path = str(path)
        self.layers = layers
        self.is_first = layers.first == 0
        self.is_last = layers.last == n_layers_total - 1
        self.config = config
        self._lock = threading.Lock()  # one llama_decode at a time per stage (the weights' caches)

        mparams = llama_cpp.llama_model_default_params()
        mparams.use_mmap = True
        mparams.use_extra_bufts = bool(config.repack)
        mparams.n_gpu_layers = (999 if config.n_gpu_layers < 0 else config.n_gpu_layers) \
            if llama_cpp.llama_supports_gpu_offload() else 0
        self._model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise ll.LlamaError(f"llama.cpp could not load stage file {self.path}")
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        n_layer = llama_cpp.llama_model_n_layer(self._model)
        if n_layer != layers.count:
            self.close()
            raise ll.LlamaError(f"stage file {self.path} has {n_layer} layers, expected {layers.count} ({layers})")

        self._capture = None
        if not self.is_last:
            self._capture = ll.LayerOutputCapture(n_layer - 1, config.n_batch, self.n_embd)
        self._contexts: dict[int, tuple] = {}   # sequence -> (llama context, its memory)
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0 if self.is_first else self.n_embd, 1)
        self.forward_steps = 0  # llama_decode calls, for the benchmark and counters
        try:
            self._context(0)   # the first one now: a stage that cannot make one fails at load
        except ll.LlamaError:
            self.close()
            raise

    # Inside a sequence's context the sequence is llama.cpp's sequence 0; sequence 1 is the scratch
    # sequence that export_state and import_state pass ranges through (it shares cells, not memory).
    _SEQ, _SCRATCH = 0, 1

    def _context(self, seq: int, create: bool = True):
        """The llama.cpp context and memory of `seq` (made on first use; None if not made and not `create`)."""
        got = self._contexts.get(seq)
        if got is not None or not create:
            return got
        with self._lock:
            if seq not in self._contexts:
                self._contexts[seq] = self._new_context()
            return self._contexts[seq]

    def _new_context(self, n_ctx: int | None = None) -> tuple:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx or self.config.n_ctx
        cparams.n_batch = cparams.n_ubatch = self.config.n_batch
        cparams.n_seq_max = 2
        cparams.n_threads = cparams.n_threads_batch = self.config.resolved_threads()
        cparams.kv_unified = True   # the scratch sequence shares the sequence's cells
        cparams.no_perf = True
        if self._capture is not None:
            cparams.cb_eval = self._capture.callback
            cparams.cb_eval_user_data = self._capture.user_data
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ll.LlamaError(f"llama.cpp could not create a context for {self.path} (n_ctx={self.config.n_ctx})")
        return ctx, llama_cpp.llama_get_memory(ctx)

    # -- sequences -------------------------------------------------------------------------------

    def next_position(self, seq: int) -> int:
        """The position the next row of `seq` must have (0 for an empty sequence)."""
        self._check_seq(seq)
        got = self._context(seq, create=False)
        return 0 if got is None else int(llama_cpp.llama_memory_seq_pos_max(got[1], self._SEQ)) + 1

    def set_threads(self, seq: int, threads: int) -> None:
        """Run the forward steps of `seq` on `threads` llama.cpp threads from now on (an audit
        replay on fewer cores than the sessions' steps). The rows do not depend on it (checked on
        the CPU backend: tests/engine/test_threads.py)."""
        self._check_seq(seq)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        ctx, _ = self._context(seq)
        with self._lock:
            llama_cpp.llama_set_n_threads(ctx, threads, threads)

    def threads(self, seq: int) -> int:
        """The llama.cpp threads the forward steps of `seq` run on."""
        self._check_seq(seq)
        return int(llama_cpp.llama_n_threads(self._context(seq)[0]))

    def truncate(self, seq: int, position: int) -> None:
        """Forget positions >= `position` of `seq`, so the sequence continues from there."""
        self._check_seq(seq)
        got = self._context(seq, create=False)
        if got is None:
            return   # never used: nothing to forget
        with self._lock:
            if not llama_cpp.llama_memory_seq_rm(got[1], self._SEQ, max(0, position), -1):
                raise ll.LlamaError(f"llama.cpp could not truncate sequence {seq} at position {position}")

    def clear(self, seq: int) -> None:
        self.truncate(seq, 0)

    def drop(self, seq: int) -> None:
        """Free the context of `seq` (its KV cache and compute buffers); a later use makes a new one."""
        self._check_seq(seq)
        with self._lock:
            got = self._contexts.pop(seq, None)
            if got is not None:
                llama_cpp.llama_free(got[0])

    # -- KV state: a range of positions out of one stage and into another -------------------------

    def export_state(self, seq: int, start: int, end: int) -> bytes:
        """llama.cpp's serialized KV cache for positions start..end-1 of `seq`: every layer's keys
        and values at those positions, in the cache's own types (llama_state_seq_get_data's format).

        Another context of the same stage file and build continues from it (import_state) exactly
        as this one would: a window of rows replayed there after the earlier windows' states gives
        the rows this stage gave, bit for bit, without replaying every earlier position.
        """
        self._check_seq(seq)
        have = self.next_position(seq)
        if not 0 <= start < end <= have:
            raise StageInputError(f"positions {start}..{end - 1} are not all in sequence {seq} (it holds 0..{have - 1})")
        ctx, mem = self._context(seq)
        with self._lock:
            return self._state_of(ctx, mem, start, end)

    def _state_of(self, ctx, mem, start: int, end: int) -> bytes:
        """export_state's bytes from a context; called with self._lock held."""
        scratch = self._SCRATCH
        llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
        try:
            llama_cpp.llama_memory_seq_cp(mem, self._SEQ, scratch, start, end)
            size = llama_cpp.llama_state_seq_get_size(ctx, scratch)
            buf = (ctypes.c_uint8 * size)()
            got = llama_cpp.llama_state_seq_get_data(ctx, buf, size, scratch)
        finally:
            llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
        if got != size:
            raise ll.LlamaError(f"llama.cpp wrote {got} of {size} bytes of state for positions {start}..{end - 1}")
        return bytes(buf)

    def import_state(self, seq: int, states: list[bytes]) -> int:
        """Replace `seq` with the positions of `states` (export_state's, of this stage file and
        build), which must cover 0..n-1 in order; returns n, where the sequence continues."""
        self._check_seq(seq)
        ctx, mem = self._context(seq)
        seq, scratch = self._SEQ, self._SCRATCH
        with self._lock:
            llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
            try:
                for i, state in enumerate(states):
                    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
                    if llama_cpp.llama_state_seq_set_data(ctx, buf, len(state), scratch) != len(state):
                        raise StageInputError(f"state {i} does not fit this stage ({self.layers}: another model, "
                                              "stage, build or cache type, or truncated)")
                    lo = llama_cpp.llama_memory_seq_pos_min(mem, scratch)
                    hi = llama_cpp.llama_memory_seq_pos_max(mem, scratch)
                    expected = llama_cpp.llama_memory_seq_pos_max(mem, seq) + 1
                    if lo != expected:
                        raise StageInputError(f"state {i} holds positions {lo}..{hi}, the sequence continues at {expected}")
                    llama_cpp.llama_memory_seq_cp(mem, scratch, seq, lo, hi + 1)
                    llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
            except BaseException:
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)   # never half a prefix
                raise
            finally:
                llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
        return int(llama_cpp.llama_memory_seq_pos_max(mem, seq)) + 1

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.config.n_seq_max:
            raise StageInputError(f"sequence {seq} out of range: this stage holds {self.config.n_seq_max} (0-{self.config.n_seq_max - 1})")

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, seq: int, position: int, *, tokens=None, hidden=None, all_logits: bool = False,
                logits: bool = True) -> np.ndarray | None:
        """Run rows at positions position.. of sequence `seq` through the stage.

        Returns float32 [n, n_embd] hidden states on a non-final stage; on the final stage, logits
        [1, n_vocab] for the last row (or [n, n_vocab] for every row with all_logits), or None with
        logits=False: the rows then only extend the KV cache, which skips the LM head (on a small
        model about half of the final stage's time) and leaves the cache bit for bit the same.
        """
        rows = self._check_input(seq, position, tokens, hidden)
        n = len(rows)
        outputs = []
        self._context(seq)
        with self._lock:
            for start in range(0, n, self.config.n_batch):
                chunk = rows[start:start + self.config.n_batch]
                last_chunk = start + len(chunk) == n
                outputs.append(self._decode(seq, position + start, chunk, all_logits and logits,
                                            last_chunk and logits))
        outputs = [o for o in outputs if o is not None]
        if not outputs:
            return None
        return np.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]

    def _check_input(self, seq, position, tokens, hidden):
        self._check_seq(seq)
        if (tokens is None) == (hidden is None):
            raise StageInputError("give either token ids or hidden states")
        if self.is_first and tokens is None:
            raise StageInputError(f"stage {self.layers} is the first stage: it takes token ids, not hidden states")
        if not self.is_first and hidden is None:
            raise StageInputError(f"stage {self.layers} takes hidden states of width {self.n_embd}, not token ids")
        if tokens is not None:
            rows = np.asarray(tokens)
            if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
                raise StageInputError(f"token ids must be a non-empty 1-D integer array, got shape {rows.shape} {rows.dtype}")
            bad = rows[(rows < 0) | (rows >= self.n_vocab)]
            if bad.size:
                raise StageInputError(f"token id {int(bad[0])} is outside the vocabulary (0-{self.n_vocab - 1})")
            rows = rows.astype(np.int32)
        else:
            rows = np.asarray(hidden)
            if rows.ndim != 2 or rows.shape[0] == 0:
                raise StageInputError(f"hidden states must be [tokens, {self.n_embd}], got shape {rows.shape}")
            if rows.shape[1] != self.n_embd:
                raise StageInputError(f"hidden states have width {rows.shape[1]}, stage {self.layers} expects {self.n_embd}")
            if rows.dtype != np.float32:
                raise StageInputError(f"hidden states must be float32, got {rows.dtype}")
            if not np.isfinite(rows).all():
                raise StageInputError("hidden states contain NaN or Inf")
            rows = np.ascontiguousarray(rows)
        expected = self.next_position(seq)
        if position != expected:
            raise StageInputError(f"sequence {seq} continues at position {expected}, not {position} "
                                  f"(truncate it first to replay from an earlier position)")
        if position + len(rows) > self.config.n_ctx:
            raise StageInputError(f"{position + len(rows)} positions do not fit the context of {self.config.n_ctx}")
        return rows

    def batch_invariant_sizes(self, max_rows: int, candidates: Sequence[int] | None = None, *,
                              logits: bool = True) -> list[int]:
        """The batch sizes 2..max_rows (or those of `candidates`) in which decode steps give this
        stage's rows (logits, on the final stage) and keys and values bit for bit as one-row steps
        do, here: on this backend, build and weights' kernels. A replay may merge decode steps into
        batches of these sizes and still reproduce them, with fewer passes over the weights. Checked
        on a scratch context after a few rows of prefix, with inputs of the stage's kind, against
        max_rows one-row steps; costs about max_rows one-row steps and one batch of each size.
        logits=False, on the final stage: the keys and values alone, for replays that only rebuild
        the KV cache (without the LM head, most of the check's cost on a large vocabulary)."""
        if not 1 < max_rows <= self.config.n_batch:
            raise ValueError(f"max_rows must be in 2..{self.config.n_batch} (the batch size), got {max_rows}")
        sizes_to_check = sorted({k for k in (candidates or range(2, max_rows + 1)) if 1 < k <= max_rows})
        prefix = 8
        rng = np.random.default_rng(max_rows)
        if self.is_first:
            x = rng.integers(0, self.n_vocab, size=prefix + max_rows).astype(np.int32)
        else:
            x = rng.standard_normal((prefix + max_rows, self.n_embd)).astype(np.float32)
        # One llama_decode at a time under the stage's lock, as everywhere, but not the whole check
        # under it: an agent checks a stage that may be serving (or replaying) from other threads.
        with self._lock:
            ctx, mem = self._new_context(prefix + max_rows + 1)
        try:
            rows = logits or not self.is_last

            def decode(position, n):
                with self._lock:
                    return self._decode_in(ctx, position, x[position:position + n], rows, rows)

            with self._lock:
                self._decode_in(ctx, 0, x[:prefix], False, False)
            steps = [decode(p, 1) for p in range(prefix, prefix + max_rows)]
            steps = np.concatenate(steps) if rows else None
            with self._lock:
                states = {k: self._state_of(ctx, mem, prefix, prefix + k) for k in sizes_to_check}
            sizes = []
            for k in sizes_to_check:
                with self._lock:
                    llama_cpp.llama_memory_seq_rm(mem, self._SEQ, prefix, -1)
                    batch = self._decode_in(ctx, prefix, x[prefix:prefix + k], rows, rows)
                    same = self._state_of(ctx, mem, prefix, prefix + k) == states[k]
                if same and (not rows or batch.tobytes() == steps[:k].tobytes()):
                    sizes.append(k)
        finally:
            with self._lock:
                llama_cpp.llama_free(ctx)
        return sizes

    def _decode(self, seq: int, position: int, rows: np.ndarray, all_logits: bool, last_logits: bool):
        return self._decode_in(self._contexts[seq][0], position, rows, all_logits, last_logits)

    def _decode_in(self, ctx, position: int, rows: np.ndarray, all_logits: bool, last_logits: bool):
        b = self._batch
        n = len(rows)
        b.n_tokens = n
        if self.is_first:
            ctypes.memmove(b.token, rows.ctypes.data, rows.nbytes)
        else:
            ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        want_logits = self.is_last and (all_logits or last_logits)
        for i in range(n):
            b.pos[i] = position + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = self._SEQ
            # Every row of a non-final stage is an output: llama.cpp drops non-output rows inside
            # the last layer, and the next stage needs them all.
            b.logits[i] = 1 if not self.is_last else int(all_logits or (last_logits and i == n - 1)) if want_logits else 0
        if self._capture is not None:
            self._capture.reset()
        rc = llama_cpp.llama_decode(ctx, b)
        self.forward_steps += 1
        if rc != 0:
            raise ll.LlamaError(f"llama_decode failed with code {rc}" + (" (no room in the KV cache)" if rc == 1 else ""))
        if self._capture is not None:
            return self._capture.result(n)
        if not want_logits:
            return None
        idx = range(n) if all_logits else [n - 1]
        out = np.empty((len(idx), self.n_vocab), dtype=np.float32)
        for j, i in enumerate(idx):
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        for ctx, _ in getattr(self, "_contexts", {}).values():
            llama_cpp.llama_free(ctx)
        self._contexts = {}
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
