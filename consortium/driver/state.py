"""The session's progress as a plain object: what a driver needs to continue after a restart.

Audit selection needs no saved RNG state: a unit (stage, position) is audited when a generator
seeded with (seed, stage, position) draws below the probability, so a resumed driver and a rollback
select the same units again. Audits from window states select whole windows (every position of a
window whose first position is drawn).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np


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
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, o: dict) -> "SessionState":
        return cls(**o)

    def dumps(self) -> str:
        return json.dumps(self.to_json())
