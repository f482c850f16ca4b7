"""One session's report, from what the API keeps (or an archive of it): where its time went, its
audits, failovers and rollbacks, and whether its Receipts hold up. `consortium report` writes it as
`summary.md`, `report.json` and `latency.png`, as the test case does for its own session.

Everything comes from the session's status (the tokens, `report.steps` with each step's wall time
and the failovers, `report.driverState` with the audits and rollbacks, the metrics) and from the
Receipt check (`receipt_check`); nothing is measured again.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from consortium import receipt_check
from consortium.driver.state import audit_records, steps_of_report

VERDICTS = ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud")


def build(session: dict, receipts: list[dict], nodes: list[dict]) -> dict:
    md, spec, st = session["metadata"], session.get("spec") or {}, session.get("status") or {}
    rep = st.get("report") or {}
    drv = rep.get("driverState") or {}
    steps = steps_of_report(rep.get("steps"))
    decode = [ms for _, rows, ms, fo in steps[1:] if rows == 1 and not fo]
    audits = audit_records(drv)
    check = receipt_check.check(session, receipts, nodes)
    return {
        "session": f"{md.get('namespace')}/{md['name']}", "uid": md.get("uid"), "model": (spec.get("model") or {}).get("name"),
        "phase": st.get("phase"), "stopped": rep.get("stopped"),
        "stop_detail": rep.get("stopReason") or rep.get("stopSequence"),
        "tokens": len(st.get("tokens") or []), "max_tokens": spec.get("maxTokens"),
        "prompt_tokens": len(drv.get("prompt_tokens") or []),
        # The layers as the stages ran them: the operator's split where the spec says 'auto'.
        "stages": [{"layers": layers, "node": n, "epoch": e} for layers, n, e in zip(
            st.get("layers") or [s.get("layers") for s in spec.get("stages") or []],
            drv.get("nodes") or [], drv.get("epochs") or [])],
        "started_at": st.get("startedAt"), "finished_at": st.get("finishedAt"),
        "tokens_per_s": (st.get("metrics") or {}).get("tokensPerSecond"),
        "step_tokens_per_s": (st.get("metrics") or {}).get("stepTokensPerSecond"),
        "prefill_ms": steps[0][2] if steps else None,
        "step_ms": {"median": round(statistics.median(decode), 1), "p90": round(_p90(decode), 1),
                    "max": max(decode)} if decode else None,
        "audits": {"total": len(audits), **{v: sum(a["verdict"] == v for a in audits) for v in VERDICTS},
                   "probability": spec.get("audit", {}).get("probability"),
                   "from_window_states": bool((spec.get("audit") or {}).get("fromWindowStates"))},
        "failovers": [{k: f.get(k) for k in ("stage", "from", "to", "at_token", "replayed_rows", "adopted_rows", "ms",
                                             "reason")} for f in drv.get("failovers") or []],
        "rollbacks": [{k: b.get(k) for k in ("node", "to_token", "reason", "ms")} for b in drv.get("rollbacks") or []],
        "quarantined": drv.get("quarantined") or [],
        "receipts": {"count": check["receipts"], "verified": check["verified"], "complete": check["complete"],
                     "tokens_signed": check["tokens_signed"], "ok": check["ok"]},
        "steps": [{"position": p, "rows": n, "wall_ms": ms, "failover": fo} for p, n, ms, fo in steps],
        "check_lines": receipt_check.lines(check),
    }


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def outcome(r: dict) -> str:
    """The session in one line, as the plot's title says it."""
    why = f"{r['stopped']}" + (f": {r['stop_detail']}" if r.get("stop_detail") else "")
    receipts = "receipts verify" if r["receipts"]["ok"] else "RECEIPTS DO NOT VERIFY"
    return (f"{r['phase']} ({why}): {r['tokens']} tokens, {r['audits']['total']} audits, "
            f"{len(r['failovers'])} failover(s), {len(r['rollbacks'])} rollback(s); {receipts}")


def markdown(r: dict) -> list[str]:
    a, s = r["audits"], r["step_ms"]
    lines = [f"# Session {r['session']}", "", f"**{outcome(r)}**", "",
             "| | |", "|---|---|",
             f"| model | {r['model']} |",
             f"| stages | " + "; ".join(f"{x['layers']} on {x['node']} (epoch {x['epoch']})" for x in r["stages"]) + " |",
             f"| tokens | {r['tokens']} of {r['max_tokens']} after a {r['prompt_tokens']}-token prompt |",
             f"| started, finished | {r['started_at']}, {r['finished_at']} |",
             f"| tokens/s | {r['tokens_per_s']} as written out, {r['step_tokens_per_s']} in the steps |",
             f"| prefill | {r['prefill_ms']} ms |" if r["prefill_ms"] is not None else "| prefill | - |",
             (f"| decode step | median {s['median']} ms, p90 {s['p90']} ms, worst {s['max']} ms |" if s else
              "| decode step | - |"),
             f"| audits | {a['total']} ({', '.join(f'{v} {a[v]}' for v in VERDICTS)}); probability {a['probability']}"
             f"{', from window states' if a['from_window_states'] else ''} |",
             f"| receipts | {r['receipts']['count']}, {r['receipts']['verified']} verify; every position covered: "
             f"{r['receipts']['complete']}; tokens signed by the final stage: {r['receipts']['tokens_signed']} |",
             f"| quarantined | {', '.join(r['quarantined']) or 'none'} |", ""]
    if r["failovers"]:
        lines += ["## Failovers", "", "| stage | from | to | at token | rows replayed | taken over | ms | why |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {f['stage']} | {f['from']} | {f['to']} | {f['at_token']} | {f['replayed_rows']} | "
                  f"{f['adopted_rows'] or 0} | {f['ms']} | {f['reason']} |" for f in r["failovers"]] + [""]
    if r["rollbacks"]:
        lines += ["## Rollbacks", "", "| node | back to token | ms | why |", "|---|---|---|---|"]
        lines += [f"| {b['node']} | {b['to_token']} | {b['ms']} | {b['reason']} |" for b in r["rollbacks"]] + [""]
    lines += ["## Receipts", "", "```", *r["check_lines"], "```", ""]
    if r["steps"]:
        lines += ["![latency](latency.png)", ""]
    return lines


def write(r: dict, out: Path) -> list[Path]:
    """summary.md, report.json and (when the session has steps) latency.png under `out`."""
    from consortium.standalone import plot_latency

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "summary.md"]
    (out / "report.json").write_text(json.dumps({k: v for k, v in r.items() if k != "check_lines"}, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(markdown(r)))
    if r["steps"]:
        plot_latency(r["steps"], out / "latency.png", outcome(r),
                     ok=r["phase"] == "Completed" and r["receipts"]["ok"] and not r["quarantined"])
        written.append(out / "latency.png")
    return written
