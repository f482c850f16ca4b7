"""Consortium on a control plane, with the operator and the agents as processes: what
`consortium testcase` (without --standalone) and the operator tests set up.

The chart is installed as a Helm release (no kubelet runs its Deployment or DaemonSet), and the
operator and each agent run with a token of their own ServiceAccount, so the chart's RBAC is what
they live with. Agents register themselves; an admin approves them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from consortium import resources as r
from consortium import kube, processes, tls, wire
from consortium.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
NS = "consortium-system"
TEST_MAX_TOKENS = 32  # the operator tests: enough to pass token 20, where stage 1 dies
RELEASE = "consortium"
OPERATOR_SA = "consortium-operator"
AGENT_SA = "consortium-agent"

# Test Case v1's machines: N0 the CUDA coordinator (verifier, backup), N1 the CUDA worker, N2 the Metal
# worker and verifier. The labels are what an admin would set; the backend is what llama.cpp detects.
NODE_LABELS = {
    "n0": {r.LABEL_ACCELERATOR: "cuda", r.LABEL_COORDINATOR: "true", r.LABEL_VERIFIER: "true"},
    "n1": {r.LABEL_ACCELERATOR: "cuda", r.LABEL_WORKER: "true"},
    "n2": {r.LABEL_ACCELERATOR: "metal", r.LABEL_WORKER: "true", r.LABEL_VERIFIER: "true"},
}


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy (polling the API, not standing in for compute)."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class Testbed:
    def __init__(self, cluster, workdir: Path, threads: int = 1, plaintext: bool = False, issuer: str = "admin"):
        """Mutual TLS unless `plaintext`: a CA made for this testbed issues each agent a certificate
        naming it (as a user supplies them) and the operator its client certificate; with issuer
        "operator" (the chart's tls.issuer) the operator holds the CA and signs the certificates the
        agents ask for."""
        self.cluster, self.workdir, self.threads, self.issuer = cluster, Path(workdir), threads, issuer
        self.ca = None if plaintext else tls.CertificateAuthority.create()
        self.driver_tls = None if plaintext else tls.Credentials(*self.ca.issue(tls.DRIVER_NAME, server=False),
                                                                 self.ca.cert_pem)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.operator: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}
        self._operator_runs = 0
        self._api = None

    # -- install ---------------------------------------------------------------------------------

    def install(self) -> None:
        c = self.cluster
        c.kubectl("apply", "-f", str(ROOT / "crds"))
        c.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  *[f"crd/{k.plural}.{r.GROUP}" for k in r.KINDS])
        c.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        # Installed as a Helm release (not `helm template | kubectl apply`), so the chart's own tests
        # and `helm upgrade` find objects Helm owns. The operator runs as a process, not a Deployment.
        c.helm("upgrade", "--install", RELEASE, str(ROOT / "charts/consortium"), "-n", NS,
               "--set", f"devPlaintext={str(self.ca is None).lower()}", "--set", f"tls.issuer={self.issuer}",
               "--set", "operator.replicas=0")
        self.operator_kubeconfig = c.write_kubeconfig(self.workdir / "operator.kubeconfig",
                                                      token=c.create_token(OPERATOR_SA, NS, duration="2h"))
        # RBAC reaches the server's authorizer a moment after it is written.
        wait_until(lambda: c.kubectl("auth", "can-i", "create", "computenodes.consortium.io", "--as",
                                     f"system:serviceaccount:{NS}:{AGENT_SA}", check=False).stdout.strip() == "yes",
                   30, "agent RBAC")

    # -- processes -------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        env["CONSORTIUM_NAMESPACE"] = NS
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _tls_args(self, name: str) -> list[str]:
        if self.ca is None:
            return ["--plaintext"]
        if self.issuer == "operator":
            if name != tls.DRIVER_NAME:
                return ["--tls-from-cluster", str(self.workdir / "tls" / name)]
            if not (self.workdir / "tls" / "ca" / "ca.key").exists():
                self.ca.save(self.workdir / "tls" / "ca")
            return ["--tls-ca", str(self.workdir / "tls" / "ca" / "ca.crt"),
                    "--tls-ca-key", str(self.workdir / "tls" / "ca" / "ca.key")]
        creds = self.driver_tls if name == tls.DRIVER_NAME else tls.Credentials(*self.ca.issue(name), self.ca.cert_pem)
        f = creds.write(self.workdir / "tls" / name)
        return ["--tls-cert", f["cert"], "--tls-key", f["key"], "--tls-ca", f["ca"]]

    def start_operator(self, extra: list[str] = ()) -> subprocess.Popen:
        self._operator_runs += 1
        log = open(self.workdir / f"operator-{self._operator_runs}.log", "wb")
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"   # the operator's Prometheus metrics
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "consortium_operator.main", "--kubeconfig", self.operator_kubeconfig,
             "--agent-namespace", NS, "--proof-key", str(self.workdir / "keys" / "operator-proofs.pem"),
             "--metrics-port", str(port),
             *self._tls_args(tls.DRIVER_NAME), *extra], stdout=log, stderr=subprocess.STDOUT, env=self._env())
        return self.operator

    def operator_log(self) -> str:
        return (self.workdir / f"operator-{self._operator_runs}.log").read_text(errors="replace")

    def kill_operator(self) -> None:
        if self.operator and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGKILL)
            self.operator.wait()

    def agent_kubeconfig(self, name: str) -> str:
        """The agent ServiceAccount with a token bound to Node `name`, as an admin hands a bare agent."""
        return self.cluster.write_kubeconfig(self.workdir / f"agent-{name}.kubeconfig", token=self.cluster.node_bound_token(
            AGENT_SA, NS, name, duration="2h"))

    def start_agent(self, name: str, labels: dict[str, str], extra: list[str] = (), host=None,
                    kubeconfig: str | None = None, wait: bool = True) -> subprocess.Popen:
        """An agent process; with `host` (a consortium.netlab.Host) inside that host's network
        namespace on its address, logging in with `kubeconfig` (one that reaches the API server from
        there, netlab's forwarder). Returned once it serves and has registered, unless not `wait`
        (then wait_agent)."""
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        addr = host.address if host is not None else "127.0.0.1"
        cmd = [*(host.prefix() if host is not None else []),
               sys.executable, "-m", "node_agent.main", "--listen", f"{addr}:0", "--port-file", str(port_file),
               "--key-file", str(self.workdir / "keys" / f"{name}.pem"), "--node-id", name, "--name", name,
               *self._tls_args(name), "--threads", str(self.threads), "--kubeconfig", kubeconfig or self.agent_kubeconfig(name),
               "--namespace", NS, "--labels", ",".join(f"{k}={v}" for k, v in labels.items()), *extra]
        log = open(self.workdir / f"agent-{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env())
        self.agents[name] = p
        if wait:
            self.wait_agent(name, addr)
        return p

    def wait_agent(self, name: str, addr: str = "127.0.0.1", timeout: float = 120) -> None:
        """Until agent `name` has registered and serves (it writes its port file then)."""
        p, port_file = self.agents[name], self.workdir / f"{name}.port"
        wait_until(lambda: port_file.is_file() or p.poll() is not None, timeout, f"agent {name} to serve")
        if p.poll() is not None:
            raise RuntimeError(f"agent {name} exited: {(self.workdir / f'agent-{name}.log').read_text()[-2000:]}")
        self.endpoints[name] = f"{addr}:{int(port_file.read_text())}"

    def channel(self, name: str):
        """A gRPC channel to agent `name` as the operator would open it (tests call agents directly)."""
        if self.ca is None:
            return grpc.insecure_channel(self.endpoints[name], options=wire.CHANNEL_OPTIONS)
        return tls.secure_channel(self.endpoints[name], name, self.driver_tls, wire.CHANNEL_OPTIONS)

    def kill_agent(self, name: str) -> None:
        p = self.agents[name]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()

    def approve(self, *names: str) -> None:
        for n in names:
            wait_until(lambda n=n: self.cluster.kubectl("get", "computenode", n, check=False).returncode == 0,
                       60, f"ComputeNode {n}")
            self.cluster.kubectl("patch", "computenode", n, "--type", "merge", "-p", '{"spec":{"approved":true}}')

    def close(self) -> None:
        processes.stop(([self.operator] if self.operator else []) + list(self.agents.values()), timeout=15)

    def set_quarantined(self, node: str, value: bool) -> None:
        """Set or lift a ComputeNode's Quarantined condition, as the operator would (for tests),
        at once (a Python client: 25 ms, where kubectl took most of a second), at the
        resourceVersion read, so that a condition the agent's registrar writes meanwhile is neither
        lost nor undoes this one."""
        api = self.api()

        def change(status: dict) -> dict:
            status["conditions"] = kube.with_condition(status.get("conditions"), "Quarantined", value, "Test",
                                                       "set by the test")
            return status
        kube.update_status(lambda: api.get_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", node),
                           lambda b: api.patch_cluster_custom_object_status(r.GROUP, r.VERSION, "computenodes",
                                                                            node, b),
                           change)

    # -- API ---------------------------------------------------------------------------------------

    def api(self):
        """A CustomObjectsApi on the admin's kubeconfig (not kubectl: faster where timing matters)."""
        from kubernetes import client, config

        if self._api is None:
            self._api = client.CustomObjectsApi(config.new_client_from_config(config_file=self.cluster.kubeconfig))
        return self._api

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None):
        args = ["get", kind] + ([name] if name else []) + (["-n", namespace] if namespace else [])
        args += (["-l", selector] if selector else []) + ["-o", "json"]
        return json.loads(self.cluster.kubectl(*args).stdout)

    def session(self, name: str, namespace: str) -> dict:
        return self.get("inferencesession", name, namespace)

    def session_id(self, name: str, namespace: str) -> str:
        """The id the agents know the session by (with its uid)."""
        s = self.api().get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, r.InferenceSession.plural, name)
        return r.session_id(namespace, name, s["metadata"]["uid"])

    def wait_assignment(self, name: str, namespace: str, stage: int, timeout: float) -> dict:
        """The spec (nodeName, epoch, ...) of the StageAssignment of `stage` of the session, read as
        soon as it exists (through the API's client every 20 ms: kubectl takes a few tenths of a
        second a call, in which a short session's first tokens go by)."""
        api = self.api()

        def placed():
            try:
                sa = api.get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, r.StageAssignment.plural,
                                                      f"{name}-s{stage}")
            except Exception as e:  # noqa: BLE001 - not there yet
                if kube.is_status(e, 404):
                    return None
                raise
            return sa["spec"]
        return wait_until(placed, timeout, f"stage {stage} of {name} to be placed", every=0.02)

    def wait_token(self, name: str, namespace: str, node: str, stage: int, token: int, timeout: float,
                   prompt_len: int | None = None) -> int:
        """Block until `node`, serving `stage` of the session, has computed its row of the step that
        generates token number `token` (position prompt + token - 2), asked of the agent's Health
        every 10 ms: the operator writes the session's status at most every
        PROGRESS_INTERVAL_S, so status.position tells where a session is only to within several
        tokens. A fault injected then lands in the next step, as the seed's "at token 20" means.
        For token <= 0, until the agent has loaded the stage: a fault then lands in the prompt.
        The prompt's length is read from the session's first saved state unless the caller knows it
        (`prompt_len`): that state may be written a few tokens late, and the fault with it.
        Returns max(token, 0)."""
        deadline = time.monotonic() + timeout
        api = self.api()

        def saved_prompt_len():   # from the first saved state, written with the first token (not kubectl: slower)
            s = api.get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, r.InferenceSession.plural, name)
            drv = ((s.get("status") or {}).get("report") or {}).get("driverState")
            return len(drv["prompt_tokens"]) if drv else None
        if token <= 0:
            at, what = None, "load"
        else:
            if prompt_len is None:
                prompt_len = wait_until(saved_prompt_len, timeout, f"{name}'s first saved state", every=0.01)
            at = prompt_len + token - 2
            what = f"compute position {at} of"
        channel = self.channel(node)
        try:
            stub, sid = wire.pb_grpc.NodeAgentStub(channel), self.session_id(name, namespace)
            while time.monotonic() < deadline:
                try:
                    health = stub.Health(wire.pb.HealthRequest(session=sid), timeout=5)
                except grpc.RpcError:
                    health = None
                if health is not None and (stage in health.held_stages if at is None else any(
                        c.stage == stage and c.position >= at for c in health.counters)):
                    return max(token, 0)
                time.sleep(0.01)   # each Health costs the agent a little CPU: about one a step
        finally:
            channel.close()
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {node} to {what} stage {stage} of {name}")

    def stage_position(self, node: str, session_id: str, stage: int) -> int | None:
        """The last position `node` computed for `stage` of a session, from its Health (no API
        call: usable while the API server is away); None once it holds none of the session's rows
        (released: the session ended)."""
        channel = self.channel(node)
        try:
            counters = wire.pb_grpc.NodeAgentStub(channel).Health(wire.pb.HealthRequest(session=session_id),
                                                                  timeout=10).counters
        finally:
            channel.close()
        return max((c.position for c in counters if c.stage == stage), default=None)

    def wait_phase(self, name: str, namespace: str, phases: tuple[str, ...], timeout: float) -> dict:
        def check():
            if self.operator is not None and self.operator.poll() is not None:
                raise RuntimeError(f"the operator exited: {self.operator_log()[-3000:]}")
            s = self.session(name, namespace)
            ph = (s.get("status") or {}).get("phase")
            if ph == "Failed" and "Failed" not in phases:
                raise RuntimeError(f"session {name} failed: {json.dumps(s.get('status'))[:3000]}")
            return s if ph in phases else None
        return wait_until(check, timeout, f"session {name} in {phases}", every=0.5)

    def events(self, namespace: str, name: str) -> list[dict]:
        items = self.get("events", namespace=namespace)["items"]
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]


def sky_is_blue(max_tokens: int, name: str = "sky-is-blue", audit_probability: float = 0.2) -> dict:
    import yaml

    body = yaml.safe_load((ROOT / "manifests/sessions/sky-is-blue.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["maxTokens"] = max_tokens
    body["spec"]["audit"]["probability"] = audit_probability
    return body
