"""The node agent's gRPC service: serves the stages it is given, one assignment per (session, stage).

An assignment holds the stage's epoch, a sequence slot in a llama.cpp context for that layer range,
the agent's window signer and the outputs it sent (bounded), so that it can resend them to a node
taking over the next stage, reveal a committed row, or be truncated for a rollback. Audits run on
separate sequence slots of the same engines, so verifying never disturbs serving.

Every handler turns bad input into INVALID_ARGUMENT with a reason and a stale epoch into
FAILED_PRECONDITION; nothing a client sends can take the server down. Forward steps also come over
the data lane (node_agent.datalane), through the same handler and with the same refusals.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from consortium import fetch, wire
from consortium.batches import largest_allowed, merge_decode_steps
from consortium.layers import LayerRange
from consortium.resources import MAX_SESSION_ID, MAX_WINDOW
from consortium.sampling import SamplingParams, sample
from consortium.verification import canonical, proofs, receipts
from consortium.verification.canonical import CanonicalGrid
from consortium.wire import lane, pb
from node_agent import audit_gate, faults
from node_agent.datalane import DataLane
from node_agent.engine import llama as ll
from node_agent.engine.slicing import read_model_info, stage_file, verify_sha256
from node_agent.engine.stage import Stage, StageConfig, StageInputError, usable_cores
from node_agent.identity import NodeIdentity

log = logging.getLogger("node_agent")

# The final stage keeps only its latest logits rows: a Llama-3 row is 0.5 MB.
FINAL_STAGE_KEEP = 64

# Batch sizes a failover's replay may merge decode steps into, where the backup checked they keep the
# bits. Replaying 192 decode rows of a default-model stage on one thread took 0.72 of the one-row
# time in batches of 8, 0.67 in 16 and 0.66 in 32; checking 2, 4, 8, 16 costs about 0.15-0.25 s once.
REPLAY_MERGE_SIZES = (2, 4, 8, 16)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _bad(msg: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, msg)


def refusing(fn, *args):
    """fn(*args), every error a request can cause raised as Refused with its status and reason."""
    try:
        return fn(*args)
    except (StageInputError, wire.TensorError, canonical.NonFiniteActivation) as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    except (ValueError, TypeError, OverflowError) as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}") from None
    except FileNotFoundError as e:
        raise Refused(grpc.StatusCode.NOT_FOUND, str(e)) from None
    except ll.LlamaError as e:
        raise Refused(grpc.StatusCode.INTERNAL, f"llama.cpp: {e}") from None


def _sample(logits: np.ndarray, position: int, params: SamplingParams) -> int | None:
    """The token the driver would sample from this row, or None where it cannot be sampled (logits
    that are not finite): the driver then samples from the row itself and says why it cannot."""
    try:
        return sample(logits, position, params)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    node_id: str | None = None
    labels: dict = dataclasses.field(default_factory=dict)
    threads: int = 0       # llama.cpp threads of the sessions' forward steps; 0: every usable core
    # Threads of audit replays; 0: the cores the forward steps leave free, at least one. An audit on
    # the cores a forward step uses slows that step down more than its lower priority can prevent:
    # llama.cpp's threads wait for each other at every node of the graph, so one of them
    # descheduled for a time slice holds up the step (docs/dataplane.md, audits).
    audit_threads: int = 0
    n_ctx: int = 2048      # positions per sequence
    n_seq_max: int = 8     # sequence slots per loaded layer range (sessions and audit replays), each its own KV cache
    repack: bool = True
    fault: str | None = None
    # A verifier that lies, for tests: this output fault (noise-<scale>, replay, random) is applied to
    # the rows its audits recompute, so that drivers can be shown not to convict on its word alone.
    audit_fault: str | None = None
    # Seconds a call into the audit process may wait while that process advances by not one batch
    # nor task; then the process is killed, the call refused INTERNAL (the driver audits elsewhere)
    # and the next audit starts a new one. Long enough for a batch of a big model on a slow node.
    audit_stall_s: float = 120.0
    # Under mutual TLS: names a caller's certificate must carry (the driver's), so another agent's
    # certificate from the same CA cannot fence or truncate this node's stages. Empty: any caller.
    allowed_callers: tuple[str, ...] = ()

    def resolved_audit_threads(self) -> int:
        if self.audit_threads:
            return self.audit_threads
        cores = usable_cores()
        return max(1, cores - (self.threads or cores))


class Engines:
    """llama.cpp stages loaded on this node, keyed by stage file, with their sequence slots."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self._lock = threading.Lock()
        self._stages: dict[str, Stage] = {}
        self._free: dict[str, list[int]] = {}
        self._keys: dict[int, str] = {}   # id(stage) -> its key
        self._replay_sizes: dict[str, frozenset[int]] = {}   # stage key -> checked REPLAY_MERGE_SIZES
        self._checks: dict[str, threading.Event] = {}        # stage key -> set once its check ended

    def acquire(self, path: Path, layers: LayerRange, n_layers_total: int, *, model_path: str | None = None,
                fault: faults.Fault | None = None) -> tuple[Stage, int]:
        """A sequence slot of the stage for `path`; with a fault, of a cheating stage for the same layers."""
        with self._lock:
            key, _ = self._loaded(path, layers, n_layers_total, model_path, fault)
            if not self._free[key]:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"all {self.config.n_seq_max} sequence slots of layers {layers} are in use")
            seq = self._free[key].pop(0)
        stage = self._stages[key]
        stage.clear(seq)
        return stage, seq

    def is_loaded(self, path: Path, fault: faults.Fault | None = None) -> bool:
        with self._lock:
            return (str(path) if fault is None else f"{path}#{fault.name}") in self._stages

    def prepare(self, path: Path, layers: LayerRange, n_layers_total: int, *, model_path: str | None = None,
                fault: faults.Fault | None = None) -> bool:
        """Load the stage for `path` unless it is loaded, taking no slot; True if it was loaded now."""
        with self._lock:
            return self._loaded(path, layers, n_layers_total, model_path, fault)[1]

    def _loaded(self, path, layers, n_layers_total, model_path, fault) -> tuple[str, bool]:
        """The key of the stage for `path`, loaded now if it was not (True then). Under the lock."""
        key = str(path) if fault is None else f"{path}#{fault.name}"
        if key in self._stages:
            return key, False
        cfg = StageConfig(threads=self.config.threads, n_ctx=self.config.n_ctx,
                          n_seq_max=self.config.n_seq_max, repack=self.config.repack)
        if fault is None:
            stage = Stage(path, layers, n_layers_total, cfg)
        else:
            try:
                stage = faults.CheatingStage(fault, model_path, layers, n_layers_total, cfg)
            except ValueError as e:   # e.g. skip-layer on a stage of fewer than 3 layers
                raise _bad(f"fault {fault.name}: {e}") from e
        self._stages[key] = stage
        self._keys[id(stage)] = key
        self._free[key] = list(range(self.config.n_seq_max))
        return key, True

    def check_replay_merging(self, path: Path, fault: faults.Fault | None = None) -> None:
        """Find out, in the background and once per loaded stage, which of REPLAY_MERGE_SIZES keep its
        bits (Stage.batch_invariant_sizes): meant for a stage loaded ahead and idle; 0.1-0.35 s of
        compute, one decode at a time under the stage's lock, so a Replay meanwhile goes between its
        decodes (in the shapes given). Not in the lowest CPU class, as audits are: there, behind the
        audits' replays, it was still running when failovers came."""
        key = str(path) if fault is None else f"{path}#{fault.name}"
        with self._lock:
            stage = self._stages.get(key)
            if stage is None or key in self._checks:
                return
            done = self._checks[key] = threading.Event()

        def check() -> None:
            t0 = time.perf_counter()
            sizes: frozenset[int] = frozenset()
            try:
                run = getattr(stage, "batch_invariant_sizes", None)   # a cheating stage replays as it was run
                most = min(max(REPLAY_MERGE_SIZES), stage.config.n_batch) if run is not None else 1
                if most > 1:
                    # A final stage's replay merges only rows whose logits nobody needs (merged_replay):
                    # its keys and values are what must stay.
                    sizes = frozenset(run(most, REPLAY_MERGE_SIZES, logits=False))
                log.info("replays of %s may merge decode steps into %s (checked in %.0f ms)", key,
                         sorted(sizes) or "nothing", (time.perf_counter() - t0) * 1000)
            except Exception:   # the replays keep their shapes
                log.exception("checking merged replays of %s failed", key)
            finally:
                with self._lock:
                    self._replay_sizes[key] = sizes
                done.set()

        threading.Thread(target=check, name="merge-check", daemon=True).start()

    def replay_sizes(self, stage: Stage, wait_s: float = 0.0) -> frozenset[int]:
        """The merged batch sizes a replay on `stage` may use: none until check_replay_merging has
        ended on it (wait_s: how long to wait for a check under way)."""
        with self._lock:
            key = self._keys.get(id(stage), "")
            done = self._checks.get(key)
        if done is not None and wait_s > 0:
            done.wait(wait_s)
        with self._lock:
            return self._replay_sizes.get(key, frozenset())

    def release(self, stage: Stage, seq: int) -> None:
        stage.drop(seq)   # an idle slot holds no KV cache
        with self._lock:
            key = self._keys[id(stage)]
            self._free[key].append(seq)
            self._free[key].sort()


def merged_replay(sizes: list[int], start: int, keep_from: int | None,
                  allowed: frozenset[int]) -> tuple[list[tuple[int, bool]], int]:
    """A Replay's batches with runs of decode steps merged into the `allowed` sizes: (rows, output
    kept) per batch, and how many rows went into merged batches. keep_from: on the final stage the
    request's commit_from (batches ending there or later keep their logits and their shapes); None
    on other stages, whose every row is output."""
    n = sum(sizes)
    must_end = set() if keep_from is None else set(range(max(keep_from - 1, start), start + n))
    runs = merge_decode_steps(sizes, start, must_end, largest_allowed(allowed))
    plan, pos = [], start
    for rows, _ in runs:
        plan.append((rows, keep_from is None or pos + rows - 1 >= keep_from))
        pos += rows
    return plan, sum(rows for rows, merged in runs if merged)


def request_inputs(a_is_first: bool, n_embd: int, tokens, hidden: pb.Tensor, has_hidden: bool):
    """A request's rows: token ids for a first stage, else hidden states of the stage's width, checked."""
    if a_is_first:
        if has_hidden:
            raise _bad("stage 0 takes token ids, not hidden states")
        if not tokens:
            raise _bad("no token ids")
        return np.asarray(tokens, dtype=np.int64), None
    if tokens:
        raise _bad("this stage takes hidden states, not token ids")
    if not has_hidden:
        raise _bad("no hidden states")
    h = wire.decode_tensor(hidden, ndim=2)
    if h.shape[1] != n_embd:
        raise _bad(f"hidden states have width {h.shape[1]}, this stage expects {n_embd}")
    if not np.isfinite(h).all():
        raise _bad("hidden states contain NaN or Inf")
    return None, h


class DeferredJob:
    """A deferred step's commit-and-sign job. It starts once the step's response has gone out: its
    Python would otherwise hold the GIL while the response is serialized and sent (0.2 ms more per hop
    on a middle stage, 0.8 ms on the final one, measured on one agent alone). Whoever needs its result
    first starts it if that has not happened, so a response that never went out cannot stall the stage."""

    def __init__(self, job, pool: futures.Executor):
        self._job, self._pool = job, pool
        self._lock = threading.Lock()
        self._future: futures.Future | None = None

    def start(self) -> None:
        with self._lock:
            if self._future is None:
                self._future = self._pool.submit(self._job)

    def result(self):
        self.start()
        return self._future.result()


@dataclasses.dataclass
class Assignment:
    session: str
    stage_index: int
    epoch: int
    layers: LayerRange
    n_layers_total: int
    model_path: str
    engine: Stage
    seq: int
    signer: receipts.WindowSigner
    grid: CanonicalGrid
    outputs: dict = dataclasses.field(default_factory=dict)        # position -> float32 row
    commitments: dict = dataclasses.field(default_factory=dict)    # position -> 32 bytes
    windows: dict = dataclasses.field(default_factory=dict)        # window start -> SignedStatement
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Deferred steps: the commit-and-sign job of the last one (settled under `lock` before anything
    # reads the fields above), and what they committed that no response has carried yet.
    pending: "DeferredJob | None" = None
    undelivered: list = dataclasses.field(default_factory=list)    # [(position, commitment)]
    undelivered_windows: dict = dataclasses.field(default_factory=dict)  # window start -> latest signed
    # Steps signed per window whose rows went out and are not committed yet: [(first row, rows, inputs,
    # (SamplingParams, token) sampled from the last row or None)].
    uncommitted: list = dataclasses.field(default_factory=list)
    # The final stage's sampling parameters, from its first sampled step: its windows sign tokens
    # sampled with one set of them, so a step asking for others is refused.
    sampling: SamplingParams | None = None
    # With window_states: the KV state of each closed state window (state_window positions, apart
    # from the receipt window: audits replay whole state windows) and its signed statement, by start.
    window_states: bool = False
    state_window: int = receipts.DEFAULT_WINDOW
    states: dict = dataclasses.field(default_factory=dict)          # window start -> (bytes, SignedState)
    stage_file: str = ""   # the honest stage file, whose audit sequence a failover here may take over

    def settle(self, commit=None) -> None:
        """Wait for the deferred commit-and-sign job (starting it if its response's delivery has not);
        its error, if any, is raised here once. With `commit` (the agent's commit-and-sign), also
        commit and sign the steps held for their window's end, for whoever needs them now."""
        job, self.pending = self.pending, None
        if job is not None:
            job.result()
        if commit is not None and self.uncommitted:
            steps, self.uncommitted = self.uncommitted, []
            commit(self, steps, True)

    def take_undelivered(self) -> pb.DeferredCommitments:
        out = pb.DeferredCommitments(position=self.undelivered[0][0] if self.undelivered else 0,
                                     commitments=[c for _, c in self.undelivered],
                                     windows=[wire.window_to_pb(w) for _, w in sorted(self.undelivered_windows.items())])
        self.undelivered, self.undelivered_windows = [], {}
        return out

    def committed_from(self, first: int) -> pb.DeferredCommitments:
        """The commitments kept from `first` on (to the first position without one) and the latest
        signed statement of each window they touch; nothing from `first` on is undelivered after it."""
        cs = list(itertools.takewhile(lambda c: c is not None, (self.commitments.get(p) for p in itertools.count(first))))
        last = first + len(cs) - 1
        windows = [w for ws, w in sorted(self.windows.items()) if cs and ws <= last and ws + w.statement.count > first]
        self.undelivered = [(p, c) for p, c in self.undelivered if p < first]
        self.undelivered_windows = {ws: w for ws, w in self.undelivered_windows.items() if ws + w.statement.count <= first}
        return pb.DeferredCommitments(position=first, commitments=cs, windows=[wire.window_to_pb(w) for w in windows])

    @property
    def is_first(self) -> bool:
        return self.layers.first == 0

    @property
    def is_last(self) -> bool:
        return self.layers.last == self.n_layers_total - 1


class NodeAgentService(wire.pb_grpc.NodeAgentServicer):
    def __init__(self, identity: NodeIdentity, config: AgentConfig = AgentConfig()):
        self.identity = identity
        self.config = config
        self.fault = faults.parse_fault(config.fault) if config.fault else None
        # The fault its stages compute with; a token fault leaves the rows honest.
        self.row_fault = self.fault if self.fault is not None and self.fault.changes_rows else None
        self.audit_fault = faults.parse_fault(config.audit_fault) if config.audit_fault else None
        if self.audit_fault is not None and not self.audit_fault.transforms_output:
            raise ValueError(f"audit fault {self.audit_fault.name}: only noise-<scale>, replay and random "
                             "change an audit's rows")
        self._audit_rng = np.random.default_rng()
        self.backend = ll.detect_backend()
        self.build = ll.build_info()
        self.engines = Engines(config)
        self.fetches = fetch.Fetches()
        # (sha256, header_bytes) -> digest: the operator asks every few seconds until its slowest node
        # is done, and a fetched file never changes (it is named by its sha256).
        self._header_digests: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        self._assignments: dict[tuple[str, int], Assignment] = {}
        self._fences: dict[tuple[str, int], int] = {}
        self._audit_keys: set[tuple] = set()   # (session, stage, stage file) audited here
        self.audits = AuditProcess(config)
        self._counters: dict[tuple[str, int, int], list[int]] = collections.defaultdict(lambda: [0, 0])
        # Seconds spent in Forward (0) and Replay (1) steps per (session, stage), and audits answered,
        # their rows and seconds: for /metrics (node_agent.metrics).
        self._step_seconds: dict[tuple[str, int], list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        self.audit_stats = {"audits": 0, "rows": 0, "seconds": 0.0}
        # Commits and signs deferred steps after their response went out (one job per assignment at a time).
        self._committer = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="commit")
        self.requests = 0
        self.rejected = 0
        self.data_port = 0   # set by serve() when a data lane listens

    # -- plumbing ------------------------------------------------------------------------------

    def _handle(self, context, fn, *args):
        self.count_request()
        try:
            if not getattr(context, "in_process", False):
                self.check_caller([n.decode(errors="replace")
                                   for n in context.auth_context().get("x509_subject_alternative_name", [])])
            return self.run(fn, *args)
        except Refused as e:
            context.abort(e.code, str(e) or e.code.name)

    def check_caller(self, names: list[str]) -> None:
        """Refuse (PERMISSION_DENIED) a caller whose certificate names none of the allowed callers."""
        if self.config.allowed_callers and not set(names) & set(self.config.allowed_callers):
            self._refused()
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"caller {', '.join(names) or '(no certificate)'} is not one of "
                          f"{', '.join(self.config.allowed_callers)}")

    def run(self, fn, *args):
        """refusing(fn, *args), each refusal counted."""
        try:
            return refusing(fn, *args)
        except Refused:
            self._refused()
            raise

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def _refused(self) -> None:
        with self._lock:
            self.rejected += 1

    def _ref(self, ref: pb.StageRef) -> tuple[str, int, int]:
        if not ref.session:
            raise _bad("the request names no session")
        if len(ref.session) > MAX_SESSION_ID:
            raise _bad(f"session id longer than {MAX_SESSION_ID} characters")
        if ref.stage < 0:
            raise _bad(f"stage {ref.stage} is negative")
        if ref.epoch < 0:
            raise _bad(f"epoch {ref.epoch} is negative")
        return ref.session, int(ref.stage), int(ref.epoch)

    def _check_fence(self, key, epoch):
        fence = self._fences.get(key, 0)
        if epoch < fence:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"stale epoch {epoch} for session {key[0]!r} stage {key[1]}: fenced at epoch {fence}")

    def _assignment(self, ref: pb.StageRef) -> Assignment:
        session, stage, epoch = self._ref(ref)
        key = (session, stage)
        with self._lock:
            self._check_fence(key, epoch)
            a = self._assignments.get(key)
        if a is None:
            raise _bad(f"unknown session {session!r} stage {stage} on this node (LoadStage first)")
        if epoch < a.epoch:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"stale epoch {epoch} for session {session!r} stage {stage}: this node serves epoch {a.epoch}")
        if epoch > a.epoch:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"epoch {epoch} is newer than the loaded epoch {a.epoch}: LoadStage it first")
        return a

    def _model_path(self, req) -> str:
        """The model file a LoadStage, Prepare or Audit names: its path here, or with model_url the
        file this agent fetched from there (RESOURCE_EXHAUSTED, saying how far, while it fetches:
        the operator waits, as for a busy node)."""
        if not req.model_url:
            return req.model_path
        if not fetch.is_url(req.model_url) or len(req.model_sha256) != 64:
            raise _bad("model_url must be an http(s) URL, with the model_sha256 that pins it")
        path = self.fetches.ready(req.model_url, req.model_sha256)
        if path is not None:
            return str(path)
        p = self.fetches.progress(req.model_url, req.model_sha256)
        if p.error:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the model could not be fetched: {p.error}")
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"fetching the model from {req.model_url}: {p}")

    def FetchModel(self, request, context):
        return self._handle(context, self._fetch_model, request)

    def _fetch_model(self, req: pb.FetchModelRequest) -> pb.FetchModelResponse:
        if not fetch.is_url(req.url):
            raise _bad(f"url {req.url[:200]!r} is not an http(s) URL")
        if len(req.sha256) != 64 or any(c not in "0123456789abcdef" for c in req.sha256):
            raise _bad("sha256 must be 64 lower-case hex digits: a fetched model is pinned by it")
        if not 0 <= req.header_bytes <= fetch.MAX_HEADER_BYTES:   # the digest reads them at once
            raise _bad(f"header_bytes must be 0 to {fetch.MAX_HEADER_BYTES}")
        p = self.fetches.progress(req.url, req.sha256)
        out = pb.FetchModelResponse(done=p.done, bytes=p.bytes, total=p.total, error=p.error)
        path = self.fetches.ready(req.url, req.sha256)
        if req.header_bytes and path is not None:
            # The operator read only the header, unverifiable alone: this file's first bytes are pinned.
            key = (req.sha256, req.header_bytes)
            if key not in self._header_digests:
                self._header_digests[key] = fetch.prefix_digest(path, req.header_bytes)
            out.header_sha256 = self._header_digests[key]
        return out

    def _stage_path(self, model_path: str, sha: str, layers: LayerRange):
        if not model_path:
            raise _bad("no model path")
        if not Path(model_path).is_file():
            raise _bad(f"model file {model_path!r} does not exist on this node")
        info = read_model_info(model_path)
        if layers.last >= info.n_layers:
            raise _bad(f"layers {layers} run past the model's {info.n_layers} layers")
        digest = verify_sha256(model_path, sha) if sha else None
        return stage_file(model_path, layers, model_sha256=digest), info

    def _layers(self, first: int, last: int) -> LayerRange:
        if first < 0 or last < first:
            raise _bad(f"bad layer range {first}-{last}")
        return LayerRange(int(first), int(last))

    # -- LoadStage / Fence / Truncate ---------------------------------------------------------

    def LoadStage(self, request, context):
        return self._handle(context, self._load_stage, request)

    def _load_stage(self, req: pb.LoadStageRequest) -> pb.LoadStageResponse:
        session, stage_index, epoch = self._ref(req.ref)
        key = (session, stage_index)
        layers = self._layers(req.first_layer, req.last_layer)
        grid = wire.grid_from_pb(req.grid)
        window = req.receipt_window or receipts.DEFAULT_WINDOW
        if not 1 <= window <= MAX_WINDOW:
            raise _bad(f"receipt_window {req.receipt_window} outside 1..{MAX_WINDOW}")
        state_window = req.state_window or window
        if not 1 <= state_window <= MAX_WINDOW:
            raise _bad(f"state_window {req.state_window} outside 1..{MAX_WINDOW}")
        t0 = time.perf_counter()
        with self._lock:
            self._check_fence(key, epoch)
            old = self._assignments.get(key)
        if old is not None and epoch < old.epoch:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"stale epoch {epoch}: this node serves epoch {old.epoch}")
        model_path = self._model_path(req)
        path, info = self._stage_path(model_path, req.model_sha256, layers)
        found = self.engines.is_loaded(path, self.row_fault)
        engine, seq = self.engines.acquire(path, layers, info.n_layers, model_path=model_path, fault=self.row_fault)
        signer = receipts.WindowSigner(self.identity.private_key, session=session, stage=stage_index,
                                       node_id=self.identity.node_id, epoch=epoch, grid=grid, window=window)
        a = Assignment(session, stage_index, epoch, layers, info.n_layers, model_path, engine, seq, signer, grid,
                       window_states=req.window_states, state_window=state_window, stage_file=str(path))
        with self._lock:
            old = self._assignments.get(key)
            self._assignments[key] = a
        if old is not None:
            with old.lock:
                self.engines.release(old.engine, old.seq)
        return pb.LoadStageResponse(node_id=self.identity.node_id, public_key=self.identity.public_key_text,
                                    backend=self.backend, n_embd=engine.n_embd, n_vocab=engine.n_vocab,
                                    n_layers_total=info.n_layers, load_ms=(time.perf_counter() - t0) * 1000,
                                    commit_domain=canonical.ROW_DOMAIN.decode(),
                                    data_port=self.data_port, found_loaded=found, n_ctx=self.config.n_ctx)

    def Prepare(self, request, context):
        return self._handle(context, self._prepare, request)

    def _prepare(self, req: pb.PrepareRequest) -> pb.PrepareResponse:
        """Load a stage's layers as a likely backup, with no assignment: nothing is served from them
        until a LoadStage of a session's stage finds them loaded."""
        layers = self._layers(req.first_layer, req.last_layer)
        t0 = time.perf_counter()
        model_path = self._model_path(req)
        path, info = self._stage_path(model_path, req.model_sha256, layers)
        loaded = self.engines.prepare(path, layers, info.n_layers, model_path=model_path, fault=self.row_fault)
        # While the stage waits idle: whether a failover's replay on it may merge decode steps.
        self.engines.check_replay_merging(path, self.row_fault)
        return pb.PrepareResponse(load_ms=(time.perf_counter() - t0) * 1000 if loaded else 0.0)

    def Fence(self, request, context):
        return self._handle(context, self._fence, request)

    def _fence(self, req: pb.FenceRequest) -> pb.FenceResponse:
        session, stage_index, epoch = self._ref(req.ref)
        key = (session, stage_index)
        with self._lock:
            self._fences[key] = max(self._fences.get(key, 0), epoch)
            a = self._assignments.get(key)
            if a is not None and a.epoch < epoch:
                del self._assignments[key]  # fenced: its KV and outputs must not be used again
            else:
                a = None
        if a is not None:
            with a.lock:
                self.engines.release(a.engine, a.seq)
        return pb.FenceResponse(epoch=self._fences[key])

    def Release(self, request, context):
        return self._handle(context, self._release, request)

    def _release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        session, stage_index, epoch = self._ref(req.ref)
        key = (session, stage_index)
        with self._lock:
            a = self._assignments.get(key)
            if a is not None and a.epoch > epoch:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"stale epoch {epoch}: this node serves epoch {a.epoch}")
            self._fences[key] = max(self._fences.get(key, 0), epoch + 1)
        return pb.ReleaseResponse(slots=self._free(lambda k: k == key, max_epoch=epoch))

    def Truncate(self, request, context):
        return self._handle(context, self._truncate, request)

    def _truncate(self, req: pb.TruncateRequest) -> pb.TruncateResponse:
        a = self._assignment(req.ref)
        if req.position < 0:
            raise _bad(f"position {req.position} is negative")
        with a.lock:
            a.settle()
            p = min(int(req.position), a.engine.next_position(a.seq))
            a.engine.truncate(a.seq, p)
            for d in (a.outputs, a.commitments):
                for k in [k for k in d if k >= p]:
                    del d[k]
            for k in [k for k in a.windows if k >= p]:
                del a.windows[k]
            for k in [k for k in a.states if k + a.state_window > p]:   # a window cut at p is gone too
                del a.states[k]
            # A driver that truncates is rolling back or resuming after its own crash: it could not check
            # an undelivered window whose earlier commitments it never received, so none is delivered.
            a.undelivered, a.undelivered_windows, a.uncommitted = [], {}, []
            a.signer.reset()
            return pb.TruncateResponse(next_position=a.engine.next_position(a.seq), n_ctx=self.config.n_ctx)

    # -- Forward / Replay ---------------------------------------------------------------------

    def Forward(self, request, context):
        def when_sent(job: DeferredJob) -> None:
            if not (hasattr(context, "add_callback") and context.add_callback(job.start)):
                job.start()   # called in process, or the call has ended already
        return self._handle(context, self._forward, request, True, when_sent)

    # -- the data lane (node_agent.datalane): the same steps and errors, as frames --------------

    def lane_caller(self, names: list[str]) -> bytes | None:
        """None if the lane's caller (its certificate's names) may call, else the frame refusing it."""
        try:
            self.check_caller(names)
        except Refused as e:
            self.count_request()
            return lane.error_frame(e.code, str(e))
        return None

    def lane_oversized(self, n: int) -> bytes:
        self.count_request()
        self._refused()
        return lane.error_frame(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"a request of {n} bytes is over the limit of {wire.MAX_MESSAGE_BYTES}")

    def lane_step(self, body: bytes | bytearray) -> tuple[list, list[DeferredJob]]:
        """One lane request's answer frames, in order (bytes, or a callable making them once the
        frames before it are out), and the jobs to start once they have all gone out."""
        self.count_request()
        sent: list[DeferredJob] = []
        row: list[np.ndarray] = []
        try:
            response = self.run(self._lane_forward, body, sent.append, row)
        except Refused as e:
            return [lane.error_frame(e.code, str(e))], []
        except Exception as e:   # a bug of ours: gRPC would answer UNKNOWN and go on serving, so does the lane
            log.exception("a data lane step failed")
            return [lane.error_frame(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")], []
        if not row:
            return [lane.response_frame(response.SerializeToString())], sent
        # A sampled token goes out alone; the logit row it came from (196 KB to 1 MB) follows while
        # the driver already feeds the token to stage 0.
        head = pb.ForwardResponse(output_position=response.output_position, compute_ms=response.compute_ms,
                                  cpu_ms=response.cpu_ms, token=response.token, row_follows=True)

        def whole() -> bytes:
            wire.put_tensor(response.output, row[0])
            return lane.response_frame(response.SerializeToString())
        return [lane.response_frame(head.SerializeToString()), whole], sent

    def _lane_forward(self, body: bytes | bytearray, when_sent, row_later: list) -> pb.ForwardResponse:
        try:
            request = pb.ForwardRequest.FromString(body)
        except DecodeError as e:
            raise _bad(f"not a ForwardRequest: {e}") from None
        return self._forward(request, True, when_sent, row_later)

    def Replay(self, request, context):
        return self._handle(context, self._forward, request, False)

    def _forward(self, req: pb.ForwardRequest, send: bool, when_sent=DeferredJob.start, row_later: list | None = None):
        """One forward step (send: Forward, its output rows in the response) or a replay of one or
        more of the original run's batches (Replay). `when_sent(job)` arranges for a deferred step's
        job to start once its response has gone out. `row_later` (the data lane): a sampled token's
        logit row is appended there instead of written into the response."""
        a = self._assignment(req.ref)
        sampling = None
        if req.HasField("sample"):
            if not (send and a.is_last):
                raise _bad("sample is for a Forward step of the final stage")
            # Checked before the step: a refusal after it would leave the KV a row ahead of the driver.
            sampling = SamplingParams(req.sample.temperature, req.sample.top_p, req.sample.seed)
            if a.sampling is not None and sampling != a.sampling:
                raise _bad(f"sampling {sampling} differs from this session's earlier steps ({a.sampling}); "
                           "the tokens a node signs are sampled with one set of parameters")
        tokens, hidden = request_inputs(a.is_first, a.engine.n_embd, list(req.tokens), req.hidden,
                                        req.HasField("hidden"))
        x = tokens if tokens is not None else hidden
        n = len(x)
        sizes = self._batch_sizes(req, n, send)
        ends = [e - 1 for e in itertools.accumulate(sizes)]   # each batch's last row, from the first given
        # A non-final stage outputs every row; the final stage the logits of batch ends from commit_from.
        logits = [not a.is_last or req.position + e >= req.commit_from for e in ends]
        if req.commit_from and not (a.is_last and not send):
            raise _bad("commit_from is for a Replay of the final stage")
        committed = [e for e, keep in zip(ends, logits) if keep]
        if a.is_last and any(b - e != 1 for e, b in zip(committed, committed[1:])):
            raise _bad("on the final stage the batches that commit logits must end at consecutive positions "
                       "(after the first of them, one row each)")
        if req.adopt_upto and (send or req.position != 0):
            raise _bad("adopt_upto is for a Replay from position 0")
        defer = send and req.defer_commitments
        with a.lock:
            # Steps held for their window's end are committed first by anything that commits now.
            a.settle(None if defer else self._commit_and_sign)
            expected = a.engine.next_position(a.seq)
            if req.position != expected:
                raise _bad(f"session {a.session!r} stage {a.stage_index} continues at position {expected}, "
                           f"not {req.position}")
            t0, c0 = time.perf_counter(), time.thread_time()
            outs, i, adopted = [], 0, 0
            if req.adopt_upto > 0:
                # Batch ends the take-over may stop at: on the final stage only before commit_from,
                # whose rows need logits.
                limit = min(req.adopt_upto, req.commit_from if a.is_last else req.adopt_upto)
                adopted, rows = self._adopt(a, [e + 1 for e in ends if e + 1 <= limit])
                if adopted:
                    if rows is not None:
                        outs.append(rows)
                    done = list(itertools.accumulate(sizes)).index(adopted) + 1
                    sizes, logits, i = sizes[done:], logits[done:], adopted
            # A Replay merges decode steps where this node checked that the bits stay (a stage loaded ahead).
            plan, merged_rows = list(zip(sizes, logits)), 0
            if not send and not req.exact_shapes and sizes:
                allowed = self.engines.replay_sizes(a.engine)
                if allowed:
                    plan, merged_rows = merged_replay(sizes, req.position + i,
                                                      req.commit_from if a.is_last else None, allowed)
            for size, keep in plan:
                chunk = x[i:i + size]
                if tokens is not None:
                    out = a.engine.forward(a.seq, req.position + i, tokens=chunk, logits=keep)
                else:
                    out = a.engine.forward(a.seq, req.position + i, hidden=chunk, logits=keep)
                if keep:
                    outs.append(out)
                i += size
            out = (outs[0] if len(outs) == 1 else np.concatenate(outs)) if outs else None
            # The token is signed with its row's commitment (receipts.SampledTokens).
            token = _sample(out[-1], req.position + n, sampling) if sampling is not None else None
            if token is not None and self.fault is not None and self.fault.kind == "wrong-token":
                token = int(np.argmin(out[-1]))
            signed_token = None if token is None else (sampling, token)
            if token is not None:
                a.sampling = sampling
            if not a.is_last:
                first_out, inputs = req.position, x
            elif committed:
                first_out, inputs = req.position + committed[0], x[committed]
            else:
                first_out, inputs = None, None
            if out is not None:
                for k in range(len(out)):
                    a.outputs[first_out + k] = out[k]
                if a.is_last:
                    for k in [k for k in a.outputs if k <= first_out + len(out) - 1 - FINAL_STAGE_KEEP]:
                        del a.outputs[k]
            states = self._close_states(a, req.position, n) if a.window_states else []
            with self._lock:
                for p in range(req.position, req.position + n):
                    self._counters[(a.session, a.stage_index, p)][0 if send else 1] += 1
            earlier = a.take_undelivered() if send else None   # before the job below adds to it
            if defer:
                commitments, windows = [], []
                a.uncommitted.append((first_out, out, inputs, signed_token))
                window = a.signer.window
                if not req.sign_per_window or (first_out + len(out)) // window > first_out // window:
                    steps, a.uncommitted = a.uncommitted, []
                    a.pending = DeferredJob(functools.partial(self._commit_and_sign, a, steps, True),
                                            self._committer)
                    when_sent(a.pending)
            elif out is not None:
                commitments, windows = self._commit_and_sign(a, [(first_out, out, inputs, signed_token)], False)
            else:   # a final-stage replay that only rebuilt the KV cache
                commitments, windows = [], []
            compute_ms, cpu_ms = (time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000
            with self._lock:
                self._step_seconds[(a.session, a.stage_index)][0 if send else 1] += compute_ms / 1000
        wins = [wire.window_to_pb(w) for w in windows]
        if not send:
            return pb.ReplayResponse(rows=n, commitments=commitments, windows=wins, compute_ms=compute_ms,
                                     cpu_ms=cpu_ms, states=states, merged_rows=merged_rows, adopted_rows=adopted)
        resp = pb.ForwardResponse(output_position=first_out, commitments=commitments, windows=wins,
                                  compute_ms=compute_ms, earlier=earlier, cpu_ms=cpu_ms, states=states)
        if token is not None:
            resp.token = token
        if token is not None and row_later is not None:
            row_later.append(out)
        else:
            wire.put_tensor(resp.output, out)
        return resp

    def _adopt(self, a: Assignment, cuts: list[int]) -> tuple[int, np.ndarray | None]:
        """Take positions [0, n) of a's stage (n one of `cuts`) from this node's own audit replay of it
        into a's sequence, which holds nothing yet: (n, their rows on a non-final stage), or (0, None)
        where the audit process holds none of them or the stage cannot take them. Called under a.lock."""
        key = (a.session, a.stage_index, a.stage_file)
        with self._lock:
            audited = key in self._audit_keys
        if not cuts or not audited or not isinstance(a.engine, Stage) or a.engine.next_position(a.seq) != 0:
            return 0, None
        try:
            n, state, rows = self.audits.handover(key, cuts)
        except Refused as e:   # the audit process died: its sequences are gone
            log.warning("session %s stage %d: nothing taken from the audit replay: %s", a.session, a.stage_index, e)
            return 0, None
        if n == 0:
            return 0, None
        try:
            got = a.engine.import_state(a.seq, [state])
        except (StageInputError, ll.LlamaError) as e:
            log.warning("session %s stage %d: the audit replay's state did not load: %s", a.session, a.stage_index, e)
            got = -1
        if got != n:
            a.engine.clear(a.seq)
            return 0, None
        if a.is_last:
            return n, None
        return n, np.frombuffer(rows, dtype=np.float32).reshape(n, a.engine.n_embd).copy()

    def _close_states(self, a: Assignment, first: int, n: int) -> list[pb.SignedState]:
        """Export, keep and sign the KV state of every state window that rows first..first+n-1 closed."""
        w = a.state_window
        out = []
        for end in range((first // w + 1) * w, first + n + 1, w):
            state = a.engine.export_state(a.seq, end - w, end)
            st = pb.SignedState(window_start=end - w, count=w, digest=hashlib.sha256(state).digest())
            st.signature = self.identity.sign(receipts.state_message(
                a.session, a.stage_index, self.identity.node_id, a.epoch, st.window_start, st.count, st.digest))
            a.states[st.window_start] = (state, st)
            out.append(st)
        return out

    def States(self, request, context):
        return self._handle(context, self._states, request)

    def _states(self, req: pb.StatesRequest) -> pb.StatesResponse:
        a = self._assignment(req.ref)
        w = a.state_window
        if req.upto < 0 or req.upto % w:
            raise _bad(f"upto {req.upto} is not a window start (windows of {w})")
        with a.lock:
            if not a.window_states:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this stage was loaded without window_states")
            missing = [k for k in range(0, req.upto, w) if k not in a.states]
            if missing:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no state kept for the window(s) starting at {missing[:4]}")
            kept = [a.states[k] for k in range(0, req.upto, w)]
        return pb.StatesResponse(states=[s for s, _ in kept], statements=[st for _, st in kept])

    @staticmethod
    def _batch_sizes(req: pb.ForwardRequest, n: int, forward_step: bool) -> list[int]:
        sizes = list(req.batch_sizes)
        if not sizes:
            return [n]
        if forward_step:
            raise _bad("batch_sizes is for Replay; a Forward step is one batch")
        if any(s <= 0 for s in sizes) or sum(sizes) != n:
            raise _bad(f"batch sizes {sizes[:8]} do not add up to the {n} rows given")
        return sizes

    @staticmethod
    def _commit_and_sign(a: Assignment, steps: list, deferred: bool) -> tuple[list[bytes], list]:
        """Commit and sign the rows of one or more steps (WindowSigner.commit_steps); kept for Reveal
        (and, deferred, for a later response). Runs under a.lock, or as a.pending's job while no one
        else reads a."""
        commitments, windows = a.signer.commit_steps(steps, token_inputs=a.is_first)
        first_out = steps[0][0]
        for i, c in enumerate(commitments):
            a.commitments[first_out + i] = c
        for w in windows:
            a.windows[w.statement.window_start] = w
        if deferred:
            a.undelivered += [(first_out + i, c) for i, c in enumerate(commitments)]
            for w in windows:
                a.undelivered_windows[w.statement.window_start] = w
        return commitments, windows

    def Commitments(self, request, context):
        return self._handle(context, self._commitments, request)

    def _commitments(self, req: pb.CommitmentsRequest) -> pb.DeferredCommitments:
        a = self._assignment(req.ref)
        if req.HasField("from_position") and req.from_position < 0:
            raise _bad(f"from_position {req.from_position} is negative")
        with a.lock:
            a.settle(self._commit_and_sign)
            return a.committed_from(int(req.from_position)) if req.HasField("from_position") else a.take_undelivered()

    # -- Resend / Reveal ----------------------------------------------------------------------

    def Resend(self, request, context):
        yield from self._handle(context, self._resend_chunks, request) or []

    def _resend_chunks(self, req: pb.ResendRequest) -> list:
        a = self._assignment(req.ref)
        lo, hi = int(req.from_position), int(req.to_position)
        if lo < 0 or hi <= lo:
            raise _bad(f"bad position range [{lo}, {hi})")
        with a.lock:
            missing = [p for p in range(lo, hi) if p not in a.outputs]
            if missing:
                raise _bad(f"no stored output for positions {missing[0]}..{missing[-1]} "
                           f"(this node holds {len(a.outputs)} rows)")
            rows = np.stack([a.outputs[p] for p in range(lo, hi)])
        per = max(1, wire.RESEND_CHUNK_BYTES // max(1, rows[0].nbytes))
        chunks = [pb.ResendChunk(position=lo + i) for i in range(0, len(rows), per)]
        for c in chunks:
            wire.put_tensor(c.output, rows[c.position - lo:c.position - lo + per])
        return chunks

    def Reveal(self, request, context):
        return self._handle(context, self._reveal, request)

    def _reveal(self, req: pb.RevealRequest) -> pb.RevealResponse:
        a = self._assignment(req.ref)
        p = int(req.position)
        with a.lock:
            a.settle(self._commit_and_sign)
            row = a.outputs.get(p)
            if row is None:
                raise _bad(f"no stored output for position {p}")
            win = next((w for w in a.windows.values() if p in w.statement.positions), None)
            if win is None:
                raise _bad(f"no signed window holds position {p}")
            k = canonical.canonical_rows(row[None, :], a.grid)[0]
            sig = proofs.sign_reveal(self.identity.private_key, win.statement, p, k)
            resp = pb.RevealResponse(window=wire.window_to_pb(win), commitment=a.commitments[p],
                                     reveal_signature=sig)
            wire.put_tensor(resp.canonical, k)
            return resp

    # -- Audit --------------------------------------------------------------------------------

    def Audit(self, request, context):
        return self._handle(context, self._audit, request)

    def _audit(self, req: pb.AuditRequest) -> pb.AuditResponse:
        session, stage_index, _ = self._ref(req.ref)
        layers = self._layers(req.first_layer, req.last_layer)
        # Audits are honest on a cheating worker (--fault): the cheater under test is a worker. A
        # lying verifier (--audit-fault) is another agent.
        path, info = self._stage_path(self._model_path(req), req.model_sha256, layers)
        key = (session, stage_index, str(path))
        with self._lock:
            self._audit_keys.add(key)
        try:
            resp = self.audits.audit(key, req, layers, info.n_layers)
            if self.audit_fault is not None:
                rows = faults.apply_fault(self.audit_fault, wire.decode_tensor(resp.rows, ndim=2), rng=self._audit_rng)
                resp.ClearField("rows")
                wire.put_tensor(resp.rows, rows)
            with self._lock:
                self.audit_stats["audits"] += 1
                self.audit_stats["rows"] += resp.replayed_rows
                self.audit_stats["seconds"] += resp.compute_ms / 1000
            return resp
        finally:
            with self._lock:
                dropped = key not in self._audit_keys
            if dropped:   # its session or stage was freed while it ran
                self.audits.release([key])

    def sessions(self) -> set[str]:
        """Sessions this agent holds sequence slots for (serving or auditing)."""
        with self._lock:
            return {k[0] for k in self._assignments} | {k[0] for k in self._audit_keys}

    def release_session(self, session: str) -> int:
        """Free every sequence slot of a session that is over (its StageAssignments are gone) and
        forget its forward counters; returns how many slots. Its fences stay, so a late request with
        its old epochs is still refused."""
        return self._free(lambda k: k[0] == session)

    def _free(self, match, max_epoch: int | None = None) -> int:
        """Free what the (session, stage) keys that `match` hold here: assignments (up to max_epoch;
        each one's epoch fenced), the slots of audit replays, forward counters. Returns the slots."""
        with self._lock:
            gone = [self._assignments.pop(k) for k in [k for k, a in self._assignments.items()
                                                        if match(k) and (max_epoch is None or a.epoch <= max_epoch)]]
            audits = [k for k in self._audit_keys if match(k[:2])]
            self._audit_keys.difference_update(audits)
            for k in [k for k in self._counters if match(k[:2])]:   # an agent lives through many sessions
                del self._counters[k]
            for k in [k for k in self._step_seconds if match(k)]:
                del self._step_seconds[k]
            for a in gone:
                key = (a.session, a.stage_index)
                self._fences[key] = max(self._fences.get(key, 0), a.epoch + 1)
        for a in gone:
            with a.lock:
                self.engines.release(a.engine, a.seq)
        return len(gone) + (self.audits.release(audits) if audits else 0)

    def held(self) -> dict[tuple[str, int], int]:
        """(session, stage) -> epoch of every assignment this agent serves now."""
        with self._lock:
            return {k: a.epoch for k, a in self._assignments.items()}

    def totals(self) -> dict:
        """What the agent has done, for /metrics: per (session, stage) [forward positions, replayed
        positions, forward seconds, replay seconds]; requests, refusals, audits (one consistent read)."""
        with self._lock:
            steps: dict[tuple[str, int], list] = {k: [0, 0, *v] for k, v in self._step_seconds.items()}
            for (session, stage, _), (fwd, rep) in self._counters.items():
                t = steps.setdefault((session, stage), [0, 0, 0.0, 0.0])
                t[0], t[1] = t[0] + fwd, t[1] + rep
            return {"steps": steps, "requests": self.requests, "refused": self.rejected,
                    "audits": dict(self.audit_stats)}

    # -- Health -------------------------------------------------------------------------------

    def Health(self, request, context):
        return self._handle(context, self._health, request)

    def _health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        with self._lock:
            counters = [pb.PositionCount(session=s, stage=st, position=p, forward=c[0], replay=c[1])
                        for (s, st, p), c in sorted(self._counters.items()) if not req.session or s == req.session]
            held = sorted(st for s, st in self._assignments if req.session and s == req.session)
            req, rej = self.requests, self.rejected
        return pb.HealthResponse(node_id=self.identity.node_id, public_key=self.identity.public_key_text,
                                 backend=self.backend, labels={str(k): str(v) for k, v in self.config.labels.items()},
                                 llama_cpp_version=str(self.build.get("llama_cpp_python", "")),
                                 ggml_commit=str(self.build.get("commit", "")), counters=counters,
                                 requests=req, rejected=rej, fault=self.fault.name if self.fault else "",
                                 audit_fault=self.audit_fault.name if self.audit_fault else "", held_stages=held)


class AuditProcess:
    """The agent's audit replays, in a process of their own (in the lowest CPU class: priority.py;
    started by start(), else at the first audit), which keeps each audited stage's sequence between
    audits.

    Apart, the replay's Python does not take turns at the GIL with the forward steps' Python, and a
    replay that brings llama.cpp down takes only this process with it: the audit in flight is
    refused INTERNAL and the next one starts a new process (docs/dataplane.md has the figures). One
    that hangs (or gets no CPU) is killed once it has advanced by nothing for audit_stall_s, with the
    same outcome: otherwise it would hold every audit, handover and release on this node."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self._lock = threading.Lock()
        self._pool: futures.ProcessPoolExecutor | None = None
        self._give_way = None   # the pool's audit_gate event
        self._progress = None   # the pool's audit_gate counter
        self._pid: int | None = None
        self.stalls = 0         # audit processes killed for making no progress

    def start(self) -> None:
        """Start the process now, in the background (node-agent does, so that no session's audit
        waits for it), instead of at the first audit."""
        threading.Thread(target=self._running, name="audit-start", daemon=True).start()

    def _running(self) -> futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._spawn()
            return self._pool

    def _spawn(self) -> futures.ProcessPoolExecutor:
        # spawn, not fork: the agent's gRPC threads and llama.cpp state do not survive a fork. The
        # initializer, from a module that imports next to nothing, puts the process in the lowest
        # CPU class before it imports numpy and llama.cpp (about a second of CPU) for its setup.
        ctx = multiprocessing.get_context("spawn")
        self._give_way, self._progress = ctx.Event(), ctx.RawValue("Q", 0)
        pool = futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=audit_gate.init,
                                           initargs=(self._give_way, self._progress))
        try:
            self._pid = pool.submit(_audit_process_setup, self.config, os.getpid()).result()
        except BrokenProcessPool:
            pass   # the call that needs it says so
        return pool

    def pid(self) -> int | None:
        """The audit process's pid (started now if it was not; None if it could not start)."""
        self._running()
        return self._pid

    def _call(self, method: str, *args):
        pool = self._running()
        try:
            ok, got = self._wait(pool, pool.submit(_in_audit_process, method, *args))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            # INTERNAL, not UNAVAILABLE: the agent is up, and a driver takes UNAVAILABLE as a node gone.
            raise Refused(grpc.StatusCode.INTERNAL, "the agent's audit process exited; its audit "
                                                    "sequences are gone (the next audit starts a new one)") from None
        if not ok:
            code, message = got
            raise Refused(grpc.StatusCode[code], message)
        return got

    def _wait(self, pool: futures.ProcessPoolExecutor, fut: futures.Future):
        """fut's result, or the audit process killed once it has advanced by nothing for audit_stall_s
        (queued behind another session's long audit, this call sees that audit advance)."""
        stall = self.config.audit_stall_s
        seen, since = self._progress.value, time.monotonic()
        while True:
            try:
                return fut.result(timeout=min(1.0, stall))
            except futures.TimeoutError:
                now, value = time.monotonic(), self._progress.value
                if value != seen:
                    seen, since = value, now
                elif now - since >= stall:
                    break
        with self._lock:
            if self._pool is pool:
                self._pool = None
                pid, self._pid = self._pid, None
                self.stalls += 1
            else:
                pid = None   # another call killed it already
        log.warning("the audit process advanced by nothing for %.0f s: killed; the next audit starts a new one",
                    stall)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)   # SIGKILL reaches a stopped process too
            except ProcessLookupError:
                pass
        pool.shutdown(wait=False, cancel_futures=True)
        raise Refused(grpc.StatusCode.INTERNAL, f"the agent's audit process advanced by nothing for {stall:.0f} s "
                                                "and was killed; its audit sequences are gone (the next audit "
                                                "starts a new one)")

    def audit(self, key: tuple, req: pb.AuditRequest, layers: LayerRange, n_layers: int) -> pb.AuditResponse:
        body = self._call("audit", key, req.SerializeToString(), layers.first, layers.last, n_layers)
        return pb.AuditResponse.FromString(body)

    def release(self, keys: list[tuple]) -> int:
        """Free the audit sequences of `keys`; returns how many there were."""
        with self._lock:
            if self._pool is None:
                return 0
        try:
            return self._call("release", keys)
        except Refused:   # the process is gone, and its sequences with it
            return 0

    def threads(self) -> dict[tuple, int]:
        """The llama.cpp threads of each audit sequence, by key."""
        return self._call("threads")

    def handover(self, key: tuple, cuts: list[int]) -> tuple[int, bytes, bytes]:
        """_AuditSequences.handover in the audit process (which must be running already), ahead of
        the audits in flight or queued: they give way (audit_gate)."""
        with self._lock:
            if self._pool is None:
                return 0, b"", b""
            gate = self._give_way
        gate.set()
        try:
            return self._call("handover", key, cuts)
        finally:
            gate.clear()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_AUDIT_PROCESS: "_AuditSequences | None" = None   # in the audit process


def _audit_process_setup(config: AgentConfig, agent_pid: int) -> int:
    """The audit process's first task (its llama.cpp threads inherit its CPU class); its pid."""
    global _AUDIT_PROCESS
    _AUDIT_PROCESS = _AuditSequences(config)
    threading.Thread(target=_exit_with, args=(agent_pid,), name="agent-watch", daemon=True).start()
    return os.getpid()


def _exit_with(agent_pid: int) -> None:
    """End the audit process once the agent is gone: a killed agent cannot shut it down, and it
    would wait for audits that never come."""
    while os.getppid() == agent_pid:
        time.sleep(1.0)   # a liveness check, not a stand-in for work
    os._exit(0)


def _in_audit_process(method: str, *args):
    """(True, result), or (False, (status code name, reason)) for a request refused."""
    try:
        return True, refusing(getattr(_AUDIT_PROCESS, method), *args)
    except Refused as e:
        return False, (e.code.name, str(e))
    finally:
        audit_gate.advance()


# The most one-row batches (decode steps) an audit replay merges into one batch. Per row a merged
# batch costs less (on the default model's stages 0.78 of a one-row step at 4 rows, 0.67 at 8, 0.58
# at 32: most of it by 8), and only sizes Stage.batch_invariant_sizes passed for on the stage are
# used (checked once per stage file in the audit process: 0.1-0.3 s of CPU up to 8 rows here).
AUDIT_MERGE_ROWS = 8


class _AuditSequences:
    """In the audit process: a sequence slot per audited (session, stage, stage file)."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.engines = Engines(config)
        self.slots: dict[tuple, tuple[Stage, int]] = {}
        self.merge_sizes: dict[str, set[int]] = {}   # stage file -> Stage.batch_invariant_sizes
        # What a failover on this node may take over (handover): whether a slot's keys and values are
        # all this process's own replay (not imported from a worker's window states), and on a
        # non-final stage the rows it computed, by position.
        self.own: dict[tuple, bool] = {}
        self.rows: dict[tuple, dict[int, np.ndarray]] = {}

    def audit(self, key: tuple, body: bytes, first: int, last: int, n_layers: int) -> bytes:
        """Replay an AuditRequest (its bytes) on the sequence of `key`; the AuditResponse's bytes."""
        req = pb.AuditRequest.FromString(body)
        layers = LayerRange(first, last)
        if key not in self.slots:
            self.slots[key] = self.engines.acquire(Path(key[2]), layers, n_layers)
        engine, seq = self.slots[key]
        is_first, is_last = layers.first == 0, layers.last == n_layers - 1
        tokens, hidden = request_inputs(is_first, engine.n_embd, list(req.tokens), req.hidden, req.HasField("hidden"))
        n = len(tokens) if tokens is not None else hidden.shape[0]
        sizes = list(req.batch_sizes) or [n]
        if any(s <= 0 for s in sizes) or sum(sizes) != n:
            raise _bad(f"batch sizes {sizes[:8]} do not add up to the {n} rows given")
        start = int(req.start_position)
        if start < 0:
            raise _bad("negative start position")
        want = [int(p) for p in req.positions]
        wanted = set(want)
        if any(p < start or p >= start + n for p in want):
            raise _bad(f"audited positions must lie in [{start}, {start + n})")
        ends = set()
        pos = start
        for s in sizes:
            pos += s
            ends.add(pos - 1)
        if is_last and any(p not in ends for p in want):
            raise _bad("the final stage is audited at the last row of a batch (where logits exist)")
        t0, c0 = time.perf_counter(), time.thread_time()
        got: dict[int, np.ndarray] = {}
        engine.set_threads(seq, self.config.resolved_audit_threads())   # a released slot's context is made anew
        kept = self.rows.setdefault(key, {}) if not is_last else None
        if req.prefix_states:
            self.own[key] = False
            if kept is not None:
                kept.clear()
            try:
                have = engine.import_state(seq, list(req.prefix_states))
            except StageInputError as e:
                raise _bad(f"prefix states: {e}") from None
            if have != start:
                engine.clear(seq)
                raise _bad(f"the prefix states end at position {have}, the replay starts at {start}")
        else:
            nxt = engine.next_position(seq)
            if start > nxt:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"audit sequence continues at {nxt}, not {start}")
            engine.truncate(seq, start)
            self.own[key] = start == 0 or self.own.get(key, False)
            if kept is not None:
                for p in [p for p in kept if p >= start]:
                    del kept[p]
        check_ms = check_wall_ms = 0.0
        if req.exact_shapes:
            plan = [(s, False) for s in sizes]
        else:
            if key[2] not in self.merge_sizes:   # once per stage file, like loading it: timed apart
                t1, c1 = time.perf_counter(), time.thread_time()
                most = min(AUDIT_MERGE_ROWS, engine.config.n_batch)
                self.merge_sizes[key[2]] = set(engine.batch_invariant_sizes(most)) if most > 1 else set()
                check_ms, check_wall_ms = (time.thread_time() - c1) * 1000, (time.perf_counter() - t1) * 1000
            allowed = self.merge_sizes[key[2]]
            plan = merge_decode_steps(sizes, start, wanted if is_last else set(), largest_allowed(allowed))
        pos, i, merged_rows = start, 0, 0
        for s, merged in plan:
            if audit_gate.must_give_way():   # a failover here takes over a sequence: it goes first
                raise Refused(grpc.StatusCode.ABORTED, "the audit gave way to a failover on this node; "
                                                       "it can be sent again")
            # The final stage's logits only where audited: the LM head is most of its replay.
            logits = not is_last or pos + s - 1 in wanted
            if tokens is not None:
                out = engine.forward(seq, pos, tokens=tokens[i:i + s], logits=logits)
            else:
                out = engine.forward(seq, pos, hidden=hidden[i:i + s], logits=logits)
            if not is_last:
                for j in range(s):
                    kept[pos + j] = out[j]
                    if pos + j in wanted:
                        got[pos + j] = out[j]
            elif logits:
                got[pos + s - 1] = out[-1]
            pos, i, merged_rows = pos + s, i + s, merged_rows + (s if merged else 0)
            audit_gate.advance()
        state = engine.export_state(seq, start, start + n) if req.export_state else b""
        rows = np.stack([got[p] for p in want]) if want else np.zeros((1, 1), np.float32)
        resp = pb.AuditResponse(compute_ms=(time.perf_counter() - t0) * 1000 - check_wall_ms,
                                cpu_ms=(time.thread_time() - c0) * 1000 - check_ms, replayed_rows=n, state=state,
                                merged_rows=merged_rows, check_cpu_ms=check_ms)
        wire.put_tensor(resp.rows, rows)
        return resp.SerializeToString()

    def handover(self, key: tuple, cuts: list[int]) -> tuple[int, bytes, bytes]:
        """For a failover onto this node: positions [0, n) of key's sequence, n the largest of `cuts`
        that the sequence holds as this process's own replay: (n, their KV state, on a non-final
        stage their rows as float32 bytes); (0, b"", b"") when it holds none of them."""
        got = self.slots.get(key)
        if got is None or not self.own.get(key):
            return 0, b"", b""
        engine, seq = got
        have = engine.next_position(seq)
        kept = self.rows.get(key)
        if kept is not None:   # a non-final stage: every row too
            have = next((p for p in range(have) if p not in kept), have)
        n = max((c for c in cuts if 0 < c <= have), default=0)
        if n == 0:
            return 0, b"", b""
        rows = np.stack([kept[p] for p in range(n)]).astype(np.float32).tobytes() if kept is not None else b""
        return n, engine.export_state(seq, 0, n), rows

    def release(self, keys: list[tuple]) -> int:
        for k in keys:
            self.own.pop(k, None)
            self.rows.pop(k, None)
        freed = [self.slots.pop(k) for k in keys if k in self.slots]
        for engine, seq in freed:
            self.engines.release(engine, seq)
        return len(freed)

    def threads(self) -> dict[tuple, int]:
        return {k: engine.threads(seq) for k, (engine, seq) in self.slots.items()}


class AgentServer:
    """The agent's gRPC server and the data lane beside it; stop() stops both."""

    def __init__(self, grpc_server: grpc.Server, lane: DataLane | None, service: NodeAgentService):
        self.grpc, self.lane, self.service = grpc_server, lane, service

    def stop(self, grace: float | None):
        if self.lane is not None:
            self.lane.close()
        self.service.audits.close()
        return self.grpc.stop(grace)


def serve(identity: NodeIdentity, listen: str, config: AgentConfig = AgentConfig(), *,
          max_workers: int = 8, tls=None, data_port: int | None = 0) -> tuple[AgentServer, NodeAgentService, int]:
    """Start the agent on `listen` (host:port, port 0 picks one); returns (server, service, port).
    `tls` (consortium.tls.Credentials): mutual TLS, callers must present a certificate from its CA;
    None: plaintext (development only). `data_port`: where the data lane listens on the same host (0:
    any free port, None: no lane; drivers then call Forward)."""
    if tls is not None and not config.allowed_callers:
        from consortium.tls import DRIVER_NAME

        config = dataclasses.replace(config, allowed_callers=(DRIVER_NAME,))
    service = NodeAgentService(identity, config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=wire.CHANNEL_OPTIONS)
    wire.pb_grpc.add_NodeAgentServicer_to_server(service, server)
    port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    data_lane = None
    if data_port is not None:
        data_lane = DataLane(service, listen.rsplit(":", 1)[0], data_port, tls)
        service.data_port = data_lane.port
    server.start()
    return AgentServer(server, data_lane, service), service, port
