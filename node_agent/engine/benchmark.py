"""The stage engine's benchmark: split-in-process speed against unsplit, and each stage's memory.

Speed: the unsplit model and the split run alternate token by token in one process, on the same
prompt, for several rounds; the median of the per-round ratios is reported, so drifting load on a
shared machine hits both sides alike. Memory: each stage is loaded alone in a fresh process, and its
resident memory after a prefill and some decoding is set against the bytes of the weights it owns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from consortium.layers import LayerRange, format_split


def _interleaved(a, b, prompt: np.ndarray, n_tokens: int) -> tuple[float, float]:
    """Decode n_tokens on pipelines a and b alternately, token by token; return each one's tokens/s.

    Alternating at token granularity puts both under the same load at the same moments, which
    matters on a shared 2-core machine where load changes by the second.
    """
    ta = tb = 0.0
    a.reset(0)
    b.reset(0)
    la, lb = a.forward(0, 0, prompt), b.forward(0, 0, prompt)
    pos = len(prompt)
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        la = a.forward(0, pos, np.asarray([int(np.argmax(la))], dtype=np.int32))
        t1 = time.perf_counter()
        lb = b.forward(0, pos, np.asarray([int(np.argmax(lb))], dtype=np.int32))
        t2 = time.perf_counter()
        ta += t1 - t0
        tb += t2 - t1
        pos += 1
    return n_tokens / ta, n_tokens / tb


def speed(model: str, split: list[LayerRange], *, n_tokens: int = 64, rounds: int = 5, threads: int = 0,
          prompt_len: int = 32, log=lambda s: None) -> dict:
    from node_agent.engine.pipeline import LocalPipeline
    from node_agent.engine.stage import StageConfig

    config = StageConfig(threads=threads)
    rng = np.random.default_rng(0)
    with LocalPipeline(model, None, config) as whole, LocalPipeline(model, split, config) as parts:
        prompt = rng.integers(10, min(whole.info.n_vocab, 20000), size=prompt_len).astype(np.int32)
        _interleaved(whole, parts, prompt, 4)  # warm-up: page in weights, build graphs
        unsplit, splitr = [], []
        for r in range(rounds):
            u, p = _interleaved(whole, parts, prompt, n_tokens)
            unsplit.append(u)
            splitr.append(p)
            log(f"round {r + 1}/{rounds}: unsplit {u:.1f} tok/s, split {p:.1f} tok/s, ratio {p / u:.3f}")
    ratios = [p / u for u, p in zip(unsplit, splitr)]
    return {"split": format_split(split), "tokens_per_round": n_tokens, "rounds": rounds,
            "unsplit_tokens_per_s": [round(x, 2) for x in unsplit], "split_tokens_per_s": [round(x, 2) for x in splitr],
            "unsplit_median": round(float(np.median(unsplit)), 2), "split_median": round(float(np.median(splitr)), 2),
            "split_over_unsplit": round(float(np.median(ratios)), 4)}


def window_audit(model: str, split: list[LayerRange], *, contexts=(128, 448), window: int = 16, prompt_len: int = 64,
                 threads: int = 1, log=lambda s: None) -> list[dict]:
    """What auditing one window of a stage costs when the auditor starts from the worker's KV state
    of the earlier positions (Stage.export_state / import_state), against replaying every earlier
    position as audits do today; per stage and context, CPU time of this thread.

    Each worker stage runs the prompt in one batch and then one row per step, as a session does, fed
    the previous stage's rows, and exports each window's state as it closes (what a worker would
    commit to). The auditor imports the states before the last window, replays that window row by
    row and must give the worker's rows bit for bit; the full replay is the same rows from position
    0 in a context of its own. The projection at 20% of windows audited adds the worker's exports.
    """
    from node_agent.engine.slicing import read_model_info, stage_file
    from node_agent.engine.stage import Stage, StageConfig

    info = read_model_info(model)
    config = StageConfig(threads=threads, n_ctx=max(2048, max(contexts) + window), n_seq_max=1)
    rows = []
    for n in contexts:
        if n < prompt_len or (n - prompt_len) % window:
            raise ValueError(f"context {n} must be the prompt ({prompt_len}) plus whole windows of {window}")
        x = np.random.default_rng(n).integers(100, min(info.n_vocab, 20000), size=n + window).astype(np.int32)
        cuts = [0, prompt_len, *range(prompt_len + window, n + window + 1, window)]
        for r in split:
            path = stage_file(model, r)
            with Stage(path, r, info.n_layers, config) as worker, Stage(path, r, info.n_layers, config) as auditor, \
                    Stage(path, r, info.n_layers, config) as full:
                def feed(a, b, x=x, first=worker.is_first):
                    return {"tokens": x[a:b]} if first else {"hidden": x[a:b]}

                outs, states, export_s, gen_s = [worker.forward(0, 0, **feed(0, prompt_len))], [], 0.0, 0.0
                for a, b in zip(cuts, cuts[1:]):
                    t = time.thread_time()
                    for p in range(max(a, prompt_len), b):
                        outs.append(worker.forward(0, p, **feed(p, p + 1)))
                    gen_s = time.thread_time() - t   # the last window's, kept
                    t = time.thread_time()
                    states.append(worker.export_state(0, a, b))
                    export_s += time.thread_time() - t
                t = time.thread_time()
                auditor.import_state(0, states[:-1])
                got = np.concatenate([auditor.forward(0, p, **feed(p, p + 1)) for p in range(n, n + window)])
                window_s = time.thread_time() - t
                t = time.thread_time()
                full.forward(0, 0, **feed(0, prompt_len), logits=False)
                for p in range(prompt_len, n + window):
                    full.forward(0, p, **feed(p, p + 1), logits=p >= n)
                full_s = time.thread_time() - t
                rows.append({
                    "layers": str(r), "context": n, "window": window,
                    "state_bytes_per_position": sum(map(len, states)) // (n + window),
                    "export_ms_per_window": round(export_s / len(states) * 1000, 3),
                    "window_from_state_cpu_ms": round(window_s * 1000, 2),
                    "full_replay_cpu_ms": round(full_s * 1000, 2),
                    "window_over_full": round(window_s / full_s, 4),
                    "generation_window_cpu_ms": round(gen_s * 1000, 2),
                    "bit_identical": bool(np.array_equal(got, np.concatenate(outs[-window:]))),
                    "projected_audit20_cpu_ratio": round((0.2 * window_s + export_s / len(states)) / gen_s, 4)})
                log(f"window audit, stage {r}, context {n}: from state {window_s * 1000:.1f} ms CPU, full replay "
                    f"{full_s * 1000:.1f} ms, bit-identical {rows[-1]['bit_identical']}")
                x = np.concatenate(outs) if not worker.is_last else x   # the next stage's inputs
    return rows


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def weight_bytes(model: str, layers: LayerRange) -> int:
    """Bytes of the weights a stage owns: its blocks, plus the embedding (first) or the head (last)."""
    import re

    import gguf

    reader = gguf.GGUFReader(model, "r")
    arch = reader.fields["general.architecture"].contents()
    n_layers = reader.fields[f"{arch}.block_count"].contents()
    names = {t.name: t for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and layers.first <= int(m.group(1)) <= layers.last:
            total += int(t.n_bytes)
    if layers.first == 0:
        total += int(names["token_embd.weight"].n_bytes)
    if layers.last == n_layers - 1:
        head = names.get("output.weight") or (None if layers.first == 0 else names["token_embd.weight"])
        total += int(head.n_bytes) if head is not None else 0
        total += int(names["output_norm.weight"].n_bytes)
    return total


def _memory_probe(model: str, layers: str, threads: int) -> dict:
    """Runs in a fresh process: RSS before and after loading one stage and running it."""
    from node_agent.engine import llama as ll
    from node_agent.engine.slicing import read_model_info, stage_file
    from node_agent.engine.stage import Stage, StageConfig

    ll.init_backend()
    r = LayerRange.parse(layers)
    info = read_model_info(model)
    path = stage_file(model, r)
    before = _rss_bytes()
    stage = Stage(path, r, info.n_layers, StageConfig(threads=threads))
    rng = np.random.default_rng(0)
    if stage.is_first:
        feed = lambda n: {"tokens": rng.integers(10, 1000, size=n).astype(np.int32)}  # noqa: E731
    else:
        feed = lambda n: {"hidden": rng.standard_normal((n, stage.n_embd)).astype(np.float32)}  # noqa: E731
    stage.forward(0, 0, **feed(64))
    for pos in range(64, 80):
        stage.forward(0, pos, **feed(1))
    after = _rss_bytes()
    return {"layers": layers, "rss_delta_bytes": after - before, "weights_bytes": weight_bytes(model, r)}


def memory(model: str, split: list[LayerRange], *, threads: int = 0) -> list[dict]:
    out = []
    for r in split:
        proc = subprocess.run([sys.executable, "-m", "node_agent.engine.benchmark", "--memory-probe", model, str(r),
                               str(threads)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["rss_over_weights"] = round(row["rss_delta_bytes"] / max(1, row["weights_bytes"]), 3)
        out.append(row)
    return out


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--memory-probe":
    os.environ.setdefault("CONSORTIUM_LLAMA_VERBOSE", "")
    print(json.dumps(_memory_probe(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
