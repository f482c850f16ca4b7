"""Failover as reconciliation: the Kubernetes side of the driver's policy seam.

The driver (consortium.driver.session) detects a lost stage on the data path, bumps its epoch, fences
the old node, and asks its policy for a backup; this policy answers from the API (approved, Ready,
non-quarantined nodes matching the session's backupSelector, then the stage's own nodeSelector),
writes the decision into the StageAssignment (new node, new epoch) before the backup loads anything,
and sets conditions and Events. Between steps, `NodeWatch.check` fails a stage over when the node
serving it stopped renewing its Lease, and has the driver treat a node the cluster quarantined as
caught.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from consortium import kube
from consortium import resources as r
from consortium.driver.policy import NoCandidate
from consortium_operator import placement

log = logging.getLogger("consortium.operator.failover")

VERIFIER_VIEWS_MAX_AGE_S = 1.0
# How long a verifier choice waits for a fresh reading before choosing from the last good one: an
# API server that hangs answers a LIST only after the client's read timeout (30 s, tried again), and
# the session's last audits, so its end and the release of its agents, waited that long.
VERIFIER_READ_WAIT_S = 1.0


class KubePolicy:
    def __init__(self, session: dict, spec: r.InferenceSessionSpec, agent_namespace: str | None,
                 set_condition: Callable[..., None]):
        self.session, self.spec, self.agent_namespace = session, spec, agent_namespace
        self.set_condition = set_condition
        self.driver = None  # set once the driver exists: the new epoch is read from its state
        self.decisions: list[dict] = []
        self.stage_bytes: list[int] = []   # each stage's share of the weights, when known
        self._warmed: dict[str, int] = {}  # node -> bytes of stages it was asked to load ahead
        self._views: tuple[float, dict[str, placement.NodeView]] = (float("-inf"), {})   # the last good: (taken at, by name)
        self._failed_at = float("-inf")   # when a reading last failed
        self._unwritten: dict[int, tuple[str, int]] = {}   # stage -> (node, epoch) the API was away for
        self._unwritten_lock = threading.Lock()
        self._reader: threading.Thread | None = None   # a reading wait_s gave up on, still under way
        self._reader_lock = threading.Lock()

    def _usable(self, candidates: Sequence[str], max_age_s: float = 0.0,
                wait_s: float | None = None) -> list[placement.NodeView]:
        """The candidates that are usable now, from ComputeNodes and Leases read at most max_age_s ago.
        `wait_s`: where a good reading exists, how long to wait for a new one before choosing from
        it (the read goes on in the background); None: as long as the read takes."""
        views = self._views[1]
        if time.monotonic() - self._failed_at > max_age_s:   # node_views keeps readings young enough
            views = self._read(max_age_s) if wait_s is None or not views else self._read_behind(max_age_s, wait_s)
        return [views[c] for c in candidates if c in views and views[c].why_not() is None]

    def _read(self, max_age_s: float) -> dict[str, placement.NodeView]:
        at, views = self._views
        try:
            views = {n.name: n for n in placement.node_views(self.agent_namespace, max_age_s)}
            self._views = time.monotonic(), views
        except Exception as e:  # noqa: BLE001 - sorted below
            # Not read again within max_age_s either: the auditor asked once per group of units,
            # several times a second while the API was away, each ask a LIST tried four times.
            self._failed_at = time.monotonic()
            if not views or not kube.transient(e):
                raise
            # The API away (a control plane restarting): the last reading, however old, rather
            # than no choice at all; the data path still finds out a node that died since.
            log.warning("ComputeNodes not readable (%s): choosing from a reading %.0f s old", kube.reason(e),
                        time.monotonic() - at)
        return views

    def _read_behind(self, max_age_s: float, wait_s: float) -> dict[str, placement.NodeView]:
        """_read on a thread of its own (one at a time), waited for at most wait_s; then the last good
        reading, whichever it is."""
        def read() -> None:
            try:
                self._read(max_age_s)
            except Exception as e:  # noqa: BLE001 - the next choice reads again
                log.warning("ComputeNodes not read: %s", kube.reason(e))
        with self._reader_lock:
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(target=read, name="node-views", daemon=True)
                self._reader.start()
            reader = self._reader
        reader.join(wait_s)
        return self._views[1]

    def choose_backup(self, stage: int, failed: str, candidates: Sequence[str]) -> str:
        epoch = self.driver.state.epochs[stage] if self.driver else 0
        kube.event(self.session, "FailoverStarted", f"stage {stage} lost {failed}; fenced below epoch {epoch}",
                   type_="Warning")
        try:
            self.set_condition("StageFailover", True, "StageLost", f"stage {stage} lost {failed} (epoch {epoch})",
                               phase="Failover")
        except Exception as e:  # noqa: BLE001 - sorted below
            if not kube.transient(e):
                raise
            log.warning("stage %d: StageFailover condition not written (%s)", stage, kube.reason(e))
        pool, by_backup = self._backup_pool(stage, candidates)
        if not pool:
            msg = (f"no backup for stage {stage}: none of {list(candidates)} is usable and matches the backup "
                   f"selector or the stage's selector")
            kube.event(self.session, "FailoverFailed", msg, type_="Warning")
            raise NoCandidate(msg)
        chosen = pool[0].name
        with self._unwritten_lock:   # a write of the writer's thread in flight finishes first
            self._unwritten[stage] = (chosen, epoch)
        try:
            self.write_pending()
        except Exception as e:  # noqa: BLE001 - sorted below
            if not kube.transient(e):
                with self._unwritten_lock:
                    self._unwritten.pop(stage, None)   # the failover fails with it
                raise
            # The backup takes over all the same (the driver fences and loads it by RPC); the
            # StageAssignment, which agents fence by and a resumed operator reads, follows once the
            # API answers (write_pending, at each progress write).
            log.warning("stage %d: StageAssignment to %s at epoch %d not written yet (%s)", stage, chosen, epoch,
                        kube.reason(e))
        self._assignment_condition(stage, "Ready", False, "Failover",
                                   f"{failed} lost; {chosen} takes over at epoch {epoch}")
        kube.event(self.session, "StageReassigned",
                   f"stage {stage}: {failed} -> {chosen} at epoch {epoch} "
                   f"({'backupSelector' if by_backup else 'stage nodeSelector'})")
        self.decisions.append({"stage": stage, "from": failed, "to": chosen, "epoch": epoch})
        return chosen

    def write_pending(self) -> None:
        """Write the StageAssignments failovers decided and could not write yet, the earliest stage
        first; raises the first failure (the rest wait for the next call)."""
        # Called from the progress writer's thread too, while the token loop may fail a stage over:
        # one writer at a time, so that an older decision is never written over a newer one.
        with self._unwritten_lock:
            for stage, (node, epoch) in sorted(self._unwritten.items()):
                placement.write_assignment(self.session, stage, self.spec.stages[stage], node, epoch,
                                           self.spec.model.to_k8s())
                del self._unwritten[stage]

    def _backup_pool(self, stage: int, candidates: Sequence[str]) -> tuple[list[placement.NodeView], bool]:
        """The usable candidates a backup of `stage` is chosen from, best first, and whether the
        backup selector (rather than the stage's own selector) gave them."""
        usable = self._usable(candidates)
        by_backup = [n for n in usable if placement.matches(self.spec.failover.backup_selector, n.labels)]
        by_stage = [n for n in usable if placement.matches(self.spec.stages[stage].node_selector, n.labels)]
        return by_backup or by_stage, bool(by_backup)

    def likely_backup(self, stage: int, serving: str, candidates: Sequence[str]) -> str | None:
        """The node choose_backup would pick now, without its events and StageAssignment; None when
        its declared memory (ComputeNode memoryBytes) cannot also hold this stage beside the stages
        it serves and those it loads ahead already: layers held ahead stay for the whole session."""
        pool, _ = self._backup_pool(stage, [c for c in candidates if c != serving])
        if not pool:
            return None
        node = pool[0]
        if node.memory_bytes and self.stage_bytes and self.driver is not None:
            serving_bytes = sum(b for b, n in zip(self.stage_bytes, self.driver.state.nodes) if n == node.name)
            held = serving_bytes + self._warmed.get(node.name, 0) + self.stage_bytes[stage]
            if held > node.memory_bytes:
                log.info("stage %d: %s would hold %d MiB with it loaded ahead, over its %d MiB: not loaded ahead",
                         stage, node.name, held >> 20, node.memory_bytes >> 20)
                return None
        if self.stage_bytes:
            self._warmed[node.name] = self._warmed.get(node.name, 0) + self.stage_bytes[stage]
        return node.name

    def choose_verifier(self, stage: int, worker: str, candidates: Sequence[str]) -> str:
        sel = self.spec.audit.verifier_selector
        names = [c for c in candidates if c != worker]
        try:
            # Read again at most once a second: the auditor chose a verifier for each group of units
            # it took, two LIST calls each (about 13 a second in a 1,000-token session). A verifier
            # that died since is found out by its audit, which is then tried on another node.
            usable = self._usable(names, VERIFIER_VIEWS_MAX_AGE_S, VERIFIER_READ_WAIT_S)
        except Exception:  # noqa: BLE001 - the API away for a moment must not stop an audit
            usable = []
        preferred = [n.name for n in usable if placement.matches(sel, n.labels)]
        pool = preferred or [n.name for n in usable] or names
        if not pool:
            raise NoCandidate(f"no verifier for stage {stage} other than {worker}")
        return pool[0]

    def _assignment_condition(self, stage: int, type_: str, status: bool, reason: str, message: str) -> None:
        md = self.session["metadata"]
        ns, name = md["namespace"], r.StageAssignment.name_for(md["name"], stage)
        api = kube.api()
        try:
            kube.update_status(
                lambda: api.get_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", name),
                lambda b: api.patch_namespaced_custom_object_status(r.GROUP, r.VERSION, ns, "stageassignments",
                                                                    name, b),
                lambda st: {**st, "conditions": kube.with_condition(st.get("conditions"), type_, status, reason,
                                                                     message)})
        except Exception as e:  # noqa: BLE001
            log.warning("condition %s on %s not written: %s", type_, name, e)

    def finished(self, f: dict) -> None:
        """A failover the driver completed: conditions, then its Event (the conditions' write may
        fail while the API is away, and is made again; the Event, posted last, is posted once)."""
        how = [f"{f['adopted_rows']} taken from its audit replay"] if f.get("adopted_rows") else []
        how += [f"{f['merged_rows']} in merged batches"] if f.get("merged_rows") else []
        merged = f" ({', '.join(how)})" if how else ""
        msg = (f"stage {f['stage']}: {f['from']} -> {f['to']} at epoch {f['epoch']}, position {f['at_position']}, "
               f"{f['replayed_rows']} rows replayed{merged} in {f['ms']:.0f} ms ({f['reason']})")
        self._assignment_condition(f["stage"], "Ready", True, "FailedOver", msg)
        self.set_condition("StageFailover", False, "FailoverCompleted", msg, phase="Running")
        kube.event(self.session, "FailoverFinished", msg)


class NodeWatch:
    """Fails a stage over when the node serving it stopped renewing its Lease, and treats a node the
    cluster quarantined (its ComputeNode's Quarantined condition, from another session's verdicts) as
    caught in this session too: the driver rolls back to the first position it computed since its
    last passed audit here and fails its stages over. Before, a session went on with a node known to
    cheat unless its own audits caught it (none, at audit probability 0).

    The Leases and ComputeNodes are read every `every_s` on a thread of its own (`start`), and the
    token loop takes each reading between two steps (`check`): read in the token loop, an API server
    that hung held up generation for as long as it hung."""

    def __init__(self, namespace: str | None, every_s: float = 1.0):
        self.namespace, self.every_s = namespace, every_s
        self._reading: tuple[list[str], dict[str, str]] | None = None   # (expired, quarantined), not yet taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, driver) -> None:
        self._thread = threading.Thread(target=self._watch, args=(driver,), name="node-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _watch(self, driver) -> None:
        while True:
            try:
                # Copies made at once of what the token loop changes meanwhile; readings shared with
                # the operator's other sessions when young enough (placement.computenodes, .leases).
                self._reading = (self._expired(sorted(set(driver.state.nodes)), self.every_s / 2),
                                 self._quarantined(list(driver.clients), self.every_s / 2))
            except Exception:  # noqa: BLE001 - a watch that stops would leave the session blind
                log.exception("node watch: reading failed")
            if self._stop.wait(self.every_s):
                return

    def check(self, driver) -> None:
        """Between two steps, in the token loop: acts on the latest reading, once."""
        reading, self._reading = self._reading, None
        if reading is None:
            return
        expired, quarantined = reading
        for node in expired:
            if node in driver.state.nodes:   # still serving: not failed over since the reading
                driver.dead.add(node)
                for s, n in enumerate(list(driver.state.nodes)):
                    if n == node:
                        driver._failover(s, f"Lease of {node} expired")
        for node, why in quarantined.items():
            driver._fraud(node, f"quarantined in the cluster: {why}")

    def check_quarantine(self, driver) -> None:
        """The quarantine half of a reading, read now: the last look before a session completes (a
        Lease expiring once every token is out needs no failover)."""
        for node, why in self._quarantined(list(driver.clients)).items():
            driver._fraud(node, f"quarantined in the cluster: {why}")

    def _expired(self, nodes: Sequence[str], max_age_s: float = 0.0) -> list[str]:
        if not self.namespace:
            return []
        try:
            leases = placement.leases(self.namespace, max_age_s)
        except Exception as e:  # noqa: BLE001 - no verdict without data: the data path still catches failures
            log.warning("leases not readable: %s", kube.reason(e))
            return []
        return [n for n in nodes if (lease := leases.get(kube.lease_name(n))) is not None and kube.LEASES.expired(lease)]

    def _quarantined(self, nodes: Sequence[str], max_age_s: float = 0.0) -> dict[str, str]:
        """node -> the message of its Quarantined condition, for those of `nodes` that have it."""
        try:
            items = placement.computenodes(max_age_s)
        except Exception as e:  # noqa: BLE001 - as above
            log.warning("ComputeNodes not readable: %s", kube.reason(e))
            return {}
        out = {}
        for cn in items:
            name = cn["metadata"]["name"]
            if name in nodes and kube.condition_true(cn, "Quarantined"):
                cond = kube.condition((cn.get("status") or {}).get("conditions"), "Quarantined")
                out[name] = cond.get("message") or cond.get("reason") or "Quarantined"
        return out
