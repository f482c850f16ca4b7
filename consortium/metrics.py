"""Prometheus metrics over HTTP for the operator and the node agent (prometheus_client does the
exposition format and the server). Each process registers collectors that read its own state when
scraped, so nothing in the token path counts anything for them."""
from __future__ import annotations

import logging

log = logging.getLogger("consortium.metrics")


def serve(collectors, port: int, host: str = "0.0.0.0") -> int:
    """Serve `collectors` and the process's own figures (CPU, memory, open files) at
    http://host:port/metrics from a daemon thread; returns the port (port 0 picks one)."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for c in collectors:
        registry.register(c)
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return bound


DASHBOARD = "charts/consortium/dashboards/consortium.json"   # from the repository root


def dashboard_series(text: str, prefix: str) -> dict[str, set[str]]:
    """The metrics named `prefix`* in the Grafana dashboard's queries (the dashboard JSON as text),
    each with the label names the queries select or group it by, beside `instance`, which
    Prometheus adds when it scrapes. Lets tests hold the dashboard to what a process serves."""
    import json
    import re

    out: dict[str, set[str]] = {}
    for panel in json.loads(text)["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            grouped = {g.strip() for by in re.findall(r"\bby \(([^)]*)\)", expr) for g in by.split(",")}
            for name, selector in re.findall(rf"\b({re.escape(prefix)}\w*)(?:\{{([^}}]*)\}})?", expr):
                labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)) | grouped
                out.setdefault(name, set()).update(labels - {"instance"})
    return out
