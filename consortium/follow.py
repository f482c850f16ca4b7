"""Following one InferenceSession from a terminal: its text as it grows, and what happens to it.

The operator writes the session's progress into its status a few times a second (tokens, text,
conditions, at the end metrics). A person watching wants the text streamed, as a local runner prints
it, and told in a line when something happens: placed, waiting for a free node, a stage failed over
(from which node to which, how long the replay took), tokens rolled back after a fraud, the end with
its audits and receipts. `SessionView` turns successive snapshots of the object into exactly that
(text to one stream, events to another); `follow` feeds it from a watch on the API server.
"""
from __future__ import annotations

import json
import time
from typing import TextIO

from consortium import kube
from consortium import resources as r

FINAL_PHASES = ("Completed", "Failed")
# Conditions whose every change is news; Ready is news only when it is not the steady "Generating".
_TOLD_CONDITIONS = ("Scheduled", "StageFailover", "Ready")
# A text that ends in the middle of a multi-byte character decodes with a replacement character there,
# which the next token's bytes turn into the real one: such a tail is held back until it settles.
_UNSETTLED = "\ufffd"


class SessionView:
    """What a person watching one session is told: `out` gets the generated text as it grows, `err`
    one line per change of phase or condition, a rollback, and the outcome."""

    def __init__(self, out: TextIO, err: TextIO, *, timestamps: bool = True):
        self.out, self.err = out, err
        self.timestamps = timestamps      # off where `err` is a log that stamps its own lines
        self.phase: str | None = None
        self.printed = ""                 # the text written to `out` so far
        self.tokens: list[int] = []
        self.rollbacks = 0                # times the text streamed so far was taken back
        self._conditions: dict[str, tuple] = {}
        self.status: dict = {}

    def update(self, obj: dict) -> None:
        """Take one snapshot of the session object (as the API returns it)."""
        self.status = obj.get("status") or {}
        st = self.status
        phase = st.get("phase")
        if phase != self.phase and phase and phase not in FINAL_PHASES:
            self._line(f"phase {phase}")
        self._tell_conditions(st.get("conditions") or [])
        tokens = list(st.get("tokens") or [])
        text = st.get("text") or ""
        if tokens[:len(self.tokens)] != self.tokens:
            kept = next(i for i, (a, b) in enumerate(zip(tokens + [None], self.tokens)) if a != b)
            self.rollbacks += 1
            again = "" if st.get("phase") in FINAL_PHASES else " and are generated again"
            self._line(f"taken back: tokens from {kept} on{again} (the text goes on below from where it "
                       f"differs)")
        self.tokens = tokens
        final = st.get("phase") in FINAL_PHASES
        self._write_text(text if final else text.rstrip(_UNSETTLED))
        if phase != self.phase:
            self.phase = phase
            if final:
                self._end()

    def finished(self) -> bool:
        return self.phase in FINAL_PHASES

    def _write_text(self, text: str) -> None:
        same = 0
        for a, b in zip(text, self.printed):
            if a != b:
                break
            same += 1
        if same < len(self.printed):
            # Taken back (a rollback): what follows replaces the printed text from `same` on.
            self.out.write("\n")
        if text[same:]:
            self.out.write(text[same:])
            self.out.flush()
        self.printed = text

    def _tell_conditions(self, conditions: list[dict]) -> None:
        for c in conditions:
            t = c.get("type")
            if t not in _TOLD_CONDITIONS:
                continue
            now = (c.get("status"), c.get("reason"), c.get("message"))
            if self._conditions.get(t) == now:
                continue
            self._conditions[t] = now
            if c.get("reason") in ("Generating", "Completed", "NoFailover"):
                continue   # the phase lines and the outcome say these
            msg = f": {c['message']}" if c.get("message") else ""
            self._line(f"{t} {c.get('status')} {c.get('reason')}{msg}")

    def _end(self) -> None:
        if self.printed and not self.printed.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        for line in self.summary():
            self._line(line)

    def summary(self) -> list[str]:
        """The outcome in a few lines: the phase and why, tokens and speed, audits, failovers,
        rollbacks, receipts."""
        st = self.status
        m = st.get("metrics") or {}
        ready = kube.condition(st.get("conditions"), "Ready") or {}
        if st.get("phase") == "Failed":
            lines = [f"Failed: {ready.get('reason', '')}" + (f": {ready['message']}" if ready.get("message") else "")]
        elif (st.get("report") or {}).get("stopped") == "stop_requested":
            lines = [f"{st.get('phase')}: stopped on request: {st['report'].get('stopReason')}"]
        elif (st.get("report") or {}).get("stopped") == "stop_sequence":
            lines = [f"{st.get('phase')}: stopped at {json.dumps(st['report'].get('stopSequence'))}"]
        else:
            lines = [str(st.get("phase"))]
        lines.append(f"{len(st.get('tokens') or [])} tokens"
                     + (f", {m['tokensPerSecond']:.1f} tokens/s" if m.get("tokensPerSecond") else ""))
        if "audits" in m:
            lines.append(f"audits: {m.get('auditsPassed', 0)} passed, {m.get('auditsPassedWithinTolerance', 0)} "
                         f"within tolerance, {m.get('auditsMismatch', 0)} mismatch, {m.get('auditsFraud', 0)} fraud "
                         f"(of {m['audits']})")
            lines.append(f"failovers {m.get('failovers', 0)}, rollbacks {m.get('rollbacks', 0)}, "
                         f"receipts {m.get('receipts', 0)}")
        if self.rollbacks:
            lines.append("the text was taken back while streaming; the session's status.text holds it whole")
        return lines

    def _line(self, text: str) -> None:
        self.err.write(f"[{time.strftime('%H:%M:%S')}] {text}\n" if self.timestamps else f"{text}\n")
        self.err.flush()


class SessionGone(RuntimeError):
    """The session was deleted while followed."""


def follow(namespace: str, name: str, view: SessionView, *, timeout_s: float | None = None, api=None) -> dict:
    """Feed `view` every change of the session until it ends (or `timeout_s` passes: TimeoutError);
    returns the last snapshot. A missing session raises the API's 404; a deleted one SessionGone.
    The watch is made again when it ends or the API server goes away for a while."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    api = api or kube.api()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def get() -> dict:
        return api.get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, "inferencesessions", name)

    obj = get()
    view.update(obj)
    rv = obj["metadata"]["resourceVersion"]
    while not view.finished():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"inferencesession {namespace}/{name} still {view.phase} after {timeout_s:g} s")
        w = watch.Watch()
        try:
            for ev in w.stream(api.list_namespaced_custom_object, r.GROUP, r.VERSION, namespace, "inferencesessions",
                               field_selector=f"metadata.name={name}", resource_version=rv,
                               timeout_seconds=int(min(30, left + 1) if left is not None else 30)):
                kind, o = ev["type"], ev["object"]
                if kind == "ERROR":   # the resourceVersion is too old (410): read the object anew
                    rv = None
                    break
                if kind == "DELETED":
                    raise SessionGone(f"inferencesession {namespace}/{name} was deleted")
                rv = o["metadata"]["resourceVersion"]
                view.update(o)
                if view.finished():
                    break
        except ApiException as e:
            if e.status != 410 and not kube.transient(e):
                raise
            rv = None
        except Exception as e:  # noqa: BLE001 - the connection dropped: a short wait, then read anew
            if not kube.transient(e):
                raise
            time.sleep(1.0)
            rv = None
        finally:
            w.stop()
        if rv is None and not view.finished():
            obj = get()
            view.update(obj)
            rv = obj["metadata"]["resourceVersion"]
    return {"status": view.status}


__all__ = ["SessionView", "SessionGone", "follow", "FINAL_PHASES"]
