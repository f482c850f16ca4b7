"""Audit verdicts into the API: Receipt status, node audit records, and quarantine.

The driver selects units (stage, position) by (seed, stage, position), recomputes them on a verifier
other than the worker and judges them (consortium.verification.verdicts); this module puts each
verdict on the Receipt whose window holds the unit, keeps each ComputeNode's audit record, and marks
a node Quarantined when the driver quarantined it (one Fraud, or a Mismatch count failing the
binomial test). The driver rolls the node's work back; placement skips a Quarantined node from then
on. A receipt none of whose units was selected keeps verdict Pending, with a message saying so; one
with selected units no audit could judge (the driver's `unjudged`) says how many and why.
"""
from __future__ import annotations

import collections
import logging
import math
import time

from consortium import kube
from consortium import resources as r

log = logging.getLogger("consortium.operator.audits")

SEVERITY = {"Passed": 0, "PassedWithinTolerance": 1, "Mismatch": 2, "Fraud": 3}
# A node's record in one session, in the order _records gives it and ComputeNode.sessionRecords keeps it.
RECORD_FIELDS = ("audits", "mismatches", "frauds", "verdicts", "overruled")
# A node's record is written at most this often while the session runs (at its end, and a quarantine,
# at once): a read and a write per node with every progress write were most of what publishing cost.
RECORD_INTERVAL_S = 5.0


def receipt_status(audits: list[dict], unjudged: list[dict] = ()) -> dict:
    """A Receipt's status from the verdicts on its window's units, and the selected units of the
    window that no audit could judge (each with the driver's reason)."""
    missed = ""
    if unjudged:
        reasons = sorted({u["reason"] for u in unjudged})
        missed = f"{len(unjudged)} selected unit(s) not judged: {'; '.join(reasons)}"
    if not audits:
        return {"verdict": "Pending",
                "message": (missed or "no unit of this window was selected for audit (yet)")[:4000]}
    worst = max(audits, key=lambda a: SEVERITY[a["verdict"]])
    message = f"{len(audits)} unit(s) audited; {'; '.join(worst.get('reasons') or [])}"
    return {"verdict": worst["verdict"], "verifier": worst["verifier"],
            "audits": [{"position": a["position"], "verdict": a["verdict"],
                        "figures": {k: float(v) for k, v in (a.get("figures") or {}).items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}}
                       for a in sorted(audits, key=lambda a: a["position"])][:r.MAX_AUDITS],
            "message": (message + (f"; {missed}" if missed else ""))[:4000]}


def _windows(audits: list[dict], unjudged: list[dict], index: dict[str, dict], final: bool):
    """Per Receipt: (name, what its status is computed from, its window's audits, its unjudged units).
    Units are looked up by stage, node and position: matching every unit against every window made a
    long session's publishing quadratic (at 2,400 tokens, with the state's copy, it took nine tenths
    of the token loop)."""
    audits_at, missed_at = collections.defaultdict(list), collections.defaultdict(list)
    for i, a in enumerate(audits):
        audits_at[(a["stage"], a["node"], a["position"])].append((i, a))
    for u in unjudged:
        missed_at[(u["stage"], u["node"], u["position"])].append(u)
    for name, w in index.items():
        units = [(w["stage"], w["node"], p) for p in range(w["start"], w["start"] + w["count"])]
        mine = [a for _, a in sorted(x for k in units for x in audits_at.get(k, ()) if x[1]["epoch"] == w["epoch"])]
        missed = [u for k in units for u in missed_at.get(k, ())]
        yield name, (len(mine), len(missed), final), mine, missed


def _shows(status: dict, want: dict) -> bool:
    """Whether a Receipt's status (as the API returned it) says what `want` (receipt_status) says."""
    return all(status.get(k) == v for k, v in want.items())


def _records(driver) -> dict[str, tuple]:
    """Each node's record in this session, as a worker (audits, mismatches, frauds), then as a verifier
    (verdicts, overruled). Called with the driver's lock held."""
    workers = {n: (rec.audits, rec.mismatches, rec.frauds) for n, rec in driver.records.items()
               if hasattr(rec, "audits")}
    verifiers = {n: (rec.audits, rec.mismatches) for n, rec in driver.verifier_records.items()}
    return {n: workers.get(n, (0, 0, 0)) + verifiers.get(n, (0, 0)) for n in {*workers, *verifiers}}


class AuditPublisher:
    def __init__(self, session: dict):
        self.session = session
        self._applied: dict[str, tuple] = {}
        self._shown: dict[str, str] = {}   # receipt name -> the verdict its status shows
        self._quarantined: set[str] = set()
        self._records: dict[str, tuple] = {}   # node -> this session's record as last written to it
        self._records_at: dict[str, float] = {}   # node -> when it was written (time.monotonic)
        self._overruled = 0   # overruled verdicts announced so far

    def resumed(self, driver, receipts_index: dict[str, dict], shown: dict[str, dict] | None = None) -> None:
        """After an operator restart, before anything is published, from what the API shows: a
        Receipt whose status already says what the saved state gives is not written again, nor its
        AuditFailed announced again (one the old operator saved but did not write is); a quarantine
        is taken as written only where the ComputeNode shows it. A node's records need nothing here:
        each ComputeNode keeps this session's share of them (`sessionRecords`), and only what that
        lacks is added. Overruled verdicts the saved state holds are taken as announced."""
        with driver._lock:
            audits, unjudged = list(driver.state.audits), list(driver.state.unjudged)
            quarantined = set(driver.state.quarantined)
            self._overruled = len(driver.state.overruled)
        shown = shown or {}
        self._shown = {name: st["verdict"] for name, st in shown.items() if st.get("verdict")}
        self._applied = {name: key for name, key, mine, missed in _windows(audits, unjudged, receipts_index, False)
                         if _shows(shown.get(name) or {}, receipt_status(mine, missed))}
        try:
            nodes = kube.api().list_cluster_custom_object(r.GROUP, r.VERSION, "computenodes").get("items", [])
        except Exception as e:  # noqa: BLE001 - then each quarantine is written (and announced) again
            log.warning("computenodes not read on resuming: %s", e)
            return
        self._quarantined = {n["metadata"]["name"] for n in nodes if n["metadata"]["name"] in quarantined
                             and kube.condition_true(n, "Quarantined")}

    def publish(self, driver, receipts_index: dict[str, dict], *, final: bool = False) -> None:
        with driver._lock:
            audits = list(driver.state.audits)
            unjudged = list(driver.state.unjudged)
            quarantined = list(driver.state.quarantined)
            overruled = list(driver.state.overruled[self._overruled:])
            records = _records(driver)
        self._receipts(audits, unjudged, receipts_index, final)
        self._nodes(quarantined, records, driver, final)
        # Accusations another verifier did not bear out: one Event per verifier and publish, not per unit.
        for verifier in sorted({o["verifier"] for o in overruled}):
            mine = [o for o in overruled if o["verifier"] == verifier]
            parts = [f"{sum(1 for o in mine if o['overruled_by'] == by)} overruled by {by}"
                     for by in sorted({o["overruled_by"] for o in mine if o["overruled_by"]})]
            dropped = sum(1 for o in mine if not o["overruled_by"])
            parts += [f"{dropped} dropped once it was caught"] if dropped else []
            o = mine[0]
            kube.event(self.session, "VerdictOverruled",
                       f"{verifier}'s accusing verdicts: {', '.join(parts)} (first: {o['first_verdict']} on {o['node']} "
                       f"stage {o['stage']} position {o['position']})", type_="Warning")
        self._overruled += len(overruled)

    def _receipts(self, audits: list[dict], unjudged: list[dict], index: dict[str, dict], final: bool) -> None:
        md = self.session["metadata"]
        for name, key, mine, missed in _windows(audits, unjudged, index, final):
            if self._applied.get(name) == key:
                continue
            status = receipt_status(mine, missed)
            if not mine and not missed and final:
                status["message"] = "no unit of this window was selected for audit"
            try:
                kube.api().patch_namespaced_custom_object_status(r.GROUP, r.VERSION, md["namespace"], "receipts",
                                                                 name, {"status": status})
                self._applied[name] = key
            except Exception as e:  # noqa: BLE001 - retried on the next publish
                log.warning("verdict on receipt %s not written: %s %s", name, e, getattr(e, "body", "")[:600])
            # Announced when a receipt's verdict turns accusing (or worse), not at every rewrite.
            if mine and status["verdict"] in ("Mismatch", "Fraud") and self._shown.get(name) != status["verdict"]:
                kube.event(self.session, "AuditFailed", f"receipt {name}: {status['verdict']}", type_="Warning")
                if self._applied.get(name) == key:
                    self._shown[name] = status["verdict"]

    def _nodes(self, quarantined: list[str], records: dict[str, tuple], driver, final: bool = False) -> None:
        api = kube.api()
        md = self.session["metadata"]
        uid = md.get("uid", "")
        # A node quarantined as a verifier (its verdicts overruled) may have no record as a worker.
        for node, rec in {**{n: (0,) * 5 for n in quarantined}, **records}.items():
            q = node in quarantined and node not in self._quarantined
            recent = time.monotonic() - self._records_at.get(node, -math.inf) < RECORD_INTERVAL_S
            if not q and (self._records.get(node) == rec or recent and not final):
                continue

            def change(status: dict, rec=rec, node=node, q=q) -> dict:
                # The records span sessions: add what this session's driver saw beyond its share as
                # the node shows it (or, if the node no longer keeps it, as this operator last wrote it).
                shares = list(status.get("sessionRecords") or [])
                mine = next((x for x in shares if x.get("uid") == uid), None)
                prev = (tuple(int(mine.get(k, 0)) for k in RECORD_FIELDS) if mine is not None
                        else self._records.get(node, (0,) * 5))
                shares = [x for x in shares if x.get("uid") != uid] + [
                    {"session": r.session_id(md["namespace"], md["name"]), "uid": uid, **dict(zip(RECORD_FIELDS, rec))}]
                status["sessionRecords"] = shares[-r.MAX_SESSION_RECORDS:]
                old = status.get("auditRecord") or {}
                status["auditRecord"] = {"audits": int(old.get("audits", 0)) + rec[0] - prev[0],
                                         "mismatches": int(old.get("mismatches", 0)) + rec[1] - prev[1],
                                         "frauds": int(old.get("frauds", 0)) + rec[2] - prev[2]}
                if rec[3] or status.get("verifierRecord"):
                    old = status.get("verifierRecord") or {}
                    status["verifierRecord"] = {"verdicts": int(old.get("verdicts", 0)) + rec[3] - prev[3],
                                                "overruled": int(old.get("overruled", 0)) + rec[4] - prev[4]}
                if q:
                    why = next((rb["reason"] for rb in driver.state.rollbacks if rb["node"] == node),
                               "failed its audits")
                    status["conditions"] = kube.with_condition(status.get("conditions"), "Quarantined", True,
                                                               "AuditFailed", why)
                return status

            try:
                kube.update_status(
                    lambda node=node: api.get_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", node),
                    lambda b, node=node: api.patch_cluster_custom_object_status(r.GROUP, r.VERSION, "computenodes",
                                                                                node, b),
                    change)
                self._records[node], self._records_at[node] = rec, time.monotonic()
                if q:
                    self._quarantined.add(node)
                    kube.event(self.session, "NodeQuarantined", f"{node}: quarantined; its work is rolled back",
                               type_="Warning")
            except Exception as e:  # noqa: BLE001
                log.warning("audit record of %s not written: %s", node, e)
