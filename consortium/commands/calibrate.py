"""consortium calibrate: measure honest disagreement and cheaters on real stage outputs, choose tolerances.

Method (docs/calibration.md has the measured figures):
- Each model is split 3 ways. For every prompt, the worker's pipeline (llama.cpp, CPU weight
  repacking on) gives every stage its input; on that same input, honest verifiers recompute the stage
  on other "hardware" (llama.cpp with repacking off; the numpy float64 reference for llama models;
  with --verifier-agent, running node agents on their own machines, CUDA or Metal, through the Audit
  call a session's verifier answers), and cheaters (node_agent.faults) produce their own output. One
  comparison is one token row of one stage, judged on the canonical grid the way an audit judges it
  (verdicts.figures).
- Prompts are split in two: tolerances are chosen on the calibration prompts only, and every figure
  reported as a result comes from the held-out prompts.
- The honest threshold is a high percentile (98th, as seed 003) of the honest calibration distances
  whose hashes differ, on the figure that best separates cheaters; the decisive (Fraud) threshold is a
  large multiple of the largest honest calibration distance. Both are chosen twice: pooled over
  everything (for models and ranges never calibrated) and per (model sha256, layer range), because
  honest disagreement differs several-fold between stages and one pooled limit is too loose for the
  quiet stages (cheaters slip under it) and too tight for the noisy ones (honest Mismatch piles up).
- Window states (audits from them) get a limit of their own, from windows of decode steps replayed
  from the worker's prefix states: honest keys and values lie apart by other amounts than rows do.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from consortium import tls

DEFAULT_MODELS = ("smollm2-135m", "smollm2-135m-q4_k_m", "gemma3-270m")
QUICK_MODELS = ("smollm2-135m-q4_k_m",)
HONEST_PERCENTILE = 98.0
DECISIVE_FACTOR = 8.0       # Fraud only this far beyond the largest honest distance seen in calibration
MIN_STAGE_ROWS = 200        # honest differing rows a stage needs for limits of its own
GRIDS = (16, 32, 64, 128, 256, 512, 1024)
ROW_CHUNK = 16              # rows per vectorized figure batch (a Gemma logit row is 262144 wide)

# Distances derived from verdicts.Figures, all "larger = further apart"; similarities become 1 - s.
CANDIDATES = ("relative_l2", "frac_gt_1", "frac_gt_2", "frac_gt_4", "max_abs_steps",
              "one_minus_cosine", "topk_disagreement")
_FIGURE_OF = {"one_minus_cosine": "cosine", "topk_disagreement": "topk_agreement"}
_CORE_CHEATERS = ("skip-layer", "cheap-quant", "replay", "random")
# Audits from window states (docs/dataplane.md): windows of STATE_WINDOW decode steps, each replayed
# from the worker's states before it, after a prompt of STATE_PREFILL rows in one batch (windows
# holding the prompt's batch are replayed in full by the driver, never from states). 16 was the
# state window when the shipped limits were measured; sessions audit windows of 4 by default
# (receipts.DEFAULT_STATE_WINDOW), whose honest distances a run at 4 found within those limits
# (docs/calibration.md, Window states).
STATE_WINDOW = 16
STATE_PREFILL = 24
STATE_FACTOR = 2.0          # the honest state limit: this many times the largest honest calibration distance
MIN_STATE_WINDOWS = 8       # windows with differing states a stage needs for a state limit of its own

# Prose of 100-150 tokens each, on unrelated subjects, so prefill gives many rows per stage. The first
# half calibrates, the second half is held out.
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a screw press adapted from wine making. Within fifty years presses "
    "had spread to more than two hundred cities across Europe, and the price of books fell sharply. Scholars "
    "argue about how much this changed literacy, religion and science, but almost all agree that the speed of "
    "copying made it easier to compare, correct and build on earlier work. Explain the three most important "
    "consequences.",
    "A sourdough starter is a living culture of wild yeast and lactic acid bacteria. To make one, mix equal "
    "weights of whole wheat flour and water in a clean jar, cover it loosely and keep it somewhere warm. Every "
    "day discard half and feed it again with fresh flour and water. After about a week it should double in "
    "size within six hours of feeding and smell pleasantly sour. If a grey liquid appears on top, the starter "
    "is hungry, not dead. Describe what goes wrong most often and how to fix it.",
    "Plate tectonics explains why earthquakes and volcanoes cluster along narrow belts. The outer shell of "
    "the Earth is broken into rigid plates that move a few centimetres a year over the hotter, softer mantle. "
    "Where plates pull apart, magma rises and forms new ocean floor; where they collide, one plate may sink "
    "beneath the other, melting as it descends and feeding chains of volcanoes. Where they slide past each "
    "other, stress builds for decades and is released in sudden slips. Summarize the evidence for this theory.",
    "Our team maintains a small web service written in Python that stores customer orders in PostgreSQL. "
    "Last month the nightly report started timing out. The query joins orders, customers and shipments, "
    "filters by date and groups by region. The orders table has grown to forty million rows, and the "
    "execution plan shows a sequential scan followed by a hash join that spills to disk. We added an index "
    "on the order date, but nothing changed. What would you check next, and in which order?",
    "The violin family evolved in northern Italy during the sixteenth century. Makers in Cremona, above all "
    "the Amati, Guarneri and Stradivari families, refined the shape of the body, the arching of the plates "
    "and the varnish. Many people have tried to explain why their instruments sound the way they do: the "
    "density of the spruce, chemical treatments of the wood, the climate of the little ice age. Blind tests "
    "with modern players have given surprising results. What do those tests show, and how should we read them?",
    "Photosynthesis converts light energy into chemical energy stored in sugar. In the light reactions, "
    "chlorophyll in the thylakoid membranes absorbs photons, splits water, releases oxygen and produces ATP "
    "and NADPH. In the Calvin cycle, which takes place in the stroma, the enzyme rubisco fixes carbon dioxide "
    "into a three-carbon compound that is then reduced using that ATP and NADPH. Rubisco is slow and sometimes "
    "grabs oxygen instead of carbon dioxide. Explain how C4 and CAM plants work around this problem.",
    "When the city council proposed closing the main street to cars on weekends, shop owners were worried "
    "that customers would stop coming. A year later the council published the numbers: foot traffic rose by "
    "a third, restaurants added outdoor seating, and two shops that sold bulky furniture lost sales while "
    "most others gained. Residents of the side streets complained about parking and noise. Write a balanced "
    "memo for the council that weighs these results and recommends what to do next year, with reasons.",
    "A binary search tree keeps its keys in order so that lookups, insertions and deletions take time "
    "proportional to the height of the tree. If keys arrive in sorted order, a naive tree degenerates into a "
    "linked list and every operation becomes linear. Self-balancing trees such as red-black trees and AVL "
    "trees restore logarithmic height by rotating nodes after each change. B-trees, used by databases and "
    "file systems, store many keys per node to reduce disk reads. Compare these three designs for a beginner.",
    "The expedition left the coast in early March with twelve camels, four guides and enough water for nine "
    "days between wells. On the third day a sandstorm buried the track, and the guides disagreed about the "
    "direction of the next well. The leader, a geologist with no desert experience, had to decide whether to "
    "wait, turn back or follow the oldest guide, who navigated by the shape of the dunes. Continue the story "
    "from the leader's point of view, and keep the details of travel in the desert realistic.",
    "Vaccines train the immune system to recognize a pathogen without causing the disease. Older vaccines use "
    "weakened or inactivated viruses; newer ones deliver only a protein from the surface of the pathogen, or "
    "the messenger RNA that tells our cells to make that protein for a short time. The immune system then "
    "produces antibodies and memory cells that respond quickly to a real infection. Explain why some vaccines "
    "need booster doses while others protect for decades, and what herd immunity means in practice.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", metavar="PATH",
                   help="a GGUF file or a named model (repeatable); default: "
                        f"{' and '.join(DEFAULT_MODELS)} ({QUICK_MODELS[0]} with --quick)")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON here")
    p.add_argument("--plot", metavar="PNG", help="write the separation plot and grid sweep here")
    p.add_argument("--quick", action="store_true",
                   help="CI size: the default model only, one calibration and one held-out prompt")
    p.add_argument("--write-default", action="store_true",
                   help="also write the chosen tolerance over the shipped default (tolerance.default.json)")
    p.add_argument("--tolerance-out", metavar="FILE", help="write the chosen tolerance (Tolerance JSON) here")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"prompts per role (calibration, held-out); default 5, 1 with --quick (max {len(PROMPTS) // 2})")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per stage (0: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and random cheaters")
    p.add_argument("--verifier-agent", action="append", default=[], metavar="NODE=HOST:PORT",
                   help="also recompute every stage on this running node agent (its own machine and backend), "
                        "as an honest pair the tolerances must hold: how CUDA and Metal nodes are calibrated "
                        "against each other. Repeatable. Calls it as the driver does (--tls-* below)")
    p.add_argument("--verifier-model", metavar="PATH",
                   help="the model file's path on the agents' machines (default: the same path as here)")
    tls.add_arguments(p, "driver")


# -- figures for many rows at once ----------------------------------------------------------------

def batch_figures(worker: np.ndarray, verifier: np.ndarray, topk: int = 16) -> dict[str, np.ndarray]:
    """verdicts.figures for every row of two [n, d] grid-index arrays, vectorized, with the same exact
    integer sums and the same IEEE steps (tests hold the two equal)."""
    a = np.asarray(worker, dtype=np.int64)
    b = np.asarray(verifier, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [n, d] arrays of one shape, got {a.shape} and {b.shape}")
    n, width = a.shape
    d = np.abs(a - b)
    dd, bb = np.einsum("ij,ij->i", d, d), np.einsum("ij,ij->i", b, b)
    aa, ab = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(dd == 0, 0.0, np.where(bb == 0, np.inf, np.sqrt(dd.astype(np.float64)) /
                                              np.sqrt(bb.astype(np.float64))))
        cos = ab.astype(np.float64) / (np.sqrt(aa.astype(np.float64)) * np.sqrt(bb.astype(np.float64)))
    cos = np.where((aa == 0) & (bb == 0), 1.0, np.where((aa == 0) | (bb == 0), 0.0, cos))
    k = min(topk, width)
    agree = (_topk_mask(a, k) & _topk_mask(b, k)).sum(axis=1) / k
    return {
        "relative_l2": rel,
        "frac_gt_1": (d > 1).sum(axis=1) / width,
        "frac_gt_2": (d > 2).sum(axis=1) / width,
        "frac_gt_4": (d > 4).sum(axis=1) / width,
        "max_abs_steps": d.max(axis=1).astype(np.float64),
        "cosine": cos,
        "topk_agreement": agree,
    }


def _topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k largest magnitudes, ties going to the lower index (verdicts._topk's order)."""
    m = np.abs(x)
    kth = np.partition(m, m.shape[1] - k, axis=1)[:, m.shape[1] - k][:, None]
    above = m > kth
    tie = m == kth
    room = k - above.sum(axis=1, keepdims=True)
    return above | (tie & (np.cumsum(tie, axis=1) <= room))


def distances(fig: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name in CANDIDATES:
        src = _FIGURE_OF.get(name, name)
        out[name] = 1.0 - fig[src] if name in _FIGURE_OF else fig[src]
    return out


# -- collecting comparisons -----------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """Comparisons of one source (an honest pair or a cheater class) on one stage and prompt."""
    model: str
    stage: int
    role: str           # calibration | heldout
    source: str         # honest pair name, or cheater class
    honest: bool
    hash_equal: np.ndarray
    figures: dict[str, np.ndarray]
    grid_equal: dict[int, np.ndarray] | None = None   # honest only: hash equal at each swept grid
    stage_key: tuple[str, str] = ("", "")              # (model sha256, "first-last"): its own tolerance


def compare(worker: np.ndarray, verifier_idx: np.ndarray, grid, topk: int) -> tuple[np.ndarray, dict]:
    from consortium.verification.canonical import canonical_rows

    eq, figs = [], []
    for s in range(0, len(worker), ROW_CHUNK):
        w = canonical_rows(worker[s:s + ROW_CHUNK], grid)
        v = verifier_idx[s:s + ROW_CHUNK]
        # Equal canonical rows are exactly the rows whose commitments are equal (same header, same bytes).
        eq.append(np.all(w == v, axis=1))
        figs.append(batch_figures(w, v, topk))
    return np.concatenate(eq), {k: np.concatenate([f[k] for f in figs]) for k in figs[0]}


def grid_equal(worker: np.ndarray, verifier: np.ndarray, grids=GRIDS) -> dict[int, np.ndarray]:
    from consortium.verification.canonical import CanonicalGrid, canonical_rows

    out = {}
    for g in grids:
        cg = CanonicalGrid(grid=g)
        out[g] = np.concatenate([np.all(canonical_rows(worker[s:s + ROW_CHUNK], cg) ==
                                        canonical_rows(verifier[s:s + ROW_CHUNK], cg), axis=1)
                                 for s in range(0, len(worker), ROW_CHUNK)])
    return out


def even_split(n_layers: int, parts: int = 3):
    from consortium.layers import LayerRange

    bounds = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [LayerRange(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def _row_by_row(stage, kw: dict) -> np.ndarray:
    """The stage's logit rows for these inputs, one row per llama_decode, as a session decodes."""
    stage.clear(0)
    (key, rows), = kw.items()
    out = [stage.forward(0, j, all_logits=True, **{key: rows[j:j + 1]}) for j in range(len(rows))]
    stage.clear(0)
    return np.concatenate(out)


class AgentError(RuntimeError):
    """A verifier agent could not be reached or refused a recomputation (with its reason)."""


@dataclasses.dataclass
class AgentLink:
    """A running node agent used as an honest verifier: `name=host:port` and how to reach it."""
    name: str
    endpoint: str
    creds: tls.Credentials | None   # None: plaintext (development)

    @classmethod
    def parse(cls, text: str, creds) -> "AgentLink":
        name, sep, endpoint = text.partition("=")
        if not sep or not name or ":" not in endpoint:
            raise ValueError(f"--verifier-agent {text!r}: give NODE=HOST:PORT (NODE: the name its certificate holds)")
        return cls(name, endpoint, creds)

    def channel(self):
        import grpc

        from consortium import wire

        if self.creds is None:
            return grpc.insecure_channel(self.endpoint, options=wire.CHANNEL_OPTIONS)
        return tls.secure_channel(self.endpoint, self.name, self.creds, options=wire.CHANNEL_OPTIONS)


class AgentVerifier:
    """One stage recomputed by a node agent: an Audit of all the prompt's positions from position 0,
    as a verifier answers in a session (non-final stages in one batch, as the worker here computes
    them; the final stage row by row, since an Audit returns logits at batch ends only). Each call is
    a session of its own, released after it."""

    def __init__(self, link: AgentLink, stage: int, layers, model_path: str, model_sha256: str, last: bool):
        from consortium import wire

        self.link, self.stage, self.layers, self.last = link, stage, layers, last
        self.model_path, self.model_sha256 = model_path, model_sha256
        self._channel = link.channel()
        self._stub = wire.pb_grpc.NodeAgentStub(self._channel)
        health = self._call("Health", wire.pb.HealthRequest(), 30)
        self.backend, self.build = health.backend, health.ggml_commit

    def _call(self, method: str, request, timeout: float):
        import grpc

        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise AgentError(f"verifier agent {self.link.name} at {self.link.endpoint}: {method}: "
                             f"{e.code().name}: {e.details()}") from None

    def clear(self, seq: int) -> None:   # every call starts at position 0 in a session of its own
        pass

    def forward(self, seq: int, position: int, *, all_logits: bool = False, tokens=None, hidden=None) -> np.ndarray:
        import uuid

        from consortium import wire
        from consortium.wire import pb

        n = len(tokens) if tokens is not None else int(np.asarray(hidden).shape[0])
        ref = pb.StageRef(session=f"calibrate-{uuid.uuid4().hex[:12]}", stage=self.stage, epoch=1)
        req = pb.AuditRequest(ref=ref, model_path=self.model_path, model_sha256=self.model_sha256,
                              first_layer=self.layers.first, last_layer=self.layers.last, start_position=0,
                              batch_sizes=[1] * n if self.last else [n], positions=list(range(n)), exact_shapes=True)
        if tokens is not None:
            req.tokens.extend(int(t) for t in tokens)
        else:
            wire.put_tensor(req.hidden, np.asarray(hidden, dtype=np.float32))
        try:
            resp = self._call("Audit", req, 900)
        finally:
            try:
                self._stub.Release(pb.ReleaseRequest(ref=ref), timeout=30)
            except Exception:  # noqa: BLE001 - the slot goes with the session on the agent anyway
                pass
        return wire.decode_tensor(resp.rows, ndim=2)

    def close(self) -> None:
        self._channel.close()


def collect_model(spec: str, prompts: list[tuple[str, str]], *, threads: int, seed: int, noise_scales,
                  log, agents: list[AgentLink] = (), agent_model: str | None = None) -> tuple[list[Rows], dict]:
    """Every comparison for one model: honest pairs and cheaters, per stage, per prompt."""
    from consortium.models import resolve_model
    from consortium.tokenizer import Tokenizer
    from consortium.verification.canonical import DEFAULT_GRID, canonical_rows
    from consortium.verification.verdicts import Tolerance
    from node_agent.engine.reference import ReferenceError, ReferenceModel
    from node_agent.engine.slicing import read_model_info, stage_file
    from node_agent.engine.stage import Stage, StageConfig
    from node_agent.faults import CheatingStage, Fault, apply_fault

    t0 = time.time()
    path = resolve_model(spec)
    info = read_model_info(path)
    n = info.n_layers
    split = even_split(n)
    label = spec if not Path(str(spec)).is_file() else Path(str(spec)).name
    grid, topk = DEFAULT_GRID, Tolerance.load().topk
    n_ctx = 512
    worker_cfg = StageConfig(threads=threads, n_ctx=n_ctx, n_seq_max=1, n_batch=64, repack=True)
    other_cfg = dataclasses.replace(worker_cfg, repack=False)
    try:
        ref = ReferenceModel(path)
    except ReferenceError as e:
        ref = None
        log(f"  {label}: no numpy reference pair ({e})")
    import consortium.cache
    from node_agent.engine.slicing import sha256_file

    sha = sha256_file(path, consortium.cache.cache_dir())
    stages, remote = [], []
    for si, r in enumerate(split):
        f = stage_file(path, r)
        stages.append({
            "worker": Stage(f, r, n, worker_cfg),
            "repack-off": Stage(f, r, n, other_cfg),
            "skip-layer": CheatingStage("skip-layer", path, r, n, worker_cfg),
            "cheap-quant": CheatingStage("cheap-quant", path, r, n, worker_cfg),
        })
        remote.append({f"agent:{a.name}": AgentVerifier(a, si, r, agent_model or str(path), sha, si == len(split) - 1)
                       for a in agents})
    agents_seen = {v.link.name: f"{v.backend} (ggml {v.build[:12]})" for v in (remote[0].values() if remote else ())}
    log(f"  {label}: {n} layers split {', '.join(map(str, split))}; stages loaded in {time.time() - t0:.1f} s"
        + "".join(f"; agent {k} on {v}" for k, v in agents_seen.items()))
    tok = Tokenizer(path)
    out: list[Rows] = []
    output_faults = [Fault("noise", s) for s in noise_scales] + [Fault("replay"), Fault("random")]
    n_tokens = []
    try:
        for pi, (role, text) in enumerate(prompts):
            ids = np.asarray(tok.encode(text), dtype=np.int32)[: n_ctx - 8]
            n_tokens.append(len(ids))
            x = None
            for si, (r, st) in enumerate(zip(split, stages)):
                last = si == len(split) - 1
                kw = {"tokens": ids} if x is None else {"hidden": x}
                for s in st.values():
                    s.clear(0)
                y = st["worker"].forward(0, 0, all_logits=last, **kw)
                verifiers = {"repack-off": st["repack-off"].forward(0, 0, all_logits=last, **kw)}
                for name, v in remote[si].items():
                    verifiers[name] = v.forward(0, 0, all_logits=last, **kw)
                if ref is not None:
                    h = ref.run_layers(ref.embed(ids) if x is None else x, r.first, r.last)
                    verifiers["reference"] = (ref.logits(h) if last else h).astype(np.float32)
                # An agent recomputes the final stage row by row (an Audit gives logits at batch ends);
                # the worker's rows for it are taken the same way, as a session's decode steps are:
                # across batch shapes the LM head's kernels differ, which no audit compares.
                y_steps = _row_by_row(st["worker"], kw) if last and remote[si] else None
                for name, v in verifiers.items():
                    w = y_steps if name in remote[si] and y_steps is not None else y
                    vidx = canonical_rows(v, grid)
                    eq, fig = compare(w, vidx, grid, topk)
                    out.append(Rows(label, si, role, name, True, eq, fig,
                                    grid_equal(w, v) if role == "heldout" else None))
                # Cheaters are audited by the repacking-off verifier, like the honest worker.
                vidx = canonical_rows(verifiers["repack-off"], grid)
                for name in ("skip-layer", "cheap-quant"):
                    c = st[name].forward(0, 0, all_logits=last, **kw)
                    eq, fig = compare(c, vidx, grid, topk)
                    out.append(Rows(label, si, role, name, False, eq, fig))
                rng = np.random.default_rng([seed, pi, si])
                for fault in output_faults:
                    eq, fig = compare(apply_fault(fault, y, rng=rng), vidx, grid, topk)
                    out.append(Rows(label, si, role, fault.name, False, eq, fig))
                x = y
            log(f"  {label}: prompt {pi + 1}/{len(prompts)} ({role}, {len(ids)} tokens) done at {time.time() - t0:.0f} s")
    finally:
        tok.close()
        for st in stages + remote:
            for s in st.values():
                s.close()
    for r in out:
        r.stage_key = (sha, str(split[r.stage]))
    meta = {"model": label, "sha256": sha, "architecture": info.architecture, "file_type": info.file_type, "layers": n,
            "split": [str(r) for r in split],
            "honest_pairs": ["repack-off"] + (["reference"] if ref else []) + [f"agent:{a.name}" for a in agents],
            "agents": agents_seen,
            "prompt_tokens": n_tokens, "seconds": round(time.time() - t0, 1)}
    return out, meta


@dataclasses.dataclass
class StateRows:
    """Window-state comparisons of one source on one stage and prompt: kvstate.relative_l2 between
    the worker's (or cheater's) keys and values of each window and the verifier's replay of it."""
    model: str
    stage: int
    role: str           # calibration | heldout
    source: str         # repack-off (honest), or the cheater class
    honest: bool
    distances: np.ndarray
    stage_key: tuple[str, str] = ("", "")


def collect_states(spec: str, prompts: list[tuple[str, str]], *, threads: int, log) -> list[StateRows]:
    """Window audits from states, as the driver runs them: the worker (repacking on) prefills
    STATE_PREFILL rows and then decodes one row per step, fed by the worker pipeline's previous stage;
    for each window of decode steps the verifier (repacking off) imports the worker's states of the
    positions before it, replays the window row by row and exports its own state of the window, which
    is compared with the worker's. The cheap-quant cheater's states are audited the same way from its
    own prefix. (Skip-layer's states fit no honest stage: the driver cannot compare them and stops
    trusting that node's states, so there is no distance to calibrate.)"""
    import consortium.cache
    from consortium.models import resolve_model
    from consortium.tokenizer import Tokenizer
    from consortium.verification import kvstate
    from node_agent.engine.slicing import read_model_info, sha256_file, stage_file
    from node_agent.engine.stage import Stage, StageConfig
    from node_agent.faults import CheatingStage

    t0 = time.time()
    path = resolve_model(spec)
    info = read_model_info(path)
    n, split = info.n_layers, even_split(info.n_layers)
    label = spec if not Path(str(spec)).is_file() else Path(str(spec)).name
    sha = sha256_file(path, consortium.cache.cache_dir())
    worker_cfg = StageConfig(threads=threads, n_ctx=512, n_seq_max=1, n_batch=64, repack=True)
    verifier_cfg = dataclasses.replace(worker_cfg, repack=False)
    tok = Tokenizer(path)
    out: list[StateRows] = []
    try:
        inputs = [np.asarray(tok.encode(text), dtype=np.int32)[:400] for _, text in prompts]
        for si, r in enumerate(split):
            f = stage_file(path, r)
            last = si == len(split) - 1
            with Stage(f, r, n, worker_cfg) as worker, Stage(f, r, n, verifier_cfg) as verifier, \
                    CheatingStage("cheap-quant", path, r, n, worker_cfg) as cheat:
                for pi, (role, _) in enumerate(prompts):
                    x = inputs[pi]
                    rows = (lambda a: {"tokens": a}) if si == 0 else (lambda a: {"hidden": a})
                    ys = []
                    for s in (worker, cheat):
                        s.clear(0)
                        y = [s.forward(0, 0, **rows(x[:STATE_PREFILL]), logits=not last)]
                        for p in range(STATE_PREFILL, len(x)):
                            y.append(s.forward(0, p, **rows(x[p:p + 1]), logits=not last))
                        ys.append(None if last else np.concatenate(y))
                    first = -(-STATE_PREFILL // STATE_WINDOW) * STATE_WINDOW
                    for source, s in (("repack-off", worker), ("cheap-quant", cheat)):
                        ds = []
                        for ws in range(first, len(x) - STATE_WINDOW + 1, STATE_WINDOW):
                            verifier.clear(0)
                            verifier.import_state(0, [s.export_state(0, 0, ws)])
                            for p in range(ws, ws + STATE_WINDOW):
                                verifier.forward(0, p, **rows(x[p:p + 1]), logits=not last)
                            ds.append(kvstate.relative_l2(kvstate.parse(s.export_state(0, ws, ws + STATE_WINDOW)),
                                                          kvstate.parse(verifier.export_state(0, ws, ws + STATE_WINDOW))))
                        out.append(StateRows(label, si, role, source, source == "repack-off", np.asarray(ds),
                                             (sha, str(r))))
                    inputs[pi] = ys[0]   # the next stage's input: the honest worker's rows
            log(f"  {label}: window states of stage {r} compared at {time.time() - t0:.0f} s")
    finally:
        tok.close()
    return out


def choose_state_limits(rows: list[StateRows], factor: float = STATE_FACTOR) -> tuple[float, dict]:
    """The honest state limit, pooled and per stage: factor x the largest honest calibration distance.
    A stage with fewer than MIN_STATE_WINDOWS differing honest windows (on the default Q4_1 model
    repacking changes nothing, so every honest state is equal) takes the pooled limit."""
    honest = [r for r in rows if r.honest and r.role == "calibration"]
    every = np.concatenate([r.distances for r in honest]) if honest else np.zeros(0)
    if not (every > 0).any():
        raise RuntimeError("no honest calibration window state differed: nothing to calibrate")
    pooled = factor * float(every.max())
    stages = {}
    for key in sorted({r.stage_key for r in honest}):
        d = np.concatenate([r.distances for r in honest if r.stage_key == key])
        stages[key] = factor * float(d.max()) if int((d > 0).sum()) >= MIN_STATE_WINDOWS else pooled
    return pooled, stages


def evaluate_states(rows: list[StateRows], pooled: float, stages: dict, role: str = "heldout") -> dict:
    """Per (model, stage, source): windows, how many states differ, the largest distance, and how many
    lie beyond the stage's limit (honest: states the driver would stop trusting; cheater: caught)."""
    out = {}
    for key in sorted({(r.model, r.stage, r.source) for r in rows if r.role == role}):
        rs = [r for r in rows if r.role == role and (r.model, r.stage, r.source) == key]
        d = np.concatenate([r.distances for r in rs])
        limit = stages.get(rs[0].stage_key, pooled)
        out["{} stage {} {}".format(*key)] = {
            "honest": rs[0].honest, "windows": int(d.size), "differ": int((d > 0).sum()),
            "max": float(d.max()) if d.size else 0.0, "min": float(d.min()) if d.size else 0.0, "limit": limit,
            "beyond_limit": int((d > limit).sum())}
    return out


# -- choosing and evaluating the tolerance --------------------------------------------------------

def _select(rows: list[Rows], role: str, honest: bool | None = None, source: str | None = None):
    return [r for r in rows if r.role == role and (honest is None or r.honest == honest)
            and (source is None or r.source == source)]


def _cat(rows: list[Rows], key: str) -> np.ndarray:
    if not rows:
        return np.zeros(0)
    if key == "hash_equal":
        return np.concatenate([r.hash_equal for r in rows])
    return np.concatenate([distances(r.figures)[key] for r in rows])


def cheater_classes(rows: list[Rows]) -> list[str]:
    seen = []
    for r in rows:
        if not r.honest and r.source not in seen:
            seen.append(r.source)
    return seen


def choose_tolerance(rows: list[Rows], percentile: float = HONEST_PERCENTILE, factor: float = DECISIVE_FACTOR):
    """Pick the figure that separates cheaters best on the calibration prompts, and its thresholds."""
    honest = _select(rows, "calibration", honest=True)
    differ = ~_cat(honest, "hash_equal")
    classes = cheater_classes(rows)
    table = {}
    for name in CANDIDATES:
        h = _cat(honest, name)[differ]
        if h.size == 0:
            raise RuntimeError("no honest calibration comparison had a differing hash: nothing to calibrate")
        thr = float(np.percentile(h, percentile))
        det = {}
        for c in classes:
            cr = _select(rows, "calibration", honest=False, source=c)
            v, eq = _cat(cr, name), _cat(cr, "hash_equal")
            det[c] = float(np.mean((v > thr) & ~eq))
        core = min(det[c] for c in _CORE_CHEATERS if c in det)
        noise = float(np.mean([d for c, d in det.items() if c.startswith("noise-")] or [0.0]))
        table[name] = {"honest_threshold": thr, "honest_max": float(h.max()), "detection": det,
                       "core_min_detection": core, "noise_mean_detection": noise}
    # Catch every core cheater first; among near-equals, the one that also catches smaller noise.
    best = max(CANDIDATES, key=lambda k: (round(table[k]["core_min_detection"], 3), table[k]["noise_mean_detection"]))
    # A node is judged on the stage it serves against the verifiers it meets, and honest disagreement
    # differs a lot between them (Gemma's middle stage against repacking off: ~15% beyond the pooled
    # limit, SmolLM2's stages: under 1%). So the pooled binomial rate is the worst honest (model,
    # pair, stage), and every stage with enough rows gets limits of its own.
    node_rates = {}
    for key in sorted({(r.model, r.source, r.stage) for r in honest}):
        rs = [r for r in honest if (r.model, r.source, r.stage) == key]
        k = int(np.sum((_cat(rs, best) > table[best]["honest_threshold"]) & ~_cat(rs, "hash_equal")))
        m = int(sum(len(r.hash_equal) for r in rs))
        node_rates["{} {} stage {}".format(*key)] = {"comparisons": m, "mismatch": k, "upper95": upper_bound(k, m)}
    table[best]["node_rates"] = node_rates
    stages = {}
    for key in sorted({r.stage_key for r in honest if r.stage_key[0]}):
        rs = [r for r in honest if r.stage_key == key]
        if int((~_cat(rs, "hash_equal")).sum()) >= MIN_STAGE_ROWS:   # else the pooled limits judge it
            stages[key] = _tolerance_from(rs, best, percentile, factor, lambda r: r.source,
                                          f"{int((~_cat(rs, 'hash_equal')).sum())} honest calibration "
                                          "comparisons whose hashes differ")
    about = (f"Calibrated by `consortium calibrate` on {datetime.date.today().isoformat()}: honest limit = "
             f"{percentile:g}th percentile of {int(differ.sum())} honest calibration comparisons whose hashes "
             f"differ ({int(differ.size)} in all), decisive limit = {factor:g} x the largest of them, on {best}; "
             f"honest Mismatch rate = upper 95% bound of the worst honest (model, pair, stage) calibration rate.")
    pooled = _tolerance_from(honest, best, percentile, factor, lambda r: (r.model, r.source, r.stage), about)
    tol = dataclasses.replace(pooled, stages=stages)
    return tol, best, table


def _tolerance_from(honest: list[Rows], figure: str, percentile: float, factor: float, group_of, about: str):
    """Limits on `figure` from honest rows whose hashes differ: the percentile is the honest limit,
    factor x the largest the decisive one; the binomial rate is the upper 95% bound of the worst group
    (not its point estimate, so that prompts unlike the calibration ones don't quarantine honest nodes)."""
    from consortium.verification.verdicts import Limits, Tolerance

    v, differ = _cat(honest, figure), ~_cat(honest, "hash_equal")
    h = v[differ]
    thr, decisive = float(np.percentile(h, percentile)), factor * float(h.max())
    rate = 0.0
    for g in sorted({group_of(r) for r in honest}):
        rs = [r for r in honest if group_of(r) == g]
        k = int(np.sum((_cat(rs, figure) > thr) & ~_cat(rs, "hash_equal")))
        rate = max(rate, upper_bound(k, int(sum(len(r.hash_equal) for r in rs))))
    src = _FIGURE_OF.get(figure, figure)
    if figure in _FIGURE_OF:  # similarity: limits are minima of 1 - distance
        honest_lim, decisive_lim = {src: 1.0 - thr}, ({src: 1.0 - decisive} if decisive < 1.0 else {})
    else:
        honest_lim = {src: thr}
        decisive_lim = {src: decisive} if not (figure.startswith("frac_gt") and decisive >= 1.0) else {}
    return Tolerance(Limits.from_json(honest_lim), Limits.from_json(decisive_lim), honest_mismatch_rate=round(rate, 6),
                     topk=16, about=about)


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate, k events in n: p with P[X <= k | p] = 1 - confidence."""
    from consortium.verification.judgement import binomial_tail

    if n == 0:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(50):  # bisection: P[X <= k] falls as p rises
        mid = (lo + hi) / 2
        if 1.0 - binomial_tail(k + 1, n, mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return min(hi, 0.999999)


def _fig_objects(r: Rows):
    from consortium.verification.verdicts import Figures

    names = [f.name for f in dataclasses.fields(Figures)]
    cols = [r.figures[k] for k in names]
    for i in range(len(r.hash_equal)):
        yield bool(r.hash_equal[i]), Figures(**{k: float(c[i]) for k, c in zip(names, cols)})


def verdicts_of(r: Rows, tol) -> list[str]:
    """The audit's verdict per row: Passed when the hash matches, else what the tolerance says."""
    from consortium.verification.verdicts import Verdict

    tol = tol.for_stage(*r.stage_key)
    return [Verdict.PASSED.value if eq else tol.classify(f)[0].value for eq, f in _fig_objects(r)]


def evaluate(rows: list[Rows], tol, role: str = "heldout") -> dict:
    from consortium.verification.judgement import NodeRecord, judge_node

    def tally(rs):
        c = {"Passed": 0, "PassedWithinTolerance": 0, "Mismatch": 0, "Fraud": 0}
        for r in rs:
            for v in verdicts_of(r, tol):
                c[v] += 1
        return c

    honest = _select(rows, role, honest=True)
    c = tally(honest)
    n = sum(c.values())
    differ = n - c["Passed"]
    # Each (model, honest pair, stage) is one simulated honest node; judge it as the network would.
    nodes, quarantined = {}, []
    for r in honest:
        key = (r.model, r.source, r.stage)
        rec = nodes.get(key, NodeRecord("/".join(map(str, key))))
        for v in verdicts_of(r, tol):
            rec = rec.add(v)
        nodes[key] = rec
    stage_keys = {(r.model, r.source, r.stage): r.stage_key for r in honest}
    for key, rec in nodes.items():
        j = judge_node(rec, tol.for_stage(*stage_keys[key]).honest_mismatch_rate)
        if rec.frauds or j.quarantine:
            quarantined.append({"node": rec.node_id, "audits": rec.audits, "mismatches": rec.mismatches,
                                "frauds": rec.frauds, "p_value": j.p_value})
    def by(key_of):
        out = {}
        for key in sorted({key_of(r) for r in honest}):
            t = tally([r for r in honest if key_of(r) == key])
            m = sum(t.values())
            out[" ".join(map(str, key))] = {"comparisons": m, "hash_equal": t["Passed"], "mismatch": t["Mismatch"],
                                            "fraud": t["Fraud"], "mismatch_rate": t["Mismatch"] / max(1, m)}
        return out
    by_pair = by(lambda r: (r.model, r.source))
    by_stage = by(lambda r: (r.model, r.source, "stage", r.stage))
    result = {
        "honest": {
            "comparisons": n, "hash_equal": c["Passed"], "hash_differ": differ,
            "within_tolerance": c["PassedWithinTolerance"], "mismatch": c["Mismatch"],
            "fraud_verdicts": c["Fraud"], "false_fraud": len(quarantined),
            "mismatch_rate": c["Mismatch"] / max(1, n), "mismatch_rate_hash_differ": c["Mismatch"] / max(1, differ),
            "nodes": len(nodes), "nodes_quarantined_or_fraud": quarantined, "by_pair": by_pair,
            "by_stage": by_stage,
        },
        "cheaters": {},
    }
    for cls in cheater_classes(rows):
        cr = _select(rows, role, honest=False, source=cls)
        t = tally(cr)
        audits = sum(t.values())
        det = t["Mismatch"] + t["Fraud"]
        by_stage = {}
        for key in sorted({(r.model, r.stage) for r in cr}):
            ts = tally([r for r in cr if (r.model, r.stage) == key])
            by_stage["{} stage {}".format(*key)] = (ts["Mismatch"] + ts["Fraud"]) / max(1, sum(ts.values()))
        result["cheaters"][cls] = {"audits": audits, "detected": det, "fraud": t["Fraud"],
                                   "detection_rate": det / max(1, audits), "detection_by_stage": by_stage}
    return result


def noise_breakpoint(cheaters: dict) -> dict:
    """The largest noise scale whose detection is below 50%, and the log-interpolated 50% crossing."""
    pts = sorted((float(k[len("noise-"):]), v["detection_rate"]) for k, v in cheaters.items() if k.startswith("noise-"))
    below = [s for s, d in pts if d < 0.5]
    out = {"detection_by_scale": {f"{s:g}": d for s, d in pts},
           "largest_scale_below_50pct": max(below) if below else None, "crossing_50pct": None}
    for (s0, d0), (s1, d1) in zip(pts, pts[1:]):
        if d0 < 0.5 <= d1:
            f = (0.5 - d0) / (d1 - d0) if d1 > d0 else 0.0
            out["crossing_50pct"] = float(math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0))))
    return out


def sweep(rows: list[Rows], role: str = "heldout") -> list[dict]:
    honest = [r for r in _select(rows, role, honest=True) if r.grid_equal is not None]
    out = []
    for g in GRIDS:
        all_eq = np.concatenate([r.grid_equal[g] for r in honest])
        by_pair = {}
        for key in sorted({(r.model, r.source) for r in honest}):
            e = np.concatenate([r.grid_equal[g] for r in honest if (r.model, r.source) == key])
            by_pair[f"{key[0]} {key[1]}"] = float(e.mean())
        out.append({"grid": g, "hash_match_rate": float(all_eq.mean()), "comparisons": int(all_eq.size),
                    "by_pair": by_pair})
    return out


# -- plot -----------------------------------------------------------------------------------------

def plot(rows: list[Rows], tol, figure: str, grid_sweep: list[dict], path: str, title: str,
         state_rows: list[StateRows] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every row is shown as its distance over its own stage's honest limit, so one line at 1 is the
    # Mismatch boundary of every stage; decisive limits differ per stage and show as a band.
    def limits(r: Rows) -> tuple[float, float | None]:
        t = tol.for_stage(*r.stage_key)
        src = _FIGURE_OF.get(figure, figure)
        h, d = getattr(t.honest, src), getattr(t.decisive, src)
        if figure in _FIGURE_OF:
            h, d = 1.0 - h, (None if d is None else 1.0 - d)
        return h, d

    def scaled(rs: list[Rows]) -> np.ndarray:
        return np.concatenate([distances(r.figures)[figure] / limits(r)[0] for r in rs]) if rs else np.zeros(0)

    ratios = [d / h for h, d in map(limits, rows) if d is not None]
    dec = (min(ratios), max(ratios)) if ratios else None
    honest = {"honest: " + p: scaled(_select(rows, "heldout", honest=True, source=p))
              for p in sorted({r.source for r in rows if r.honest})}
    cheat = {c: scaled(_select(rows, "heldout", honest=False, source=c)) for c in cheater_classes(rows)}
    pos = np.concatenate([v[v > 0] for v in list(honest.values()) + list(cheat.values())])
    lo, hi = max(pos.min() / 2, 1e-7), pos.max() * 2
    bins = np.logspace(np.log10(lo), np.log10(hi), 70)
    noise = [c for c in cheat if c.startswith("noise-")]
    core = [c for c in cheat if c not in noise]
    cmap = plt.get_cmap("plasma")
    colors = {"honest: repack-off": "#1f77b4", "honest: reference": "#2ca02c", "skip-layer": "#d62728",
              "cheap-quant": "#ff7f0e", "replay": "#9467bd", "random": "#8c564b"}
    for i, c in enumerate(noise):
        colors[c] = cmap(0.05 + 0.8 * i / max(1, len(noise) - 1))

    def label(name, v):
        zero = int((v == 0).sum())
        return f"{name} (n={v.size}" + (f", {zero} hash-equal off the log axis)" if zero else ")")

    fig, axes = plt.subplots(1, 4, figsize=(23, 6), gridspec_kw={"width_ratios": [1.35, 1.35, 1, 1]})
    for ax, classes, sub in ((axes[0], core, "skipped layer, cheaper quantization, replay, random"),
                             (axes[1], noise, "noise-s: each element times (1 + s N(0,1))")):
        for name, v in honest.items():
            ax.hist(np.clip(v[v > 0], lo, hi), bins=bins, histtype="stepfilled", alpha=0.35,
                    color=colors.get(name), label=label(name, v))
        for name in classes:
            v = cheat[name]
            ax.hist(np.clip(v[v > 0], lo, hi), bins=bins, histtype="step", linewidth=1.8,
                    color=colors.get(name), label=label(name, v))
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1.5, label="honest limit of the row's stage (Mismatch beyond)")
        if dec is not None:
            ax.axvspan(dec[0], dec[1], color="r", alpha=0.12,
                       label=f"decisive limits, {dec[0]:.3g}-{dec[1]:.3g} x honest (Fraud beyond)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.8, None)
        ax.set_xlabel(f"{figure} (worker vs verifier, held-out prompts) / its stage's honest limit")
        ax.set_ylabel("token rows (one stage each)")
        ax.set_title(f"Honest pairs vs cheaters: {sub}", fontsize=10)
        ax.legend(fontsize=7.5, loc="upper left", framealpha=0.85)
        ax.grid(True, which="major", alpha=0.3)
    ax2 = axes[2]
    grids = [g["grid"] for g in grid_sweep]
    ax2.plot(grids, [g["hash_match_rate"] for g in grid_sweep], "k-o", label="all honest pairs")
    for key in grid_sweep[0]["by_pair"]:
        ax2.plot(grids, [g["by_pair"][key] for g in grid_sweep], "--o", markersize=3, label=key)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(grids)
    ax2.set_xticklabels([str(g) for g in grids])
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("grid (steps per unit; the seed uses 64)")
    ax2.set_ylabel("share of honest rows whose hashes are equal")
    ax2.set_title("Exact-hash match rate vs grid size", fontsize=10)
    ax2.legend(fontsize=7.5, loc="upper right")
    ax2.grid(True, alpha=0.3)
    # Window states: each held-out window's distance over its stage's state limit.
    ax3 = axes[3]
    held = [r for r in state_rows if r.role == "heldout"]
    for source in sorted({r.source for r in held}, key=lambda x: x != "repack-off"):
        v = np.concatenate([r.distances / tol.for_stage(*r.stage_key).state_limit for r in held if r.source == source])
        name = "honest: repack-off" if source == "repack-off" else source
        zero = int((v == 0).sum())
        ax3.hist(np.clip(v[v > 0], 1e-3, None), bins=np.logspace(-3, 1.5, 40), color=colors.get(name),
                 histtype="stepfilled" if source == "repack-off" else "step", linewidth=1.8,
                 alpha=0.5 if source == "repack-off" else 1.0,
                 label=f"{name} (n={v.size}" + (f", {zero} equal off the log axis)" if zero else ")"))
    ax3.axvline(1.0, color="k", linestyle="--", linewidth=1.5, label="the stage's state limit (untrusted beyond)")
    ax3.set_xscale("log")
    ax3.set_xlabel("window state relative L2 (node vs replay) / state limit")
    ax3.set_ylabel(f"windows of {STATE_WINDOW} decode steps")
    ax3.set_title("Audits from window states: keys and values", fontsize=10)
    ax3.legend(fontsize=7.5, loc="upper left")
    ax3.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command --------------------------------------------------------------------------------------

def run(args) -> int:
    from consortium.verification.verdicts import DEFAULT_TOLERANCE_PATH, Tolerance
    from node_agent.faults import DEFAULT_NOISE_SCALES

    t0 = time.time()
    per_role = args.prompts or (1 if args.quick else 5)
    half = len(PROMPTS) // 2
    if not 1 <= per_role <= half:
        print(f"--prompts must be 1-{half}", file=sys.stderr)
        return 2
    prompts = [("calibration", p) for p in PROMPTS[:per_role]] + [("heldout", p) for p in PROMPTS[half:half + per_role]]
    models = args.model or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    agents = []
    if args.verifier_agent:
        try:
            creds = tls.from_args(args)
            agents = [AgentLink.parse(a, creds) for a in args.verifier_agent]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    rows, metas, state_rows = [], [], []
    for m in models:
        try:
            r, meta = collect_model(m, prompts, threads=args.threads, seed=args.seed,
                                    noise_scales=DEFAULT_NOISE_SCALES, log=log, agents=agents,
                                    agent_model=args.verifier_model)
        except AgentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows += r
        metas.append(meta)
        state_rows += collect_states(m, prompts, threads=args.threads, log=log)
    tol, figure, table = choose_tolerance(rows)
    state_pooled, state_stages = choose_state_limits(state_rows)
    windows = sum(r.distances.size for r in state_rows if r.honest and r.role == "calibration")
    about = (f" Window-state limit (audits from window states) = {STATE_FACTOR:g} x the largest kvstate.relative_l2 "
             f"of {windows} honest calibration windows, per stage with at least {MIN_STATE_WINDOWS} differing.")
    tol = dataclasses.replace(tol, about=tol.about + about, state_relative_l2=state_pooled, stages={
        k: dataclasses.replace(t, state_relative_l2=state_stages.get(k, state_pooled)) for k, t in tol.stages.items()})
    calib = evaluate(rows, tol, "calibration")
    held = evaluate(rows, tol, "heldout")
    grid_sweep = sweep(rows)
    brk = noise_breakpoint(held["cheaters"])
    import llama_cpp

    agents_seen = {name: backend for meta in metas for name, backend in meta["agents"].items()}
    report = {
        "about": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": f"{platform.machine()} {platform.system()}, CPU backend",
                  "llama_cpp_python": llama_cpp.__version__, "quick": bool(args.quick),
                  "prompts_per_role": per_role, "models": metas, "grid": "float16, grid 64, clamp 100",
                  "worker": "llama.cpp, CPU weight repacking on",
                  "cheaters_audited_by": "llama.cpp, repacking off",
                  "verifier_agents": agents_seen,
                  "not_measured": None if any(b.split()[0] in ("cuda", "metal") for b in agents_seen.values())
                  else "CUDA and Metal (no GPU here, and no --verifier-agent on one)"},
        "honest": held["honest"],
        "cheaters": held["cheaters"],
        "noise_breakpoint": brk,
        "tolerance": tol.to_json(),
        "figure": figure,
        "figure_choice": table,
        "calibration": {"honest": calib["honest"], "cheaters": calib["cheaters"]},
        "grid_sweep": grid_sweep,
        "states": {"window": STATE_WINDOW, "prefill": STATE_PREFILL,
                   "rule": f"{STATE_FACTOR:g} x the largest honest calibration distance (per stage with at least "
                           f"{MIN_STATE_WINDOWS} differing windows, else pooled)",
                   "pooled_limit": state_pooled, "heldout": evaluate_states(state_rows, state_pooled, state_stages),
                   "calibration": evaluate_states(state_rows, state_pooled, state_stages, "calibration")},
        "runtime_s": round(time.time() - t0, 1),
    }
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    tol_json = json.dumps(tol.to_json(), indent=2) + "\n"
    if args.tolerance_out:
        Path(args.tolerance_out).write_text(tol_json)
    if args.write_default:
        Tolerance.from_json(json.loads(tol_json))  # must load before it replaces the shipped file
        DEFAULT_TOLERANCE_PATH.write_text(tol_json)
        print(f"wrote the shipped default tolerance {DEFAULT_TOLERANCE_PATH.name}")
    if args.plot:
        plot(rows, tol, figure, grid_sweep, args.plot, state_rows=state_rows, title=
             f"consortium calibrate, {', '.join(m['model'] for m in metas)}: 3-way split, "
             f"{per_role} held-out prompts, {report['about']['date'][:10]}")
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def summary(rep: dict) -> str:
    h = rep["honest"]
    tol = rep["tolerance"]
    lines = [
        f"calibration ({'quick' if rep['about']['quick'] else 'full'}), {rep['about']['date']}, "
        f"llama-cpp-python {rep['about']['llama_cpp_python']}",
        "models: " + "; ".join(f"{m['model']} ({m['file_type']}, split {' / '.join(m['split'])}, honest pairs: "
                               f"{', '.join(m['honest_pairs'])})" for m in rep["about"]["models"]),
        f"figure chosen: {rep['figure']}; honest limit {json.dumps(tol['honest'])}, decisive limit "
        f"{json.dumps(tol['decisive'])}, honest Mismatch rate for the binomial test {tol['honest_mismatch_rate']:g}",
        f"held-out honest: {h['comparisons']} comparisons, {h['hash_equal']} hash-equal, {h['hash_differ']} differ: "
        f"{h['within_tolerance']} within tolerance, {h['mismatch']} Mismatch "
        f"({100 * h['mismatch_rate']:.2f}% of all, {100 * h['mismatch_rate_hash_differ']:.2f}% of differing), "
        f"{h['fraud_verdicts']} Fraud; false fraud (honest nodes with Fraud or quarantined, of {h['nodes']}): "
        f"{h['false_fraud']}",
    ]
    for k, v in {**h["by_pair"], **h.get("by_stage", {})}.items():
        lines.append(f"  {k}: {v['comparisons']} comparisons, {v['hash_equal']} hash-equal, "
                     f"{v['mismatch']} Mismatch ({100 * v['mismatch_rate']:.2f}%), {v['fraud']} Fraud")
    lines.append("held-out cheaters (detected = Mismatch or Fraud):")
    for k, v in rep["cheaters"].items():
        lines.append(f"  {k:12s} {v['detected']:5d}/{v['audits']:<5d} detected ({100 * v['detection_rate']:.2f}%), "
                     f"{v['fraud']} Fraud" + "".join(f"; {st} {100 * d:.1f}%" for st, d in
                                                     v.get("detection_by_stage", {}).items() if d < 0.99))
    b = rep["noise_breakpoint"]
    lines.append(f"noise: detection falls below 50% at scale {b['largest_scale_below_50pct']} and below "
                 f"(50% crossing about {b['crossing_50pct'] and round(b['crossing_50pct'], 5)})")
    lines.append("grid sweep (exact hash match rate of honest pairs): " +
                 ", ".join(f"{g['grid']}: {g['hash_match_rate']:.3f}" for g in rep["grid_sweep"]))
    st = rep["states"]
    lines.append(f"window states (audits from them; limit {st['rule']}, pooled {st['pooled_limit']:.4g}), held out:")
    for k, v in st["heldout"].items():
        lines.append(f"  {k}: {v['windows']} windows, {v['differ']} differ, relative L2 {v['min']:.4g}-{v['max']:.4g}, "
                     f"limit {v['limit']:.4g}, {v['beyond_limit']} beyond it")
    lines.append(f"runtime {rep['runtime_s']} s")
    return "\n".join(lines)
