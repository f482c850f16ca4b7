"""The node agent's Prometheus metrics, read from the service when scraped: who it is, the stages it
serves (epoch), positions computed and seconds spent per session and stage (Forward steps and
failover replays apart), audits answered, requests and refusals, audit processes killed for making no
progress; a bare agent's token expiry. A session's series go when the agent frees it (its
StageAssignments are gone)."""
from __future__ import annotations


class AgentCollector:
    def __init__(self, service, credentials=None):
        self.service = service
        self.credentials = credentials   # a bare agent's Kubeconfig: its token's expiry

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        svc = self.service
        held, totals = svc.held(), svc.totals()
        audits = totals["audits"]
        info = GaugeMetricFamily("consortium_agent_info", "The agent: its node id, backend and llama.cpp build",
                                 labels=["node_id", "backend", "llama_cpp"])
        info.add_metric([svc.identity.node_id, svc.backend, str(svc.build.get("llama_cpp_python", ""))], 1)
        yield info
        stage = ["session", "stage"]
        epoch = GaugeMetricFamily("consortium_agent_stage_epoch", "Stages served now, by their epoch", labels=stage)
        for (session, s), e in sorted(held.items()):
            epoch.add_metric([session, str(s)], e)
        yield epoch
        positions = CounterMetricFamily("consortium_agent_positions", "Positions computed",
                                        labels=stage + ["kind"])
        busy = CounterMetricFamily("consortium_agent_step_seconds", "Seconds in those steps, commitments included",
                                   labels=stage + ["kind"])
        for (session, s), (fwd, rep, fwd_s, rep_s) in sorted(totals["steps"].items()):
            who = [session, str(s)]
            positions.add_metric(who + ["forward"], fwd)
            positions.add_metric(who + ["replay"], rep)
            busy.add_metric(who + ["forward"], fwd_s)
            busy.add_metric(who + ["replay"], rep_s)
        yield positions
        yield busy
        yield CounterMetricFamily("consortium_agent_audits", "Audits answered", value=audits["audits"])
        yield CounterMetricFamily("consortium_agent_audit_rows", "Rows those audits replayed", value=audits["rows"])
        yield CounterMetricFamily("consortium_agent_audit_seconds", "Seconds those audits took", value=audits["seconds"])
        yield CounterMetricFamily("consortium_agent_audit_process_kills",
                                  "Audit processes killed for making no progress (--audit-stall-s)",
                                  value=svc.audits.stalls)
        if self.credentials is not None and self.credentials.expires is not None:
            yield GaugeMetricFamily("consortium_agent_credentials_expiry_timestamp_seconds",
                                    "When the bare agent's kubeconfig token expires (Unix time)",
                                    value=self.credentials.expires.timestamp())
        yield CounterMetricFamily("consortium_agent_requests", "Requests received", value=totals["requests"])
        yield CounterMetricFamily("consortium_agent_refused", "Requests refused with a reason", value=totals["refused"])
