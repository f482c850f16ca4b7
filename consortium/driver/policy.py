"""The seam between the driver's failover mechanism and the decision of who takes over.

The driver detects, fences, rebuilds and continues; which node takes over a stage and which node
verifies an audit is asked of a policy. Without Kubernetes the LocalPolicy decides from a preference
order; the operator's policy answers from StageAssignments and node selectors.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class Policy(Protocol):
    def choose_backup(self, stage: int, failed: str, candidates: Sequence[str]) -> str:
        """A node to take over `stage` from `failed`; candidates are alive and not quarantined."""

    def choose_verifier(self, stage: int, worker: str, candidates: Sequence[str]) -> str:
        """A node (not the worker) to recompute an audited unit of `stage`."""

    # Optional: likely_backup(stage, serving, candidates) -> str | None, the node choose_backup would
    # most likely pick if `serving` failed now, decided without side effects. The driver has it load
    # the stage's layers ahead (SessionDriver warm_backups).


class NoCandidate(RuntimeError):
    pass


class LocalPolicy:
    """First choice by a fixed preference order (the seed: N0 takes over and verifies). `backups`:
    the nodes that may take a stage over (default any), as a session's backupSelector does."""

    def __init__(self, preference: Sequence[str], backups: Sequence[str] | None = None):
        self.preference = list(preference)
        self.backups = None if backups is None else set(backups)

    def _backups(self, candidates):
        return [n for n in candidates if self.backups is None or n in self.backups]

    def _first(self, candidates, exclude):
        ordered = [n for n in self.preference if n in candidates] + [n for n in candidates if n not in self.preference]
        for n in ordered:
            if n != exclude:
                return n
        raise NoCandidate(f"no node left to choose (all failed, quarantined or excluded: {exclude})")

    def choose_backup(self, stage, failed, candidates):
        return self._first(self._backups(candidates), failed)

    def likely_backup(self, stage, serving, candidates):
        try:
            return self._first(self._backups(candidates), serving)
        except NoCandidate:
            return None

    def choose_verifier(self, stage, worker, candidates):
        return self._first(candidates, worker)
