"""Test Case v1 without Kubernetes: three node agents as processes on loopback, a single-node
baseline, the distributed session with audits, a SIGKILL of one agent mid-generation, and a report.

Roles follow the seed: N0 (cuda role, coordinator, verifier, backup) serves the last stage, N1 (cuda
role) the first, N2 (metal role) the middle one. The backend each agent reports is what llama.cpp
detected; the role is a label, and the report shows both.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from consortium import processes
from consortium.driver.state import audit_records

NODES = ("N0", "N1", "N2")
ROLES = {"N0": "cuda", "N1": "cuda", "N2": "metal"}
PLACEMENT = ["N1", "N2", "N0"]      # stage -> node
PROMPT = "Explain in one paragraph why the sky appears blue."


@dataclasses.dataclass
class Options:
    model: str | None = None
    max_tokens: int = 64
    kill_stage: int | None = 1
    kill_at: int = 20
    audit_probability: float = 0.2
    audit_seed: int = 7
    faulty_stage: int | None = None
    fault: str | None = None
    heterogeneous: bool = False
    threads: int = 1
    prompt: str = PROMPT
    json_out: str | None = None
    report_dir: str | None = None
    logs_dir: str | None = None      # where the agents' logs go (default: report_dir/agents; none: not kept)
    rpc_timeout_s: float = 30.0
    hang: bool = False   # SIGSTOP instead of SIGKILL: the agent keeps its socket and never answers
    plaintext: bool = False  # gRPC without TLS; by default a CA made for the run issues mutual-TLS certificates
    tls_issuer: str = "admin"   # through Kubernetes: "operator" has the agents ask the operator for their certificates
    defer_commitments: bool = True   # agents commit and sign after answering (False: before, in the response)
    audit_replay_rows: int = 0   # audits' decode steps: 0 merged where the verifier checked, 1 as run, N merged up to N
    audit_from_state: bool = False   # audit decode windows from the nodes' signed window states
    state_window: int | None = None   # positions per state window with audit_from_state (None: the driver's default)
    sign_per_window: bool = False   # deferred commitments committed and signed once per receipt window
    lying_verifier: str | None = None   # this node's audits lie (node-agent --audit-fault `lie`)
    lie: str = "random"   # random rows: Fraud verdicts; noise-0.1: Mismatch verdicts
    backups: tuple[str, ...] | None = None   # the nodes that may take a stage over (None: any)


class Agents:
    """The three node-agent processes."""

    def __init__(self, workdir: Path, opts: Options, faulty_node: str | None,
                 netns: dict[str, tuple[str, str]] | None = None):
        """netns: node -> (network namespace, address there): that agent runs inside the namespace."""
        from node_agent.identity import NodeIdentity

        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.hung: set[str] = set()
        self.endpoints: dict[str, str] = {}
        self.driver_tls = None   # the driver's client credentials; None: plaintext
        # The keys are made here, as an admin registers a node's key, so signatures verify under them.
        self.public_keys = {n: NodeIdentity.load_or_create(workdir / "keys" / f"{n}.pem", n).public_key_text
                            for n in NODES}
        agent_tls = {n: ["--plaintext"] for n in NODES}
        if not opts.plaintext:
            from consortium import tls

            files, self.driver_tls = tls.local_pki(workdir / "tls", list(NODES))
            agent_tls = {n: ["--tls-cert", f["cert"], "--tls-key", f["key"], "--tls-ca", f["ca"]] for n, f in files.items()}
        where = {n: (netns or {}).get(n, (None, "127.0.0.1")) for n in NODES}
        for n in NODES:
            port_file = workdir / f"{n}.port"
            ns, host = where[n]
            cmd = ["ip", "netns", "exec", ns] if ns else []
            cmd += [sys.executable, "-m", "node_agent.main", "--listen", f"{host}:0", "--port-file", str(port_file),
                    "--key-file", str(workdir / "keys" / f"{n}.pem"), "--node-id", n, *agent_tls[n],
                   "--labels", f"consortium.io/node={n},consortium.io/role={ROLES[n]}", "--threads", str(opts.threads)]
            if opts.heterogeneous and ROLES[n] == "metal":
                cmd.append("--no-repack")
            if n == faulty_node:
                cmd += ["--fault", opts.fault]
            if n == opts.lying_verifier:
                cmd += ["--audit-fault", opts.lie]
            with open(workdir / f"{n}.log", "wb") as log:   # the child keeps its own descriptor
                self.procs[n] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_serving(where)
        except BaseException:
            self.close()   # the ones that did start are not left behind
            raise

    def _wait_serving(self, where: dict[str, tuple[str | None, str]]) -> None:
        deadline = time.monotonic() + 120
        for n in NODES:
            pf = self.workdir / f"{n}.port"
            while not pf.is_file():
                if self.procs[n].poll() is not None:
                    raise RuntimeError(f"node agent {n} exited: {(self.workdir / f'{n}.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node agent {n} did not start")
                time.sleep(0.05)  # waiting for a process to bind its port, not for compute
            self.endpoints[n] = f"{where[n][1]}:{int(pf.read_text())}"

    def kill(self, node: str) -> None:
        self.procs[node].send_signal(signal.SIGKILL)
        self.procs[node].wait()

    def hang(self, node: str) -> None:
        self.procs[node].send_signal(signal.SIGSTOP)
        self.hung.add(node)

    def close(self) -> None:
        processes.stop(self.procs.values(), kill=[self.procs[n] for n in self.hung])


class _Recording:
    """Wraps a pipeline to keep each step's top-2 logit margin (for the first divergence)."""

    def __init__(self, pipe):
        self.pipe, self.n_stages, self.margins = pipe, pipe.n_stages, []

    def forward(self, seq, position, tokens):
        from consortium.sampling import top2_margin

        row = self.pipe.forward(seq, position, tokens)
        self.margins.append(top2_margin(row))
        return row

    def stage_ms(self):
        return self.pipe.stage_ms()

    def context_positions(self):
        return self.pipe.context_positions()


def run(opts: Options) -> dict:
    import consortium.cache
    from consortium import generation
    from consortium.driver.policy import LocalPolicy, NoCandidate
    from consortium.driver.session import SessionDriver
    from consortium.driver.state import SessionState
    from consortium.layers import even_split, format_split
    from consortium.models import resolve_model
    from consortium.tokenizer import Tokenizer
    from consortium.verification import judgement
    from consortium.wire import pb
    from node_agent.engine import llama as ll
    from node_agent.engine.pipeline import LocalPipeline
    from node_agent.engine.slicing import read_model_info, sha256_file
    from node_agent.engine.stage import StageConfig
    from node_agent.identity import NodeIdentity

    model = resolve_model(opts.model or ("gemma3-270m" if opts.heterogeneous else None))
    info = read_model_info(model)
    split = even_split(info.n_layers, 3)
    tok = Tokenizer(model)
    prompt_ids = tok.prompt_tokens(opts.prompt)
    max_tokens = opts.max_tokens

    # Baseline first, alone on the machine.
    with LocalPipeline(model, None, StageConfig(threads=opts.threads)) as pipe:
        rec = _Recording(pipe)
        base = generation.generate(rec, prompt_ids, max_tokens, detokenize=tok.decode)
    faulty_node = PLACEMENT[opts.faulty_stage] if opts.faulty_stage is not None and opts.fault else None
    kill_node = PLACEMENT[opts.kill_stage] if opts.kill_stage is not None else None

    workdir = Path(tempfile.mkdtemp(prefix="consortium-testcase-"))
    agents = Agents(workdir, opts, faulty_node)
    # The coordinator's own key signs the fraud proofs (consortium.driver.proofs says what they claim).
    coordinator = NodeIdentity.load_or_create(workdir / "keys" / "coordinator.pem", "coordinator")
    driver = None
    failed, closed = True, False
    try:
        state = SessionState(session="sky-is-blue", prompt_tokens=prompt_ids, nodes=list(PLACEMENT),
                             epochs=[1, 1, 1], audit_probability=opts.audit_probability, audit_seed=opts.audit_seed)
        driver = SessionDriver(session=state.session, model_path=str(model), split=split, n_layers=info.n_layers,
                               model_sha256=sha256_file(model, consortium.cache.cache_dir()), endpoints=agents.endpoints, state=state, policy=LocalPolicy(["N0", "N1", "N2"], opts.backups),
                               rpc_timeout_s=opts.rpc_timeout_s, tls=agents.driver_tls,
                               registered_keys=agents.public_keys, defer_commitments=opts.defer_commitments,
                               sign_per_window=opts.sign_per_window,
                               proof_key=coordinator.private_key, proof_signer=coordinator.node_id,
                               audit_replay_rows=opts.audit_replay_rows, audit_from_state=opts.audit_from_state,
                               state_window=opts.state_window)
        health = {n: driver.clients[n].call("Health", pb.HealthRequest())
                  for n in NODES}
        driver.start()
        killed = {}
        # The kill lands inside the step that produces token kill_at, just before the stage's hop.
        kill_position = 0 if opts.kill_at <= 0 else len(prompt_ids) + opts.kill_at - 1

        def on_stage(s, position):
            if kill_node and not killed and s == opts.kill_stage and position == kill_position:
                (agents.hang if opts.hang else agents.kill)(kill_node)
                killed.update(node=kill_node, position=position, time=time.time(),
                              how="SIGSTOP" if opts.hang else "SIGKILL")

        driver.on_stage = on_stage
        t0 = time.perf_counter()
        shown: list[int] = []
        try:
            dist = generation.generate(driver, prompt_ids, max_tokens, detokenize=tok.decode,
                                       on_token=lambda ts: shown.__setitem__(slice(None), ts))
            failure = None
        except NoCandidate as e:   # a stage lost with no node left: the run keeps its record, as through Kubernetes
            dist, failure = None, {"reason": "StageLost", "message": str(e)}
        wall_s = time.perf_counter() - t0
        counters = driver.counters()
        # Closed before the report: its last windows (still open at the end) are flushed as receipts
        # then, and proofs waiting for them made.
        driver.close()
        closed = True
        if failure is not None:
            dist, failure["message"] = _kept(driver, prompt_ids, shown, tok, failure["message"])
        rpc = driver.rpc.summary()
        report = _report(opts, model, info, split, prompt_ids, base, rec.margins, dist, wall_s, driver, health,
                         killed, kill_node, faulty_node, counters, rpc, format_split(split), ll, judgement)
        report["failure"] = failure
        report["phase"] = "Failed" if failure else "Completed"
        report["success"] = report["success"] and failure is None
        failed = False
    finally:
        if driver is not None and not closed:
            driver.close()
        agents.close()
        tok.close()
        logs_dir = opts.logs_dir or (str(Path(opts.report_dir) / "agents") if opts.report_dir else None)
        agent_logs = settle_workdir(workdir, logs_dir, keep=failed or not report["success"])
    report["agent_logs"] = agent_logs
    write(report, opts.json_out, opts.report_dir)
    return report


def _kept(driver, prompt_ids: list[int], shown: list[int], tok, message: str):
    """What a run that could not go on keeps (as the operator keeps of a Failed session): the tokens
    shown that every stage's verified receipts back and no rollback still pending puts in doubt, as
    a GenerationResult without timings, and the failure's message saying what was dropped."""
    from consortium import receipt_check
    from consortium.generation import GenerationResult

    at, why = driver.abandon()
    items = _receipt_items(driver.receipts)
    keep, why = receipt_check.backed_tokens(items, len(prompt_ids), len(shown), len(driver.state.nodes), at, why)
    if keep < len(shown):
        message += f"; {keep} of the {len(shown)} tokens generated are kept ({why})"
    tokens = list(shown[:keep])
    return GenerationResult(list(prompt_ids), tokens, tok.decode(tokens), 0.0, [], [], "failed"), message


def settle_workdir(workdir: Path, logs_dir: str | None, keep: bool) -> str | None:
    """The logs of a test case's processes go to logs_dir (if any), and their folder (logs, keys,
    TLS material) is removed, unless `keep` (the run failed): then it stays, and stderr says where.
    Returns where the logs are, if anywhere."""
    logs = None
    if logs_dir:
        dest = Path(logs_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for f in workdir.glob("*.log"):
            shutil.copyfile(f, dest / f.name)
        logs = str(dest)
    if keep:
        print(f"agent logs, keys and certificates kept in {workdir}", file=sys.stderr)
        return str(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return logs


def write(report: dict, json_out: str | None, report_dir: str | None) -> None:
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    if report_dir:
        write_report_dir(report, Path(report_dir))


def _report(opts, model, info, split, prompt_ids, base, margins, dist, wall_s, driver, health, killed, kill_node,
            faulty_node, counters, rpc, split_text, ll, judgement):
    st = driver.state
    audits = st.audits
    count = {v: sum(a["verdict"] == v for a in audits) for v in ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud")}
    honest = [n for n in NODES if n not in (faulty_node, opts.lying_verifier)]
    records = list(driver.records.values())
    false_fraud = judgement.false_fraud(records, honest, driver.honest_rate, driver.alpha, st.quarantined)
    diverge = next((i for i, (a, b) in enumerate(zip(base.tokens, dist.tokens)) if a != b), None)
    if diverge is None and len(base.tokens) != len(dist.tokens):
        diverge = min(len(base.tokens), len(dist.tokens))
    agree = sum(a == b for a, b in zip(base.tokens, dist.tokens)) / max(1, len(base.tokens))

    # Session restarts from the agents' own counters: a restart recomputes position 0 on every stage
    # by a forward step (a replay on a backup is a rebuild, not a restart; rollbacks to 0 are counted).
    pos0 = []
    per_stage = []
    for s in range(len(split)):
        fwd = {}
        rep = 0
        for n, rows in counters.items():
            for stage, p, f, r in rows:
                if stage == s:
                    fwd[p] = fwd.get(p, 0) + f
                    rep += r
        pos0.append(fwd.get(0, 0))
        per_stage.append({"stage": s, "positions": len(fwd), "forward_rows": sum(fwd.values()),
                          "positions_computed_more_than_once": sum(1 for v in fwd.values() if v > 1),
                          "replayed_rows": rep})
    rollbacks_to_0 = sum(1 for r in st.rollbacks if r["to_position"] == 0)
    session_restarts = max(0, min(pos0) - 1 - rollbacks_to_0) if pos0 else 0

    steps = driver.steps
    fo_steps = [i for i, s in enumerate(steps) if s.failover]
    normal = [s.wall_ms for s in steps[1:] if not s.failover] or [0.0]
    fo = next((f for f in st.failovers if kill_node and f["from"] == kill_node), None)
    spike = (max(steps[i].wall_ms for i in fo_steps) - statistics.median(normal)) if fo_steps else None
    failover = {"injected": bool(killed), "stage": opts.kill_stage if killed else None,
                "at_token": opts.kill_at if killed else None, "killed_node": killed.get("node"),
                "how": killed.get("how"),
                "completed": bool(killed) and fo is not None and len(dist.tokens) > 0,
                "spike_ms": round(spike, 3) if spike is not None else None,
                "failover_ms": fo["ms"] if fo else None, "replayed_rows": fo["replayed_rows"] if fo else None,
                "backup_node": fo["to"] if fo else None,
                "backup_had_layers": fo.get("backup_had_layers") if fo else None,
                "prepared": list(driver.prepared), "events": st.failovers}
    nodes = {}
    for n, h in health.items():
        nodes[n] = {"node_id": h.node_id, "role": ROLES[n], "backend": h.backend,
                    "shown": h.backend if h.backend == ROLES[n] else f"{h.backend} (labeled {ROLES[n]})",
                    "labels": dict(h.labels), "fault": h.fault or None, "audit_fault": h.audit_fault or None,
                    "repack": not (opts.heterogeneous and ROLES[n] == "metal")}
    exact = base.tokens == dist.tokens
    fault_caught = None
    if faulty_node:
        fault_caught = faulty_node in st.quarantined
    liar = None
    if opts.lying_verifier:
        liar = {**liar_figures(opts.lying_verifier, opts.lie, st.to_json()), "second_opinions": driver.second_opinions}
    # Same kernels everywhere: every honest audit must pass. Heterogeneous: an honest Mismatch now and
    # then is what calibration measured (a few percent per stage); the binomial test (false_fraud)
    # decides whether there are too many.
    honest_verdicts_ok = all(a["verdict"] in ("Passed", "PassedWithinTolerance") or
                             (opts.heterogeneous and a["verdict"] == "Mismatch") for a in audits if a["node"] in honest)
    report = {
        "model": {"path_name": Path(str(model)).name, "architecture": info.architecture, "layers": info.n_layers,
                  "file_type": info.file_type},
        "llama_cpp": {k: ll.build_info().get(k) for k in ("llama_cpp_python", "ggml_version", "commit")},
        "split": split_text, "placement": {f"stage{s}": n for s, n in enumerate(PLACEMENT)}, "nodes": nodes,
        "prompt": opts.prompt, "prompt_tokens": len(prompt_ids), "max_tokens": opts.max_tokens,
        "threads_per_agent": opts.threads, "heterogeneous": opts.heterogeneous,
        "transport": "plaintext" if opts.plaintext else "mutual TLS",
        "signing": "PerWindow" if driver.sign_per_window else "PerStep", "receipt_window": driver.receipt_window,
        "baseline": {"tokens": base.tokens, "text": base.text, "tokens_per_s": round(base.tokens_per_s, 3),
                     "token_ms": [round(x, 3) for x in base.token_ms]},
        "distributed": {"tokens": dist.tokens, "text": dist.text, "tokens_per_s": round(dist.tokens_per_s, 3),
                        "per_stage_ms": [round(x, 3) for x in dist.per_stage_mean_ms()], "wall_s": round(wall_s, 3),
                        "rewinds": dist.rewinds,
                        "steps": [{"position": s.position, "rows": s.rows, "wall_ms": round(s.wall_ms, 3),
                                   "stage_ms": [round(x, 3) for x in s.stage_ms], "failover": s.failover,
                                   "agent_ms": [round(x, 3) for x in s.agent_ms]}
                                  for s in steps]},
        "speed_ratio": round(dist.tokens_per_s / base.tokens_per_s, 4) if base.tokens_per_s else None,
        "exact_match": exact,
        "token_agreement": round(agree, 4),
        "first_divergence": diverge,
        "top2_margin_at_divergence": round(margins[diverge], 5) if diverge is not None and diverge < len(margins) else None,
        "audits": {"total": len(audits), "passed": count["Passed"], "passed_within_tolerance": count["PassedWithinTolerance"],
                   "mismatch": count["Mismatch"], "fraud": count["Fraud"], "probability": opts.audit_probability,
                   "seed": opts.audit_seed, "audit_cpu_ms": round(driver.audit_cpu_ms, 3),
                   "generation_cpu_ms": round(driver.forward_cpu_ms, 3),
                   # rows the verifiers replayed in batches they merged from decode steps, and the CPU
                   # time of their one-time checks of the sizes they may merge into (not in audit_cpu_ms)
                   "merged_rows": driver.audit_merged_rows,
                   "merge_check_cpu_ms": round(driver.audit_check_cpu_ms, 3),
                   "audit_over_generation": (round(driver.audit_cpu_ms / driver.forward_cpu_ms, 4)
                                             if driver.forward_cpu_ms else None),
                   # with --audit-from-state: windows audited from the nodes' states, how many of them
                   # the verifier wrote other keys and values for, and units replayed in full instead
                   "from_state": ({**driver.state_audits, "state_window": driver.state_window}
                                  if opts.audit_from_state else None),
                   # units selected; those that got no verdict (an audit that failed for a reason other
                   # than its verifier dying), with the reasons; those a rollback cut before their audit
                   # (their positions were computed again and selected anew): selected = total +
                   # unjudged + superseded
                   "selected": driver.audits_selected,
                   "superseded": driver.audits_superseded,
                   "unjudged": len(driver.unjudged),
                   "unjudged_reasons": sorted({u["reason"] for u in driver.unjudged}),
                   # accusing verdicts (Mismatch, Fraud) audited again on another node before they
                   # counted, and those overruled (or dropped once their verifier was caught)
                   "second_opinions": driver.second_opinions, "overruled": st.overruled,
                   "units": audits},
        "hash_equal_rate": round(sum(a["hash_equal"] for a in audits) / len(audits), 4) if audits else None,
        "false_fraud": false_fraud,
        "node_records": {r.node_id: dataclasses.asdict(r) for r in records},
        "quarantined": list(st.quarantined),
        "fraud_proofs": driver.proofs.report(),
        "coordinator_public_key": driver.proofs.public_key_text,
        "fault": {"node": faulty_node, "stage": opts.faulty_stage, "kind": opts.fault, "caught": fault_caught,
                  "rollbacks": st.rollbacks} if faulty_node else None,
        "lying_verifier": liar,
        "failover": failover,
        "session_restarts": session_restarts,
        "counters": per_stage,
        "receipts": {"count": len(driver.receipts), "verified": sum(r["verified"] for r in driver.receipts),
                     "short_windows": sum(r["count"] < 16 for r in driver.receipts),
                     "bytes_json": sum(r["bytes"] for r in driver.receipts),
                     "tokens": signed_tokens(driver.receipts, dist.tokens, len(prompt_ids), len(split) - 1)},
        "rpc": rpc,
        "state": st.to_json(),
    }
    report["success"] = bool(
        (exact or opts.heterogeneous) and false_fraud == 0 and session_restarts == 0 and len(dist.tokens) > 0
        and honest_verdicts_ok and (failover["completed"] or not kill_node)
        and (fault_caught is not False) and (liar is None or liar["caught"] or not liar["accusations"])
        and all(r["verified"] for r in driver.receipts) and not report["receipts"]["tokens"]["contradicted"])
    return report


def signed_tokens(entries: list[dict], tokens: list[int], prompt_len: int, final_stage: int) -> dict:
    """receipt_check.token_signatures over the driver's receipts: the answer against the tokens the
    final stage signed (signed, unsigned token indices, contradicted)."""
    from consortium import receipt_check

    items = _receipt_items(entries)
    return receipt_check.token_signatures(items, tokens, prompt_len, final_stage, receipt_check.standing(items))


def _receipt_items(entries: list[dict]) -> list[dict]:
    """The driver's verified receipts in the shape receipt_check reads Receipt objects in."""
    return [{"spec": {"stage": e["stage"], "window": {"start": e["start"], "count": e["count"]},
                      "rollbacks": e["rollbacks"], "sampled": e["receipt"].get("sampled")}}
            for e in entries if e["verified"]]


def liar_figures(node: str, lie: str, state: dict) -> dict:
    """What a lying verifier did in a session (its driver state as JSON): its accusing verdicts (those
    overruled by a second verifier, dropped once it was caught, or left standing), and whether it
    was caught. One that was gone before it accused anyone had nothing to be caught for."""
    mine = [o for o in state.get("overruled", []) if o["verifier"] == node]
    standing = sum(a["verifier"] == node and a["verdict"] in ("Mismatch", "Fraud") for a in audit_records(state))
    overruled = sum(o["overruled_by"] is not None for o in mine)
    return {"node": node, "lie": lie, "caught": node in state.get("quarantined", []),
            "accusations": len(mine) + standing, "overruled_verdicts": overruled,
            "dropped_verdicts": len(mine) - overruled, "standing_accusations": standing}


def plot_latency(steps: list[dict], path: Path, outcome: str | None = None, ok: bool | None = None) -> None:
    """Per-token latency, per stage where the steps have stage_ms, with failovers marked; `outcome`
    (the verdict in words) heads the plot, green when `ok` (by default: when it says PASS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = list(range(len(steps)))
    for s in range(len(steps[0].get("stage_ms") or []) if steps else 0):
        ax.plot(xs, [st["stage_ms"][s] for st in steps], marker=".", label=f"stage {s}")
    ax.plot(xs, [st["wall_ms"] for st in steps], color="black", alpha=0.4, label="step (all stages)")
    for i, st in enumerate(steps):
        if st["failover"]:
            ax.axvline(i, color="red", linestyle="--", label="failover")
            ax.annotate(f"{st['wall_ms']:.0f} ms", (i, st["wall_ms"]), textcoords="offset points", xytext=(4, 4),
                        color="red")
    ax.set_yscale("log")
    ax.set_xlabel("step (0 = prompt)")
    ax.set_ylabel("ms")
    ax.set_title("per-token latency per stage" if steps and steps[0].get("stage_ms") else "per-token latency")
    if outcome:
        good = outcome.startswith("PASS") if ok is None else ok
        fig.suptitle(outcome, color="green" if good else "red", fontsize=11)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report_dir(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from consortium import testreport
    from consortium.driver.proofs import write_proof_files

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_latency(report["distributed"]["steps"], out / "latency.png", testreport.outcome(report))
    write_proof_files(report.get("fraud_proofs") or [], out / "proofs")
    r = report
    a = r["audits"]
    lines = [
        "# Test Case v1, standalone", "", *testreport.markdown(r), "## Details", "",
        f"- model: {r['model']['path_name']} ({r['model']['architecture']}, {r['model']['layers']} layers, "
        f"{r['model']['file_type']}), split {r['split']}, placement {r['placement']}",
        "- nodes: " + ", ".join(f"{n} {v['shown']}{' repacking off' if not v['repack'] else ''}"
                               f"{' FAULT ' + v['fault'] if v['fault'] else ''}" for n, v in r["nodes"].items()),
        f"- signing: {r['signing']} (receipt window {r['receipt_window']})",
        f"- exact_match: **{r['exact_match']}** (token agreement {r['token_agreement']}, first divergence "
        f"{r['first_divergence']}, top-2 margin there {r['top2_margin_at_divergence']})",
        f"- baseline {r['baseline']['tokens_per_s']} tok/s, distributed {r['distributed']['tokens_per_s']} tok/s "
        f"(ratio {r['speed_ratio']}), {r['threads_per_agent']} thread(s) per agent",
        f"- audits: {a['total']} total, {a['passed']} Passed, {a['passed_within_tolerance']} PassedWithinTolerance, "
        f"{a['mismatch']} Mismatch, {a['fraud']} Fraud; hash_equal_rate {r['hash_equal_rate']}; "
        f"false_fraud {r['false_fraud']}; audit CPU / generation CPU {a['audit_over_generation']}",
        f"- failover: {json.dumps({k: v for k, v in r['failover'].items() if k != 'events'})}",
        f"- session_restarts (from agent counters): {r['session_restarts']}",
        f"- receipts: {r['receipts']}",
        f"- fraud proofs: {len([p for p in r.get('fraud_proofs') or [] if p['holds']])} holding of "
        f"{len(r.get('fraud_proofs') or [])}, files in proofs/ (check one: consortium verify-proof FILE)",
        f"- success: **{r['success']}**", "", "| RPC | count | p50 ms | p95 ms | bytes |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {v['count']} | {v['p50_ms']} | {v['p95_ms']} | {v['bytes']} |" for m, v in r["rpc"].items()]
    if r.get("fault"):
        lines += ["", f"Fault: {json.dumps(r['fault'])}"]
    lines += ["", "![latency](latency.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
