"""`consortium bench --suite tls`: what mutual TLS costs on the agent link, measured side by side.

One agent serves mutual TLS and another plaintext, both in this process on loopback, with the same
stage loaded and the same prompt's activations stored. Rounds alternate which transport goes first;
each round times a new channel's handshake plus first call, small calls (Health) and calls that carry
activations (Resend of every stored row, the bytes a failover replay moves).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

PROMPT_ROWS = 32


def run(model_name: str | None, rounds: int, calls: int, log) -> dict:
    from consortium import tls
    from consortium.driver.client import NodeClient, RpcLog
    from consortium.models import resolve_model
    from consortium.wire import pb
    from node_agent import server
    from node_agent.engine.slicing import read_model_info
    from node_agent.identity import NodeIdentity

    model = str(resolve_model(model_name))
    last = read_model_info(model).n_layers // 3 - 1
    ca = tls.CertificateAuthority.create()
    driver = tls.Credentials(*ca.issue(tls.DRIVER_NAME, server=False), ca.cert_pem)
    workdir = Path(tempfile.mkdtemp(prefix="consortium-tls-bench-"))
    servers, endpoints = [], {}
    try:
        for transport, creds in (("tls", tls.Credentials(*ca.issue("bench"), ca.cert_pem)), ("plaintext", None)):
            ident = NodeIdentity.load_or_create(workdir / f"{transport}.pem", "bench")
            srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="bench", threads=1, n_ctx=256),
                                        tls=creds)
            servers.append(srv)
            endpoints[transport] = f"127.0.0.1:{port}"

        def client(transport):
            return NodeClient("bench", endpoints[transport], RpcLog(), 60.0, driver if transport == "tls" else None)

        ref = pb.StageRef(session="bench", stage=0, epoch=1)
        for transport in endpoints:
            c = client(transport)
            c.call("LoadStage", pb.LoadStageRequest(ref=ref, model_path=model, first_layer=0, last_layer=last),
                   timeout=300)
            c.call("Forward", pb.ForwardRequest(ref=ref, position=0, tokens=[1 + i for i in range(PROMPT_ROWS)]))
            c.close()
        resend = pb.ResendRequest(ref=ref, from_position=0, to_position=PROMPT_ROWS)
        ms = {t: {"connect_first_call": [], "health": [], "resend": []} for t in endpoints}
        payload = {}
        for r in range(rounds):
            for transport in (list(endpoints) if r % 2 == 0 else list(reversed(endpoints))):
                t0 = time.perf_counter()
                c = client(transport)
                c.call("Health", pb.HealthRequest())
                ms[transport]["connect_first_call"].append((time.perf_counter() - t0) * 1000)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    c.call("Health", pb.HealthRequest())
                    ms[transport]["health"].append((time.perf_counter() - t0) * 1000)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    chunks = c.stream("Resend", resend)
                    ms[transport]["resend"].append((time.perf_counter() - t0) * 1000)
                payload[transport] = sum(x.ByteSize() for x in chunks)
                c.close()
            log(f"round {r + 1}/{rounds}")
    finally:
        for s in servers:
            s.stop(None)
        shutil.rmtree(workdir, ignore_errors=True)
    med = {t: {k: round(statistics.median(v), 3) for k, v in d.items()} for t, d in ms.items()}
    return {"model": Path(model).name, "layers": f"0-{last}", "rounds": rounds, "calls_per_round": calls,
            "resend_rows": PROMPT_ROWS, "resend_bytes": payload.get("tls"), "median_ms": med,
            "tls_over_plaintext": {k: round(med["tls"][k] / med["plaintext"][k], 3) for k in med["tls"]}}


def summary(res: dict) -> str:
    m, ratio = res["median_ms"], res["tls_over_plaintext"]
    lines = [f"mutual TLS vs plaintext on loopback, {res['rounds']} alternating rounds of {res['calls_per_round']} "
             f"calls ({res['model']}, stage {res['layers']}), median ms:",
             f"{'':>22} {'tls':>9} {'plaintext':>10} {'tls/plain':>10}"]
    for k, name in (("connect_first_call", "new channel + Health"), ("health", "Health"),
                    ("resend", f"Resend {res['resend_rows']} rows ({res['resend_bytes']} B)")):
        lines.append(f"{name:>22} {m['tls'][k]:9.3f} {m['plaintext'][k]:10.3f} {ratio[k]:10.3f}")
    return "\n".join(lines)
