"""The operator's Prometheus metrics: what each session's driver has done so far, read when scraped
(tokens, steps and their time, audits by verdict, unjudged units, failovers by stage, rollbacks,
receipts, quarantined nodes). A session keeps its series after it ends (`consortium_session_running`
0) until the operator restarts; the oldest ended ones are dropped beyond MAX_ENDED."""
from __future__ import annotations

import threading

MAX_ENDED = 100

_lock = threading.Lock()
_sessions: dict[tuple[str, str], dict] = {}   # (namespace, name) -> {"driver", "running", "tokens"}


def track(namespace: str, name: str, driver, tokens: int = 0) -> None:
    with _lock:
        _sessions.pop((namespace, name), None)   # re-inserted last: the newest
        _sessions[(namespace, name)] = {"driver": driver, "running": True, "tokens": tokens}


def generated(namespace: str, name: str, tokens: int) -> None:
    """The session's tokens so far (the driver's state holds those fed back, not the latest)."""
    with _lock:
        if (namespace, name) in _sessions:
            _sessions[(namespace, name)]["tokens"] = tokens


def ended(namespace: str, name: str) -> None:
    with _lock:
        if (namespace, name) in _sessions:
            _sessions[(namespace, name)]["running"] = False
        done = [k for k, v in _sessions.items() if not v["running"]]
        for k in done[:max(0, len(done) - MAX_ENDED)]:
            del _sessions[k]


def _figures(driver) -> dict:
    with driver._lock:
        st = driver.state
        verdicts: dict[str, int] = {}
        for a in st.audits:
            verdicts[a["verdict"]] = verdicts.get(a["verdict"], 0) + 1
        failovers: dict[int, int] = {}
        for f in st.failovers:
            failovers[f["stage"]] = failovers.get(f["stage"], 0) + 1
        out = {"verdicts": verdicts, "unjudged": len(st.unjudged),
               "failovers": failovers, "rollbacks": len(st.rollbacks), "receipts": len(driver.receipts),
               "quarantined": len(st.quarantined), "overruled": len(st.overruled), "stages": len(st.nodes)}
    steps = list(driver.steps)
    out["steps"], out["step_seconds"] = len(steps), sum(s.wall_ms for s in steps) / 1000
    return out


class SessionCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["namespace", "session"]
        fam = {
            "running": GaugeMetricFamily("consortium_session_running", "1 while this operator drives the session", labels=labels),
            "tokens": CounterMetricFamily("consortium_session_tokens", "Tokens generated", labels=labels),
            "steps": CounterMetricFamily("consortium_session_steps", "Pipeline steps driven (a prompt is one)", labels=labels),
            "step_seconds": CounterMetricFamily("consortium_session_step_seconds",
                                                "Wall time of those steps, every stage's hop included", labels=labels),
            "audits": CounterMetricFamily("consortium_session_audits", "Audit verdicts recorded",
                                          labels=labels + ["verdict"]),
            "unjudged": CounterMetricFamily("consortium_session_audits_unjudged",
                                            "Units selected for audit that got no verdict", labels=labels),
            "overruled": CounterMetricFamily("consortium_session_verdicts_overruled",
                                             "Accusing verdicts a second verifier overruled (or dropped)", labels=labels),
            "failovers": CounterMetricFamily("consortium_session_failovers", "Failovers", labels=labels + ["stage"]),
            "rollbacks": CounterMetricFamily("consortium_session_rollbacks", "Rollbacks", labels=labels),
            "receipts": CounterMetricFamily("consortium_session_receipts", "Receipt windows flushed", labels=labels),
            "quarantined": GaugeMetricFamily("consortium_session_quarantined_nodes",
                                             "Nodes this session quarantined", labels=labels),
        }
        with _lock:
            tracked = [(k, v["driver"], v["running"], v["tokens"]) for k, v in _sessions.items()]
        for (ns, name), driver, running, tokens in tracked:
            f, who = {**_figures(driver), "tokens": tokens}, [ns, name]
            fam["running"].add_metric(who, 1 if running else 0)
            for key in ("tokens", "steps", "step_seconds", "unjudged", "overruled", "rollbacks", "receipts",
                        "quarantined"):
                fam[key].add_metric(who, f[key])
            for v in ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud"):
                fam["audits"].add_metric(who + [v], f["verdicts"].get(v, 0))
            for s in range(f["stages"]):
                fam["failovers"].add_metric(who + [str(s)], f["failovers"].get(s, 0))
        yield from fam.values()
