"""The anchor benchmark (`consortium bench`, the default suite): where the data plane stands against
single-node llama.cpp, llama.cpp's own RPC mode on the same split, and distance, in one run.

Sections, all on the same model, machine and split, ratios taken side by side:
  speed      single node (llama-cpp-python, in process), our split in process, our three agent
             processes over loopback (Forward steps on their data lanes); rounds alternate single and
             distributed runs.
  rpc        llama-bench alone and llama-bench driving one ggml-rpc-server per stage (same sources as
             our llama-cpp-python, GGML_RPC on), prefill and generation; the layer placement llama.cpp
             logged is reported.
  distance   the same two approaches with each node in its own network namespace behind a delaying
             TCP proxy (emulated round-trip latency; this kernel has no netem).
  extras     commitments + receipt signatures as a share of token time; audits at 20% and 50% as audit
             CPU over generation CPU and the wall time they add.
  failover   the spike over several runs with stage 1's agent SIGKILLed, and against the context that
             must be replayed.
  concurrent several sessions at once through the same three agents: aggregate tokens/s.
  memory     each stage alone in a fresh process: resident memory against its share of the weights.
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from consortium import processes, standalone


class _BenchAgents(standalone.Agents):
    """Agents whose folder (logs, keys, TLS material) goes with them: a bench run starts fifteen
    sets, and an agent that dies early already puts its log's tail in the error."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclasses.dataclass
class Settings:
    model: str | None = None
    tokens: int = 64              # generated tokens per measured run
    prompt_tokens: int = 64       # prefill length (the prompt text repeated up to this many tokens)
    rounds: int = 3               # alternating single/distributed rounds
    threads: int = 1              # llama.cpp threads per stage and for the single node
    rtts_ms: tuple[float, ...] = (0.0, 1.0, 10.0)
    distance_tokens: int = 32
    audit_probabilities: tuple[float, ...] = (0.2, 0.5)
    # 20% audits again with decode steps replayed in batches of this many rows (1: no such run)
    audit_replay_rows: int = 32
    failover_runs: int = 10
    failover_kill_at: int = 20
    failover_contexts: tuple[int, ...] = (64, 192)   # kill at these tokens too (longer replay)
    failover_context_runs: int = 2
    warm_backups: bool = True      # the failover runs' backup loads the stage when the session starts
    concurrent: tuple[int, ...] = (2, 4)
    rpc: bool = True
    distance: bool = True
    memory: bool = True


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


class Session:
    """One driver session over running agents (a fresh driver; the agents keep their stages)."""

    def __init__(self, agents_endpoints: dict[str, str], model: str, info, split, sha: str, prompt_ids: list[int],
                 name: str, audit: float, rpc_timeout_s: float = 30.0, tls=None,
                 registered_keys: dict[str, str] | None = None, audit_replay_rows: int = 0,
                 sign_per_window: bool = False, audit_from_state: bool = False, warm_backups: bool = False,
                 sample_at_final: bool = True, state_window: int | None = None, replay_exact_shapes: bool = False,
                 adopt_audit_replays: bool = True):
        from consortium.driver.policy import LocalPolicy
        from consortium.driver.session import SessionDriver
        from consortium.driver.state import SessionState

        state = SessionState(session=name, prompt_tokens=prompt_ids, nodes=list(standalone.PLACEMENT),
                             epochs=[1, 1, 1], audit_probability=audit, audit_seed=7)
        self.driver = SessionDriver(session=name, model_path=str(model), split=split, n_layers=info.n_layers,
                                    model_sha256=sha, endpoints=agents_endpoints, state=state,
                                    policy=LocalPolicy(list(standalone.NODES)), rpc_timeout_s=rpc_timeout_s,
                                    tls=tls, registered_keys=registered_keys, audit_replay_rows=audit_replay_rows,
                                    sign_per_window=sign_per_window, audit_from_state=audit_from_state,
                                    state_window=state_window, warm_backups=warm_backups,
                                    sample_at_final=sample_at_final, replay_exact_shapes=replay_exact_shapes,
                                    adopt_audit_replays=adopt_audit_replays)
        self.driver.start()
        self.prompt_ids = prompt_ids

    def generate(self, n: int):
        from consortium import generation

        return generation.generate(self.driver, self.prompt_ids, n)

    def close(self):
        self.driver.close(release=True)   # the agents serve many sessions: free this one's slots


class Bench:
    def __init__(self, s: Settings, log):
        import consortium.cache
        from consortium.layers import even_split
        from consortium.models import resolve_model
        from consortium.tokenizer import benchmark_prompt
        from node_agent.engine.slicing import read_model_info, sha256_file

        self.s, self.log = s, log
        self.model = str(resolve_model(s.model))
        self.info = read_model_info(self.model)
        self.split = even_split(self.info.n_layers, 3)
        self.sha = sha256_file(self.model, consortium.cache.cache_dir())
        ids = benchmark_prompt(self.model, standalone.PROMPT)
        self.short_prompt = ids
        self.prompt = (ids * (s.prompt_tokens // len(ids) + 1))[:max(s.prompt_tokens, 2)]
        self.opts = standalone.Options(model=s.model, threads=s.threads)

    def agents(self, netns=None) -> standalone.Agents:
        return _BenchAgents(Path(tempfile.mkdtemp(prefix="consortium-bench-")), self.opts, None, netns=netns)

    def session(self, agents: standalone.Agents, name, audit=0.0, prompt=None, endpoints=None,
                replay_rows=0, sign_per_window=False, from_state=False, warm_backups=False,
                sample_at_final=True, state_window=None, replay_exact_shapes=False, adopt_audit_replays=True) -> Session:
        """A session over the agents (through `endpoints` instead of theirs, e.g. delaying proxies).
        Backups load ahead only where asked (the failover runs): elsewhere the loads would land in
        the speed rounds."""
        return Session(endpoints or agents.endpoints, self.model, self.info, self.split, self.sha,
                       prompt or self.prompt, name, audit, tls=agents.driver_tls, registered_keys=agents.public_keys,
                       audit_replay_rows=replay_rows, sign_per_window=sign_per_window, audit_from_state=from_state,
                       warm_backups=warm_backups, sample_at_final=sample_at_final, state_window=state_window,
                       replay_exact_shapes=replay_exact_shapes, adopt_audit_replays=adopt_audit_replays)

    # -- speed: single node, split in process, agents on loopback; audits' cost ------------------

    def speed_and_audits(self, agents) -> dict:
        from consortium import generation
        from node_agent.engine.benchmark import speed
        from node_agent.engine.pipeline import LocalPipeline
        from node_agent.engine.stage import StageConfig

        s = self.s
        self.log("speed: split in process against unsplit")
        inproc = speed(self.model, self.split, n_tokens=s.tokens, rounds=s.rounds, threads=s.threads,
                       prompt_len=len(self.prompt), log=self.log)
        # (audit probability, audit_replay_rows (0, the default: each verifier merges decode steps
        # where it checked that gives the same bits), signing per window, audits from window states,
        # the final stage sampling, positions per state window: None the default), keyed as in the
        # output: "0" (no audits), "0_window" (no audits,
        # agents signing once per receipt window), "0_driver_sampling" (no audits, the driver samples
        # from the logit row as it did before the final stage sampled), "20", "50", "20_original"
        # (decode steps replayed one row at a time, as the original run), "20_replay32", "20_state",
        # "20_state16" (state windows as long as the receipt window, as before they had their own)
        runs = {"0": (0.0, 0, False, False, True, None), "0_window": (0.0, 0, True, False, True, None),
                "0_driver_sampling": (0.0, 0, False, False, False, None),
                **{f"{int(p * 100)}": (p, 0, False, False, True, None) for p in s.audit_probabilities}}
        if 0.2 in s.audit_probabilities:
            runs["20_original"] = (0.2, 1, False, False, True, None)
        if s.audit_replay_rows > 1 and 0.2 in s.audit_probabilities:
            runs[f"20_replay{s.audit_replay_rows}"] = (0.2, s.audit_replay_rows, False, False, True, None)
        if 0.2 in s.audit_probabilities:
            runs["20_state"] = (0.2, 0, False, True, True, None)
            runs["20_state16"] = (0.2, 0, False, True, True, 16)
        labels = {"0": "no audits", "0_window": "no audits signing per window",
                  "0_driver_sampling": "no audits the driver sampling"}
        rows = {"single": [], **{k: [] for k in runs}}
        audit_cpu = {k: [] for k, (p, *_) in runs.items() if p}
        check_cpu = {k: 0.0 for k in audit_cpu}   # the verifiers' one-time merge checks, outside audit_cpu
        breakdowns = []   # per round, where a token's time goes without audits (token_breakdown)
        with LocalPipeline(self.model, None, StageConfig(threads=s.threads)) as single:
            for r in range(s.rounds):
                single.reset(0)
                base = generation.generate(single, self.prompt, s.tokens)
                rows["single"].append(base)
                for k, (p, replay, per_window, from_state, final_samples, state_window) in runs.items():
                    # A fresh driver and session per run (the agents refuse to restart a session at
                    # position 0), released at its end; loading is outside the timed generation.
                    sess = self.session(agents, f"speed-{k.replace('_', '-')}-r{r}", p, replay_rows=replay,
                                        sign_per_window=per_window, from_state=from_state,
                                        sample_at_final=final_samples, state_window=state_window)
                    try:
                        rows[k].append(sess.generate(s.tokens))
                        d = sess.driver
                        if k == "0":
                            breakdowns.append(token_breakdown(rows[k][-1], d.steps, base))
                        if p:   # both CPU times as the agents report them, of the threads that ran llama.cpp
                            audit_cpu[k].append(d.audit_cpu_ms / d.forward_cpu_ms if d.forward_cpu_ms else None)
                            check_cpu[k] += d.audit_check_cpu_ms
                    finally:
                        sess.close()
                self.log(f"speed round {r + 1}/{s.rounds}: single {base.tokens_per_s:.1f} tok/s, agents "
                         + ", ".join(f"{labels.get(k, k + ' audits')} {rows[k][-1].tokens_per_s:.1f}" for k in runs))

        def prefill_tps(res):
            return len(self.prompt) / (res.prefill_ms / 1000) if res.prefill_ms else None

        single_tps = [x.tokens_per_s for x in rows["single"]]
        out = {"prompt_tokens": len(self.prompt), "generated_tokens": s.tokens, "rounds": s.rounds,
               "single_tokens_per_s": _median(single_tps),
               "single_prefill_tokens_per_s": _median([prefill_tps(x) for x in rows["single"]]),
               "inprocess_split_over_single": inproc["split_over_unsplit"], "inprocess": inproc,
               "loopback_tokens_per_s": _median([x.tokens_per_s for x in rows["0"]]),
               "loopback_prefill_tokens_per_s": _median([prefill_tps(x) for x in rows["0"]]),
               "loopback_over_single": _median([d.tokens_per_s / b.tokens_per_s
                                                for d, b in zip(rows["0"], rows["single"])]),
               "loopback_prefill_over_single": _median([prefill_tps(d) / prefill_tps(b)
                                                        for d, b in zip(rows["0"], rows["single"])]),
               "loopback_signing_per_window_over_single": _median([d.tokens_per_s / b.tokens_per_s for d, b
                                                                   in zip(rows["0_window"], rows["single"])]),
               "loopback_driver_sampling_over_single": _median([d.tokens_per_s / b.tokens_per_s for d, b
                                                                in zip(rows["0_driver_sampling"], rows["single"])]),
               "loopback_breakdown_ms": {k: _median([b[k] for b in breakdowns]) for k in breakdowns[0]},
               "audits": {}}
        for k in audit_cpu:
            out["audits"][k] = {
                "tokens_per_s": _median([x.tokens_per_s for x in rows[k]]),
                "cpu_ratio": _median(audit_cpu[k]),
                "merge_check_cpu_ms": round(check_cpu[k], 1),
                # wall time per token added, against the run without audits in the same round
                "added_share": _median([a.tokens_per_s and (n.tokens_per_s / a.tokens_per_s - 1)
                                        for a, n in zip(rows[k], rows["0"])])}
        return out

    # -- llama.cpp RPC mode ------------------------------------------------------------------------

    def rpc(self, bins, endpoints=None, prefixes=None, hosts=None, n_gen=None, reps=None) -> dict:
        from consortium.anchors import llamarpc

        s = self.s
        kw = dict(threads=s.threads, n_prompt=len(self.prompt), n_gen=n_gen or s.tokens, reps=reps or s.rounds)
        with llamarpc.RpcServers(bins, 3, s.threads, hosts=hosts, prefixes=prefixes) as servers:
            eps = endpoints(servers.endpoints) if endpoints else servers.endpoints
            return llamarpc.llama_bench(bins, self.model, rpc=eps, split=self.split, **kw)

    def rpc_single(self, bins) -> dict:
        from consortium.anchors import llamarpc

        s = self.s
        return llamarpc.llama_bench(bins, self.model, threads=s.threads, n_prompt=len(self.prompt),
                                    n_gen=s.tokens, reps=s.rounds)

    # -- distance: network namespaces and a delaying proxy --------------------------------------------

    def distance(self, bins, rpc_single_tps: float | None) -> dict:
        from consortium import generation, netlab
        from node_agent.engine.pipeline import LocalPipeline
        from node_agent.engine.stage import StageConfig

        s = self.s
        rows = []
        with netlab.Lab([n.lower() for n in standalone.NODES]) as lab:
            hosts = list(lab.hosts.values())
            where = {n: (h.netns, h.address) for n, h in zip(standalone.NODES, hosts)}
            agents = self.agents(netns=where)
            try:
                with LocalPipeline(self.model, None, StageConfig(threads=s.threads)) as single:
                    for rtt in s.rtts_ms:
                        single.reset(0)   # the single node right before each row, side by side
                        base = generation.generate(single, self.prompt, s.distance_tokens)
                        with Proxies(list(agents.endpoints.values()), rtt / 2) as px:
                            eps = dict(zip(agents.endpoints, px.endpoints))
                            sess = self.session(agents, f"distance-{rtt:g}", endpoints=eps)
                            try:
                                with self.relay_lanes(sess, agents, rtt / 2):
                                    res = sess.generate(s.distance_tokens)
                            finally:
                                sess.close()
                        row = {"rtt_ms": rtt, "emulated": True, "ours_tokens_per_s": round(res.tokens_per_s, 3),
                               "single_tokens_per_s": round(base.tokens_per_s, 3),
                               "ours_over_single": round(res.tokens_per_s / base.tokens_per_s, 4)}
                        self.log(f"distance {rtt:g} ms: ours {res.tokens_per_s:.1f} tok/s, single "
                                 f"{base.tokens_per_s:.1f}")
                        rows.append(row)
            finally:
                agents.close()
            if bins is not None:
                for row in rows:
                    def via_proxies(eps, rtt=row["rtt_ms"]):
                        row["_proxies"] = Proxies(eps, rtt / 2)
                        return row["_proxies"].endpoints
                    try:
                        r = self.rpc(bins, endpoints=via_proxies, prefixes=[h.prefix() for h in hosts],
                                     hosts=[h.address for h in hosts], n_gen=s.distance_tokens, reps=max(1, s.rounds - 1))
                    finally:
                        row.pop("_proxies").close()
                    row["rpc_tokens_per_s"] = r["generation"]["tokens_per_s"]
                    row["rpc_over_single"] = (round(r["generation"]["tokens_per_s"] / rpc_single_tps, 4)
                                              if rpc_single_tps else None)
                    self.log(f"distance {row['rtt_ms']:g} ms: llama.cpp RPC {row['rpc_tokens_per_s']:.1f} tok/s")
        return {"rows": rows, "label": "separate network namespaces joined by veth; round-trip latency added by "
                "a delaying TCP proxy per node (emulated, this kernel has no netem), 0 ms = proxy only; ours over a "
                "single-node run right before each row, llama.cpp RPC over llama-bench's single-node run above"}

    @staticmethod
    def relay_lanes(sess: Session, agents: standalone.Agents, one_way_ms: float) -> "Proxies":
        """Delaying proxies in front of the agents' data lanes as well, so that Forward steps cross
        the same emulated distance as every other call."""
        clients = {n: c for n, c in sess.driver.clients.items() if c.lane_address is not None}
        px = Proxies([f"{agents.endpoints[n].rsplit(':', 1)[0]}:{c.lane_address[1]}" for n, c in clients.items()],
                     one_way_ms)
        for c, ep in zip(clients.values(), px.endpoints):
            host, port = ep.rsplit(":", 1)
            c.use_data_lane(int(port), host)
        return px

    # -- failover ----------------------------------------------------------------------------------------

    def failover_once(self, kill_at: int, max_tokens: int, exact_shapes: bool = False, audit: float = 0.0,
                      adopt: bool = True) -> dict:
        agents = self.agents()
        sess = None
        try:
            sess = self.session(agents, "failover", audit, prompt=self.short_prompt, warm_backups=self.s.warm_backups,
                                replay_exact_shapes=exact_shapes, adopt_audit_replays=adopt)
            d = sess.driver
            kill_node = standalone.PLACEMENT[1]
            kill_position = len(self.short_prompt) + kill_at - 1
            killed = []

            def on_stage(stage, position):
                if not killed and stage == 1 and position == kill_position:
                    agents.kill(kill_node)
                    killed.append(position)

            d.on_stage = on_stage
            sess.generate(max_tokens)
            normal = [x.wall_ms for x in d.steps[1:] if not x.failover]
            fo = [x.wall_ms for x in d.steps if x.failover]
            event = next(e for e in d.state.failovers if e["from"] == kill_node)
            return {"kill_at_token": kill_at, "context_replayed": event["replayed_rows"],
                    "merged_rows": event["merged_rows"], "exact_shapes": exact_shapes, "audit_probability": audit,
                    "adopted_rows": event["adopted_rows"], "adopt": adopt,
                    "spike_ms": round(max(fo) - statistics.median(normal), 3), "failover_ms": event["ms"],
                    "median_step_ms": round(statistics.median(normal), 3)}
        finally:
            if sess is not None:
                sess.close()
            agents.close()

    def failover(self) -> dict:
        s = self.s
        runs = []
        for i in range(s.failover_runs):
            runs.append(self.failover_once(s.failover_kill_at, s.failover_kill_at + 4))
            self.log(f"failover run {i + 1}/{s.failover_runs}: spike {runs[-1]['spike_ms']} ms")
        growth = []
        for k in s.failover_contexts:
            for i in range(s.failover_context_runs):
                # Side by side, order alternating: the backup replaying its decode steps merged where
                # it checked the bits stay (the default) and in the original shapes.
                for exact in ((False, True) if i % 2 == 0 else (True, False)):
                    growth.append(self.failover_once(k, k + 4, exact_shapes=exact))
                    self.log(f"failover at token {k}: {growth[-1]['context_replayed']} rows replayed "
                             f"({growth[-1]['merged_rows']} merged), spike {growth[-1]['spike_ms']} ms")
        audited = []
        if s.failover_contexts:
            # With 20% audits, at the longest context, order alternating: the backup taking over what
            # its own audits replayed of the stage (the default), and replaying every row.
            k = max(s.failover_contexts)
            for i in range(s.failover_context_runs):
                for adopt in ((True, False) if i % 2 == 0 else (False, True)):
                    audited.append(self.failover_once(k, k + 4, audit=0.2, adopt=adopt))
                    self.log(f"failover at token {k}, 20% audits: {audited[-1]['adopted_rows']} of "
                             f"{audited[-1]['context_replayed']} rows taken from the backup's audit replay, "
                             f"spike {audited[-1]['spike_ms']} ms")
        spikes = [r["spike_ms"] for r in runs]
        return {"runs": runs, "spike_ms": {"median": _median(spikes), "max": max(spikes), "min": min(spikes),
                                            "n": len(spikes)},
                "by_context": growth, "with_audits": audited}

    # -- concurrent sessions -----------------------------------------------------------------------------

    def concurrent(self, agents) -> dict:
        s = self.s
        rows = []
        counts = sorted({1, *s.concurrent})
        for k in counts:
            sessions = [self.session(agents, f"concurrent-{k}-{i}") for i in range(k)]
            try:
                results = [None] * k
                errors = []

                def one(i):
                    try:
                        results[i] = sessions[i].generate(s.tokens)
                    except Exception as e:   # re-raised below, not swallowed
                        errors.append(e)
                threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
            finally:
                for x in sessions:
                    x.close()
            if errors:
                raise errors[0]
            agg = k * s.tokens / wall
            rows.append({"sessions": k, "aggregate_tokens_per_s": round(agg, 3),
                         "per_session_tokens_per_s": [round(r.tokens_per_s, 3) for r in results]})
            self.log(f"concurrent {k}: aggregate {agg:.1f} tok/s")
        one_agg = rows[0]["aggregate_tokens_per_s"]
        for r in rows:
            r["over_one_session"] = round(r["aggregate_tokens_per_s"] / one_agg, 4)
        return {"rows": rows, "note": "aggregate = sessions x tokens / wall time from first start to last end "
                                      "(prefill included)"}


class Proxies:
    """One delaying forwarder process per endpoint (consortium.netlab's, out of the benchmark's
    interpreter so it takes none of the driver's time)."""

    def __init__(self, targets: list[str], one_way_ms: float):
        self.procs, self.endpoints = [], []
        try:
            for t in targets:
                p = subprocess.Popen([sys.executable, "-m", "consortium.netlab", "127.0.0.1:0", t,
                                      str(one_way_ms)], stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
                line = p.stdout.readline()
                if not line.strip().isdigit():
                    raise RuntimeError(f"delay proxy to {t} did not start")
                self.endpoints.append(f"127.0.0.1:{int(line)}")
        except BaseException:
            self.close()
            raise

    def close(self):
        processes.stop(self.procs, timeout=5)
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run(s: Settings, log) -> dict:
    """Every section in one run; sections that cannot run here say why instead of a figure."""
    from consortium import netlab
    from consortium.anchors import llamarpc
    from consortium.dataplane_bench import commit_share
    from consortium.layers import format_split
    from node_agent.engine import llama as ll

    t_start = time.perf_counter()
    b = Bench(s, log)
    res = {"model": {"name": Path(b.model).name, "architecture": b.info.architecture, "layers": b.info.n_layers,
                     "file_type": b.info.file_type},
           "llama_cpp": {k: ll.build_info().get(k) for k in ("llama_cpp_python", "ggml_version", "commit")},
           "split": format_split(b.split), "threads": s.threads, "machine": machine(),
           "settings": dataclasses.asdict(s), "skipped": {}}
    sections = res["section_s"] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        try:
            return fn(*a)
        finally:
            sections[name] = round(time.perf_counter() - t0, 1)

    agents = b.agents()
    try:
        res["speed"] = timed("speed_and_audits", b.speed_and_audits, agents)
        res["concurrent"] = timed("concurrent", b.concurrent, agents)
    finally:
        agents.close()
    log("extras: commitments and signatures in process, after every step and once per window")
    res["commit_sign"] = timed("commit_sign", commit_share, b.model, b.split, s.tokens, s.threads, standalone.PROMPT)
    res["commit_sign_per_window"] = timed("commit_sign_per_window", commit_share, b.model, b.split, s.tokens,
                                          s.threads, standalone.PROMPT, True)

    bins, why = llamarpc.bin_dir() if s.rpc else (None, "disabled (--no-rpc)")
    if bins is not None:
        log("llama.cpp RPC mode on loopback")
        res["rpc"] = {"single": timed("rpc_single", b.rpc_single, bins), "loopback": timed("rpc_loopback", b.rpc, bins),
                      "tensor_split": llamarpc.tensor_split(b.split)}
    else:
        res["skipped"]["rpc"] = why
    why_ns = netlab.available() if s.distance else "disabled (--no-distance)"
    if why_ns is None:
        rpc_single = res["rpc"]["single"]["generation"]["tokens_per_s"] if "rpc" in res else None
        res["distance"] = timed("distance", b.distance, bins, rpc_single)
    else:
        res["skipped"]["distance"] = why_ns
    res["failover"] = timed("failover", b.failover)
    if s.memory:
        from node_agent.engine.benchmark import memory

        log("memory per stage")
        res["memory"] = timed("memory", lambda: memory(b.model, b.split, threads=s.threads))
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["headline"] = headline(res)
    return res


def token_breakdown(ours, steps, single) -> dict:
    """Where a decode token's time goes, medians over the decode steps in ms: the single node's token
    and its llama.cpp compute; our token, the agents' own compute (their compute_ms, llama.cpp and
    the step's handling around it), the hops (the driver's time for each stage beyond the agent's
    own) and the rest (the driver's sampling and loop)."""
    med = statistics.median
    # steps[i] produced token i (steps[0]: the prompt); a loopback run has no failover or rewind.
    decode = [(t, st) for t, st in zip(ours.token_ms[1:], steps[1:])
              if st.rows == 1 and not st.failover and len(st.agent_ms) == len(st.stage_ms)]
    return {"single_ms": med(single.token_ms[1:]), "single_compute_ms": med(sum(x) for x in single.stage_ms[1:]),
            "ours_ms": med(ours.token_ms[1:]),
            "agents_compute_ms": med(sum(st.agent_ms) for _, st in decode),
            "hops_ms": med(sum(t - a for t, a in zip(st.stage_ms, st.agent_ms)) for _, st in decode),
            # each token's time beyond its stages: medians of separate series need not add up
            "driver_ms": med(t - sum(st.stage_ms) for t, st in decode)}


def headline(res: dict) -> dict:
    """The figures the issue names, at the top level of the JSON."""
    sp = res["speed"]
    rpc = res.get("rpc")
    rpc_over = (round(rpc["loopback"]["generation"]["tokens_per_s"] / rpc["single"]["generation"]["tokens_per_s"], 4)
                if rpc else None)
    conc = res["concurrent"]["rows"]
    breakdown = dict(sp["loopback_breakdown_ms"])
    # What each approach adds per token over its own single node, in ms: ours from the breakdown,
    # llama.cpp RPC mode from llama-bench's rates (it reports no more than that).
    breakdown["ours_added_ms"] = round(breakdown["ours_ms"] - breakdown["single_ms"], 3)
    breakdown["rpc_added_ms"] = (round(1000 / rpc["loopback"]["generation"]["tokens_per_s"]
                                       - 1000 / rpc["single"]["generation"]["tokens_per_s"], 3) if rpc else None)
    return {
        "loopback_over_single": sp["loopback_over_single"],
        "loopback_breakdown_ms": breakdown,
        "inprocess_over_single": sp["inprocess_split_over_single"],
        "rpc_over_single": rpc_over,
        "commit_share": res["commit_sign"]["share_of_token_time"],
        "commit_share_signing_per_window": res["commit_sign_per_window"]["share_of_token_time"],
        "loopback_signing_per_window_over_single": sp["loopback_signing_per_window_over_single"],
        "loopback_driver_sampling_over_single": sp["loopback_driver_sampling_over_single"],
        "audit20_cpu_ratio": sp["audits"].get("20", {}).get("cpu_ratio"),
        "audit20_added_share": sp["audits"].get("20", {}).get("added_share"),
        "audit50_cpu_ratio": sp["audits"].get("50", {}).get("cpu_ratio"),
        "audit50_added_share": sp["audits"].get("50", {}).get("added_share"),
        # the same 20% with decode steps replayed one row at a time, as the original run computed them
        "audit20_original_cpu_ratio": sp["audits"].get("20_original", {}).get("cpu_ratio"),
        # the same 20% with decode steps replayed in larger batches (Settings.audit_replay_rows)
        "audit20_replay_cpu_ratio": next((v["cpu_ratio"] for k, v in sp["audits"].items()
                                          if k.startswith("20_replay")), None),
        # the same 20% of windows audited whole from the nodes' signed window states
        "audit20_state_cpu_ratio": sp["audits"].get("20_state", {}).get("cpu_ratio"),
        "audit20_state_added_share": sp["audits"].get("20_state", {}).get("added_share"),
        "audit20_state16_cpu_ratio": sp["audits"].get("20_state16", {}).get("cpu_ratio"),
        "failover_spike_ms": {k: res["failover"]["spike_ms"][k] for k in ("median", "max")},
        "concurrent_over_single": conc[-1]["over_one_session"],
        "concurrent_sessions": conc[-1]["sessions"],
        "memory_per_stage": [{"layers": m["layers"], "rss_mib": round(m["rss_delta_bytes"] / 2**20, 1),
                              "weights_mib": round(m["weights_bytes"] / 2**20, 1),
                              "rss_over_weights": m["rss_over_weights"]} for m in res.get("memory", [])],
    }


def machine() -> dict:
    import os
    import platform

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "system": platform.system(),
            "load_average_at_start": [round(x, 2) for x in load] if load else None}
