"""The session driver as a kopf daemon, one per InferenceSession.

The daemon places the stages (placement), writes the StageAssignments, and runs
consortium.driver's SessionDriver with the Kubernetes policy (failover.KubePolicy) through the one
token loop (consortium.generation.generate). Between two tokens, at most every PROGRESS_INTERVAL_S,
it takes the driver's SessionState (tokens, per-stage nodes and epochs, batch shapes, audit results),
which a thread of its own (ProgressWriter) saves into the session's status before it publishes
receipts, verdicts and failovers: no token waits for the API. An operator that
restarts finds that state in status: it truncates every stage's KV to the saved position, refills
the driver's audit inputs from the agents' stored outputs (Resend, not recomputation), and
generates on from the same position, so the agents' forward counters show no position the last
write saved computed again. A session that ends is released on its agents (their slots and KV).
"""
from __future__ import annotations

import base64
import collections
import importlib.util
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import kopf
import numpy as np

from consortium import fetch, generation, kube, receipt_check, wire
from consortium import resources as r
from consortium.driver.policy import NoCandidate
from consortium.driver.session import DriverError, NodeBusy, SessionDriver
from consortium.driver.state import SessionState, report_counters, report_steps
from consortium.layers import LayerRange
from consortium.sampling import SamplingParams, sample
from consortium.verification import canonical
from consortium.verification.canonical import CanonicalGrid
from consortium.wire import pb
from consortium_operator import audits, failover, placement, proofs, receipts
from consortium_operator import metrics as session_metrics
from node_agent.engine.slicing import ModelInfo, read_model_info, sha256_file

log = logging.getLogger("consortium.operator.sessions")

PLACEMENT_RETRY_S = 3.0
# The session's progress is written between two tokens, at most this often (and after the last one,
# and when the operator stops). A status patch with the driver's state took a median 16 ms here (p90
# 23 ms), about as long as a step of the default model: written after every token, it nearly halved
# the token rate and put a new version of the object in etcd each token. An operator that dies
# recomputes at most this much of the session (docs/operator.md, restarts).
PROGRESS_INTERVAL_S = 0.25
# ...and at most this many bytes a second: each write keeps a new version of the whole object in
# etcd until the API server compacts its history (every 5 minutes by default), so a long session's
# status (a few hundred KB at 8,000 tokens) is written less often than a short one's.
PROGRESS_BYTES_PER_S = 256 * 1024
# ...and with at least this many times its own duration between two writes (the shortest of the last
# three: one slow write, such as the first after a resume that publishes what its predecessor had not,
# does not hold the next ones back), so that saving takes at most a tenth of the token loop: at 2,400
# tokens a write (the patch, then receipts and verdicts) took 130 ms, mostly waiting for the API
# server, and written every 0.25 s it took 43% of the loop.
PROGRESS_SPACING = 9.0
# A session stops generating (stopped: status_full) once a progress write carries more than this:
# the whole object, status included, must stay under etcd's request limit (1.5 MiB by default), or
# every later write fails and the session could neither finish nor be resumed. A session of the
# longest maxTokens with audits passing by equal hashes writes about 1.1 MB (tests/dataplane/
# test_state_size.py); one whose audits all pass within tolerance, as many at about half its length.
STATUS_BUDGET_BYTES = 1_310_720
# A progress write the API refused for a reason that may pass (a control plane restarting) is tried
# again this long after, while generation goes on; the writes that end a session are retried, the
# wait doubling up to FINAL_RETRY_MAX_S, for at most FINAL_RETRY_FOR_S.
PROGRESS_RETRY_S = 1.0
FINAL_RETRY_MAX_S = 8.0
FINAL_RETRY_FOR_S = 600.0
AGENT_TLS = None   # the operator's client credentials for the agents (consortium.tls); None: --plaintext
PROOF_KEY = None   # the operator's identity that signs fraud proofs (--proof-key); None: one key per session


class Interrupted(Exception):
    """The operator is stopping: the session's progress is in status, the next operator resumes it."""


class ModelFetchFailed(Exception):
    """A model fetched by URL could not be had, here or on a stage's node (the reason says which)."""


class StopRequested(Exception):
    """The session's owner asked it to stop (the consortium.io/stop annotation) before it generated."""


def agent_namespace() -> str | None:
    return os.environ.get("CONSORTIUM_NAMESPACE") or None


def resolve_model_file(model: r.ModelRef) -> Path:
    """The GGUF path the agents load; the same file on every machine (one machine in development)."""
    if model.source and model.source.startswith("pypi:"):
        spec = importlib.util.find_spec(model.source[5:].replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model package {model.source[5:]} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / model.file
    p = Path(model.file)
    return p if p.is_absolute() else Path(os.environ.get("CONSORTIUM_MODEL_DIR", "/models")) / p


def _sha256(path: Path) -> str:
    """The model's sha256, by which the driver finds the tolerances calibrated for its stages."""
    import consortium.cache

    return sha256_file(path, consortium.cache.cache_dir())


class SessionRun:
    def __init__(self, body: dict, stopped):
        self.body = {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
                     "metadata": dict(body["metadata"]), "spec": dict(body["spec"])}
        self.name, self.namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        self.spec = r.InferenceSessionSpec.model_validate(body["spec"])
        self.status = dict(body.get("status") or {})
        self.live = body   # kopf keeps a daemon's body fresh: how a stop request reaches the token loop
        self._header: tuple[int, str] | None = None   # (length, sha256) of a URL model's header read here
        self.stopped = stopped
        self.api = kube.api()
        # Conditions are read, changed and written whole from the token loop (a failover) and the
        # progress writer (the failover finished): one at a time, or one would undo the other's.
        self._conditions_lock = threading.Lock()

    # -- status ----------------------------------------------------------------------------------

    def patch_status(self, **fields) -> None:
        self.status.update(fields)
        self.api.patch_namespaced_custom_object_status(r.GROUP, r.VERSION, self.namespace, "inferencesessions",
                                                       self.name, {"status": fields})

    def set_condition(self, type_: str, status: bool, reason: str, message: str = "", phase: str | None = None):
        with self._conditions_lock:
            conds = kube.with_condition(self.status.get("conditions"), type_, status, reason, message,
                                        self.body["metadata"].get("generation"))
            fields = {"conditions": conds}
            if phase:
                fields["phase"] = phase
            self.patch_status(**fields)

    def stop_requested(self) -> str | None:
        """The reason given with a request to stop the session, or None (none made)."""
        annotations = (self.live.get("metadata") or {}).get("annotations") or {}
        if r.ANNOTATION_STOP not in annotations:
            return None
        return annotations[r.ANNOTATION_STOP] or "no reason given"

    def _waiting(self) -> None:
        """Between two tries at placing or starting the session."""
        if self.stopped.wait(PLACEMENT_RETRY_S):
            raise Interrupted()
        why = self.stop_requested()
        if why is not None:
            raise StopRequested(why)

    # -- the model file --------------------------------------------------------------------------

    def _model_file(self) -> Path:
        """The model's path here. Of one named by URL the operator reads only the GGUF header (the
        tokenizer, the layer count) into its cache first, the condition saying how far it has got;
        `_fetch_on_nodes` then has the nodes that verified the whole file vouch for those bytes."""
        m = self.spec.model
        if not fetch.is_url(m.source):
            return resolve_model_file(m)
        progress, got = fetch.Progress(), {}

        def run() -> None:
            try:
                got["path"] = fetch.fetch_header(m.source, m.sha256, progress=progress)
            except fetch.FetchError as e:
                got["error"] = str(e)
        t = threading.Thread(target=run, name=f"fetch {self.namespace}/{self.name}", daemon=True)
        t.start()
        while t.is_alive():
            self.set_condition("Scheduled", False, "FetchingModel",
                               f"the operator reads the model's header from {m.source}: {progress}",
                               phase="Scheduling")
            t.join(PLACEMENT_RETRY_S)
            why = self.stop_requested()
            if why is not None:
                raise StopRequested(f"stopped while the model was fetched: {why}")
            if self.stopped.is_set():
                raise Interrupted()
        if "error" in got:
            raise ModelFetchFailed(got["error"])
        if got["path"] != fetch.local_path(m.source, m.sha256):   # the header alone: unverified yet
            try:
                self._header = fetch.header_digest(got["path"])
            except fetch.FetchError as e:
                raise ModelFetchFailed(str(e)) from None
        return got["path"]

    def _fetch_on_nodes(self, driver: SessionDriver) -> None:
        """A model named by URL, fetched by every node the session may use (its stages', and those its
        verifier and backup selectors match) before the first stage loads: a stage's node that
        cannot fetch it fails the session; another node that cannot is left to the driver."""
        labels = {n.name: n.labels for n in placement.node_views(agent_namespace())}
        needed = set(driver.state.nodes)
        helpers = {n for n in driver.clients if any(placement.matches(sel, labels.get(n, {})) for sel in (
            self.spec.audit.verifier_selector, self.spec.failover.backup_selector))}
        header_bytes, header_sha = self._header or (0, "")
        while True:
            got = driver.fetch_model(sorted(needed | helpers), header_bytes=header_bytes)
            failed = {n: r.error for n, r in got.items() if r is not None and r.error}
            if failed.keys() & needed:
                raise ModelFetchFailed("; ".join(f"{n}: {failed[n]}" for n in sorted(failed.keys() & needed)))
            waiting = {n: r for n, r in got.items() if r is not None and not r.done and not r.error}
            if not waiting:
                differ = {n: r.header_sha256 for n, r in got.items()
                          if header_bytes and n in needed and r is not None and r.header_sha256 != header_sha}
                if differ:
                    raise ModelFetchFailed(
                        f"the first {header_bytes} bytes of the pinned file hash to "
                        + ", ".join(f"{d or 'nothing said'} on {n}" for n, d in sorted(differ.items()))
                        + f"; the header the operator read from {driver.model_url} hashes to {header_sha}: "
                          f"the server gave different bytes to different readers")
                return
            shown = ", ".join(f"{n} {fetch.Progress(bytes=r.bytes, total=r.total)}" for n, r in sorted(waiting.items()))
            self.set_condition("Scheduled", False, "FetchingModel", f"the nodes fetch {driver.model_url}: {shown}")
            self._waiting()

    # -- placement -------------------------------------------------------------------------------

    def place(self, info: ModelInfo) -> tuple[list[str], list[str]]:
        """Node and layer range ('a-b') per stage; waits (condition Scheduled=False with the reasons)
        until everything fits. Stages whose layers are 'auto' get the nodes' memory split."""
        auto = self.spec.auto_split
        fixed = None if auto else [s.layer_range for s in self.spec.stages]
        need = [0] * len(self.spec.stages) if auto else placement.stage_bytes(info, fixed)
        last = None
        while True:
            nodes = placement.node_views(agent_namespace())
            chosen, reasons = placement.place(self.spec.stages, nodes, need)
            ranges = fixed
            if chosen and auto:
                ranges, why = placement.memory_split(chosen, nodes, info)
                if why:
                    chosen, reasons = None, [why]
            if chosen:
                shown = {n.name: n.shown for n in nodes}
                msg = ", ".join(f"stage {i}{f' (layers {ranges[i]})' if auto else ''} -> {n} ({shown[n]})"
                                for i, n in enumerate(chosen))
                # Verifiers and backups come from the usable nodes their selectors match.
                helpers = [n.name for n in nodes if n.why_not() is None and any(
                    placement.matches(sel, n.labels) for sel in (self.spec.audit.verifier_selector,
                                                                  self.spec.failover.backup_selector))]
                mixed = placement.mixed_builds(nodes, [*chosen, *helpers])
                if mixed:
                    kube.event(self.body, "MixedBuilds", mixed, type_="Warning")
                    msg += f"; {mixed}"
                self.set_condition("Scheduled", True, "Placed", msg, phase="Scheduling")
                kube.event(self.body, "Scheduled", msg)
                return chosen, [str(lr) for lr in ranges]
            msg = "; ".join(reasons)
            if msg != last:
                self.set_condition("Scheduled", False, "Unschedulable", msg, phase="Scheduling")
                kube.event(self.body, "Unschedulable", msg, type_="Warning")
                last = msg
            self._waiting()

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> None:
        from consortium.tokenizer import Tokenizer

        try:
            model_path = self._model_file()
        except (ModelFetchFailed, StopRequested) as e:
            self.fail("ModelFetchFailed" if isinstance(e, ModelFetchFailed) else "StopRequested", str(e))
            return
        info = read_model_info(model_path)   # parsed once per file
        n_layers = info.n_layers
        if self.spec.auto_split:
            if len(self.spec.stages) > n_layers:
                self.fail("StagesDoNotCoverModel",
                          f"{len(self.spec.stages)} stages cannot share the model's {n_layers} layers")
                return
        elif self.spec.stages[-1].layer_range.end != n_layers - 1:
            self.fail("StagesDoNotCoverModel",
                      f"the stages end at layer {self.spec.stages[-1].layer_range.end}; the model has {n_layers}")
            return
        tok = Tokenizer(model_path)
        try:
            try:
                prompt = tok.prompt_tokens(self.spec.prompt, [m.to_k8s() for m in self.spec.messages]
                                           if self.spec.messages else None)
            except ValueError as e:   # a model without a tokenizer, or messages without a chat template
                self.fail("PromptNotTokenized", str(e))
                return
            self._run(model_path, info, tok, prompt)
        finally:
            tok.close()

    def _run(self, model_path: Path, info: ModelInfo, tok, prompt: list[int]) -> None:
        saved = (self.status.get("report") or {}).get("driverState")
        generated = list(self.status.get("tokens") or [])
        resume = bool(saved and generated)
        if resume:
            state = SessionState.from_json(saved)
            chosen = list(state.nodes)
            layers = self.status.get("layers") or [s.layers for s in self.spec.stages]
            if len(layers) != len(chosen) or r.AUTO_LAYERS in layers:
                self.fail("LayersUnknown", f"the session's saved state holds no layer split for its stages "
                                           f"(status.layers: {self.status.get('layers')})")
                return
        else:
            try:
                chosen, layers = self.place(info)
            except StopRequested as e:
                self.fail("StopRequested", f"stopped before it was placed: {e}")
                return
            state = SessionState(session=r.session_id(self.namespace, self.name, self.body["metadata"]["uid"]), prompt_tokens=prompt,
                                 nodes=chosen, epochs=[1] * len(chosen), audit_probability=self.spec.audit.probability,
                                 audit_seed=self.spec.audit.seed)
        # From here on each stage holds its layer range as it runs ('auto' resolved; the spec stays as written).
        spec = self.spec = self.spec.model_copy(update={"stages": [
            s.model_copy(update={"layers": lr}) for s, lr in zip(self.spec.stages, layers)]})
        need = placement.stage_bytes(info, [s.layer_range for s in spec.stages])
        if not resume:
            for i, n in enumerate(chosen):
                placement.write_assignment(self.body, i, spec.stages[i], n, 1, spec.model.to_k8s())
            self.patch_status(startedAt=kube.timestamp(), stageEpochs=state.epochs, position=0, tokens=[],
                              stagesReady=f"0/{len(chosen)}", layers=layers)
        views = {n.name: n for n in placement.node_views(agent_namespace())}
        endpoints = {n.name: n.endpoint for n in views.values()
                     if n.why_not() is None or n.name in state.nodes and not n.quarantined and n.approved}
        policy = failover.KubePolicy(self.body, spec, agent_namespace(), self.set_condition)
        policy.stage_bytes = need
        grid = CanonicalGrid(dtype=spec.canonical_grid.dtype, grid=spec.canonical_grid.grid,
                             clamp=spec.canonical_grid.clamp)
        # The id its windows are signed under, as saved: a session resumed keeps the one it began with.
        driver = SessionDriver(session=state.session, model_path=str(model_path),
                               model_sha256=self.spec.model.sha256 or _sha256(model_path),
                               split=[LayerRange(s.layer_range.start, s.layer_range.end) for s in spec.stages],
                               n_layers=info.n_layers, endpoints=endpoints, state=state, policy=policy, grid=grid,
                               rpc_timeout_s=spec.failover.rpc_timeout_seconds, tls=AGENT_TLS,
                               receipt_window=spec.receipt_window, sign_per_window=spec.signing == "PerWindow",
                               audit_from_state=spec.audit.from_window_states,
                               state_window=spec.audit.state_window,
                               warm_backups=spec.failover.warm_backups,
                               registered_keys={n: v.public_key for n, v in views.items() if v.public_key},
                               proof_key=PROOF_KEY and PROOF_KEY.private_key, proof_signer="consortium-operator",
                               model_url=spec.model.source if fetch.is_url(spec.model.source) else "")
        policy.driver = driver
        session_metrics.track(self.namespace, self.name, driver, len(generated))
        writer = receipts.ReceiptWriter(self.body)
        publisher = audits.AuditPublisher(self.body)
        proof_publisher = proofs.ProofPublisher(self.body)
        nodes_watch = failover.NodeWatch(agent_namespace())
        seen_failovers = len(state.failovers)
        saved_at = float("-inf")   # when progress was last written
        written = generated   # the tokens it carried
        interval = PROGRESS_INTERVAL_S   # until the next write, from the size and cost of the last ones
        write_s = collections.deque(maxlen=3)   # how long the last writes took
        emitted: list[float] = []   # when each new token of this run came out
        have = 0   # tokens on_token was last given (a rollback's rewind gives fewer: no new token)
        interrupted = False   # the operator stops mid-session: its successor resumes from the agents
        latest = generated   # the tokens as generation last reported them
        status_full = False   # the last snapshot reached STATUS_BUDGET_BYTES: no more tokens
        full_announced = False   # its StatusFull Event posted
        failure = None   # (reason, message) of a session that cannot go on
        stop_reason = None   # given with a request to stop, once generation has stopped for it
        stop_sequence = None   # the spec's stop sequence that ended generation

        def publish(final: bool = False) -> None:
            nonlocal seen_failovers
            try:
                policy.write_pending()   # StageAssignments failovers decided while the API was away
                for f in state.failovers[seen_failovers:]:
                    policy.finished(f)
                    seen_failovers += 1
            except Exception as e:  # noqa: BLE001 - sorted below
                if not kube.transient(e):
                    raise
                log.warning("session %s/%s: failover records not written yet (%s)", self.namespace, self.name,
                            kube.reason(e))
            writer.publish(driver)
            publisher.publish(driver, writer.index, final=final)
            proof_publisher.publish(driver, writer.index)

        def snapshot(tokens: list[int]) -> tuple[list[int], str, str, int]:
            """What a progress write carries, taken between two steps: the state as of these tokens,
            and about how many bytes. One that reaches STATUS_BUDGET_BYTES stops generation after
            these tokens."""
            nonlocal status_full
            with driver._lock:
                state.proofs = proof_publisher.unpublished(driver)
                saved = state.dumps()
            text = tok.decode(tokens)
            size = len(saved) + len(text) + 6 * len(tokens)
            status_full = status_full or size > STATUS_BUDGET_BYTES
            return tokens, saved, text, size

        def save(snap: tuple[list[int], str, str, int]) -> None:
            """One progress write; during generation on the progress writer's thread."""
            nonlocal saved_at, written, interval, full_announced
            tokens, saved, text, size = snap
            began = time.monotonic()
            try:
                self.patch_status(tokens=tokens, position=len(tokens), text=text,
                                  stageEpochs=list(state.epochs), report={"driverState": json.loads(saved)})
            except Exception as e:  # noqa: BLE001 - sorted below
                if not kube.transient(e):
                    raise
                # Generation does not need the API: it goes on, and the next write carries these tokens.
                log.warning("session %s/%s: progress at token %d not written (%s); trying again in %.0f s",
                            self.namespace, self.name, len(tokens), kube.reason(e), PROGRESS_RETRY_S)
                saved_at = time.monotonic() - interval + PROGRESS_RETRY_S
                return
            saved_at, written = time.monotonic(), tokens
            if size > STATUS_BUDGET_BYTES and not full_announced:
                full_announced = True
                kube.event(self.body, "StatusFull", f"the session's status reached {size} bytes at token "
                           f"{len(tokens)} (the operator's --status-budget-bytes: {STATUS_BUDGET_BYTES}); "
                           f"generation stops there (status_full)", type_="Warning")
            publish()
            write_s.append(time.monotonic() - began)
            interval = max(PROGRESS_INTERVAL_S, size / PROGRESS_BYTES_PER_S,
                           PROGRESS_SPACING * min(write_s) if len(write_s) == write_s.maxlen else 0.0)

        def on_token(tokens: list[int]) -> None:
            nonlocal have, latest
            session_metrics.generated(self.namespace, self.name, len(tokens))
            if len(tokens) > have:
                emitted.append(time.monotonic())
            have = len(tokens)
            latest = tokens
            progress.raise_failure()
            if time.monotonic() - saved_at >= interval and progress.idle():
                progress.offer(snapshot(tokens))

        stops = generation.StopSequences.of(spec.stop_sequences)

        def stop() -> str | None:
            """Asked before each token: a full status, one of the spec's stop sequences in the text, or
            the owner's request ends generation there."""
            nonlocal stop_reason, stop_sequence
            if status_full:
                return "status_full"
            stop_sequence = stops.in_tail(latest, tok.decode)
            if stop_sequence is not None:
                return "stop_sequence"
            stop_reason = self.stop_requested()
            return None if stop_reason is None else "stop_requested"

        progress = ProgressWriter(save, f"progress {self.namespace}/{self.name}")
        try:
            if resume:
                writer.load_existing()
                publisher.resumed(driver, writer.index, writer.shown)
                generated = latest = self._resume(driver, views, writer.index, generated)
                kube.event(self.body, "Resumed", f"resumed at token {len(generated)} (position "
                                                 f"{state.done[0]}), epochs {state.epochs}")
            else:
                self._start(driver)
            self.set_condition("Ready", False, "Generating", f"stages on {state.nodes}", phase="Running")
            limit = driver.context_positions()
            if not resume and limit is not None and len(prompt) + spec.max_tokens - 1 > limit >= len(prompt):
                kube.event(self.body, "ContextLimit", f"maxTokens {spec.max_tokens} after a {len(prompt)}-token prompt "
                           f"needs {len(prompt) + spec.max_tokens - 1} positions; the stages' nodes hold {limit}: "
                           f"generation stops at {limit - len(prompt) + 1} tokens (context_full)", type_="Warning")
            # Published so that anyone holding one of this session's fraud proofs can tell who signed it.
            self.patch_status(stagesReady=f"{len(chosen)}/{len(chosen)}", proofKey=driver.proofs.public_key_text)

            pipe = _Guarded(driver, self.stopped, nodes_watch)
            nodes_watch.start(driver)
            t0 = time.perf_counter()
            result = generation.generate(
                pipe, prompt, spec.max_tokens,
                sampling=SamplingParams(temperature=spec.sampling.temperature, top_p=spec.sampling.top_p,
                                        seed=spec.sampling.seed),
                is_end=tok.is_end_of_generation, detokenize=tok.decode, resume=generated if resume else None,
                on_token=on_token, stop=stop)
            wall = time.perf_counter() - t0
            counters = driver.counters()
        except Interrupted:
            interrupted = True
            progress.close()
            if latest is not written:   # stopped between two tokens: the successor goes on from here
                try:
                    save(snapshot(latest))
                except Exception as e:   # e.g. the session was deleted: nothing is left to resume
                    log.info("session %s/%s: its last progress was not saved: %s", self.namespace, self.name, e)
            raise
        except (NoCandidate, DriverError) as e:
            failure = ("StageLost", str(e))
        except generation.ContextFull as e:
            failure = ("PromptTooLong", f"{e} (node-agent --ctx)")
        except StopRequested as e:   # while its nodes were busy: nothing was generated
            failure = ("StopRequested", f"stopped before generation began: {e}")
        except ModelFetchFailed as e:
            failure = ("ModelFetchFailed", f"a stage's node could not fetch the model: {e}")
        finally:
            nodes_watch.close()
            # A session that ended, completed or failed, gives back its sequence slots (and KV
            # memory) on every agent: they were held until the session was deleted, and with eight
            # slots a layer range, the ninth session in a row failed RESOURCE_EXHAUSTED. Before the
            # progress writer is waited for: its write in flight may wait on an API that hangs.
            driver.close(release=not interrupted)
            session_metrics.ended(self.namespace, self.name)
            progress.close()   # the writes below are made here, in order
        progress.raise_failure()   # the last write in flight, refused for good
        # The end must reach the API, which may be away for a while: the receipts first, strictly.
        self._retrying("its receipts", lambda: writer.publish(driver, strict=True))
        if failure is not None:
            self._end_failed(failure, driver, writer, latest, lambda t: save(snapshot(t)), publish, emitted)
            return
        publish(final=True)
        with driver._lock:
            state.proofs = proof_publisher.unpublished(driver)   # empty unless the API refused some
            saved = state.to_json()
        metrics = self._metrics(state, emitted, writer, driver.steps)
        metrics.update(tokensPerSecond=metrics["tokensPerSecond"] or round(result.tokens_per_s, 3),
                       stepTokensPerSecond=round(result.tokens_per_s, 3), wallSeconds=round(wall, 3))
        end = dict(tokens=result.tokens, position=len(result.tokens), text=result.text,
                   stageEpochs=list(state.epochs), finishedAt=kube.timestamp(), metrics=metrics,
                   report={"driverState": saved, "stopped": result.stopped,
                           "counters": report_counters(counters),
                           "rpc": driver.rpc.summary(),
                           "warmBackups": list(driver.prepared),   # backups that loaded a stage ahead
                           "steps": report_steps(driver.steps)})   # each step this run drove

        why = result.stopped
        if result.stopped == "stop_requested":
            end["report"]["stopReason"] = stop_reason
            why += f": {stop_reason}"
        elif result.stopped == "stop_sequence":
            end["report"]["stopSequence"] = stop_sequence
            why += f" {json.dumps(stop_sequence)}"

        def complete() -> None:
            self.patch_status(**end)
            self.set_condition("StageFailover", False, "NoFailover", "") if not state.failovers else None
            self.set_condition("Ready", True, "Completed", f"{len(result.tokens)} tokens ({why})", phase="Completed")
        self._retrying("its completion", complete)
        if result.stopped == "stop_requested":
            kube.event(self.body, "Stopped", f"stopped at token {len(result.tokens)} of {spec.max_tokens} on "
                                             f"request: {stop_reason}")
        kube.event(self.body, "Completed", f"{len(result.tokens)} tokens, {len(state.audits)} audits, "
                                           f"{len(state.failovers)} failover(s)")

    def _retrying(self, what: str, write: Callable[[], Any]) -> Any:
        """write() made until it passes: the end of a session must reach the API, which may be away
        for a while (a control plane restarting). A refusal of the request itself is raised at once,
        as is the last failure after FINAL_RETRY_FOR_S."""
        delay, deadline = 0.5, time.monotonic() + FINAL_RETRY_FOR_S
        while True:
            try:
                return write()
            except Exception as e:  # noqa: BLE001 - sorted below
                if not kube.transient(e) or time.monotonic() + delay > deadline:
                    raise
                log.warning("session %s/%s: %s not written (%s); trying again in %.1f s", self.namespace,
                            self.name, what, kube.reason(e), delay)
            if self.stopped.wait(delay):
                raise Interrupted()
            delay = min(2 * delay, FINAL_RETRY_MAX_S)

    @staticmethod
    def _metrics(state: SessionState, emitted: list[float], writer, steps) -> dict:
        a = state.audits
        # The rate the session's tokens came out at, from its first to its last, as a user watching
        # status.tokens saw it; the steps' own rate (stepTokensPerSecond) leaves out the operator's
        # writes between them.
        span = emitted[-1] - emitted[0] if emitted else 0.0
        return {"tokensPerSecond": round((len(emitted) - 1) / span, 3) if span > 0 else 0.0,
                "audits": len(a), "auditsPassed": sum(x["verdict"] == "Passed" for x in a),
                "auditsPassedWithinTolerance": sum(x["verdict"] == "PassedWithinTolerance" for x in a),
                "auditsMismatch": sum(x["verdict"] == "Mismatch" for x in a),
                "auditsFraud": sum(x["verdict"] == "Fraud" for x in a),
                "failovers": len(state.failovers), "rollbacks": len(state.rollbacks),
                "receipts": len(writer.index), "receiptsDiscarded": writer.discarded,
                **step_metrics(steps)}

    def _end_failed(self, failure: tuple[str, str], driver: SessionDriver, writer, tokens: list[int],
                    save, publish, emitted: list[float]) -> None:
        """A session that cannot go on keeps its record, as a completed one does: its receipts,
        verdicts and fraud proofs, the driver's state (failovers, audits, rollbacks), and the tokens
        generated that its receipts back (every stage's signed rows up to the last token's) and no
        pending rollback puts in doubt; then it is Failed with the reason."""
        reason, message = failure
        n_prompt = len(driver.state.prompt_tokens)
        at, why = driver.abandon()
        try:
            publish(final=True)
            items = [{"spec": {"stage": w["stage"], "window": {"start": w["start"], "count": w["count"]},
                               "rollbacks": w.get("rollbacks", 0)}} for w in writer.index.values()]
            keep, why = receipt_check.backed_tokens(items, n_prompt, len(tokens), len(driver.state.nodes), at, why)
            if keep < len(tokens):
                message += f"; {keep} of the {len(tokens)} tokens generated are kept ({why})"
                tokens = tokens[:keep]
            save(tokens)
            self.patch_status(metrics=self._metrics(driver.state, emitted, writer, driver.steps),
                              report={"stopped": "failed", "rpc": driver.rpc.summary(),
                                      "steps": report_steps(driver.steps)})
        except Exception:   # the reason below matters more than the record
            log.exception("session %s/%s: its record was not written in full before failing", self.namespace,
                          self.name)
        self.fail(reason, message)

    def _start(self, driver: SessionDriver) -> None:
        """driver.start(), waiting while a node has no free sequence slot for its stage (the
        sessions holding them have not ended): Scheduled=False, NodesBusy, until one ends."""
        placed = next((c for c in self.status.get("conditions") or [] if c["type"] == "Scheduled"), None)
        waiting = False
        if driver.model_url:
            self._fetch_on_nodes(driver)
            waiting = True   # the Scheduled condition said so: put back what placement said
        while True:
            try:
                driver.start()
                break
            except NodeBusy as e:
                if not waiting:
                    msg = f"{e}; waiting for a session there to end"
                    self.set_condition("Scheduled", False, "NodesBusy", msg)
                    kube.event(self.body, "NodesBusy", msg, type_="Warning")
                    waiting = True
            self._waiting()
        if waiting and placed is not None:
            self.set_condition("Scheduled", True, placed["reason"], placed["message"])

    def fail(self, reason: str, message: str) -> None:
        self.set_condition("Ready", False, reason, message, phase="Failed")
        self.patch_status(finishedAt=kube.timestamp())
        kube.event(self.body, reason, message, type_="Warning")

    # -- resume ----------------------------------------------------------------------------------

    def _resume(self, driver: SessionDriver, views: dict, written: dict[str, dict],
                generated: list[int]) -> list[int]:
        """Pick the session up from its saved state; the generated tokens to go on from (the last one
        dropped when it cannot be shown to come from the logit row the final stage committed)."""
        st = driver.state
        sas = placement.read_assignments(self.namespace, self.name, len(st.nodes), self.body["metadata"]["uid"])
        for s, sa in enumerate(sas):
            if sa is not None and int(sa["spec"]["epoch"]) > st.epochs[s]:
                # A failover was decided but not saved before the restart: finish it from the saved state.
                st.epochs[s] = int(sa["spec"]["epoch"])
        for n, v in views.items():
            if v.public_key:
                driver.public_keys[n] = v.public_key
        driver._auditor.start()
        driver.start_warming()
        receipts.recover_open_windows(driver, written)   # before Truncate drops commitments past the saved positions
        for s, node in enumerate(list(st.nodes)):
            try:
                t = driver.clients[node].call("Truncate", pb.TruncateRequest(ref=driver._ref(s), position=st.done[s]))
                driver.set_context(s, t.n_ctx)
            except (grpc.RpcError, KeyError) as e:
                why = e.details() if isinstance(e, grpc.RpcError) else "not a usable node"
                driver._failover(s, f"{node} lost the stage across the operator restart: {why}")
        sp = self.spec.sampling
        why = last_token_unchecked(driver, generated, written, SamplingParams(sp.temperature, sp.top_p, sp.seed))
        if why:
            # Truncate every stage to the position before it and sample it again from a row checked now.
            driver._rollback(None, f"resumed: {why}", st.done[-1] - 1)
            generated = generated[:-1]
        # The audit inputs the driver kept in memory: token ids, and upstream outputs resent.
        seq = st.sequence()
        for s in range(len(st.nodes)):
            upto = st.done[s]
            if s == 0:
                rows = seq[:upto]
            else:
                rows = list(driver._stage_inputs(s, 0, upto)) if upto else []
            with driver._lock:
                for p, x in enumerate(rows):
                    driver._inputs[s][p] = x
        # What each stage's node signed at its current epoch, by position: the Receipts written before
        # the restart and the windows recovered since, the latest version of each row.
        with driver._lock:
            recovered = [(e["stage"], e["node"], e["epoch"], e["start"],
                          [base64.b64decode(c) for c in e["receipt"]["commitments"]], e["rollbacks"])
                         for e in driver.receipts if e["verified"]]
        windows = recovered + receipts.written_windows(written)
        for s in range(len(st.nodes) - 1):
            rows = [driver._inputs[s + 1][p] for p in range(st.done[s])]
            if rows:
                signed = receipts.signed_by_position(windows, s, st.nodes[s], st.epochs[s])
                cs = canonical.commit_rows(np.stack(rows), driver.grid)
                bad = driver.check_resent(s, cs, signed)
                log.info("%s: stage %d resent %d rows, %d checked against what its node signed, %d differ",
                         self.name, s, len(cs), sum(p in signed for p in range(len(cs))), len(bad))
                with driver._lock:
                    for p, c in enumerate(cs):
                        driver._commits[s][p] = (st.nodes[s], st.epochs[s], c)
        driver.restore_proofs()   # once the inputs are back: a unit's proof needs their digests
        queued = driver.requeue_audits()
        if queued:
            log.info("%s: %d audit unit(s) queued again after the restart", self.name, queued)
        return generated


def last_token_unchecked(driver: SessionDriver, generated: list[int], written: dict[str, dict],
                         sampling: SamplingParams) -> str | None:
    """Why the last saved token may not be what the final stage's logit row samples, or None. A
    token is saved as the final stage answers it; the check of its row may not have run before the
    operator stopped. `written`: the Receipts written so far (ReceiptWriter.index)."""
    st, last = driver.state, len(driver.state.nodes) - 1
    at = st.done[last]   # the token sits there; the row it was sampled from is at at - 1
    if not generated or at < len(st.prompt_tokens):
        return None
    try:
        row = driver.resent_rows(last, at - 1, at)[-1]
    except (grpc.RpcError, wire.TensorError) as e:
        return f"the final stage could not resend the row of the last token ({e})"
    signed = receipts.signed_by_position(receipts.written_windows(written), last, st.nodes[last],
                                         st.epochs[last]).get(at - 1)
    if signed and canonical.commit_rows(row[None, :], driver.grid)[0] not in signed:
        return "the final stage's row of the last token is not the one it signed"
    if sample(row, at, sampling) != generated[-1]:
        return "the last token is not what the final stage's row samples"
    return None


def step_metrics(steps) -> dict[str, float]:
    """The median step (the prompt's step left out) and, when a failover happened inside a step,
    how much longer the slowest such step took than the median: the failover's latency spike."""
    normal = [x.wall_ms for x in steps[1:] if not x.failover]
    out = {"stepMsMedian": round(statistics.median(normal), 3)} if normal else {}
    fo = [x.wall_ms for x in steps if x.failover]
    if fo:
        out["failoverSpikeMs"] = round(max(fo) - (statistics.median(normal) if normal else 0.0), 3)
    return out


class ProgressWriter:
    """Makes the session's progress writes on a thread of its own. Made in the token loop, they held
    up generation for as long as an API server hung (a stopped process, a link dropping packets): one
    stopped at token 10 for 12 s stopped the session within three positions, for the 12 s; now the
    rest of its answer, 137 tokens, came out meanwhile. The token loop offers what to write when the
    last write is done (`idle`); a write that fails for good is raised in the token loop
    (`raise_failure`), as it was when made there."""

    def __init__(self, write: Callable[[Any], None], name: str):
        self._write = write
        self._cond = threading.Condition()
        self._next: Any = None
        self._busy = False
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        return not self._busy and self._next is None

    def offer(self, item: Any) -> None:
        with self._cond:
            self._next = item
            self._cond.notify_all()

    def raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        """Waits for the write in flight (if any) and makes no other: what is still to write after
        generation is written by the caller, in order."""
        with self._cond:
            self._closed, self._next = True, None
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item, self._next, self._busy = self._next, None, True
            try:
                self._write(item)
            except BaseException as e:  # noqa: BLE001 - raised in the token loop
                self._failure = e
            finally:
                with self._cond:
                    self._busy = False


class _Guarded:
    """The driver as generate() sees it, checking between steps that the operator is not stopping
    and that no node of the session lost its Lease or was quarantined (NodeWatch)."""

    def __init__(self, driver: SessionDriver, stopped, nodes: failover.NodeWatch):
        self.driver, self.stopped, self.nodes = driver, stopped, nodes
        self.n_stages = driver.n_stages

    def forward(self, seq, position, tokens):
        self._check()
        return self.driver.forward(seq, position, tokens)

    def forward_token(self, seq, position, tokens, sampling):
        self._check()
        return self.driver.forward_token(seq, position, tokens, sampling)

    def _check(self):
        if self.stopped:
            raise Interrupted()
        self.nodes.check(self.driver)

    def stage_ms(self):
        return self.driver.stage_ms()

    def context_positions(self):
        return self.driver.context_positions()

    def rewind_position(self, wait: bool = False):
        q = self.driver.rewind_position(wait)
        if q is None and wait:
            # Generation is about to end (its audits drained): look at the nodes once more, however
            # recent the last look, so that a node quarantined in the cluster since then is rolled
            # back here too instead of the session completing with its work.
            self.nodes.check_quarantine(self.driver)
            q = self.driver.rewind_position(False)
        return q


@kopf.daemon(r.GROUP, r.VERSION, "inferencesessions", cancellation_timeout=30.0,
             when=lambda status, **_: (status or {}).get("phase") not in ("Completed", "Failed"))
def session_daemon(body, stopped, logger, **_):
    run = SessionRun(body, stopped)
    try:
        run.run()
    except Interrupted:
        logger.info("operator stopping; session %s resumes from its status", run.name)
    except Exception as e:
        logger.exception("session %s failed", run.name)
        run.fail("OperatorError", f"{type(e).__name__}: {e}")
