"""The chart's Grafana dashboard: every query parses with Prometheus's own PromQL parser
(tools/promqlcheck, a Go program built with `go run`, cached by Go). That the metrics and labels it
asks for are what the processes serve is checked where they serve them: tests/operator/test_session.py
and tests/dataplane/test_agent_metrics.py."""
import json
import pathlib
import shutil
import subprocess

import pytest

from consortium import metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _promqlcheck(*paths) -> subprocess.CompletedProcess:
    go = shutil.which("go")
    if not go:
        pytest.skip("go is not installed: cannot build tools/promqlcheck")
    return subprocess.run([go, "run", ".", *map(str, paths)], cwd=ROOT / "tools/promqlcheck",
                          capture_output=True, text=True, timeout=600)


def test_every_dashboard_query_parses_as_promql():
    dashboard = json.loads((ROOT / metrics.DASHBOARD).read_text())
    queries = sum(len(p.get("targets", [])) for p in dashboard["panels"])
    done = _promqlcheck(ROOT / metrics.DASHBOARD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert queries >= 15 and f"{queries} queries parse" in done.stdout


def test_promqlcheck_refuses_a_query_prometheus_would_refuse(tmp_path):
    dashboard = json.loads((ROOT / metrics.DASHBOARD).read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = 'sum by (session (rate(consortium_session_tokens_total[1m]))'
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dashboard))
    done = _promqlcheck(bad)
    assert done.returncode != 0 and dashboard["panels"][1]["title"] in done.stderr, done.stderr
