"""The session driver: a star over node agents, implementing consortium.generation's Pipeline.

Each token step sends stage 0 the new token ids and every later stage the hidden rows the stage
before returned. The token loop itself stays in consortium.generation.generate; this object adds:

- checks on every response: the commitments match the rows received (the driver holds the output,
  so its canonicalization is the reveal), the window statements verify under the node's key and
  their Merkle roots match those commitments; receipts are assembled from the signed windows and a
  window cut short by a failover or rollback is flushed as a shorter receipt. The checks run in a
  checker thread while the next hops are in flight, and agents commit and sign after answering
  (deferred: a step's commitments come with the stage's next response, the last ones from
  Commitments at the end), so neither side hashes or signs on the token's critical path; with
  sign_per_window they come once per receipt window, one signature per window and stage;
- failover, written once: an RPC error or deadline on a stage bumps its epoch, fences the old node,
  asks the policy for a backup, loads the layers there and replays the stage's inputs (resent by
  the upstream agent, or recomputed through a replacement of it if that agent is gone too) in the
  batch shapes of the original run; the step then continues at the same position;
- audits: about audit_probability of the units (stage, position) are recomputed by another node in
  a background thread (which merges decode steps into larger batches where it checked that gives
  the same bits, unless audit_replay_rows says otherwise); verdicts come from
  consortium.verification.verdicts;
- fraud proofs: each Fraud verdict becomes a signed FraudProof once its worker's window is a receipt
  (consortium.driver.proofs; `proof_key` is the coordinator's key that signs them);
- rollback: on Fraud or quarantine, every stage the node served fails over, all stages truncate to
  the first position it computed since its last passed audit, and generate() resamples from there.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import queue
import threading
import time
from concurrent import futures
from typing import Sequence

import grpc
import numpy as np

from consortium import wire
from consortium.batches import merge_decode_steps
from consortium.driver.client import NodeClient, RpcLog
from consortium.driver.policy import Policy
from consortium.driver.proofs import FraudUnit, ProofBook, SamplingUnit
from consortium.driver.state import SessionState, record_figures
from consortium.layers import LayerRange
from consortium.sampling import SamplingParams, sample
from consortium.verification import canonical, judgement, kvstate, receipts, signing, verdicts
from consortium.verification.canonical import CanonicalGrid
from consortium.wire import pb

log = logging.getLogger("consortium.driver")

# Codes that mean "this node cannot serve the step": fail the stage over. Anything else (a
# malformed request from us) is a bug in the driver and is raised.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}

# A step's deadline is rpc_timeout_s per this many of its rows (the agents' llama.cpp batch,
# StageConfig.n_batch): a decode step gets rpc_timeout_s, a prompt of 2,046 rows 32 times it. With one
# deadline for every step, a long prompt's prefill (over 5 s on one CPU core) failed each honest node
# over in turn until the session was lost.
DEADLINE_ROWS = 64

# Rows per Replay call when a backup rebuilds a stage: a call then stays within a few seconds of
# compute, and its request within a few MB (256 hidden rows of 4096 floats: 4 MB).
REPLAY_ROWS_PER_CALL = 256

# An audit the verifier failed to run (its audit process died: INTERNAL) is tried once more, on
# another verifier where there is one; not more, since an input that crashes replays would crash
# each verifier's audit process in turn.
AUDIT_RETRY_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED}
AUDIT_TRIES = 2
# Where a failed node's rows and its backup's replay of them disagree, this many of the positions in
# dispute are audited on a third node, each side's row: one node's word does not convict the other.
DISPUTE_AUDITS = 4
# While a long call (an audit) waits on a node, a Health call on the session's connection every this
# many seconds: a hung node keeps its socket open and would hold the audit until the load deadline.
PROBE_EVERY_S = 5.0


class DriverError(RuntimeError):
    pass


class RefusedAgent(DriverError):
    """An agent the driver will not use: marked dead, and passed over as a backup."""


class KeyMismatch(RefusedAgent):
    """An agent signs with another key than the one registered for its node."""


class IncompatibleAgent(RefusedAgent):
    """An agent hashes rows another way (another version of the commitment): every row it sent would
    read as Fraud."""


class NodeBusy(Exception):
    """start() found a stage's node with every sequence slot of its layers in use (by sessions that
    have not ended): a later start() loads the stages still missing."""


@functools.lru_cache(maxsize=256)
def _public_key(text: str):
    """A node's key parsed once, not at every signature check; None when it is no key."""
    try:
        return signing.public_key(text)
    except ValueError:
        return None


def replay_batches(sizes: Sequence[int], start: int, max_rows: int, must_end: set[int]) -> list[int]:
    """The batch sizes an audit replays, from the original run's `sizes` starting at `start`.

    Decode steps (one-row batches) are merged into batches of up to `max_rows` rows; larger batches
    (prompts) stay as they were, and a batch ends at every position in `must_end`. max_rows 1 keeps
    the original shapes, which reproduce the worker's rows bit for bit on every backend. A larger
    one makes the replay cheaper (fewer passes over the weights) and stays bit-exact where the
    kernels compute each row alone at those batch sizes: measured on the CPU backend, Q4_1 weights up
    to 32 rows; over repacked Q4_K_M weights the kernels change at 4 rows, and the audits then pass
    within tolerance instead of hash-equal (docs/dataplane.md).
    """
    return [n for n, _ in merge_decode_steps(sizes, start, must_end, lambda run: max_rows)]


@dataclasses.dataclass
class AuditUnit:
    stage: int
    position: int
    node: str
    epoch: int
    commitment: bytes
    worker_row: np.ndarray        # the output the worker sent: its canonicalization is the reveal
    signature_ok: bool
    generation: int               # rollback generation it belongs to
    failed_on: tuple[str, ...] = ()   # verifiers whose audit of it failed (AUDIT_RETRY_CODES, or overdue)
    not_by: tuple[str, ...] = ()      # nodes that may not verify it: the other side of a dispute
    second_opinion_of: str | None = None   # the verifier whose accusing verdict on it this audit checks
    first_verdict: str | None = None       # and that verdict (Mismatch or Fraud)
    settles_dispute: bool = False          # audited as the third node between two (_judge_replayed)


ACCUSING = (verdicts.Verdict.MISMATCH, verdicts.Verdict.FRAUD)   # verdicts that count against a worker


def _severity(v: verdicts.Verdict) -> int:
    """0 for a pass (Passed or PassedWithinTolerance), 1 Mismatch, 2 Fraud."""
    return ACCUSING.index(v) + 1 if v in ACCUSING else 0


@dataclasses.dataclass
class StepRecord:
    position: int
    rows: int
    stage_ms: list[float]
    wall_ms: float
    failover: bool
    agent_ms: list[float] = dataclasses.field(default_factory=list)  # each agent's own time in the step


class SessionDriver:
    def __init__(self, *, session: str, model_path: str, split: Sequence[LayerRange], n_layers: int,
                 endpoints: dict[str, str], state: SessionState, policy: Policy, model_sha256: str = "",
                 grid: CanonicalGrid = CanonicalGrid(), tolerance: verdicts.Tolerance | None = None,
                 rpc_timeout_s: float = 30.0, load_timeout_s: float = 120.0, honest_alpha: float = judgement.DEFAULT_ALPHA,
                 tls=None, registered_keys: dict[str, str] | None = None, defer_commitments: bool = True,
                 sign_per_window: bool = False, receipt_window: int = receipts.DEFAULT_WINDOW,
                 proof_key: signing.Ed25519PrivateKey | None = None, proof_signer: str | None = None,
                 model_url: str = "",
                 audit_replay_rows: int = 0, audit_from_state: bool = False,
                 state_window: int | None = None, warm_backups: bool = True,
                 sample_at_final: bool = True, replay_exact_shapes: bool = False,
                 adopt_audit_replays: bool = True):
        if audit_replay_rows < 0:
            raise ValueError(f"audit_replay_rows must be >= 0, got {audit_replay_rows}")
        if receipt_window < 1:
            raise ValueError(f"receipt_window must be >= 1, got {receipt_window}")
        state_window = receipts.DEFAULT_STATE_WINDOW if state_window is None else state_window
        if state_window < 1:
            raise ValueError(f"state_window must be >= 1, got {state_window}")
        self.warm_backups = warm_backups
        # A failover's replay keeps the original batch shapes even where the backup checked that merged
        # decode steps keep the bits (it checks after loading the stage ahead, warm_backups).
        self.replay_exact_shapes = replay_exact_shapes
        # A failover's backup takes over what its own audits replayed of the stage (_rebuild).
        self.adopt_audit_replays = adopt_audit_replays
        # forward_token(): the final stage's node samples the token and answers it ahead of its logit
        # row, which the driver reads and checks while stage 0 computes the next step.
        self.sample_at_final = sample_at_final
        self.prepared: list[dict] = []   # likely backups that loaded a stage ahead: stage, node, load_ms
        self.session, self.model_path, self.model_sha256 = session, str(model_path), model_sha256
        # The agents' own copy of a model fetched by URL (the session's model.source), pinned by the sha256.
        self.model_url = model_url
        self.split, self.n_layers = list(split), n_layers
        self.n_stages = len(self.split)
        self.state, self.policy, self.grid = state, policy, grid
        self.tolerance = tolerance or verdicts.Tolerance.load()
        # Limits calibrated for this model's stage when there are any (found by the model's sha256).
        self.stage_tolerances = [self.tolerance.for_stage(model_sha256, r) for r in self.split]
        # A node is judged across every stage it served: assume the largest of their honest rates.
        self.honest_rate = max(t.honest_mismatch_rate for t in self.stage_tolerances)
        self.alpha = honest_alpha
        self.rpc = RpcLog()
        self.clients = {n: NodeClient(n, ep, self.rpc, rpc_timeout_s, tls) for n, ep in endpoints.items()}
        self.rpc_timeout_s = rpc_timeout_s
        self.load_timeout_s = load_timeout_s
        # Signatures verify under the key registered for a node (its ComputeNode's), never under the key
        # an agent reports; a node without a registered key is trusted on first use.
        self.registered_keys = dict(registered_keys or {})
        self.public_keys: dict[str, str] = {}
        self.node_ids: dict[str, str] = {}
        self.dead: set[str] = set()
        self._lock = threading.RLock()
        # What the driver received, per stage: inputs it sent (for audits) and commitments by position.
        self._inputs: list[dict[int, object]] = [dict() for _ in self.split]
        self._commits: list[dict[int, tuple[str, int, bytes]]] = [dict() for _ in self.split]
        # The tokens the final stage answered, by the position of the logit row each was sampled from
        # (node, epoch, token), and the parameters sent: its signed windows must sign the same.
        self._answered: dict[int, tuple[str, int, int]] = {}
        self._sampling: SamplingParams | None = None
        self._open: list[dict | None] = [None] * self.n_stages  # open receipt window per stage
        self.defer_commitments = defer_commitments
        self.sign_per_window = defer_commitments and sign_per_window
        self.receipt_window = receipt_window   # positions per signed window, told to every agent
        # 0: the verifiers merge decode steps where they checked it gives the same bits; 1: the
        # original batch shapes; N: merged here, up to N rows (replay_batches), unchecked.
        self.audit_replay_rows = audit_replay_rows
        # Audit a decode window from the KV states of the windows before it, which the node holding the
        # stage signed as they closed, instead of replaying every earlier position (_audits_from_state).
        self.audit_from_state = audit_from_state
        # Positions per state window: the agents export and sign a KV state as each closes.
        self.state_window = state_window
        if audit_from_state:
            # A window is replayed whole from its states: audit every position of 20% of the windows,
            # not 20% of the positions, which would touch almost every window.
            state.audit_window = state_window
        # Units of selected windows not closed yet (no state statement): audited once it closes, or
        # at the end of generation (then without comparing the window's state).
        self._held: dict[tuple[int, int, str], list[AuditUnit]] = {}   # (stage, window start, worker)
        self._finishing = False
        # The state statements, trust and counts live in the SessionState (saved with it); a stage
        # is untrusted once an auditor wrote keys and values beyond tolerance of what its node signed
        # for a window: its audits go back to full replays, which do not take the node's states on trust.
        self.state_audits = state.state_audits
        # Rows received whose commitments are deferred, per stage: position -> (node, epoch, row).
        self._unsigned: list[dict[int, tuple[str, int, np.ndarray]]] = [dict() for _ in self.split]
        # Response checks, in order, off the token's critical path; settled before anything that
        # needs them done (failover, rollback, the end).
        self._checker = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checker")
        self._last_check: futures.Future | None = None
        self.receipts: list[dict] = []
        self.proofs = ProofBook(session, grid, proof_key, proof_signer)
        self.records: dict[str, judgement.NodeRecord] = {}
        self.steps: list[StepRecord] = []
        self._last_ms = [0.0] * self.n_stages
        self._agent_ms = [0.0] * self.n_stages
        # Positions a session can hold on each stage's node (its LoadStage answer; 0: not said).
        self._context = [0] * self.n_stages
        self._started: set[int] = set()   # stages start() has loaded
        self._step_failover = False
        self._generation = 0
        # Per generation a rollback ended: the position it cut the session back to (None: nothing
        # cut). A unit at an earlier position stands; one at or after it was computed again.
        self._cuts: list[int | None] = []
        self._rolling_back: int | None = None   # the position of a rollback under way
        self._pending_fraud: list[tuple[str, str]] = []
        # Accusing verdicts waiting for a second verifier (none alive yet): (stage, verifier, unit,
        # its row, result); decided at the session's end.
        self._unconfirmed: list[tuple[int, str, AuditUnit, np.ndarray, verdicts.AuditResult]] = []
        self._pending_rewind: list[tuple[int, str]] = []   # (position, why): not from a node's audit
        # (stage, epoch) whose node answered a token and then not the row it came from: failed over
        # before its next step, or a node doing that on purpose would have every token re-sampled.
        self._lost_rows: dict[tuple[int, int], str] = {}
        self._audit_q: "queue.Queue[AuditUnit]" = queue.Queue()
        # Units queued and not yet through the audit loop. Counted at the put, under the lock: an
        # empty queue is not enough, the loop may hold units it took a moment ago (it did, and the
        # report went out without them).
        self._audit_outstanding = 0
        self._audit_idle = threading.Condition(self._lock)
        self._audit_progress: dict[tuple[str, int], int] = {}
        # Agent-reported CPU time of the threads that ran the session's forward steps and its audits.
        self.audit_cpu_ms = 0.0
        self.audit_merged_rows = 0        # rows the verifiers replayed in batches they merged
        self.audit_check_cpu_ms = 0.0     # their one-time checks of the sizes they may merge into
        self.forward_cpu_ms = 0.0
        self.audits_selected = 0          # units selected for audit as their commitments arrived
        self.audits_superseded = 0        # selected units a rollback cut before they were judged
        self.second_opinions = 0          # accusing verdicts audited again before they counted
        # Each verifier's own record: a verdict of its that stood counts as Passed, one that another
        # verifier overruled as Mismatch (judged by the binomial test, as workers' Mismatches are; a
        # Fraud overruled by a pass catches its verifier at once).
        self.verifier_records: dict[str, judgement.NodeRecord] = {}
        self._stop = threading.Event()
        self.on_stage = None  # test hook: called before each stage hop with (stage, position)
        self._auditor = threading.Thread(target=self._audit_loop, name="auditor", daemon=True)
        self._audit_serial = threading.Lock()   # one audit call at a time: the loop's, or a dispute's
        self._records_from_state()

    # -- setup ---------------------------------------------------------------------------------

    def _records_from_state(self) -> None:
        """A resumed session's verdicts so far, back in the records its nodes are judged by (a
        restarted operator would otherwise judge a cheater's Mismatches from zero again): each
        recorded audit on its worker and as a verdict that stood for its verifier; a second opinion's
        first verifier as one that stood too, unless overruled, and then as overruled; a failed node's
        rows its backup's replay agreed with (_judge_replayed) on that node."""
        overruled = [(o["stage"], o["position"], o["node"], o["verifier"]) for o in self.state.overruled
                     if o["overruled_by"]]
        overruled_units = set(overruled)
        for f in self.state.failovers:
            counts = (f.get("replay_check") or {}).get("verdicts") or {}
            for v in (verdicts.Verdict.PASSED, verdicts.Verdict.PASSED_WITHIN_TOLERANCE):
                for _ in range(int(counts.get(v.value, 0))):
                    self.records[f["from"]] = (self.records.get(f["from"]) or judgement.NodeRecord(f["from"])).add(v)
        for a in self.state.audits:
            self.records[a["node"]] = (self.records.get(a["node"]) or judgement.NodeRecord(a["node"])).add(a["verdict"])
            self._verifier_record(a["verifier"], verdicts.Verdict.PASSED)
            first = a.get("first_verifier")
            if first and (a["stage"], a["position"], a["node"], first) not in overruled_units:
                self._verifier_record(first, verdicts.Verdict.PASSED)
        for stage, position, node, verifier in overruled:
            self._verifier_record(verifier, verdicts.Verdict.MISMATCH)

    def _ref(self, stage: int, epoch: int | None = None) -> pb.StageRef:
        return pb.StageRef(session=self.session, stage=stage,
                           epoch=self.state.epochs[stage] if epoch is None else epoch)

    def _load(self, node: str, stage: int) -> pb.LoadStageResponse:
        r = self.split[stage]
        resp = self.clients[node].call("LoadStage", pb.LoadStageRequest(
            ref=self._ref(stage), model_path=self.model_path, model_sha256=self.model_sha256, model_url=self.model_url,
            first_layer=r.first, last_layer=r.last, grid=wire.grid_to_pb(self.grid),
            receipt_window=self.receipt_window, window_states=self.audit_from_state,
            state_window=self.state_window), timeout=self.load_timeout_s)
        self.clients[node].use_data_lane(resp.data_port)
        if resp.commit_domain != canonical.ROW_DOMAIN.decode():
            self.dead.add(node)
            raise IncompatibleAgent(f"{node} hashes rows as {resp.commit_domain or 'an older version'}, this driver "
                                    f"as {canonical.ROW_DOMAIN.decode()}: run one Consortium version on every node")
        registered = self.registered_keys.get(node)
        if registered is not None and resp.public_key != registered:
            self.dead.add(node)
            raise KeyMismatch(f"{node} signs with key {resp.public_key[:12]}..., not the key registered for it "
                              f"({registered[:12]}...): refused")
        self.public_keys[node] = registered or resp.public_key
        self.node_ids[node] = resp.node_id   # the id it signs with (state statements name it)
        return resp

    def start(self) -> None:
        """Load every stage on its node, then start auditing; raises NodeBusy for a node with no free
        slot, and a later call loads only the stages still missing."""
        for s, node in enumerate(self.state.nodes):
            if s in self._started:
                continue
            try:
                self.set_context(s, self._load(node, s).n_ctx)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise NodeBusy(f"{node}, stage {s}: {e.details()}") from None
                raise
            self._started.add(s)
        self._auditor.start()
        self.start_warming()

    def fetch_model(self, nodes: list[str], header_bytes: int = 0) -> dict[str, pb.FetchModelResponse | None]:
        """Have each node fetch the session's model from model_url (in the background there); how far
        each has got, None for a node that did not answer. With header_bytes, a node that has the file
        also says the digest of its first header_bytes bytes."""
        out: dict[str, pb.FetchModelResponse | None] = {}
        for node in nodes:
            try:
                out[node] = self.clients[node].call("FetchModel", pb.FetchModelRequest(
                    url=self.model_url, sha256=self.model_sha256, header_bytes=header_bytes), timeout=10.0)
            except grpc.RpcError as e:
                log.info("%s did not say how far it has fetched the model: %s %s", node, e.code().name, e.details())
                out[node] = None
        return out

    def start_warming(self) -> None:
        """With warm_backups, have each stage's likely backup (the policy's `likely_backup`) load the
        stage's layers now, in the background: a failover then finds them in memory and costs only
        the replay. What each did is in `prepared`."""
        likely = getattr(self.policy, "likely_backup", None)
        if self.warm_backups and likely is not None:
            threading.Thread(target=self._warm, args=(likely,), name="warm-backups", daemon=True).start()

    def _warm(self, likely) -> None:
        for s, r in enumerate(self.split):
            if self._stop.is_set():
                return
            node = self.state.nodes[s]
            try:
                backup = likely(s, node, [n for n in self.alive() if n != node])
                if backup is None:
                    continue
                resp = self.clients[backup].call("Prepare", pb.PrepareRequest(
                    model_path=self.model_path, model_sha256=self.model_sha256, model_url=self.model_url,
                    first_layer=r.first,
                    last_layer=r.last), timeout=self.load_timeout_s)
                self.prepared.append({"stage": s, "node": backup, "load_ms": round(resp.load_ms, 3)})
            except grpc.RpcError as e:   # only a failover's load gets slower
                log.info("stage %d: its likely backup did not load it ahead: %s %s", s, e.code().name, e.details())
            except Exception:
                log.exception("stage %d: choosing or readying its likely backup failed", s)

    def alive(self) -> list[str]:
        return [n for n in self.clients if n not in self.dead and n not in self.state.quarantined]

    # -- the Pipeline protocol ------------------------------------------------------------------

    def forward(self, seq: int, position: int, tokens: np.ndarray) -> np.ndarray:
        return self._step(seq, position, tokens, None)

    def forward_token(self, seq: int, position: int, tokens: np.ndarray, sampling: SamplingParams) -> int:
        """The token after `tokens`, sampled at position + len(tokens) as generate() samples it. With
        sample_at_final the final stage's node samples it and the driver checks that the logit row
        it committed samples the same token once that row has come (_check_row): a mismatch is that
        node's fraud, a row that never comes rewinds the session to re-sample the token."""
        if not self.sample_at_final:
            return sample(self._step(seq, position, tokens, None), position + len(tokens), sampling)
        return self._step(seq, position, tokens, sampling)

    def _step(self, seq: int, position: int, tokens: np.ndarray, sampling: SamplingParams | None):
        del seq  # one session per driver; the agents hold it under the session's name
        t0 = time.perf_counter()
        tokens = np.asarray(tokens, dtype=np.int32)
        st = self.state
        P = len(st.prompt_tokens)
        with self._lock:
            self._finishing = False   # generation goes on (after a rewind): windows close again
            st.batches = [b for b in st.batches if b[0] < position] + [[position, len(tokens)]]
            # Generated tokens fed back become part of the sequence (the prompt is already there).
            for i, t in enumerate(tokens):
                p = position + i
                if p >= P:
                    del st.tokens[p - P:]
                    st.tokens.append(int(t))
        self._step_failover = False
        x = tokens
        for s in range(self.n_stages):
            if self.on_stage is not None:
                self.on_stage(s, position)
            ts = time.perf_counter()
            x, check = self._stage_step(s, position, x, sampling if s == self.n_stages - 1 else None)
            self._last_check = self._checker.submit(self._run_check, check)
            self._last_ms[s] = (time.perf_counter() - ts) * 1000
        self.steps.append(StepRecord(position, len(tokens), list(self._last_ms),
                                     (time.perf_counter() - t0) * 1000, self._step_failover, list(self._agent_ms)))
        return x if sampling is not None else x[-1]

    def stage_ms(self) -> list[float]:
        return list(self._last_ms)

    def context_positions(self) -> int | None:
        """The positions the session can hold: the smallest context among the stages' nodes."""
        known = [c for c in self._context if c > 0]
        return min(known) if known else None

    def set_context(self, s: int, n_ctx: int) -> None:
        """The context of stage s's node, as its LoadStage or Truncate answer says (0: not said)."""
        self._context[s] = n_ctx

    def rewind_position(self, wait: bool = False) -> int | None:
        """Called by generate() after each token (wait=False) and at the end (wait=True): the position
        to regenerate from after a rollback, or None."""
        if wait:
            self._settle_checks()
            self._collect_deferred()
            with self._lock:   # windows still open are audited as they stand
                self._finishing = True
                held, self._held = self._held, {}
                for us in held.values():
                    for u in us:
                        self._queue_audit(u)
            self._drain_audits()
            while self._decide_unconfirmed():
                self._drain_audits()
        with self._lock:
            rewinds, self._pending_rewind = self._pending_rewind, []
            at = min(p for p, _ in rewinds) if rewinds else None
            node = why = None
            # A node caught again while its rollback ran (a check in flight) was dealt with by it.
            self._pending_fraud = [f for f in self._pending_fraud if f[0] not in self.state.quarantined]
            if self._pending_fraud:
                node, why = self._pending_fraud[0]
                self._pending_fraud = [f for f in self._pending_fraud if f[0] != node]
        # Outside the lock: a rollback first waits for the checker, whose checks take the lock.
        if node is None:
            return self._rollback(None, "; ".join(w for _, w in rewinds), at) if rewinds else None
        return self._rollback(node, why, at)

    # -- one stage of one step -------------------------------------------------------------------

    def _stage_step(self, s: int, position: int, x: np.ndarray, sampling: SamplingParams | None = None):
        """Stage s's output rows for this step (with `sampling`, on the final stage: the token sampled
        from its last row), and the check of its response (for the checker)."""
        with self._lock:
            for i in range(len(x)):
                self._inputs[s][position + i] = x[i] if s else int(x[i])
            lost = self._lost_rows.pop((s, self.state.epochs[s]), None)
        if lost is not None:
            self._step_failover = True
            self._failover(s, lost)
        req = self._forward_request(s, position, x, self.defer_commitments, self.sign_per_window)
        if sampling is not None:
            req.sample.temperature, req.sample.top_p, req.sample.seed = (sampling.temperature, sampling.top_p,
                                                                         sampling.seed & (2 ** 64 - 1))
        for _ in range(4):
            node, epoch = self.state.nodes[s], self.state.epochs[s]
            req.ref.epoch = epoch
            try:
                resp = self.clients[node].forward(req, self.rpc_timeout_s * -(-len(x) // DEADLINE_ROWS))
            except grpc.RpcError as e:
                if e.code() not in FAILOVER_CODES:
                    raise DriverError(f"stage {s} on {node} refused step {position}: {e.code().name}: {e.details()}")
                self._step_failover = True
                self._failover(s, f"{node}: {e.code().name}: {e.details()}")
                continue
            self._agent_ms[s] = resp.compute_ms
            self.forward_cpu_ms += resp.cpu_ms
            self.state.done[s] = position + len(x)
            if sampling is not None and resp.HasField("token"):
                with self._lock:
                    self._sampling = sampling
                    self._answered[position + len(x) - 1] = (node, epoch, int(resp.token))
            if sampling is not None and resp.row_follows:
                return int(resp.token), functools.partial(self._check_row, s, node, epoch, None, int(resp.token),
                                                          position + len(x), sampling)
            out = wire.decode_tensor(resp.output, ndim=2)
            if sampling is not None:   # the row came with the answer (a Forward call, an older agent)
                token = sample(out[-1], position + len(x), sampling)
                return token, functools.partial(self._check_row, s, node, epoch, resp, token, position + len(x),
                                                sampling)
            return out, functools.partial(self._check_response, s, node, epoch, resp, out)
        raise DriverError(f"stage {s} failed over repeatedly at position {position}")

    def _check_row(self, s: int, node: str, epoch: int, resp: pb.ForwardResponse | None, token: int, at: int,
                   sampling: SamplingParams) -> None:
        """The final stage's response for a token it sampled at `at`, read from its data lane when the
        token came alone (resp None): checked as any response, and its last row must sample that token."""
        if resp is None:
            try:
                resp = self.clients[node].read_row(s)
            except grpc.RpcError as e:
                # The token came without the row it rests on: take it back and sample it again, on
                # another node.
                why = f"stage {s} on {node} answered the token at {at} but not its logit row ({e.code().name}: {e.details()})"
                with self._lock:
                    self._pending_rewind.append((at - 1, why))
                    self._lost_rows[(s, epoch)] = why
                return
        try:
            out = wire.decode_tensor(resp.output, ndim=2)
            if len(out) < 1:
                raise wire.TensorError("no logit row")
        except wire.TensorError as e:
            self._fraud(node, f"stage {s} at {at}: the logit row of its token is unreadable: {e}")
            return
        self._check_response(s, node, epoch, resp, out)
        try:
            mine = sample(out[-1], at, sampling)
        except ValueError as e:
            mine = f"nothing ({e})"
        if mine != token or (resp.HasField("token") and resp.token != token):
            self._fraud(node, f"stage {s} at {at}: answered token {token}, its logit row samples {mine}")
            # Provable once the node's window signs the token (SamplingUnit): with deferral its
            # statement comes later, asked for before the stage fails over (_collect_signed).
            commitment = canonical.commit_rows(out[-1:], self.grid)[0]
            with self._lock:
                self.proofs.add(SamplingUnit(s, at - 1, node, epoch, commitment, np.array(out[-1]), token),
                                self.receipts, self.public_keys, self._input_digests)

    def _check_response(self, s: int, node: str, epoch: int, resp: pb.ForwardResponse, out: np.ndarray) -> None:
        if resp.states:
            self._accept_states(s, node, epoch, resp.states)
        if resp.earlier.commitments:
            self._accept_deferred(s, node, epoch, resp.earlier)
        if resp.commitments:
            self._accept(s, node, epoch, resp.output_position, out, list(resp.commitments), list(resp.windows))
        else:
            with self._lock:
                for i in range(len(out)):
                    self._unsigned[s][resp.output_position + i] = (node, epoch, out[i])

    def _accept_deferred(self, s: int, node: str, epoch: int, d: pb.DeferredCommitments, select: bool = True) -> None:
        """Deferred commitments checked against the rows they commit to, when the driver holds them."""
        first, cs = int(d.position), list(d.commitments)
        with self._lock:
            held = [self._unsigned[s].pop(first + i, None) for i in range(len(cs))]
        rows = None
        if all(h is not None and h[0] == node and h[1] == epoch for h in held):
            # A list, not one stacked array: a window's 16 logit rows stacked would be 3 MB (an
            # allocation beyond malloc's mmap threshold, page faults every window).
            rows = [h[2] for h in held]
        self._accept(s, node, epoch, first, rows, cs, list(d.windows), select=select and rows is not None)

    def _accept_states(self, s: int, node: str, epoch: int, states) -> None:
        """Window state statements, kept when their signature verifies under the node's key."""
        key = _public_key(self.public_keys.get(node, "")) or ""
        for st in states:
            msg = receipts.state_message(self.session, s, self.node_ids.get(node, ""), epoch, st.window_start,
                                         st.count, st.digest)
            if not (key and signing.verify_signature(key, msg, st.signature)):
                self._fraud(node, f"stage {s}: the state statement of window {st.window_start} does not verify")
                continue
            with self._lock:
                self.state.window_states[s][str(int(st.window_start))] = [node, epoch, int(st.count),
                                                                         bytes(st.digest).hex()]
                for held in [k for k in self._held if k[:2] == (s, int(st.window_start))]:
                    for u in self._held.pop(held):
                        self._queue_audit(u)

    @staticmethod
    def _run_check(check) -> None:
        try:
            check()
        except Exception:
            log.exception("checking a response failed")
            raise

    def _settle_checks(self) -> None:
        """Wait until every response received so far is checked."""
        last, self._last_check = self._last_check, None
        if last is not None:
            last.result()

    def _collect_deferred(self, timeout: float | None = None) -> None:
        """The commitments of each stage's last deferred step(s), which no later response carried:
        asked from the first row held unsigned, so an answer lost on the way (a deadline on a slow
        link) is asked for again, once."""
        for s in range(self.n_stages):
            self._collect_stage(s, timeout)

    def _collect_stage(self, s: int, timeout: float | None, tries: int = 2, select: bool = True) -> None:
        """_collect_deferred for stage s's current node."""
        node, epoch = self.state.nodes[s], self.state.epochs[s]
        with self._lock:
            held = {p for p, (n, e, _) in self._unsigned[s].items() if (n, e) == (node, epoch)}
        if not held:
            return
        first = min(held)
        req = pb.CommitmentsRequest(ref=self._ref(s), from_position=first)
        for attempt in range(1, tries + 1):
            try:
                d = self.clients[node].call("Commitments", req, timeout=timeout)
                break
            except grpc.RpcError as e:  # those rows stay out of its receipts
                log.warning("stage %d on %s did not deliver its deferred commitments (try %d): %s", s, node,
                            attempt, e.code().name)
                d = None
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
        if d is None or not d.commitments:
            return
        # Only the run of rows held unsigned: a row after it was accepted already (its window too).
        n = next((i for i in range(len(d.commitments)) if first + i not in held), len(d.commitments))
        windows = [w for w in d.windows if w.window_start < first + n]
        self._accept_deferred(s, node, epoch, pb.DeferredCommitments(
            position=first, commitments=d.commitments[:n], windows=windows), select)

    def _forward_request(self, s: int, position: int, x, defer: bool = False,
                         per_window: bool = False) -> pb.ForwardRequest:
        if s == 0:
            return pb.ForwardRequest(ref=self._ref(s), position=position, tokens=[int(t) for t in x],
                                     defer_commitments=defer, sign_per_window=per_window)
        req = pb.ForwardRequest(ref=self._ref(s), position=position, defer_commitments=defer,
                                sign_per_window=per_window)
        wire.put_tensor(req.hidden, x)
        return req

    def _accept(self, s: int, node: str, epoch: int, first: int, out: np.ndarray | list[np.ndarray] | None,
                commitments: list[bytes], windows: list, select: bool = True) -> None:
        """Check one response's commitments and signed windows (`out`: its rows, as one array or a
        list of rows); record receipts and audit units."""
        if out is not None:
            if isinstance(out, list):
                mine = canonical.commit_arrays([r[None, :] for r in out], self.grid)
            else:
                mine = canonical.commit_rows(out, self.grid)
            if mine != commitments:
                # The worker's own output does not match what it signed: provable on its face.
                self._fraud(node, f"stage {s} at {first}: sent rows do not hash to the signed commitments")
        statements_ok = True
        with self._lock:
            for i, c in enumerate(commitments):
                self._commits[s][first + i] = (node, epoch, c)
            for w in windows:
                sst = wire.window_from_pb(w)
                st = sst.statement
                # The signature is checked once, when the window's last statement becomes a receipt
                # (_flush): each step's statement supersedes the one before it, and checking every
                # one took three Ed25519 verifications (about 0.3 ms of CPU) per token.
                ok = st.session == self.session and st.stage == s and st.epoch == epoch
                held = [self._commits[s].get(p) for p in st.positions]
                lost = [p for p, h in zip(st.positions, held) if h is None or h[:2] != (node, epoch)]
                if ok and lost:
                    # Commitments of this node's that never reached us (a message lost on the way: a
                    # logit row read that timed out): the window cannot be checked, and it is nobody's
                    # proven fault. Computed again from there, those positions are signed again.
                    log.warning("stage %d: %s's window at %d covers positions without its commitments "
                                "here (from %d); computing them again", s, node, st.window_start, lost[0])
                    self._pending_rewind.append((lost[0], f"stage {s}: commitments of {node} from position "
                                                          f"{lost[0]} were lost on the way"))
                    continue
                cs = [h[2] if h is not None else b"" for h in held]
                ok = ok and len(cs) == st.count and receipts.merkle.merkle_root(cs) == st.merkle_root
                if s == self.n_stages - 1 and ok:
                    ok = self._signs_answered_tokens(node, epoch, st)
                statements_ok = statements_ok and ok
                o = self._open[s]
                if o is not None and (o["node"] != node or o["epoch"] != epoch or o["start"] != st.window_start):
                    self._flush(s)
                self._open[s] = {"node": node, "epoch": epoch, "start": st.window_start, "signed": sst,
                                 "commitments": tuple(cs)}
                if (st.window_start + st.count) % self.receipt_window == 0:
                    self._flush(s)
            if not statements_ok:
                self._fraud(node, f"stage {s} at {first}: a window statement, its Merkle root or its signed tokens "
                                  "do not match")
            if select and out is not None:
                for i, c in enumerate(commitments):
                    p = first + i
                    if self.state.selected(s, p):
                        self.audits_selected += 1
                        self._queue_audit(AuditUnit(s, p, node, epoch, c, np.array(out[i]), statements_ok,
                                                    self._generation))

    def _signs_answered_tokens(self, node: str, epoch: int, st: receipts.WindowStatement) -> bool:
        """Whether a final-stage statement signs exactly the tokens this node answered at its
        positions, with the parameters sent. Under the lock."""
        answered = tuple((p, self._answered[p][2]) for p in st.positions
                         if self._answered.get(p, (None, None))[:2] == (node, epoch))
        if st.sampled is None:
            return not answered
        sp, params = st.sampled, self._sampling
        return (sp.tokens == answered and params is not None
                and (sp.temperature, sp.top_p, sp.seed) == (params.temperature, params.top_p,
                                                            params.seed & (2 ** 64 - 1)))

    def _flush(self, s: int) -> None:
        o = self._open[s]
        self._open[s] = None
        if o is None:
            return
        self.record_receipt(s, o["node"], o["epoch"],
                            receipts.Receipt(o["signed"].statement, o["commitments"], o["signed"].signature))
        if not self.receipts[-1]["verified"]:
            self._fraud(o["node"], f"stage {s}: the window at {o['start']} does not verify: "
                                   f"{'; '.join(self.receipts[-1]['reasons'])}")

    def record_receipt(self, s: int, node: str, epoch: int, r: receipts.Receipt) -> None:
        """A window of stage s signed by `node` becomes a receipt entry (verified under the node's
        key) and is offered to the fraud-proof book. Called with self._lock held."""
        ok, why = receipts.verify_receipt(r, self.public_keys.get(node, ""))
        self.receipts.append({"stage": s, "node": node, "epoch": epoch, "start": r.statement.window_start,
                              "count": r.statement.count, "verified": ok, "reasons": why, "bytes": len(r.dumps()),
                              "receipt": r.to_json(),
                              # which version of its rows: a rollback signs positions again
                              "rollbacks": len(self.state.rollbacks)})
        self.proofs.offer(self.receipts[-1], self.public_keys, self._input_digests)

    def restore_proofs(self) -> None:
        """After a resume, once the inputs are resent: the fraud proofs and Fraud units the stopped
        coordinator saved with the session, the units offered every receipt recovered since."""
        with self._lock:
            self.proofs.restore(self.state.proofs)
            for entry in self.receipts:
                self.proofs.offer(entry, self.public_keys, self._input_digests)

    def _input_digests(self, s: int, positions: Sequence[int]) -> list[bytes] | None:
        """What the driver fed stage s at these positions, digested as the agent signs it."""
        xs = [self._inputs[s].get(p) for p in positions]
        if any(x is None for x in xs):
            return None
        return [receipts.token_input_digest(x) if s == 0 else receipts.hidden_input_digest(x) for x in xs]

    # -- failover --------------------------------------------------------------------------------

    def _failover(self, s: int, reason: str, exclude: Sequence[str] = ()) -> str:
        t0 = time.perf_counter()
        self._settle_checks()
        st = self.state
        old = st.nodes[s]
        with self._lock:
            self._flush(s)
            # The old node's last rows will never be signed by it: its replacement replays and signs them.
            # They were used all the same, so they are judged against that replay below.
            unsigned = {p: row for p, (n, _, row) in self._unsigned[s].items() if n == old}
            self._unsigned[s].clear()
            # What the old node committed for a non-final stage: the backup's replay recomputes every
            # one of those rows, an audit of all of them for the price of a comparison (_judge_replayed).
            # The final stage's replay skips the LM head where a commitment is held, so it has none.
            signed = ({p: c for p, (n, e, c) in self._commits[s].items() if (n, e) == (old, st.epochs[s])}
                      if s < self.n_stages - 1 else {})
        st.epochs[s] += 1
        ref = self._ref(s)

        def fence() -> None:  # the old node, if it can still hear us; a dead one is fenced by its death
            try:
                self.clients[old].call("Fence", pb.FenceRequest(ref=ref), timeout=2.0)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.dead.add(old)
        # Without waiting: a hung node would hold the failover for another deadline, and the new
        # epoch already keeps its answers out of the session.
        threading.Thread(target=fence, name=f"fence-{old}", daemon=True).start()
        upto = st.done[s]
        tried = {old, *exclude}
        while True:
            candidates = [n for n in self.alive() if n not in tried]
            backup = self.policy.choose_backup(s, old, candidates)
            tried.add(backup)
            try:
                loaded = self._load(backup, s)
                replayed, merged, adopted = self._rebuild(s, backup, upto)
                break
            except RefusedAgent as e:
                log.warning("backup %s for stage %d: %s", backup, s, e)
                why = str(e)
            except grpc.RpcError as e:
                log.warning("backup %s for stage %d failed: %s", backup, s, e.code().name)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.dead.add(backup)
                why = f"{e.code().name}: {e.details() or ''}"
            with self._lock:
                st.backups_failed.append({"stage": s, "from": old, "to": backup, "epoch": st.epochs[s],
                                          "at_position": upto, "reason": why})
        st.nodes[s] = backup
        self.set_context(s, loaded.n_ctx)
        event = {"stage": s, "from": old, "to": backup, "epoch": st.epochs[s], "at_position": upto,
                 "at_token": max(0, upto - len(st.prompt_tokens) + 1), "replayed_rows": replayed,
                 "merged_rows": merged, "adopted_rows": adopted,
                 "backup_load_ms": round(loaded.load_ms, 3), "backup_had_layers": loaded.found_loaded,
                 "ms": round((time.perf_counter() - t0) * 1000, 3), "reason": reason}
        if unsigned:
            event["unsigned_rows"] = self._judge_unsigned(s, old, backup, unsigned)
        if signed:
            event["replay_check"] = self._judge_replayed(s, old, backup, signed)
        st.failovers.append(event)
        log.info("failover: %s", event)
        return backup

    def _judge_unsigned(self, s: int, old: str, backup: str, rows: dict[int, np.ndarray]) -> dict:
        """Judge the rows `old` sent for stage s that no commitment of its covers (it died first)
        against its backup's replay of them, as audits judge; a row beyond tolerance, or one that
        cannot be judged, rewinds the session to it: tokens after it may rest on wrong values. Nobody
        is accused: `old` signed none of them, and the backup's word alone proves nothing (the backup
        may be the one that lies; its own rows are audited as any node's)."""
        ps = sorted(rows)
        mine = canonical.commit_rows(np.stack([rows[p] for p in ps]), self.grid)
        with self._lock:
            theirs = [self._commits[s].get(p, (None, None, b""))[2] for p in ps]
        differ = [p for p, c, t in zip(ps, mine, theirs) if c != t]
        redone: dict[int, np.ndarray] = {}
        failed = ""
        if differ:   # the backup's rows, one Resend for the range
            try:
                redone = dict(enumerate(self.resent_rows(s, differ[0], differ[-1] + 1, backup), start=differ[0]))
            except grpc.RpcError as e:
                failed = f"unjudged ({e.code().name})"
            except wire.TensorError:
                failed = "unjudged (rows unreadable)"
        verdict_counts: dict[str, int] = {}
        bad = []
        for p, c, t in zip(ps, mine, theirs):
            if c == t:
                verdict = verdicts.Verdict.PASSED.value
            elif failed or p not in redone:
                verdict = failed or "unjudged (not resent)"
            else:
                verdict = verdicts.judge_unit(c, redone[p], grid=self.grid, tolerance=self.stage_tolerances[s],
                                              revealed=canonical.canonical_rows(rows[p][None, :], self.grid)[0]
                                              ).verdict.value
            if verdict not in (verdicts.Verdict.PASSED.value, verdicts.Verdict.PASSED_WITHIN_TOLERANCE.value):
                bad.append(p)   # beyond tolerance, or not judged: tokens after it may rest on it
            verdict_counts[verdict] = verdict_counts.get(verdict, 0) + 1
        if bad:
            with self._lock:
                self._pending_rewind.append((bad[0], f"stage {s}: rows {old} sent and never committed differ "
                                                     f"from {backup}'s replay from position {bad[0]}"))
        return {"rows": len(ps), "verdicts": verdict_counts, "rewind_from": bad[0] if bad else None}

    def _judge_replayed(self, s: int, old: str, backup: str, signed: dict[int, bytes]) -> dict:
        """Judge the rows `old` committed for non-final stage s against its backup's replay of them:
        equal commitments pass; the others (another kernel path, or a cheat no audit drew) are judged
        by value, as audits judge, from the backup's rows (Resend) and the old node's rows (the next
        stage's inputs). Where they disagree (Mismatch or Fraud), either node may be the liar, so
        neither is accused on the other's word: DISPUTE_AUDITS positions spread over the dispute are
        audited on a third node, both nodes' rows, and those verdicts convict (and roll back) as
        any audit's do. Called on the failover's thread, like _judge_unsigned."""
        with self._lock:
            now = {p: self._commits[s].get(p) for p in signed}
            differ = sorted(p for p in signed if now[p] is None or now[p][0] != backup or now[p][2] != signed[p])
            rows = {p: self._inputs[s + 1].get(p) for p in differ}
        counts = {verdicts.Verdict.PASSED.value: len(signed) - len(differ)} if len(signed) > len(differ) else {}
        redone: dict[int, np.ndarray] = {}
        if differ:
            try:
                redone = dict(enumerate(self.resent_rows(s, differ[0], differ[-1] + 1, backup), start=differ[0]))
            except (grpc.RpcError, wire.TensorError) as e:
                log.warning("stage %d: %s's replayed rows not resent (%s); %s's rows unjudged", s, backup, e, old)
        epoch = self.state.epochs[s] - 1   # the old node's
        agreed: list[verdicts.Verdict] = [verdicts.Verdict.PASSED] * (len(signed) - len(differ))
        disputed = []
        for p in differ:
            if rows[p] is None or p not in redone:
                counts["unjudged"] = counts.get("unjudged", 0) + 1
                continue
            try:
                res = verdicts.judge_unit(signed[p], redone[p], grid=self.grid, tolerance=self.stage_tolerances[s],
                                          revealed=canonical.canonical_rows(np.asarray(rows[p])[None, :], self.grid)[0])
            except canonical.NonFiniteActivation:   # the backup's row: nobody is accused
                counts["unjudged"] = counts.get("unjudged", 0) + 1
                continue
            counts[res.verdict.value] = counts.get(res.verdict.value, 0) + 1
            if res.verdict in (verdicts.Verdict.MISMATCH, verdicts.Verdict.FRAUD):
                disputed.append(p)
            else:
                agreed.append(res.verdict)
        with self._lock:
            rec = self.records.get(old) or judgement.NodeRecord(old)
            for v in agreed:
                rec = rec.add(v)
            self.records[old] = rec
            units = []
            # Spread over the dispute, first and last included: a cheat later in it is drawn too.
            k = min(DISPUTE_AUDITS, len(disputed))
            picks = sorted({disputed[round(i * (len(disputed) - 1) / max(1, k - 1))] for i in range(k)})
            for p in picks:
                replayed = self._commits[s].get(p)   # the backup's commitment of its replay
                sides = [(old, epoch, signed[p], np.asarray(rows[p]), backup)]
                if replayed is not None and replayed[0] == backup:
                    sides.append((backup, replayed[1], replayed[2], np.asarray(redone[p]), old))
                units += [AuditUnit(s, p, node, ep, c, row, True, self._generation, not_by=(other,),
                                    settles_dispute=True)
                          for node, ep, c, row, other in sides]
            self.audits_selected += len(units)
        if disputed:
            log.warning("stage %d: %s's rows differ from %s's replay at %d position(s) from %d; %d audit(s) on a "
                        "third node settle it", s, old, backup, len(disputed), disputed[0], len(units))
            self._settle(s, units)
            with self._lock:
                caught = {n for n, _ in self._pending_fraud} | set(self.state.quarantined)
                judged = {a["position"] for a in self.state.audits
                          if (a["stage"], a["node"]) == (s, old) and a["position"] in picks}
                if backup not in caught and (old in caught or judged != set(picks)):
                    # Tokens from there rest on `old`'s rows, convicted or unsettled (no third node to
                    # ask): recomputed from the backup's, which audits go on checking. A convicted
                    # backup is rolled back by its own verdict; rows a third node judged without
                    # convicting (another kernel path's differences: Mismatches count against the
                    # honest rate, as any audit's) stand.
                    self._pending_rewind.append((disputed[0], f"stage {s}: rows {old} committed differ from "
                                                              f"{backup}'s replay from position {disputed[0]}"))
        return {"rows": len(signed), "verdicts": counts, "disputed": len(disputed), "dispute_audits": len(units)}

    def _settle(self, s: int, units: list[AuditUnit]) -> None:
        """Audit a dispute's units now, on the failover's thread: before any rewind drops them (a
        rollback starts a new generation of units), and one audit at a time with the audit thread's
        (both move the verifiers' audit sequences)."""
        by_node: dict[str, list[AuditUnit]] = {}
        for u in units:
            by_node.setdefault(u.node, []).append(u)
        with self._audit_serial:
            for node, us in sorted(by_node.items()):
                try:
                    self._audit_group(s, node, us)
                except Exception as e:  # noqa: BLE001 - the failover goes on; the units are reported
                    log.exception("audit of a dispute at stage %d on %s failed", s, node)
                    self._unjudged(us, f"{type(e).__name__}: {e}")

    def resent_rows(self, s: int, lo: int, hi: int, node: str | None = None) -> np.ndarray:
        """The output rows of stage s at positions [lo, hi) as `node` (default: the stage's node)
        keeps them, by Resend: [hi - lo, width]. grpc.RpcError, or wire.TensorError for bad bytes."""
        chunks = self.clients[node or self.state.nodes[s]].stream("Resend", pb.ResendRequest(
            ref=self._ref(s), from_position=lo, to_position=hi))
        if not chunks:
            raise wire.TensorError(f"no rows resent for positions {lo}..{hi - 1}")
        return np.concatenate([wire.decode_tensor(c.output, ndim=2) for c in chunks])

    def _stage_inputs(self, s: int, lo: int, hi: int):
        """The inputs of stage s at positions [lo, hi): token ids, or hidden rows resent upstream."""
        if s == 0:
            return np.asarray(self.state.sequence()[lo:hi], dtype=np.int32)
        for _ in range(3):
            up = self.state.nodes[s - 1]
            try:
                return self.resent_rows(s - 1, lo, hi, up)
            except grpc.RpcError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                # The upstream agent is gone too: its outputs are recomputed through its replacement.
                self._failover(s - 1, f"{up} could not resend: {e.code().name}")
        raise DriverError(f"no upstream node could resend the inputs of stage {s}")

    def _rebuild(self, s: int, node: str, upto: int) -> tuple[int, int, int]:
        """Replay stage s's inputs [0, upto) on `node` in the original batch shapes (its decode steps
        merged where `node` checked that keeps the bits), many batches per Replay call (one call per
        batch cost about 2 ms per row more). Where `node` has audited the stage by replaying it from
        the start, its first call takes over what that replay holds of the current inputs instead.
        Rows rebuilt; how many in merged batches; how many taken from the audit replay."""
        if upto == 0:
            return 0, 0, 0
        x = self._stage_inputs(s, 0, upto)
        final = s == self.n_stages - 1
        with self._lock:
            # The verifier's audit sequence of the stage, as far as the inputs are still the same
            # (a rollback lowers it); audits from window states import the worker's states instead.
            adopt = min(self._audit_progress.get((node, s), 0), upto) \
                if self.adopt_audit_replays and not self.audit_from_state else 0
        calls: list[tuple[int, list[int]]] = []   # (first position, batch sizes)
        for start, n in self.state.batches:
            if start >= upto:
                break
            n = min(n, upto - start)
            # The final stage commits each batch's last row: only a call's first batch may be longer.
            # The first call reaches as far as the audit replay it may take over.
            fits = bool(calls) and (sum(calls[-1][1]) + n <= REPLAY_ROWS_PER_CALL
                                    or (calls[-1][0] == 0 and start + n <= adopt))
            if fits and not (final and n > 1):
                calls[-1][1].append(n)
            else:
                calls.append((start, [n]))
        commit_from = 0
        if final:   # logits only where no commitment is held: the LM head is about half of that stage
            with self._lock:
                ends = [b + n - 1 for b, n in self.state.batches if b + n - 1 < upto]
                commit_from = next((e for e in ends if e not in self._commits[s]), upto)
        merged = adopted = 0
        for start, sizes in calls:
            n = sum(sizes)
            chunk = x[start:start + n]
            req = self._forward_request(s, start, chunk)
            req.batch_sizes.extend(sizes)
            req.commit_from = commit_from
            req.exact_shapes = self.replay_exact_shapes
            if start == 0:
                req.adopt_upto = adopt
            resp = self.clients[node].call("Replay", req, timeout=self.load_timeout_s)
            merged += resp.merged_rows
            adopted += resp.adopted_rows
            if resp.states:
                self._accept_states(s, node, self.state.epochs[s], resp.states)
            with self._lock:
                for i in range(n):
                    self._inputs[s][start + i] = chunk[i] if s else int(chunk[i])
            if resp.commitments:
                # commit_from is a batch end: the call's first committed row is it or the call's first end
                first = start if not final else max(start + sizes[0] - 1, commit_from)
                self._accept(s, node, self.state.epochs[s], first, None, list(resp.commitments),
                             list(resp.windows), select=False)
        return sum(sum(sizes) for _, sizes in calls), merged, adopted

    # -- audits ----------------------------------------------------------------------------------

    def _still_there(self, node: str):
        """alive() for call_while on `node`: false once it is declared dead, or once a Health call (every
        PROBE_EVERY_S) goes unanswered within the RPC deadline; it is declared dead then. A busy node
        still answers Health (gRPC serves it on its own thread); a stopped one does not."""
        last = [time.monotonic()]

        def alive() -> bool:
            if node in self.dead:
                return False
            if time.monotonic() - last[0] < PROBE_EVERY_S:
                return True
            if not self._answers_health(node, "while an audit waits on it"):
                return False
            last[0] = time.monotonic()
            return True
        return alive

    def _answers_health(self, node: str, when: str) -> bool:
        """A Health call on `node`; one it lets go unanswered within the RPC deadline (or that finds it
        gone) declares it dead."""
        try:
            self.clients[node].call("Health", pb.HealthRequest(session=self.session))
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                log.warning("%s does not answer Health (%s) %s: declared dead", node, e.code().name, when)
                self.dead.add(node)
                return False
        return True

    def _cut_since(self, generation: int, position: int | None = None) -> int | None:
        """The earliest position a rollback since `generation` cut the session back to (only if at or
        before `position`, when given); None if none did. Called with self._lock held."""
        cuts = [c for c in self._cuts[generation:] if c is not None and (position is None or c <= position)]
        return min(cuts) if cuts else None

    def _standing(self, units: list[AuditUnit], s: int | None = None) -> list[AuditUnit]:
        """The units no rollback since their selection cut (and, given stage s, whose inputs are
        recorded); the others are counted superseded: their positions were computed again and
        selected anew. Called with self._lock held."""
        kept = [u for u in units if self._cut_since(u.generation, u.position) is None
                and (s is None or u.position in self._inputs[s])]
        self.audits_superseded += len(units) - len(kept)
        return kept

    def _queue_audit(self, u: AuditUnit) -> None:
        """Called with self._lock held."""
        self._audit_outstanding += 1
        self._audit_q.put(u)

    def _audit_loop(self) -> None:
        # Not at a lower priority, unlike the agents' audit threads: a descheduled thread holding the
        # GIL would hold up the token loop that waits for it.
        while not self._stop.is_set():
            try:
                first = self._audit_q.get(timeout=0.2)
            except queue.Empty:
                continue
            units = [first]
            while True:
                try:
                    units.append(self._audit_q.get_nowait())
                except queue.Empty:
                    break
            try:
                # Grouped by whom they may not go to as well: a second opinion (not by its first
                # verifier) or a retry (not where it failed) must not send fresh units of the same
                # stage and worker away from their verifier.
                groups: dict[tuple, list[AuditUnit]] = {}
                with self._lock:
                    for u in self._standing(units):
                        groups.setdefault((u.stage, u.node, u.not_by, u.failed_on), []).append(u)
                for (s, node, _, _), us in sorted(groups.items()):
                    try:
                        with self._audit_serial:
                            self._audit_group(s, node, sorted(us, key=lambda u: u.position))
                    except Exception as e:  # an audit must never take generation down; nor one group the others
                        log.exception("audit of stage %d on %s failed", s, node)
                        with self._lock:
                            judged = {(a["stage"], a["position"], a["node"]) for a in self.state.audits}
                        self._unjudged([u for u in us if (u.stage, u.position, u.node) not in judged],
                                       f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._audit_outstanding -= len(units)
                    self._audit_idle.notify_all()

    def check_resent(self, s: int, commitments: list[bytes], signed: dict[int, set[bytes]]) -> list[int]:
        """After a resume: the commitments of the rows stage s resent for positions 0.. (the next
        stage's inputs, and what its audits replay) against those its node signed for them at its
        current epoch (`signed`: position -> the commitment of the latest version of that row in a
        receipt, operator.receipts.signed_by_position). A row that matches none is not what the node
        last sent and signed: Fraud, or it could frame the next stage, whose audits would replay it.
        Returns those positions."""
        bad = [p for p, c in enumerate(commitments) if signed.get(p) and c not in signed[p]]
        if bad:
            self._fraud(self.state.nodes[s], f"stage {s}: rows resent after a restart do not hash to the "
                                             f"commitments it signed (positions {bad[0]}..{bad[-1]}, {len(bad)} rows)")
        return bad

    def requeue_audits(self) -> int:
        """After a resume: queue again each unit of the positions computed before it that the seeded
        selection picked and that was neither judged nor reported unjudged (the stopped driver's queue
        went with it). A non-final stage's row is the next stage's input, resent to this driver; a
        final-stage row is resent by that stage's node, which keeps its latest logit rows, with the
        commitment it signed (Reveal). Units whose row cannot be had are reported unjudged. Returns
        how many were queued."""
        st, last = self.state, self.n_stages - 1
        lost, queued, final = [], 0, []
        with self._lock:
            seen = {(a["stage"], a["position"]) for a in st.audits + st.unjudged}
            for s in range(self.n_stages):
                first = 0 if s < last else len(st.prompt_tokens) - 1   # the final stage's first row out
                for p in range(first, st.done[s]):
                    if (s, p) in seen or not st.selected(s, p):
                        continue
                    if s == last:   # fetched below, outside the lock
                        final.append(p)
                        continue
                    held, row = self._commits[s].get(p), self._inputs[s + 1].get(p)
                    if held is None or row is None:
                        lost.append((AuditUnit(s, p, st.nodes[s], st.epochs[s], b"", np.empty(0), True,
                                               self._generation), "its row was not resent"))
                    else:
                        node, epoch, c = held
                        self._queue_audit(AuditUnit(s, p, node, epoch, c, np.asarray(row), True, self._generation))
                        self.audits_selected += 1
                        queued += 1
        node, epoch = st.nodes[last], st.epochs[last]
        for p in final:
            unit = AuditUnit(last, p, node, epoch, b"", np.empty(0), True, self._generation)
            try:
                row = self.resent_rows(last, p, p + 1, node)
                c = bytes(self.clients[node].call("Reveal", pb.RevealRequest(ref=self._ref(last),
                                                                             position=p)).commitment)
            except (grpc.RpcError, KeyError, ValueError) as e:
                why = e.details() if isinstance(e, grpc.RpcError) else str(e)
                lost.append((unit, f"its logit row is no longer kept ({why})"))
                continue
            if canonical.commit_rows(row, self.grid) != [c]:
                lost.append((unit, "the resent logit row does not hash to the commitment its node signed"))
                continue
            with self._lock:
                self._queue_audit(dataclasses.replace(unit, commitment=c, worker_row=row[0]))
                self.audits_selected += 1
            queued += 1
        for unit, why in lost:
            self._unjudged([unit], f"queued when the coordinator stopped; {why}")
        return queued

    @property
    def unjudged(self) -> list[dict]:
        """Selected units no audit judged, each with the reason (see _unjudged)."""
        return self.state.unjudged

    def _unjudged(self, units: list[AuditUnit], reason: str) -> None:
        """Selected units that got no verdict, and why: the report counts them, nothing is lost quietly."""
        with self._lock:
            self.state.unjudged.extend({"stage": u.stage, "position": u.position, "node": u.node, "reason": reason}
                                       for u in units)

    def _audit_group(self, s: int, worker: str, units: list[AuditUnit]) -> None:
        not_by = {n for u in units for n in u.not_by}
        candidates = [n for n in self.alive() if n != worker and n not in not_by]
        failed_on = {v for u in units for v in u.failed_on}
        candidates = [n for n in candidates if n not in failed_on] or candidates   # the same one, once more
        if not candidates:
            self._unjudged(units, "no node left to verify on")
            return
        verifier = self.policy.choose_verifier(s, worker, candidates)
        if self.audit_from_state:
            # Only fresh selections come in whole state windows: a second opinion and a dispute's
            # audits are single positions, which a window audit would hold until the session's end
            # (a cheater a failover's replay check disputed went unconvicted so). They replay in full.
            single = [u for u in units if u.second_opinion_of is not None or u.settles_dispute]
            units = self._audits_from_state(s, verifier, [u for u in units if not any(u is x for x in single)]) + single
        r = self.split[s]
        with self._lock:
            gen = self._generation
            units = self._standing(units, s)
            if not units:
                return  # rolled back meanwhile
            start = self._audit_progress.get((verifier, s), 0)
            want = [u.position for u in units]
            if min(want) < start:
                start = 0  # an earlier position than the verifier's sequence: replay from the start
            batches = [(b, n) for b, n in self.state.batches if b + n > start and b <= max(want)]
            if not batches:
                self._unjudged(units, f"no recorded batch covers positions {start}..{max(want)}")
                return
            end = batches[-1][0] + batches[-1][1]
            if batches[0][0] < start:
                start = batches[0][0]
            sizes = [min(b + n, end) - max(b, start) for b, n in batches]
            last_stage = s == self.n_stages - 1   # logits exist at batch ends only
            sizes = replay_batches(sizes, start, max(1, self.audit_replay_rows), set(want) if last_stage else set())
            try:
                xs = [self._inputs[s][p] for p in range(start, end)]
            except KeyError:
                return  # rolled back meanwhile
        req = pb.AuditRequest(ref=self._ref(s, units[0].epoch), model_path=self.model_path,
                              model_sha256=self.model_sha256, model_url=self.model_url,
                              first_layer=r.first, last_layer=r.last,
                              start_position=start, batch_sizes=sizes, positions=want,
                              exact_shapes=self.audit_replay_rows > 0)
        if s == 0:
            req.tokens.extend(int(t) for t in xs)
        else:
            wire.put_tensor(req.hidden, np.stack(xs))
        try:
            resp = self.clients[verifier].call_while("Audit", req, self._still_there(verifier),
                                                     timeout=self.load_timeout_s)
        except grpc.RpcError as e:
            log.log(logging.INFO if e.code() == grpc.StatusCode.ABORTED else logging.WARNING,
                    "audit on %s failed: %s %s", verifier, e.code().name, e.details())
            # An audit past its deadline on a node that still answers Health ran too long or got stuck
            # there (its agent also kills an audit process stuck that long): the verifier failed it,
            # and the node, which may serve a stage, is not taken for dead.
            overdue = (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and verifier not in self.dead
                       and self._answers_health(verifier, "after an audit ran past its deadline"))
            with self._lock:
                self._audit_progress[(verifier, s)] = 0
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not overdue:
                    self.dead.add(verifier)
                    for u in units:
                        self._queue_audit(u)  # another verifier takes them
                    return
                if e.code() == grpc.StatusCode.ABORTED:   # it gave way to a failover there: not a failed try
                    for u in units:
                        self._queue_audit(u)
                    return
                if e.code() in AUDIT_RETRY_CODES or overdue:
                    for u in units:
                        if len(u.failed_on) + 1 < AUDIT_TRIES:
                            self._queue_audit(dataclasses.replace(u, failed_on=u.failed_on + (verifier,)))
                    units = [u for u in units if len(u.failed_on) + 1 >= AUDIT_TRIES]
                    if not units:
                        return
            self._unjudged(units, f"Audit on {verifier}: {e.code().name}: {e.details()}")
            return
        rows = wire.decode_tensor(resp.rows, ndim=2)
        with self._lock:
            self.audit_cpu_ms += resp.cpu_ms
            self.audit_merged_rows += resp.merged_rows
            self.audit_check_cpu_ms += resp.check_cpu_ms
            cut = self._cut_since(gen)
            if cut is not None:   # rolled back meanwhile: the replay holds old inputs from the cut on
                keep = [i for i, u in enumerate(units) if u.position < cut]
                self.audits_superseded += len(units) - len(keep)
                units, rows, end = [units[i] for i in keep], rows[keep], min(end, cut)
            self._audit_progress[(verifier, s)] = end
            if units:
                self._judge(s, verifier, units, rows)

    def _judge(self, s: int, verifier: str, units: list[AuditUnit], rows) -> None:
        """Verdicts on audited units from the verifier's recomputed rows. Called with self._lock held.

        A verdict that accuses the worker by a distance (Mismatch, or Fraud beyond the decisive
        threshold; not a reveal or signature the worker got wrong on its face) rests on the
        verifier's row, which it does not sign: a lying verifier would have honest workers
        quarantined with such verdicts. So it counts for nothing until a second verifier, a third
        node, audits the unit again: its verdict is the one recorded. Where it is milder, the first
        verdict is overruled: a Fraud overruled by a pass (the first row decisively far from two
        others) catches its verifier at once; other overrulings count in the verifier's own record,
        quarantined by the binomial test as a worker is for Mismatches (honest kernel paths differ
        at the calibrated rate either way). With no third node alive (two nodes left), the verdict
        waits for the session's end (_decide_unconfirmed). A dispute's units need no second
        opinion: their verifier is already the third node between two."""
        for u, row in zip(units, rows):
            revealed = canonical.canonical_rows(u.worker_row[None, :], self.grid)[0]
            res = verdicts.judge_unit(u.commitment, row, grid=self.grid, tolerance=self.stage_tolerances[s],
                                      revealed=revealed, signature_ok=u.signature_ok)
            if (res.verdict in ACCUSING and res.figures is not None and u.second_opinion_of is None
                    and not u.settles_dispute):
                if not self._ask_second_opinion(s, verifier, u, res):
                    self._unconfirmed.append((s, verifier, u, np.array(row), res))
                continue
            if u.second_opinion_of is not None:
                self._second_verdict(s, u, verifier, res.verdict)
            self._record_verdict(s, verifier, u, row, res)

    def _record_verdict(self, s: int, verifier: str, u: AuditUnit, row, res: verdicts.AuditResult) -> None:
        """Called with self._lock held."""
        self._verifier_record(verifier, verdicts.Verdict.PASSED)
        rec = self.records.get(u.node) or judgement.NodeRecord(u.node)
        rec = rec.add(res.verdict)
        self.records[u.node] = rec
        equal = res.verifier_commitment == u.commitment
        self.state.audits.append({
            "stage": s, "position": u.position, "node": u.node, "epoch": u.epoch, "verifier": verifier,
            "verdict": res.verdict.value, "reasons": list(res.reasons),
            # Equal hashes mean equal rows: their figures (every distance 0) would say nothing more.
            "figures": record_figures(res.figures) if res.figures and not equal else None,
            "hash_equal": equal,
            # A second opinion: whose accusation it judged (a resumed driver rebuilds its record).
            **({"first_verifier": u.second_opinion_of} if u.second_opinion_of else {})})
        key = f"{s}/{u.node}"
        if res.verdict in (verdicts.Verdict.PASSED, verdicts.Verdict.PASSED_WITHIN_TOLERANCE):
            self.state.last_passed[key] = max(self.state.last_passed.get(key, -1), u.position)
        if res.verdict == verdicts.Verdict.FRAUD:
            self.proofs.add(FraudUnit(s, u.position, u.node, u.epoch, u.commitment, u.worker_row, row,
                                      self.stage_tolerances[s], verifier),
                            self.receipts, self.public_keys, self._input_digests)
        verdict_node = judgement.judge_node(rec, self.honest_rate, self.alpha)
        if res.verdict == verdicts.Verdict.FRAUD or verdict_node.quarantine:
            self._fraud(u.node, f"stage {s} position {u.position}: {res.verdict.value}; {verdict_node.reason}")

    def _verifier_record(self, verifier: str, verdict: verdicts.Verdict) -> judgement.NodeRecord:
        rec = (self.verifier_records.get(verifier) or judgement.NodeRecord(verifier)).add(verdict)
        self.verifier_records[verifier] = rec
        return rec

    def _second_verdict(self, s: int, u: AuditUnit, by: str, verdict: verdicts.Verdict) -> None:
        """A second verifier's verdict on a unit the first accused: the first verifier's verdict stands,
        or is overruled. Called with self._lock held."""
        first, v1 = verdicts.Verdict(u.first_verdict), u.second_opinion_of
        if _severity(verdict) >= _severity(first):
            self._verifier_record(v1, verdicts.Verdict.PASSED)
            return
        self.state.overruled.append({"stage": s, "position": u.position, "node": u.node, "verifier": v1,
                                     "first_verdict": first.value, "overruled_by": by, "verdict": verdict.value})
        rec = self._verifier_record(v1, verdicts.Verdict.MISMATCH)
        if first == verdicts.Verdict.FRAUD and verdict not in ACCUSING:
            self._fraud(v1, f"its recomputation of stage {s} position {u.position} is decisively far from "
                            f"{u.node}'s committed row, which {by}'s recomputation finds {verdict.value}")
            return
        j = judgement.judge_node(rec, self.honest_rate, self.alpha)
        if j.quarantine:
            self._fraud(v1, f"its audit verdicts were overruled by other verifiers too often: {j.reason}")

    def _ask_second_opinion(self, s: int, verifier: str, u: AuditUnit, res: verdicts.AuditResult,
                            final: bool = False) -> bool:
        """Queue u, which `verifier` accused (`res`), for a second verifier if a third node is alive;
        False if none is. Called with self._lock held."""
        others = [n for n in self.alive() if n not in (u.node, verifier) and n not in u.not_by]
        if not others or self._cut_since(u.generation, u.position) is not None:   # (its inputs may be gone)
            log.warning("stage %d position %d: %s finds %s's row %s (%s); %s: %s",
                        s, u.position, verifier, u.node, res.verdict.value, "; ".join(res.reasons),
                        "no third node alive" if not others else "rolled back since",
                        "taken on its word" if final else "decided when the session ends")
            return False
        log.warning("stage %d position %d: %s finds %s's row %s (%s); asking another verifier",
                    s, u.position, verifier, u.node, res.verdict.value, "; ".join(res.reasons))
        self.second_opinions += 1
        self._queue_audit(dataclasses.replace(u, not_by=u.not_by + (verifier,), failed_on=(),
                                              second_opinion_of=verifier, first_verdict=res.verdict.value))
        return True

    def _decide_unconfirmed(self) -> bool:
        """At the session's end: each accusing verdict still waiting for a second opinion is dropped if its
        verifier was caught lying meanwhile, audited again if a third node is alive now, else taken on
        its verifier's word (two nodes left: the one verdict there is). True if any was queued."""
        with self._lock:
            caught = {n for n, _ in self._pending_fraud} | set(self.state.quarantined)
            waiting, self._unconfirmed = self._unconfirmed, []
            queued = False
            for s, verifier, u, row, res in waiting:
                if verifier in caught:   # its verdict is dropped; the unit stays unjudged
                    self.state.overruled.append({"stage": s, "position": u.position, "node": u.node,
                                                 "verifier": verifier, "first_verdict": res.verdict.value,
                                                 "overruled_by": None, "verdict": None})
                    self.state.unjudged.append({"stage": s, "position": u.position, "node": u.node, "reason":
                                                f"{verifier}'s {res.verdict.value} verdict dropped: it was caught"})
                elif self._ask_second_opinion(s, verifier, u, res, final=True):
                    queued = True
                else:
                    self._record_verdict(s, verifier, u, row, res)
        return queued

    def _audits_from_state(self, s: int, verifier: str, units: list[AuditUnit]) -> list[AuditUnit]:
        """Audit each state window's units from the KV states of the windows before it (signed by the
        node that holds the stage); returns the units to replay from position 0 instead."""
        w = self.state_window
        by_window: dict[int, list[AuditUnit]] = {}
        for u in units:
            by_window.setdefault(u.position // w * w, []).append(u)
        left = []
        for ws, us in sorted(by_window.items()):
            left += us if s in self.state.untrusted_states else self._audit_window_from_state(s, verifier, ws, us)
        with self._lock:
            self.state_audits["fell_back"] += len(left)
        return left

    def _audit_window_from_state(self, s: int, verifier: str, ws: int, units: list[AuditUnit]) -> list[AuditUnit]:
        """Audit the window at `ws` from the states before it, or hold its units until it closes;
        returns the units a full replay must judge instead: a window in the prompt's batch, states
        not all signed by the node holding the stage at its epoch, a node or verifier that fails."""
        w, r = self.state_window, self.split[s]
        with self._lock:
            gen = self._generation
            units = self._standing(units)
            if not units:
                return []   # rolled back meanwhile
            holder, epoch = self.state.nodes[s], self.state.epochs[s]
            window = self._signed_state(s, ws)
            # One replay per window: wait for it to close and for every unit (selection takes whole
            # windows) to arrive, since deferred commitments come a step after their rows.
            # Held per worker (its verifier was chosen against it): a window a failover split between
            # two nodes completes for neither and is audited at the end, as it stands.
            node = units[0].node
            units = self._standing(self._held.pop((s, ws, node), [])) + units
            if (window is None or len({u.position for u in units}) < w) and not self._finishing:
                self._held[(s, ws, node)] = units
                return []
            units.sort(key=lambda u: u.position)
            signed = [self._signed_state(s, k) for k in range(0, ws, w)]
            sizes = [n for b, n in self.state.batches if ws <= b < ws + w]
            n = sum(sizes)
            if (ws == 0 or not any(b == ws for b, _ in self.state.batches) or n > w
                    or any(x is None or x[:3] != (holder, epoch, w) for x in signed)
                    or (window is not None and (window[:3] != (holder, epoch, w) or n != w))
                    or any(p not in self._inputs[s] for p in range(ws, ws + n))):
                return units
            xs = [self._inputs[s][p] for p in range(ws, ws + n)]
        try:
            got = self.clients[holder].call("States", pb.StatesRequest(ref=self._ref(s, epoch), upto=ws),
                                            timeout=self.load_timeout_s)
        except grpc.RpcError as e:
            log.warning("window states of stage %d from %s: %s %s", s, holder, e.code().name, e.details())
            return units
        if [hashlib.sha256(b).digest() for b in got.states] != [x[3] for x in signed]:
            log.warning("stage %d: %s served window states other than it signed; audits replay in full", s, holder)
            with self._lock:
                self._distrust_states(s)
            return units
        req = pb.AuditRequest(ref=self._ref(s, units[0].epoch), model_path=self.model_path,
                              model_sha256=self.model_sha256, model_url=self.model_url,
                              first_layer=r.first, last_layer=r.last,
                              start_position=ws, batch_sizes=sizes, positions=[u.position for u in units],
                              prefix_states=list(got.states), export_state=window is not None,
                              exact_shapes=self.audit_replay_rows > 0)
        if s == 0:
            req.tokens.extend(int(t) for t in xs)
        else:
            wire.put_tensor(req.hidden, np.stack(xs))
        with self._lock:
            # The verifier's audit sequence now holds imported states: its full replays start over.
            self._audit_progress[(verifier, s)] = 0
        try:
            resp = self.clients[verifier].call_while("Audit", req, self._still_there(verifier),
                                                     timeout=self.load_timeout_s)
        except grpc.RpcError as e:
            log.warning("audit from state on %s failed: %s %s", verifier, e.code().name, e.details())
            return units
        # A window still open at the end has no signed state, and nothing after it rests on it.
        differs = window is not None and hashlib.sha256(resp.state).digest() != window[3]
        distance = self._state_distance(s, holder, epoch, ws, window[3], resp.state) if differs else None
        limit = self.stage_tolerances[s].state_limit
        with self._lock:
            self.audit_cpu_ms += resp.cpu_ms
            self.audit_merged_rows += resp.merged_rows
            self.audit_check_cpu_ms += resp.check_cpu_ms
            cut = self._cut_since(gen)
            if cut is not None and cut < ws + n:   # rolled back into the window meanwhile
                self.audits_superseded += len(units)
                return []
            self.state_audits["windows"] += 1
            if differs and (distance is None or limit is None or distance > limit):
                # The verifier wrote other keys and values for this window than the node signed, beyond
                # what kernels differ by (or not comparable by value): what a node lying about its KV
                # looks like. Its states are not taken on trust from here on: full replays judge what
                # they led to.
                self._distrust_states(s)
                self.state_audits["state_differs"] += 1
            elif differs:
                self.state_audits["state_within_tolerance"] += 1
            if distance is not None:
                self.state_audits["worst_relative_l2"] = max(self.state_audits["worst_relative_l2"], distance)
            self._judge(s, verifier, units, wire.decode_tensor(resp.rows, ndim=2))
        return []

    def _signed_state(self, s: int, start: int) -> tuple[str, int, int, bytes] | None:
        """(node, epoch, count, sha256) of the state statement checked for stage s's window at `start`."""
        x = self.state.window_states[s].get(str(start))
        return None if x is None else (x[0], int(x[1]), int(x[2]), bytes.fromhex(x[3]))

    def _distrust_states(self, s: int) -> None:
        if s not in self.state.untrusted_states:
            self.state.untrusted_states.append(s)

    def _state_distance(self, s: int, holder: str, epoch: int, ws: int, digest: bytes, mine: bytes) -> float | None:
        """How far the verifier's keys and values for the window at `ws` lie from the ones the node
        signed (kvstate.relative_l2: the worst layer's), or None where they cannot be compared: the
        node does not serve its state, serves another than it signed, or either is not a state of
        float caches."""
        try:
            got = self.clients[holder].call("States", pb.StatesRequest(ref=self._ref(s, epoch),
                                                                       upto=ws + self.state_window),
                                            timeout=self.load_timeout_s)
        except grpc.RpcError as e:
            log.warning("window state of stage %d at %d from %s: %s %s", s, ws, holder, e.code().name, e.details())
            return None
        theirs = got.states[-1] if got.states else b""
        if hashlib.sha256(theirs).digest() != digest:
            log.warning("stage %d: %s served a window state other than it signed", s, holder)
            return None
        try:
            return kvstate.relative_l2(kvstate.parse(theirs), kvstate.parse(mine))
        except kvstate.StateFormatError as e:
            log.warning("stage %d: window states at %d not comparable by value: %s", s, ws, e)
            return None

    def _drain_audits(self) -> None:
        with self._lock:
            while self._audit_outstanding > 0 and self._auditor.is_alive():
                self._audit_idle.wait(timeout=0.5)

    def _fraud(self, node: str, why: str) -> None:
        with self._lock:
            if node not in self.state.quarantined and all(f[0] != node for f in self._pending_fraud):
                log.warning("node %s caught: %s", node, why)
                self._pending_fraud.append((node, why))

    # -- rollback --------------------------------------------------------------------------------

    def _rollback(self, node: str | None, why: str, at: int | None = None) -> int | None:
        """Quarantine `node` (if any) and roll back to the first position it computed since its last
        passed audit, or to `at` if that is earlier."""
        st = self.state
        self._settle_checks()
        with self._lock:
            first_bad = self._first_unproven(node, at)
            if node is not None:
                st.quarantined.append(node)
            # a prompt is replayed whole, in the same shape
            q = None if first_bad is None else first_bad if first_bad >= len(st.prompt_tokens) else 0
            self._cuts.append(q)
            self._generation += 1
            self._rolling_back = q   # until the stages are truncated and failed over (abandon())
        served = [s for s in range(self.n_stages) if node is not None and st.nodes[s] == node]
        for s in served:
            self._collect_signed(s)
        if q is None:
            for s in served:
                self._failover(s, f"{node} quarantined: {why}")
            return None
        t0 = time.perf_counter()
        with self._lock:
            for s in range(self.n_stages):
                self._flush(s)
                for d in (self._inputs[s], self._commits[s]):
                    for k in [k for k in d if k >= q]:
                        del d[k]
                kept = self.state.window_states[s]
                for k in [k for k, (_, _, n, _) in kept.items() if int(k) + n > q]:
                    del kept[k]
                self._unsigned[s].clear()   # Truncate (or the failover below) drops their commitments
            for k in [k for k in self._answered if k >= q]:
                del self._answered[k]
            # A rewind asked for at or after q is done by this rollback (its position may be past
            # the tokens left).
            self._pending_rewind = [(p, w) for p, w in self._pending_rewind if p < q]
            st.batches = [b for b in st.batches if b[0] < q]
            st.done = [min(d, q) for d in st.done]
            del st.tokens[max(0, q - len(st.prompt_tokens)):]
            for k in list(self._audit_progress):
                self._audit_progress[k] = min(self._audit_progress[k], q)
        for s in range(self.n_stages):
            if s in served:
                continue
            try:
                self.clients[st.nodes[s]].call("Truncate", pb.TruncateRequest(ref=self._ref(s), position=q))
            except grpc.RpcError as e:
                if e.code() not in FAILOVER_CODES:
                    raise
                self._failover(s, f"{st.nodes[s]} could not truncate: {e.code().name}")
        for s in served:
            self._failover(s, f"{node} quarantined: {why}")
        st.rollbacks.append({"node": node, "reason": why, "to_position": q,
                             "to_token": max(0, q - len(st.prompt_tokens)), "stages": served,
                             "ms": round((time.perf_counter() - t0) * 1000, 3)})
        self._rolling_back = None
        return q

    def _collect_signed(self, s: int) -> None:
        """Before a caught node's stage s fails over: the windows it has signed since its last
        response (with deferral a step's statement comes with the next one), when a token of its
        waits for them to be proven."""
        node = self.state.nodes[s]
        with self._lock:
            waiting = any(isinstance(u, SamplingUnit) and u.node == node and u.stage == s for u in self.proofs.pending)
        if waiting and node not in self.dead:
            self._collect_stage(s, timeout=2.0, tries=1, select=False)

    def _first_unproven(self, node: str | None, at: int | None) -> int | None:
        """The first position `node` (if any) computed since its last passed audit, or `at` if that
        is earlier: where a rollback for it regenerates from. Under the lock."""
        first_bad = at
        for s in range(self.n_stages if node is not None else 0):
            since = self.state.last_passed.get(f"{s}/{node}", -1)
            ps = [p for p, (n, _, _) in self._commits[s].items() if n == node and p > since]
            if ps:
                first_bad = min(ps) if first_bad is None else min(first_bad, min(ps))
        return first_bad

    # -- end -------------------------------------------------------------------------------------

    def abandon(self) -> tuple[int | None, str]:
        """For a session that cannot go on (a stage has no node left), once closed: quarantine every
        node caught meanwhile, as a rollback would, and say from which position on the rollbacks and
        rewinds still pending would have computed the session again (None: none) and why. Nothing is
        recomputed, truncated or failed over."""
        with self._lock:
            rewinds, self._pending_rewind = self._pending_rewind, []
            frauds, self._pending_fraud = self._pending_fraud, []
            at = min((p for p, _ in rewinds), default=None)
            if self._rolling_back is not None:   # the session failed while rolling back: its failover found no node
                at = self._rolling_back if at is None else min(at, self._rolling_back)
                rewinds.append((self._rolling_back, f"a rollback to position {self._rolling_back} did not finish"))
            for node, _ in frauds:
                at = self._first_unproven(node, at)
                if node not in self.state.quarantined:
                    self.state.quarantined.append(node)
            why = "; ".join([w for _, w in rewinds] + [f"{n} caught: {w}" for n, w in frauds])
        return at, why

    def counters(self) -> dict[str, list]:
        """Each reachable agent's forward counters for this session: node -> [(stage, position, fwd, replay)]."""
        out = {}
        for n, c in self.clients.items():
            try:
                h = c.call("Health", pb.HealthRequest(session=self.session), timeout=5.0)
            except grpc.RpcError:
                continue
            out[n] = [(x.stage, x.position, x.forward, x.replay) for x in h.counters if x.session == self.session]
        return out

    def close(self, release: bool = False) -> None:
        """Stop the driver's threads after collecting what the agents still owe. `release`: also
        free the session on every agent it used (Release: each stage's sequence slot and its audit
        replays' slots; the stage is fenced, so the session cannot go on), once the session has
        ended. Not by default: an operator that stops mid-session leaves its successor to resume
        from what the agents hold (and an agent also releases a session when its StageAssignments
        go)."""
        try:   # after a normal end there is nothing left; after an error, what can still be had quickly
            self._settle_checks()
            self._collect_deferred(timeout=2.0)
        except Exception:
            log.exception("collecting deferred commitments at close failed")
        self._stop.set()
        self._checker.shutdown(wait=True)
        if self._auditor.is_alive():
            self._auditor.join(timeout=5)
        with self._lock:
            for s in range(self.n_stages):
                self._flush(s)
        if release:
            for node, client in self.clients.items():
                if node in self.dead:
                    continue
                for s in range(self.n_stages):
                    try:
                        client.call("Release", pb.ReleaseRequest(ref=self._ref(s)), timeout=10.0)
                    except grpc.RpcError as e:
                        log.info("releasing stage %d on %s: %s %s", s, node, e.code().name, e.details())
        for c in self.clients.values():
            c.close()
