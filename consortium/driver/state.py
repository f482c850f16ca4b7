"""The session's progress as a plain object: what a driver needs to continue after a restart.

Audit selection needs no saved RNG state: a unit (stage, position) is audited when a generator
seeded with (seed, stage, position) draws below the probability, so a resumed driver and a rollback
select the same units again. Audits from window states select whole windows (every position of a
window whose first position is drawn).

Under the operator this state, and the session's report beside it, live in one API object, which
etcd caps at 1.5 MiB. Saved whole, they grew about 235 bytes a token at 20% audits and passed the cap
near 6,500 tokens. So what grows with every token is saved in compact forms (`to_json`,
`report_steps`, `report_counters`): a plain pass as five values (six within tolerance), runs of
decode steps as one entry each, the agents' counters as runs of positions. A session at maxTokens'
limit (32768) then writes about 1.1 MB when its audits pass by equal hashes, and one of half as many
tokens about as much when every audit passes within tolerance (tests/dataplane/test_state_size.py).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from consortium.verification import verdicts


@dataclasses.dataclass
class SessionState:
    session: str
    prompt_tokens: list[int]
    nodes: list[str]                        # node serving each stage
    epochs: list[int]                       # each stage's epoch (bumped on every failover)
    audit_probability: float = 0.2
    audit_seed: int = 0
    audit_window: int = 0                   # >0: audits select whole windows of this many positions
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: list[int] = dataclasses.field(default_factory=list)        # next position per stage
    batches: list[list[int]] = dataclasses.field(default_factory=list)  # [start, rows] of each step
    last_passed: dict[str, int] = dataclasses.field(default_factory=dict)  # "stage/node" -> position
    quarantined: list[str] = dataclasses.field(default_factory=list)
    audits: list[dict] = dataclasses.field(default_factory=list)
    unjudged: list[dict] = dataclasses.field(default_factory=list)   # selected units no audit judged, and why
    # Accusing verdicts (Mismatch, Fraud) that a second verifier overruled with a milder one, or that
    # were dropped because their verifier was caught (overruled_by None): stage, position, node,
    # verifier, first_verdict, overruled_by, verdict.
    overruled: list[dict] = dataclasses.field(default_factory=list)
    failovers: list[dict] = dataclasses.field(default_factory=list)
    # Backups that failed while taking a stage over (stage, from, to, epoch, at_position, reason):
    # the failover went on with the next one, or, with none left, the session failed.
    backups_failed: list[dict] = dataclasses.field(default_factory=list)
    rollbacks: list[dict] = dataclasses.field(default_factory=list)
    # Audits from window states: per stage, the state statements checked ("window start" -> [node,
    # epoch, count, sha256 hex]), so a resumed driver audits earlier windows from them too; the
    # stages whose states are no longer trusted; and the counts (windows audited from states, of
    # them within tolerance or differing, units that fell back to full replays, the worst distance).
    window_states: list[dict[str, list]] = dataclasses.field(default_factory=list)
    untrusted_states: list[int] = dataclasses.field(default_factory=list)
    state_audits: dict = dataclasses.field(default_factory=dict)
    # Under the operator: fraud proofs not yet written into the API and Fraud units still waiting for
    # their receipt (ProofBook.to_json), so that an operator restarted meanwhile publishes them.
    proofs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.done:
            self.done = [0] * len(self.nodes)
        if not self.window_states:
            self.window_states = [{} for _ in self.nodes]
        for k, v in {"windows": 0, "state_within_tolerance": 0, "state_differs": 0, "fell_back": 0,
                     "worst_relative_l2": 0.0}.items():
            self.state_audits.setdefault(k, v)

    def sequence(self) -> list[int]:
        """Every token id by position: the prompt, then the generated tokens fed so far."""
        return list(self.prompt_tokens) + list(self.tokens)

    def selected(self, stage: int, position: int) -> bool:
        if self.audit_probability <= 0:
            return False
        if self.audit_window:   # whole windows: the draw of the window's first position decides
            position = position // self.audit_window * self.audit_window
            if position < len(self.prompt_tokens):
                # Every window the prompt's batch touches is audited by replaying that batch whole:
                # one draw for them all, so the prompt counts as one unit of work, not one per window.
                position = 0
        u = np.random.Generator(np.random.PCG64([self.audit_seed & 0xFFFFFFFF, stage, position])).random()
        return bool(u < self.audit_probability)

    def to_json(self) -> dict:
        """A copy, JSON values only, that the driver's threads can go on changing the state beside."""
        # Copied through JSON text: the json module's C code copies a long session's state in
        # milliseconds, where dataclasses.asdict took a quarter of a second at 8,000 tokens.
        return json.loads(self.dumps())

    @classmethod
    def from_json(cls, o: dict) -> "SessionState":
        return cls(**{**o, "audits": audit_records(o), "batches": _expand_runs(o.get("batches") or [])})

    def dumps(self) -> str:
        """The saved form as JSON text."""
        o = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        o["audits"] = [_compact_audit(a) for a in self.audits]
        o["batches"] = _compact_runs(self.batches)
        return json.dumps(o)


# -- compact forms of what grows with every token ---------------------------------------------------

# An audit record's figures keep 6 significant digits: more than any tolerance is calibrated to, and
# a within-tolerance pass then saves in about 80 bytes instead of 250.
FIGURE_DIGITS = 6
_FIGURES = [f.name for f in dataclasses.fields(verdicts.Figures)]
_WITHIN = "hashes differ; figures within the honest tolerance"   # Tolerance.classify's reason


def record_figures(fig: verdicts.Figures) -> dict:
    """An audit's figures as its record keeps them."""
    return {k: float(f"{v:.{FIGURE_DIGITS}g}") if isinstance(v, float) else v for k, v in fig.to_json().items()}


def _record(stage, position, node, epoch, verifier, figures=None) -> dict:
    """The whole record of a plain pass: by equal hashes (no figures: every distance is 0, they would
    say nothing more), or within tolerance (the figures as a list in Figures' field order)."""
    if figures is None:
        return {"stage": stage, "position": position, "node": node, "epoch": epoch, "verifier": verifier,
                "verdict": "Passed", "reasons": ["hashes equal"], "figures": None, "hash_equal": True}
    return {"stage": stage, "position": position, "node": node, "epoch": epoch, "verifier": verifier,
            "verdict": "PassedWithinTolerance", "reasons": [_WITHIN], "figures": dict(zip(_FIGURES, figures)),
            "hash_equal": False}


def _compact_audit(a: dict):
    short = [a["stage"], a["position"], a["node"], a["epoch"], a["verifier"]]
    if a == _record(*short):
        return short
    figures = [(a.get("figures") or {}).get(k) for k in _FIGURES]
    if a == _record(*short, figures):
        return short + [figures]
    return a   # anything else (an accusation, a second opinion) is kept whole


def audit_records(saved: dict) -> list[dict]:
    """Every audit record of a saved state (SessionState.to_json, e.g. `report.driverState`), whole."""
    return [_record(*a) if isinstance(a, list) else a for a in saved.get("audits") or []]


def _compact_runs(batches: list[list[int]]) -> list[list[int]]:
    """[start, rows] of each step, with a run of n decode steps (one row each, consecutive) saved as
    [start, 1, n]."""
    out: list[list[int]] = []
    for start, rows in batches:
        last = out[-1] if out else None
        run = (last[2] if len(last) == 3 else 1) if last and last[1] == 1 else 0   # decode steps in it
        if rows == 1 and run and last[0] + run == start:
            out[-1] = [last[0], 1, run + 1]
        else:
            out.append([start, rows])
    return out


def _expand_runs(saved: list[list[int]]) -> list[list[int]]:
    out = []
    for b in saved:
        out.extend([[b[0] + i, 1] for i in range(b[2])] if len(b) == 3 else [list(b)])
    return out


def report_steps(steps) -> dict:
    """A session's steps as its report saves them: `batches` ([position, rows], runs of decode steps
    as [position, 1, n]), `ms` (each step's wall time, 0.1 ms) and `failovers` (the indices of steps
    that failed over)."""
    return {"batches": _compact_runs([[x.position, x.rows] for x in steps]),
            "ms": [round(x.wall_ms, 1) for x in steps],
            "failovers": [i for i, x in enumerate(steps) if x.failover]}


def steps_of_report(saved) -> list[tuple[int, int, float, bool]]:
    """(position, rows, ms, failed over) of each step, from report_steps' form."""
    if not saved:
        return []
    failed = set(saved["failovers"])
    return [(p, n, ms, i in failed)
            for i, ((p, n), ms) in enumerate(zip(_expand_runs(saved["batches"]), saved["ms"]))]


def report_counters(counters: dict[str, list]) -> dict[str, list[list[int]]]:
    """The agents' counters (node -> [(stage, position, forward, replay)]) as runs of consecutive
    positions with the same counts: node -> [[stage, first position, last position, forward, replay]]."""
    out = {}
    for node, rows in counters.items():
        runs: list[list[int]] = []
        for stage, p, fwd, rep in sorted(rows):
            r = runs[-1] if runs else None
            if r and r[0] == stage and r[2] + 1 == p and r[3:] == [fwd, rep]:
                r[2] = p
            else:
                runs.append([stage, p, p, fwd, rep])
        out[node] = runs
    return out


def counters_of_report(saved: dict) -> dict[str, list[tuple[int, int, int, int]]]:
    """node -> [(stage, position, forward, replay)], from report_counters' form."""
    return {node: [(s, p, f, r) for s, first, last, f, r in runs for p in range(first, last + 1)]
            for node, runs in (saved or {}).items()}
