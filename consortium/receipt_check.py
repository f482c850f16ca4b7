"""A session's Receipts re-checked from the API alone, trusting neither the operator nor the driver.

For each Receipt the session owns: the Ed25519 signature over its window statement, under the key
its node publishes in its ComputeNode (the fingerprint the Receipt names must be that key's), and
the commitments against the signed Merkle root. Then the coverage: every position each stage was fed
must lie in a Receipt that verifies, among those that stand there. A rollback has the rows from its
position on computed and signed again: at a position, the Receipts with the most rollbacks
(`spec.rollbacks`) stand and the others are superseded; a Receipt superseded at every position it
covers is reported as such, its verdict apart (a cheater's rolled-back windows keep their Fraud).
Fraud proofs in the Receipts' status are re-checked against the proof key the session publishes.
And the answer itself: each token the session shows is compared with the token the final stage's
node signed for its logit row (Receipt spec.sampled), among the Receipts that verify and stand there.
`consortium verify-receipts` prints it; the Kubernetes test case and the chaos trials judge their
runs by it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json

from consortium import kube
from consortium import resources as r
from consortium.verification import receipts as rc
from consortium.verification import signing
from consortium.verification.canonical import CanonicalGrid

# Positions named per gap list in a result (the count is always whole).
GAPS_SHOWN = 10


def _positions(item: dict) -> range:
    w = item["spec"]["window"]
    return range(w["start"], w["start"] + w["count"])


def standing(items: list[dict]) -> dict[tuple[int, int], int]:
    """(stage, position) -> the most rollbacks among the Receipts covering it: those flushed after
    that many stand there. (A window an honest node computed again bit for bit after a rollback is
    the same Receipt, written once: the first one stands for both.)"""
    most: dict[tuple[int, int], int] = {}
    for it in items:
        n = int(it["spec"].get("rollbacks", 0))
        for p in _positions(it):
            k = (it["spec"]["stage"], p)
            most[k] = max(most.get(k, n), n)
    return most


def receipt_gaps(items: list[dict], prompt_len: int, n_tokens: int, n_stages: int,
                 stands: dict[tuple[int, int], int] | None = None) -> dict[int, list[int]]:
    """Positions of each stage that no Receipt window covers (empty lists: complete); given
    `stands` (standing() of all the session's Receipts), a window covers only where it stands.
    Every position fed is covered: the prompt and every token but the last, and for the last stage
    from the prompt's final row (where its first logits come from)."""
    last = prompt_len + n_tokens - 1
    gaps = {}
    for stage in range(n_stages):
        covered = set()
        for it in items:
            if it["spec"]["stage"] == stage:
                n = int(it["spec"].get("rollbacks", 0))
                covered |= {p for p in _positions(it) if stands is None or stands[(stage, p)] <= n}
        want = set(range(last)) if stage < n_stages - 1 else set(range(prompt_len - 1, last))
        gaps[stage] = sorted(want - covered)
    return gaps


def backed_tokens(items: list[dict], prompt_len: int, n_tokens: int, n_stages: int, at: int | None = None,
                  why: str | None = None) -> tuple[int, str | None]:
    """How many of a failed session's n_tokens its record keeps: those every stage's standing
    Receipts (`items`) back, before `at` (where a rollback or rewind still pending would have
    computed the session again, for `why`). Returns (tokens kept, why fewer, or None)."""
    gaps = receipt_gaps(items, prompt_len, n_tokens, n_stages, standing(items))
    unsigned = min((g[0] for g in gaps.values() if g), default=None)
    if unsigned is not None and (at is None or unsigned < at):
        # A node died before its rows' commitments came, with no backup left to replay and sign them.
        at, why = unsigned, (f"no Receipt covers position {unsigned} on every stage: a node died before its "
                             f"commitments came, and no backup was left to sign the rows again")
    if at is None:
        return n_tokens, None
    keep = min(n_tokens, max(0, at - prompt_len + 1))
    return keep, (why if keep < n_tokens else None)


def token_signatures(items: list[dict], tokens: list[int], prompt_len: int, final_stage: int,
                     stands: dict[tuple[int, int], int]) -> dict:
    """The session's tokens against the final stage's signed ones (`items`: Receipts that verify).
    Token i comes from the logit row at position prompt_len - 1 + i. Signed: a standing Receipt signs
    that token there; contradicted: the ones standing there sign another; unsigned: none signs one
    (a row its node died before signing, which a backup's replay signs without sampling)."""
    signed: dict[int, set[int]] = {}
    for it in items:
        spec = it["spec"]
        if spec["stage"] != final_stage or not spec.get("sampled"):
            continue
        n = int(spec.get("rollbacks", 0))
        for t in spec["sampled"]["tokens"]:
            p = int(t["position"])
            if p in _positions(it) and stands.get((final_stage, p), 0) <= n:
                signed.setdefault(p, set()).add(int(t["token"]))
    out = {"signed": 0, "unsigned": [], "contradicted": []}
    for i, shown in enumerate(tokens):
        there = signed.get(prompt_len - 1 + i)
        if not there:
            out["unsigned"].append(i)
        elif there == {int(shown)}:
            out["signed"] += 1
        else:
            out["contradicted"].append({"token": i, "shown": int(shown), "signed": sorted(there)})
    return out


def signature_problems(item: dict, session_name: str, session_uid: str, nodes: dict[str, dict]) -> list[str]:
    """Why one Receipt object does not verify under its node's published key (empty: it does)."""
    spec = item["spec"]
    if spec.get("session") != session_name:
        return [f"names session {spec.get('session')!r}"]
    # What the agents signed: the session's id with its uid (namespace/name in states saved before).
    ns = item["metadata"]["namespace"]
    signed_sessions = [r.session_id(ns, session_name, session_uid), r.session_id(ns, session_name)]
    node = nodes.get(spec["node"])
    if node is None:
        return [f"no ComputeNode {spec['node']!r} to take its public key from"]
    try:
        key = base64.b64decode(node["spec"]["publicKey"], validate=True)
    except (KeyError, binascii.Error) as e:
        return [f"ComputeNode {spec['node']!r} publishes no usable key ({e})"]
    published = hashlib.sha256(key).hexdigest()
    if published != spec.get("publicKeyFingerprint"):
        return [f"signed with key {str(spec.get('publicKeyFingerprint'))[:16]}, but {spec['node']} now "
                f"publishes {published[:16]}"]
    # Receipts written before they carried the signing id: the two ids an agent signs with.
    ids = [spec["nodeId"]] if spec.get("nodeId") else [signing.node_id_for(key), spec["node"]]
    try:
        w = spec["window"]
        commitments = tuple(bytes.fromhex(c) for c in spec["commitments"])
        sampled = None if spec.get("sampled") is None else rc.SampledTokens.from_json(spec["sampled"])
        statements = [rc.WindowStatement(sid, int(spec["stage"]), node_id, int(spec["epoch"]),
                                         int(w["start"]), int(w["count"]), bytes.fromhex(spec["merkleRoot"]),
                                         bytes.fromhex(spec["inputDigest"]), CanonicalGrid.from_json(spec["grid"]),
                                         sampled)
                      for sid in signed_sessions for node_id in ids]
        signature = base64.b64decode(spec["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        return [f"unreadable: {type(e).__name__}: {e}"]
    reasons: list[str] = []
    for st in statements:
        ok, reasons = rc.verify_receipt(rc.Receipt(st, commitments, signature), key)
        if ok:
            return []
    return reasons


def _proof_problems(item: dict, proof_key: str | None) -> tuple[int, list[str]]:
    from consortium.driver.proofs import recheck

    texts = (item.get("status") or {}).get("fraudProofs") or []
    entries = []
    for t in texts:
        try:
            entries.append({"proof": json.loads(t)})
        except ValueError as e:
            entries.append({"proof": None, "reasons": [f"not JSON: {e}"]})
    failed = [f"a fraud proof does not hold: {'; '.join(why)}" for _, holds, why in recheck(entries, proof_key)
              if not holds]
    return len(texts), failed


def _spans(positions: set[int]) -> str:
    """1,2,3,7 -> '1-3, 7'."""
    out, run = [], []
    for p in sorted(positions):
        if run and p != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(p)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "none"


def check(session: dict, receipts: list[dict], nodes: list[dict]) -> dict:
    """The check of one session (an InferenceSession object) against the Receipt and ComputeNode
    objects read from the API. `ok`: every Receipt it owns verifies, every fraud proof holds, and,
    once the session has ended (Completed or Failed), every position of every stage is covered."""
    md, st = session["metadata"], session.get("status") or {}
    drv = (st.get("report") or {}).get("driverState") or {}
    by_name = {n["metadata"]["name"]: n for n in nodes}
    owned = [it for it in receipts if kube.owned_by(it, md["uid"])]
    stages = len(drv.get("nodes") or []) or 1 + max((it["spec"]["stage"] for it in owned), default=-1)
    prompt_len, n_tokens = len(drv.get("prompt_tokens") or []), len(st.get("tokens") or [])
    failed, verified, proofs, proofs_failed = [], [], 0, []
    for it in sorted(owned, key=lambda it: (it["spec"]["stage"], it["spec"]["window"]["start"], it["spec"]["epoch"])):
        why = signature_problems(it, md["name"], md["uid"], by_name)
        if why:
            failed.append({"receipt": it["metadata"]["name"], "node": it["spec"].get("node"), "reasons": why})
        else:
            verified.append(it)
        n, bad = _proof_problems(it, st.get("proofKey"))
        proofs += n
        proofs_failed += [{"receipt": it["metadata"]["name"], "reason": b} for b in bad]
    # A running session may hold rows no window has closed over yet: coverage is judged once it has
    # ended. A failed one keeps only the tokens its Receipts back (the operator drops the rest).
    final = st.get("phase") in ("Completed", "Failed")
    stands = standing(owned)
    # Positions that led to a token shown: none before the first (a session that failed in its prompt).
    gaps = (receipt_gaps(verified, prompt_len, n_tokens, stages, stands) if prompt_len and n_tokens
            else {s: [] for s in range(stages)})
    per_stage = []
    for s in range(stages):
        mine = [it for it in owned if it["spec"]["stage"] == s]
        good = [it for it in verified if it["spec"]["stage"] == s]
        covered = {p for it in good for p in _positions(it)}
        superseded = [it for it in mine
                      if all(stands[(s, p)] > int(it["spec"].get("rollbacks", 0)) for p in _positions(it))]
        verdicts: dict[str, int] = {}
        for it in mine:
            v = (it.get("status") or {}).get("verdict") or "Pending"
            v += " (superseded)" if any(it is x for x in superseded) else ""
            verdicts[v] = verdicts.get(v, 0) + 1
        per_stage.append({"stage": s, "receipts": len(mine), "verified": len(good), "superseded": len(superseded),
                          "nodes": sorted({it["spec"]["node"] for it in mine}),
                          "epochs": sorted({int(it["spec"]["epoch"]) for it in mine}),
                          "positions": _spans(covered), "gaps": len(gaps[s]), "verdicts": verdicts})
    complete = not any(gaps.values())
    answer = token_signatures(verified, [int(t) for t in st.get("tokens") or []], prompt_len, stages - 1, stands)
    return {"session": md["name"], "namespace": md.get("namespace"), "uid": md["uid"], "phase": st.get("phase"),
            "prompt_tokens": prompt_len, "tokens": n_tokens, "stages": stages,
            "receipts": len(owned), "not_owned": len(receipts) - len(owned), "verified": len(verified),
            "failed": failed, "complete": complete,
            "gaps": {s: g[:GAPS_SHOWN] for s, g in gaps.items() if g},
            "per_stage": per_stage, "fraud_proofs": proofs, "fraud_proofs_failed": proofs_failed,
            "tokens_signed": answer["signed"], "tokens_unsigned": answer["unsigned"][:GAPS_SHOWN],
            "tokens_unsigned_count": len(answer["unsigned"]), "tokens_contradicted": answer["contradicted"][:GAPS_SHOWN],
            "ok": bool(owned) and not failed and not proofs_failed and not answer["contradicted"]
                  and (complete or not final)}


def lines(res: dict) -> list[str]:
    """The check as a reader wants it: a table per stage, then every problem, then the outcome."""
    out = [f"session {res['namespace']}/{res['session']} ({res['phase']}): {res['tokens']} tokens after a "
           f"{res['prompt_tokens']}-token prompt, {res['stages']} stages, {res['receipts']} receipts",
           "", f"{'STAGE':<6}{'RECEIPTS':<10}{'VERIFIED':<10}{'SUPERSEDED':<12}{'NODES (EPOCHS)':<24}"
               f"{'POSITIONS COVERED':<22}VERDICTS"]
    for p in res["per_stage"]:
        nodes = f"{','.join(p['nodes'])} ({','.join(map(str, p['epochs']))})"
        verdicts = ", ".join(f"{v} {n}" for v, n in sorted(p["verdicts"].items())) or "-"
        out.append(f"{p['stage']:<6}{p['receipts']:<10}{p['verified']:<10}{p.get('superseded', 0):<12}{nodes:<24}"
                   f"{p['positions']:<22}{verdicts}")
    out.append("")
    for f in res["failed"]:
        out.append(f"DOES NOT VERIFY: {f['receipt']} ({f['node']}): {'; '.join(f['reasons'])}")
    for s, g in res["gaps"].items():
        more = sum(p["gaps"] for p in res["per_stage"] if p["stage"] == s) - len(g)
        out.append(f"NOT COVERED: stage {s} positions {', '.join(map(str, g))}" + (f" and {more} more" if more > 0 else ""))
    for f in res["fraud_proofs_failed"]:
        out.append(f"PROOF: {f['receipt']}: {f['reason']}")
    for c in res.get("tokens_contradicted") or []:
        out.append(f"TOKEN {c['token']}: the session shows {c['shown']}, the final stage signed "
                   f"{', '.join(map(str, c['signed']))} for its row")
    if res.get("tokens"):
        line = (f"tokens the final stage's node signed as sampled from its committed rows: "
                f"{res.get('tokens_signed', 0)} of {res['tokens']}")
        unsigned, named = res.get("tokens_unsigned_count", 0), res.get("tokens_unsigned") or []
        if unsigned:
            more = f" and {unsigned - len(named)} more" if unsigned > len(named) else ""
            line += f" (unsigned: {', '.join(map(str, named))}{more}; rows a backup replayed, or sampled by the driver)"
        out.append(line)
    if res["not_owned"]:
        out.append(f"({res['not_owned']} receipts labeled with this session belong to a deleted namesake: not counted)")
    if res["fraud_proofs"]:
        out.append(f"fraud proofs in the receipts' status: {res['fraud_proofs'] - len(res['fraud_proofs_failed'])} "
                   f"of {res['fraud_proofs']} hold")
    if res["ok"]:
        tail = ("every position of every stage is covered" if res["complete"] else
                f"coverage not judged while the session is {res['phase'] or 'starting'}")
        out.append(f"OK: all {res['verified']} receipts verify under their nodes' published keys; {tail}")
    elif not res["receipts"]:
        out.append("FAIL: the session owns no receipts")
    else:
        out.append("FAIL")
    return out
