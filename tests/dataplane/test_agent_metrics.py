"""The agent's /metrics (node_agent.metrics), scraped over HTTP after a real session on three
agents in this process, against what the driver saw: positions, audits, requests."""
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consortium import generation, metrics
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from node_agent import server
from node_agent.identity import NodeIdentity
from node_agent.metrics import AgentCollector

from tests.dataplane.test_failover import PROMPT, SPLIT

TOKENS = 5
ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_agent_metrics_agree_with_the_session(tmp_path, model_path):
    servers, services, endpoints, ports = {}, {}, {}, {}
    for n in ("A", "B", "C"):
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        servers[n], services[n], port = server.serve(ident, "127.0.0.1:0",
                                                     server.AgentConfig(node_id=n, threads=1, n_ctx=256))
        endpoints[n] = f"127.0.0.1:{port}"
        ports[n] = metrics.serve([AgentCollector(services[n])], 0, "127.0.0.1")
    state = SessionState(session="metrics", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=1.0)
    driver = SessionDriver(session="metrics", model_path=model_path, split=SPLIT, n_layers=30, endpoints=endpoints,
                           state=state, policy=LocalPolicy(["C", "A", "B"]))
    try:
        driver.start()
        generation.generate(driver, PROMPT, TOKENS)
        counters = driver.counters()
    finally:
        driver.close()
    try:
        got = {n: scrape(ports[n]) for n in ports}
    finally:
        for srv in servers.values():
            srv.stop(None)

    for s, n in enumerate(("A", "B", "C")):
        m, who = got[n], (("session", "metrics"), ("stage", str(s)))
        info = [k for k in m if k[0] == "consortium_agent_info"]
        assert len(info) == 1 and ("node_id", n) in info[0][1]
        forward = sum(f for stage, _, f, _ in counters[n] if stage == s)
        assert forward == len(PROMPT) + TOKENS - 1   # every position fed, once
        assert m[("consortium_agent_positions_total", tuple(sorted(who + (("kind", "forward"),))))] == forward
        assert m[("consortium_agent_positions_total", tuple(sorted(who + (("kind", "replay"),))))] == 0
        assert m[("consortium_agent_step_seconds_total", tuple(sorted(who + (("kind", "forward"),))))] > 0
        assert m[("consortium_agent_stage_epoch", tuple(sorted(who)))] == 1
        answered = sum(r.ok for r in driver.rpc.records if r.node == n and r.method == "Audit")
        assert m[("consortium_agent_audits_total", ())] == answered
        assert (m[("consortium_agent_audit_rows_total", ())] > 0) == (answered > 0)
        assert m[("consortium_agent_requests_total", ())] > forward / 2 and m[("consortium_agent_refused_total", ())] == 0
        assert m[("consortium_agent_audit_process_kills_total", ())] == 0
    assert sum(got[n][("consortium_agent_audits_total", ())] for n in got) > 0
    # The chart's Grafana dashboard asks only for series an agent serves, with labels it has.
    served = {}
    for name, labels in got["A"]:
        served.setdefault(name, set()).update(k for k, _ in labels)
    wanted = metrics.dashboard_series((ROOT / metrics.DASHBOARD).read_text(), "consortium_agent")
    assert len(wanted) >= 5
    for name, labels in wanted.items():
        assert name in served and labels <= served[name], (name, labels, served.get(name))
