"""Test Case v1's extension tests (seed 000, section 12) as presets of `consortium testcase`.

    audit-50       audits at 50% instead of 20%
    batch          a long prompt (several paragraphs) through the pipeline: activation bytes per row
                   on every hop of the star, prefill and decode throughput
    faulty-worker  one agent cheats (default: stage 1's, skip-layer; --faulty-stage/--fault choose):
                   it must be caught, proven (at least one signed fraud proof, every one holding
                   and naming the cheater), quarantined, its work rolled back, its stage failed
                   over, the tokens equal to the baseline, and no honest node accused
    grid-sweep     after the session, the honest and cheating stage outputs of calibration on the test
                   case's own model (the seed's prompt and one held-out calibration prompt), honest
                   pairs hashed at every grid size of `consortium calibrate`, cheaters judged with
                   the shipped tolerance

A preset only changes what its test is about; every other option keeps its meaning. Each preset's
figures land under report["extensions"][name], and the summary shows them.
"""
from __future__ import annotations

import sys
import time

from consortium.driver.proofs import recheck

NAMES = ("audit-50", "batch", "faulty-worker", "grid-sweep")
DEFAULT_FAULT = ("skip-layer", 1)     # (kind, stage): the Metal-role worker skips a layer


def batch_prompt() -> str:
    """Three of calibration's prose prompts as one message (about 400 tokens of prefill)."""
    from consortium.commands import calibrate

    return "\n\n".join(calibrate.PROMPTS[:3])


def check(names: list[str]) -> None:
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise ValueError(f"unknown extension {', '.join(bad)} (known: {', '.join(NAMES)})")


def apply(names: list[str], opts, *, prompt_given: bool, fault_given: bool, audit_given: bool) -> None:
    """Set the options each preset is about (in place), refusing a contradiction with an explicit flag."""
    check(names)
    if "audit-50" in names:
        if audit_given and opts.audit_probability != 0.5:
            raise ValueError("--extension audit-50 sets --audit-probability 0.5; drop one of them")
        opts.audit_probability = 0.5
    if "batch" in names:
        if prompt_given:
            raise ValueError("--extension batch brings its own long prompt; drop --prompt")
        opts.prompt = batch_prompt()
    if "faulty-worker" in names:
        if not fault_given:
            opts.fault, opts.faulty_stage = DEFAULT_FAULT
        # A cheater that is also killed could die before it is caught: the failure under test is
        # the cheating, so the kill is left out.
        opts.kill_stage = None


def add_figures(names: list[str], report: dict, opts, *, log=lambda m: print(m, file=sys.stderr)) -> None:
    """Each preset's figures into report["extensions"], and its pass/fail into report["success"]."""
    ext = report.setdefault("extensions", {})
    if "audit-50" in names:
        ext["audit-50"] = _audit_figures(report)
    if "batch" in names:
        ext["batch"] = _batch_figures(report)
    if "faulty-worker" in names:
        ext["faulty-worker"] = _faulty_figures(report)
    if "grid-sweep" in names:
        # The seed's prompt, not a --extension batch prompt: the sweep's cost grows with the rows.
        from consortium.standalone import PROMPT

        ext["grid-sweep"] = grid_sweep(opts.model, PROMPT, threads=opts.threads, log=log)
    for name, fig in ext.items():
        if fig.get("ok") is False:
            report["success"] = False


def _audit_figures(r: dict) -> dict:
    a = r["audits"]
    stages = len(r["split"].split(","))
    # Units that could have been audited: every position each stage committed to. A hidden stage
    # commits every row it computed (the prompt's and each token's but the last, which is sampled and
    # never fed back); the final stage one logit row per step.
    pt, n = r.get("prompt_tokens"), len(r["distributed"]["tokens"])
    units = (stages - 1) * (pt + n - 1) + n if pt else None
    ok = a["probability"] == 0.5 and a["total"] > 0 and a["mismatch"] == 0 and a["fraud"] == 0
    return {"probability": a["probability"], "audits": a["total"],
            "audited_share": round(a["total"] / units, 4) if units else None,
            "passed": a["passed"], "passed_within_tolerance": a["passed_within_tolerance"],
            "mismatch": a["mismatch"], "fraud": a["fraud"],
            "audit_over_generation": a.get("audit_over_generation"), "ok": ok}


def _batch_figures(r: dict) -> dict:
    d = r["distributed"]
    by_stage = ((r.get("rpc") or {}).get("Forward") or {}).get("by_stage") or {}
    steps = d.get("steps") or []
    prefill = steps[0] if steps else None
    prefill_ms = prefill["wall_ms"] if isinstance(prefill, dict) else (prefill[2] if prefill else None)
    prompt_tokens = r.get("prompt_tokens")
    hops = {}
    for s, v in sorted(by_stage.items(), key=lambda kv: int(kv[0])):
        hops[f"driver->stage{s}"] = v["bytes_in_per_row"]
        hops[f"stage{s}->driver"] = v["bytes_out_per_row"]
    ok = bool(by_stage) and bool(prompt_tokens) and r["exact_match"]
    return {"prompt_tokens": prompt_tokens, "generated_tokens": len(d["tokens"]),
            "prefill_ms": round(prefill_ms, 3) if prefill_ms is not None else None,
            "prefill_rows_per_s": round(prompt_tokens / (prefill_ms / 1000), 1) if prefill_ms and prompt_tokens else None,
            "decode_tokens_per_s": d.get("tokens_per_s"),
            "baseline_decode_tokens_per_s": r["baseline"]["tokens_per_s"],
            "bytes_per_row_per_hop": hops, "forward_by_stage": by_stage, "ok": ok}


def _faulty_figures(r: dict) -> dict:
    f = r.get("fault") or {}
    node = f.get("node")
    honest_units = [a for a in r["audits"].get("units", []) if a["node"] != node]
    faulty_units = [a for a in r["audits"].get("units", []) if a["node"] == node]
    fo = [e for e in (r["failover"].get("events") or []) if e.get("from") == node]
    # Each proof checked again from its JSON, as `consortium verify-proof` would; a Fraud the driver
    # could not prove has an entry without a proof.
    entries = r.get("fraud_proofs") or []
    checked = recheck([e for e in entries if e.get("proof")])
    out = {"node": node, "stage": f.get("stage"), "kind": f.get("kind"),
           "caught": bool(f.get("caught")), "quarantined": r.get("quarantined"),
           "quarantined_in_api": f.get("quarantined_in_api"),
           "faulty_verdicts": {v: sum(a["verdict"] == v for a in faulty_units)
                               for v in ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud")},
           "honest_verdicts_all_pass": all(a["verdict"] in ("Passed", "PassedWithinTolerance") for a in honest_units),
           "rollbacks": len(f.get("rollbacks") or []), "rewinds": r["distributed"].get("rewinds"),
           "failed_over_to": fo[0]["to"] if fo else None,
           "exact_match": r["exact_match"], "false_fraud": r["false_fraud"],
           "proofs": len(checked), "proofs_holding": sum(h for _, h, _ in checked),
           "proofs_naming_honest_nodes": sum(e["node"] != node for e, _, _ in checked),
           "frauds_unproven": len(entries) - len(checked)}
    out["ok"] = bool(out["caught"] and r.get("quarantined") == [node] and out["rollbacks"] and fo
                     and r["exact_match"] and r["false_fraud"] == 0 and out["honest_verdicts_all_pass"]
                     and out["quarantined_in_api"] is not False
                     and out["proofs"] > 0 and out["proofs_holding"] == out["proofs"]
                     and out["proofs_naming_honest_nodes"] == 0)
    return out


def grid_sweep(model: str | None, prompt: str, *, threads: int = 1, log=lambda m: None) -> dict:
    """`consortium calibrate`'s comparisons on the test case's model: honest pairs (llama.cpp with CPU
    weight repacking off, the numpy reference where the architecture has one) and the cheaters, on
    `prompt` and one held-out calibration prompt (the seed's prompt alone is ten-odd rows),
    each honest pair hashed at every grid of calibrate.GRIDS; and, at the session's grid with the
    shipped tolerance, how the honest rows are judged, how often each cheater is caught, and the
    noise scale below which a cheater passes for honest hardware (the tolerance's margin)."""
    from consortium.commands import calibrate
    from consortium.verification.verdicts import Tolerance
    from node_agent.faults import DEFAULT_NOISE_SCALES

    t0 = time.perf_counter()
    prompts = [("heldout", prompt), ("heldout", calibrate.PROMPTS[len(calibrate.PROMPTS) // 2])]
    rows, meta = calibrate.collect_model(model or "smollm2-135m", prompts, threads=threads, seed=0,
                                         noise_scales=DEFAULT_NOISE_SCALES, log=log)
    held = calibrate.evaluate(rows, Tolerance.load(), "heldout")
    h = held["honest"]
    detection = {c: round(v["detection_rate"], 4) for c, v in held["cheaters"].items()}
    sweep = [{"grid": g["grid"], "hash_match_rate": round(g["hash_match_rate"], 4), "comparisons": g["comparisons"],
              "by_pair": {k.split(" ", 1)[1]: round(v, 4) for k, v in g["by_pair"].items()}}
             for g in calibrate.sweep(rows)]
    brk = calibrate.noise_breakpoint(held["cheaters"])
    # The tolerance holds when no honest row is Fraud and every cheater that changes the computation
    # (not the sub-grid noise, which honest hardware also produces) is caught on almost every row.
    ok = h["fraud_verdicts"] == 0 and h["false_fraud"] == 0 and all(
        detection.get(c, 0.0) >= 0.9 for c in ("skip-layer", "cheap-quant", "replay", "random"))
    return {"model": meta["model"], "split": meta["split"], "honest_pairs": meta["honest_pairs"],
            "prompt_tokens": sum(meta["prompt_tokens"]), "grid_sweep": sweep,
            "at_session_grid": {"grid": 64, "honest_comparisons": h["comparisons"], "hash_equal": h["hash_equal"],
                                "within_tolerance": h["within_tolerance"], "mismatch": h["mismatch"],
                                "fraud": h["fraud_verdicts"], "false_fraud": h["false_fraud"],
                                "cheater_detection_rate": detection},
            "noise_breakpoint": {"largest_scale_below_50pct": brk["largest_scale_below_50pct"],
                                 "crossing_50pct": brk["crossing_50pct"] and round(brk["crossing_50pct"], 5)},
            "seconds": round(time.perf_counter() - t0, 1), "ok": ok}
