"""What a person reads first in a Test Case v1 report: the seed's success criteria (section 10), each
marked pass or fail with the figure behind it, its metrics (section 9), and the figures of any
extension test (section 12). Both modes' summary.md open with these lines and the latency plot is
headed by the same one-line outcome; report.json holds everything else.
"""
from __future__ import annotations

MARK = {True: "PASS", False: "FAIL", None: "not exercised"}


def criteria(r: dict) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed or None when the run did not exercise it, the figure behind it)."""
    d, a, f = r["distributed"], r["audits"], r["failover"]
    tokens = d["tokens"]
    fault_node = (r.get("fault") or {}).get("node")
    out = []
    phase = r.get("phase", "Completed" if tokens else None)
    out.append(("1. inference completes end to end", phase == "Completed" and len(tokens) > 0,
                f"{len(tokens)} of {r['max_tokens']} tokens, phase {phase}"
                + (f" ({r['failure']['reason']}: {r['failure']['message']})" if r.get("failure") else "")))
    agree = sum(x == y for x, y in zip(r["baseline"]["tokens"], tokens))
    if r["exact_match"]:
        out.append(("2. output correct: every token equals the single-node baseline", True,
                    f"{agree} of {len(r['baseline']['tokens'])} tokens identical"))
    elif r.get("heterogeneous"):
        out.append(("2. output correct: every token equals the single-node baseline", None,
                    f"different kernels, so not required: first divergence at token {r['first_divergence']}, "
                    f"top-2 margin there {r.get('top2_margin_at_divergence')}"))
    else:
        out.append(("2. output correct: every token equals the single-node baseline", False,
                    f"{agree} of {len(r['baseline']['tokens'])} identical, first divergence at token "
                    f"{r['first_divergence']}"))
    units = a.get("units") or []
    honest = [u for u in units if u["node"] != fault_node]
    ok_units = [u for u in honest if u["verdict"] in ("Passed", "PassedWithinTolerance")]
    allowed_mismatch = bool(r.get("heterogeneous")) and r["false_fraud"] == 0
    audits_ok = len(honest) > 0 and (len(ok_units) == len(honest) or
                                     (allowed_mismatch and all(u["verdict"] != "Fraud" for u in honest)))
    out.append(("3. all audits of honest nodes pass", audits_ok if units else None,
                f"{len(ok_units)} of {len(honest)} Passed or PassedWithinTolerance"
                + (f" ({len(honest) - len(ok_units)} Mismatch within the calibrated honest rate)"
                   if allowed_mismatch and len(ok_units) < len(honest) else "")))
    if f.get("injected"):
        spike = f.get("spike_ms")
        out.append(("4. failover completes without a session abort",
                    bool(f["completed"]) and r["session_restarts"] == 0,
                    f"{f.get('killed_node') or f.get('node')} {f.get('how') or 'SIGKILL'} at token {f.get('at_token')}, "
                    f"stage taken over by {f.get('backup_node')}, spike {spike} ms, "
                    f"{r['session_restarts']} session restarts"))
    else:
        moved = ", ".join(f"stage {e['stage']} {e['from']} -> {e['to']}" for e in f.get("events") or [])
        out.append(("4. failover completes without a session abort", None,
                    "no failure injected" + (f" (failed over after a quarantine: {moved})" if moved else "")))
    out.append(("no session restart (agents' forward counters)", r["session_restarts"] == 0,
                f"{r['session_restarts']} restarts"))
    out.append(("no false fraud: no honest node gets a Fraud verdict or quarantine", r["false_fraud"] == 0,
                f"false_fraud {r['false_fraud']}"))
    chk, rec = r.get("receipts_check"), r.get("receipts")
    if chk is not None:   # through Kubernetes: re-checked from the API alone
        n_proofs = chk["fraud_proofs"]
        out.append(("signed receipts: each verifies under its node's published key, every position covered",
                    bool(chk["ok"]), f"{chk['verified']} of {chk['receipts']} Receipts verify; "
                    + ("every position covered" if chk["complete"] else f"not covered: {chk['gaps']}")
                    + (f"; {n_proofs - len(chk['fraud_proofs_failed'])} of {n_proofs} fraud proofs hold"
                       if n_proofs else "")))
    elif isinstance(rec, dict):
        out.append(("signed receipts: each verifies under its node's key", rec["count"] > 0
                    and rec["verified"] == rec["count"], f"{rec['verified']} of {rec['count']} verify (driver's check)"))
    if chk is not None and chk.get("tokens_signed") is not None:
        answer = {"signed": chk["tokens_signed"], "unsigned": chk["tokens_unsigned_count"],
                  "contradicted": len(chk["tokens_contradicted"])}
    elif isinstance(rec, dict) and rec.get("tokens"):
        answer = {k: v if isinstance(v, int) else len(v) for k, v in rec["tokens"].items()}
    else:
        answer = None
    if answer is not None:
        out.append(("the answer is what the final stage signed: no token shown contradicts its signed one",
                    answer["contradicted"] == 0,
                    f"{answer['signed']} of {len(r['distributed']['tokens'])} tokens signed, {answer['unsigned']} "
                    f"unsigned (rows a backup replayed), {answer['contradicted']} contradicted"))
    if fault_node and "faulty-worker" not in (r.get("extensions") or {}):
        fr = r["fault"]
        out.append(("the faulty worker is caught and quarantined", bool(fr.get("caught")),
                    f"{fault_node} ({fr.get('kind')}) quarantined {fr.get('caught')}"
                    + (f", in the API {fr['quarantined_in_api']}" if "quarantined_in_api" in fr else "")
                    + f", {len(fr.get('rollbacks') or [])} rollbacks, "
                    f"{sum(bool(p.get('holds')) for p in r.get('fraud_proofs') or [])} fraud proofs holding"))
    liar = r.get("lying_verifier")
    if liar:
        out.append(("the lying verifier is caught, not the workers it accused",
                    bool(liar["caught"]) if liar["accusations"] else None,
                    f"{liar['node']} ({liar['lie']} rows) quarantined {liar['caught']}; of its {liar['accusations']} "
                    f"accusing verdicts {liar['overruled_verdicts']} overruled by a second verifier, "
                    f"{liar['dropped_verdicts']} dropped once it was caught, {liar['standing_accusations']} standing"))
    for name, fig in (r.get("extensions") or {}).items():
        out.append((f"extension {name}", fig.get("ok"), _extension_figure(name, fig)))
    return out


def outcome(r: dict) -> str:
    """One line: PASS or FAIL and the criteria that failed."""
    failed = [c.split(" ", 1)[0].rstrip(".") if c[0].isdigit() else c for c, ok, _ in criteria(r) if ok is False]
    return "PASS: Test Case v1 succeeded" if r["success"] else "FAIL: " + (", ".join(failed) or "see report.json")


def metrics(r: dict) -> list[tuple[str, str]]:
    d, a = r["distributed"], r["audits"]
    units = a.get("units") or []
    total = a["total"]
    rows = [("exact token match with the baseline", f"{r['exact_match']}"),
            ("false fraud (honest nodes with Fraud or quarantined)", f"{r['false_fraud']}"),
            ("audit pass rate", f"{(a['passed'] + a['passed_within_tolerance']) / total:.3f} of {total} audits "
                                f"(probability {a['probability']}"
                                + (", the faulty node's included)" if r.get("fault") else ")") if total else "no audits"),
            ("hash stability across hardware (audits of honest nodes)",
             hash_stability(r, [u for u in units if u["node"] != (r.get("fault") or {}).get("node")]))]
    if d.get("per_stage_ms"):
        rows.append(("per-token latency per stage (mean, ms)", ", ".join(f"stage {i} {ms}"
                                                                          for i, ms in enumerate(d["per_stage_ms"]))))
    elif d.get("step_ms_median") is not None:
        rows.append(("per-token latency (median step, ms)", f"{d['step_ms_median']}"))
    rows.append(("latency spike during failover", f"{r['failover'].get('spike_ms')} ms"
                 if r["failover"].get("spike_ms") is not None else "no failover"))
    rows.append(("throughput (decode)", f"{d.get('tokens_per_s')} tok/s distributed, "
                                        f"{r['baseline']['tokens_per_s']} tok/s single node"))
    return rows


def hash_stability(r: dict, units: list[dict]) -> str:
    """Audited units whose verifier's hash equals the worker's, per pair of detected backends."""
    backend = {n: (v.get("backend") or "?") + ("" if (v.get("repack", True)) else " repacking off")
               for n, v in (r.get("nodes") or {}).items()}
    pairs: dict[str, list[int]] = {}
    for u in units:
        key = " / ".join(sorted((backend.get(u["node"], "?"), backend.get(u.get("verifier"), "?"))))
        c = pairs.setdefault(key, [0, 0])
        c[0] += bool(u["hash_equal"])
        c[1] += 1
    text = "; ".join(f"{k}: {e} of {n} equal" for k, (e, n) in sorted(pairs.items())) or "no audits"
    if not any(b.startswith(("cuda", "metal")) for b in backend.values()):
        text += " (every node on CPU; CUDA and Metal not measured yet: docs/cross-hardware.md)"
    return text


def _extension_figure(name: str, fig: dict) -> str:
    if name == "audit-50":
        return (f"{fig['audits']} audits at probability {fig['probability']} (share of units {fig['audited_share']}), "
                f"{fig['passed']} Passed, {fig['passed_within_tolerance']} PWT, {fig['mismatch']} Mismatch, "
                f"{fig['fraud']} Fraud; audit CPU / generation CPU {fig['audit_over_generation']}")
    if name == "batch":
        hops = ", ".join(f"{k} {v}" for k, v in fig["bytes_per_row_per_hop"].items())
        return (f"{fig['prompt_tokens']}-token prompt: prefill {fig['prefill_ms']} ms ({fig['prefill_rows_per_s']} rows/s), "
                f"decode {fig['decode_tokens_per_s']} tok/s (single node {fig['baseline_decode_tokens_per_s']}); "
                f"bytes per row per hop: {hops}")
    if name == "faulty-worker":
        return (f"{fig['node']} at stage {fig['stage']} ({fig['kind']}): caught {fig['caught']}, verdicts "
                f"{fig['faulty_verdicts']}, proven by {fig.get('proofs_holding')} of {fig.get('proofs')} fraud proofs, "
                f"{fig['rollbacks']} rollbacks, stage failed over "
                f"to {fig['failed_over_to']}, tokens identical {fig['exact_match']}, false_fraud {fig['false_fraud']}")
    if name == "grid-sweep":
        g = fig["at_session_grid"]
        pairs = sorted(fig["grid_sweep"][0]["by_pair"]) if fig["grid_sweep"] else []
        sweep = "; ".join(f"{p}: " + ", ".join(f"{x['grid']} {x['by_pair'][p]}" for x in fig["grid_sweep"])
                          for p in pairs)
        return (f"{fig['model']}, {fig['prompt_tokens']} prompt rows per stage; exact hash match by grid ({sweep}); "
                f"at grid {g['grid']} with the shipped tolerance, {g['honest_comparisons']} honest rows: "
                f"{g['hash_equal']} equal, {g['within_tolerance']} within tolerance, {g['mismatch']} Mismatch, "
                f"{g['fraud']} Fraud; cheaters detected " + ", ".join(f"{c} {v}" for c, v in
                                                                       g["cheater_detection_rate"].items())
                + f"; noise passes for honest up to scale {fig['noise_breakpoint']['largest_scale_below_50pct']}")
    return str(fig)


def markdown(r: dict) -> list[str]:
    lines = [f"**{outcome(r)}**", "", "| seed 000 section 10 | result | figure |", "|---|---|---|"]
    lines += [f"| {c} | {MARK[ok]} | {fig} |" for c, ok, fig in criteria(r)]
    lines += ["", "| seed 000 section 9 metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics(r)]
    return lines + [""]
