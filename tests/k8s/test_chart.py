"""The Helm chart on a real API server: it lints, renders into objects the server accepts, installs,
and its ServiceAccounts (operator, agent, the OpenAI-compatible endpoint's and the prune CronJob's)
can do exactly what the chart says (tokens from `kubectl create token`).

No kubelet runs here, so the Deployment and DaemonSet never start pods; the operator and agent
processes run elsewhere with these same tokens (DESIGN.md §7)."""
from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from consortium import resources as r

from k8s_helpers import (ROOT, ensure_namespace, eventually, get_json, install_crds, register_nodes, run_cli,
                         signed_ended_session)

pytestmark = pytest.mark.k8s

CHART = str(ROOT / "charts/consortium")
RELEASE = "consortium"
NS = "consortium-system"
SESSIONS = "rbac-sessions"
HEX = "cd" * 32


def test_helm_lint(cluster):
    done = cluster.helm("lint", "--strict", CHART)
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values", [[], ["--set", "models.type=pvc", "--set", "models.existingClaim=models",
                                         "--set", "agent.hostNetwork=true", "--set", "devPlaintext=true",
                                         "--set", "agent.extraArgs={--threads,8}"],
                                    ["--set", "tls.issuer=operator"],
                                    ["--set", "api.enabled=true", "--set", "api.keySecret=api-key",
                                     "--set", "prune.enabled=true", "--set", "prune.archiveClaim=archive",
                                     "--set-json", 'api.template={"model": {"name": "m", "file": "m.gguf"}, '
                                                   '"stages": [{"layers": "0-29"}]}']],
                         ids=["defaults", "pvc-hostnetwork-plaintext-args", "operator-issues-certificates",
                              "openai-endpoint-and-prune"])
def test_rendered_chart_is_accepted_by_the_server(cluster, values):
    ensure_namespace(cluster, NS)
    rendered = cluster.helm("template", RELEASE, CHART, "-n", NS, "--include-crds", *values).stdout
    done = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    for kind in ("deployment.apps/consortium-operator", "daemonset.apps/consortium-agent",
                 "clusterrole.rbac.authorization.k8s.io/consortium-operator",
                 "validatingadmissionpolicy.admissionregistration.k8s.io/consortium-agents-cannot-approve",
                 "validatingadmissionpolicy.admissionregistration.k8s.io/consortium-agents-own-node-only",
                 "customresourcedefinition.apiextensions.k8s.io/receipts.consortium.io"):
        assert kind in done.stdout
    assert ("deployment.apps/consortium-api" in done.stdout) == ("api.enabled=true" in values)
    assert ("cronjob.batch/consortium-prune" in done.stdout) == ("prune.enabled=true" in values)


def test_the_openai_endpoint_runs_the_template_it_is_given(cluster):
    def objects(*values):
        docs = yaml.safe_load_all(cluster.helm("template", RELEASE, CHART, "-n", NS, *values).stdout)
        return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}
    assert not any(name == "consortium-api" for _, name in objects())   # off by default
    template = {"model": {"name": "m", "file": "m.gguf"}, "stages": [{"layers": "0-29"}]}
    got = objects("--set", "api.enabled=true", "--set", "api.namespace=chat", "--set", "api.keySecret=k",
                  "--set-json", f"api.template={json.dumps(template)}")
    pod = got["Deployment", "consortium-api"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["consortium", "api"] and pod["serviceAccountName"] == "consortium-api"
    assert c["args"] == ["--listen=0.0.0.0:8080", "--namespace=chat", "--timeout=600", "--max-tokens-cap=4096",
                         "--max-concurrent=32", "--template=/etc/consortium/api/template.yaml"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "k", "key": "api-key"}
    manifest = yaml.safe_load(got["ConfigMap", "consortium-api"]["data"]["template.yaml"])
    assert manifest["kind"] == "InferenceSession" and manifest["spec"] == template
    assert got["Role", "consortium-api"]["metadata"]["namespace"] == "chat"
    assert got["Service", "consortium-api"]["spec"]["ports"][0]["port"] == 8080
    plain = objects("--set", "api.enabled=true")["Deployment", "consortium-api"]["spec"]["template"]["spec"]
    assert not any(a.startswith("--template") for a in plain["containers"][0]["args"])   # the default session
    assert "env" not in plain["containers"][0]
    uncapped = objects("--set", "api.enabled=true", "--set", "api.maxTokensCap=0")["Deployment", "consortium-api"]
    assert not any(a.startswith("--max-tokens-cap") for a in uncapped["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "patch" in got["Role", "consortium-api"]["rules"][0]["verbs"]   # to stop a session whose client left
    kept = objects("--set", "api.enabled=true", "--set", "api.keepOnDisconnect=true")
    assert "--keep-on-disconnect" in kept["Deployment", "consortium-api"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "patch" not in kept["Role", "consortium-api"]["rules"][0]["verbs"]
    done = cluster.helm("template", RELEASE, CHART, "--set", "api.enabled=true", "--set-json",
                        'api.template={"stages": [{"layers": "0-29"}]}', check=False)
    assert done.returncode != 0 and "api.template must give model.name" in done.stderr


def test_daemonset_runs_only_on_accelerator_labels(cluster):
    rendered = cluster.helm("template", RELEASE, CHART, "-n", NS, "--show-only", "templates/agent-daemonset.yaml").stdout
    ds = yaml.safe_load(rendered)
    terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": r.LABEL_ACCELERATOR, "operator": "In", "values": ["cuda", "metal"]}]}]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "consortium-agent"
    assert ds["spec"]["template"]["spec"]["containers"][0]["command"] == ["node-agent"]
    assert "args" not in ds["spec"]["template"]["spec"]["containers"][0]
    rendered = cluster.helm("template", RELEASE, CHART, "-n", NS, "--set", "agent.extraArgs={--audit-stall-s,600}",
                            "--show-only", "templates/agent-daemonset.yaml").stdout
    assert yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]["args"] == ["--audit-stall-s", "600"]


def test_agent_data_lane_port_is_declared_and_can_be_turned_off(cluster):
    def agent(*values):
        ds = yaml.safe_load(cluster.helm("template", RELEASE, CHART, "-n", NS, *values, "--show-only",
                                         "templates/agent-daemonset.yaml").stdout)
        c = ds["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in c["env"]}, {p["name"]: p["containerPort"] for p in c["ports"]}
    env, ports = agent()
    assert env["CONSORTIUM_DATA_PORT"] == "50052" and env["CONSORTIUM_METRICS_PORT"] == "9400"
    assert ports == {"grpc": 50051, "data-lane": 50052, "metrics": 9400}
    env, ports = agent("--set", "agent.dataPort=0", "--set", "agent.metricsPort=0")
    assert env["CONSORTIUM_DATA_PORT"] == "0" and env["CONSORTIUM_METRICS_PORT"] == "0" and ports == {"grpc": 50051}


@pytest.mark.parametrize("plaintext", [False, True], ids=["mtls", "dev-plaintext"])
def test_tls_material_is_mounted_unless_dev_plaintext(cluster, plaintext):
    """The operator reads its client certificate from a Secret, each agent its node's from the node."""
    values = ["--set", "devPlaintext=true"] if plaintext else []
    for template, source in (("operator-deployment", "secret"), ("agent-daemonset", "hostPath")):
        obj = yaml.safe_load(cluster.helm("template", RELEASE, CHART, "-n", NS, *values,
                                          "--show-only", f"templates/{template}.yaml").stdout)
        pod = obj["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        tls_volumes = [v for v in pod["volumes"] if v["name"] == "tls"]
        if plaintext:
            assert env["CONSORTIUM_PLAINTEXT"] == "1" and "CONSORTIUM_TLS_CERT" not in env and not tls_volumes
        else:
            assert env["CONSORTIUM_PLAINTEXT"] == "0" and env["CONSORTIUM_TLS_CA"] == "/etc/consortium/tls/ca.crt"
            assert source in tls_volumes[0]
    # Secret files are root's, mode 0400: only an fsGroup lets the operator's uid read its key.
    operator = yaml.safe_load(cluster.helm("template", RELEASE, CHART, "-n", NS, "--show-only",
                                           "templates/operator-deployment.yaml").stdout)["spec"]["template"]["spec"]
    assert operator["securityContext"]["fsGroup"] == operator["securityContext"]["runAsUser"]
    # The fraud-proof key comes from the same Secret as text, and may be absent.
    [proof] = [e for e in operator["containers"][0]["env"] if e["name"] == "CONSORTIUM_PROOF_KEY_PEM"]
    assert proof["valueFrom"]["secretKeyRef"] == {"name": "consortium-operator-tls", "key": "proof.pem",
                                                  "optional": True}


def test_operator_issued_certificates_change_files_and_rights(cluster):
    """tls.issuer operator: the operator gets the CA from its Secret and rights on certificate
    requests of its own signer; agents ask for theirs (no certificate folder on the node)."""
    def render(*values):
        docs = yaml.safe_load_all(cluster.helm("template", RELEASE, CHART, "-n", NS, *values).stdout)
        return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}

    def env(obj):
        return {e["name"]: e.get("value") for e in obj["spec"]["template"]["spec"]["containers"][0]["env"]}

    def csr_rules(objs, role):
        return [rule for rule in objs[("ClusterRole", f"consortium-{role}")]["rules"]
                if rule["apiGroups"] == ["certificates.k8s.io"]]
    admin, issuing = render(), render("--set", "tls.issuer=operator")
    assert not csr_rules(admin, "operator") and not csr_rules(admin, "agent")
    assert [rule["verbs"] for rule in csr_rules(issuing, "agent")] == [["create", "get"]]
    [signers] = [rule for rule in csr_rules(issuing, "operator") if rule["resources"] == ["signers"]]
    assert signers["resourceNames"] == ["consortium.io/agent"] and signers["verbs"] == ["approve", "sign"]
    operator = env(issuing[("Deployment", "consortium-operator")])
    assert operator["CONSORTIUM_TLS_CA_KEY"] == "/etc/consortium/tls/ca.key" and "CONSORTIUM_TLS_CERT" not in operator
    assert operator["CONSORTIUM_AGENT_SERVICE_ACCOUNT"] == "consortium-agent"
    ds = issuing[("DaemonSet", "consortium-agent")]
    assert env(ds)["CONSORTIUM_TLS_FROM_CLUSTER"].startswith(env(ds)["CONSORTIUM_IDENTITY_DIR"] + "/")
    assert "CONSORTIUM_TLS_CERT" not in env(ds)
    assert not [v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    done = cluster.helm("template", RELEASE, CHART, "--set", "tls.issuer=cert-manager", check=False)
    assert done.returncode != 0 and "tls.issuer must be admin or operator" in done.stderr


def test_grafana_dashboard_is_shipped_on_request(cluster):
    """metrics.grafanaDashboard.enabled: the dashboard JSON in a ConfigMap with the sidecar's label;
    its queries are checked against what the processes serve in tests/operator/test_session.py and
    tests/dataplane/test_agent_metrics.py."""
    def configmaps(*values):
        docs = yaml.safe_load_all(cluster.helm("template", RELEASE, CHART, "-n", NS, *values).stdout)
        return [d for d in docs if d and d["kind"] == "ConfigMap"]
    assert not configmaps()
    [cm] = configmaps("--set", "metrics.grafanaDashboard.enabled=true")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == NS
    dashboard = json.loads(cm["data"]["consortium.json"])
    assert dashboard["uid"] == "consortium" and dashboard == json.loads((ROOT / "charts/consortium/dashboards/consortium.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15 and all("consortium_" in e for e in exprs)
    ensure_namespace(cluster, NS)
    done = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(cm))
    assert "configmap/consortium-dashboard" in done.stdout


def test_bad_model_source_is_refused_at_render_time(cluster):
    done = cluster.helm("template", RELEASE, CHART, "--set", "models.type=nfs", check=False)
    assert done.returncode != 0 and "models.type must be hostPath, pvc or none" in done.stderr


def test_prune_without_a_place_for_archives_is_refused_at_render_time(cluster):
    done = cluster.helm("template", RELEASE, CHART, "--set", "prune.enabled=true", check=False)
    assert done.returncode != 0 and "prune.enabled needs prune.archiveClaim" in done.stderr
    docs = yaml.safe_load_all(cluster.helm("template", RELEASE, CHART, "--set", "prune.enabled=true",
                                           "--set", "prune.noArchive=true").stdout)
    job = next(d for d in docs if d and d["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "--no-archive" in job["containers"][0]["args"] and "volumes" not in job


@pytest.fixture(scope="module")
def installed(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, SESSIONS)
    cluster.helm("upgrade", "--install", RELEASE, CHART, "-n", NS, "--create-namespace",
                 "--set", "api.enabled=true", "--set", f"api.namespace={SESSIONS}",
                 "--set", "prune.enabled=true", "--set", "prune.archiveClaim=session-archive")
    cluster.kubectl("apply", "-n", SESSIONS, "-f", str(ROOT / "manifests/sessions/minimal.yaml"))
    tokens = {who: cluster.create_token(f"{RELEASE}-{who}", NS) for who in ("operator", "agent", "api", "prune")}
    yield cluster, tokens
    cluster.helm("uninstall", RELEASE, "-n", NS, check=False)


def _as(installed, who, *args, input=None):
    """Run kubectl as "operator", "agent" (a token bound to no node) or "agent:<node>" (the agent
    ServiceAccount with a token bound to Node <node>, as every real agent has)."""
    cluster, tokens = installed
    if who not in tokens:
        tokens[who] = cluster.node_bound_token(f"{RELEASE}-agent", NS, who.split(":", 1)[1])
    return cluster.kubectl(*args, token=tokens[who], input=input, check=False)


def _forbidden(done) -> bool:
    return done.returncode != 0 and "forbidden" in done.stderr.lower()


def _can(installed, who, verb, resource, namespace=None, subresource=None) -> bool:
    args = ["auth", "can-i", verb, resource] + (["-n", namespace] if namespace else []) + \
        ([f"--subresource={subresource}"] if subresource else [])
    return _as(installed, who, *args).stdout.strip() == "yes"


def _wait_until_bound(installed, who, verb, resource):
    # Without this, a "forbidden" below could mean only that the bindings had not arrived yet.
    def check():
        assert _can(installed, who, verb, resource)
    eventually(check)


def test_operator_can_drive_sessions(installed):
    def check():
        done = _as(installed, "operator", "patch", "inferencesession", "minimal", "-n", SESSIONS,
                   "--subresource=status", "--type=merge", "-p", json.dumps({"status": {"phase": "Scheduling"}}))
        assert done.returncode == 0, done.stderr
    eventually(check)
    assert get_json(installed[0], "inferencesession", "minimal", "-n", SESSIONS)["status"]["phase"] == "Scheduling"
    assignment = r.StageAssignment(metadata={"name": "minimal-s0"}, spec=r.StageAssignmentSpec(
        session="minimal", stage_index=0, layers=r.LayerRange(start=0, end=29), node_name="n0")).to_k8s()
    done = _as(installed, "operator", "apply", "-n", SESSIONS, "-f", "-", input=json.dumps(assignment))
    assert done.returncode == 0, done.stderr
    receipt = r.Receipt(metadata={"name": "minimal-s0-w0"}, spec=r.ReceiptSpec(
        session="minimal", stage=0, node="n0", epoch=0, window=r.Window(start=0, count=1), commitments=[HEX],
        merkle_root=HEX, input_digest=HEX, grid=r.CanonicalGrid(), signature="c2ln",
        public_key_fingerprint=HEX)).to_k8s()
    done = _as(installed, "operator", "create", "-n", SESSIONS, "-f", "-", input=json.dumps(receipt))
    assert done.returncode == 0, done.stderr
    assert _can(installed, "operator", "create", "events", SESSIONS)
    assert _can(installed, "operator", "watch", "leases", NS)
    assert _can(installed, "operator", "patch", "computenodes", subresource="status")


def test_operator_cannot_read_secrets_or_delete_sessions(installed):
    _wait_until_bound(installed, "operator", "list", "inferencesessions")
    assert _forbidden(_as(installed, "operator", "get", "secrets", "-n", NS))
    assert _forbidden(_as(installed, "operator", "get", "secrets", "-n", SESSIONS))
    assert _forbidden(_as(installed, "operator", "delete", "inferencesession", "minimal", "-n", SESSIONS))
    assert _forbidden(_as(installed, "operator", "get", "pods", "-n", NS))
    assert not _can(installed, "operator", "create", "leases", NS)
    # Its replicas' leader Lease, which the chart made, it may renew; no agent's.
    assert _can(installed, "operator", "update", "leases/consortium-operator-leader", NS)
    assert not _can(installed, "operator", "update", "leases/some-agent", NS)


def test_agent_registers_and_reports_its_node(installed):
    node = r.ComputeNode(metadata={"name": "agent-registered"}, spec=r.ComputeNodeSpec(
        endpoint="10.0.0.7:50051", public_key="0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=",
        labels={r.LABEL_ACCELERATOR: "cuda"})).to_k8s()

    def check():
        done = _as(installed, "agent:agent-registered", "apply", "-f", "-", input=json.dumps(node))
        assert done.returncode == 0, done.stderr
    eventually(check)
    done = _as(installed, "agent:agent-registered", "patch", "computenode", "agent-registered", "--subresource=status",
               "--type=merge", "-p", json.dumps({"status": {"backend": "cpu", "llamaCpp": {"version": "0.3.36"}}}))
    assert done.returncode == 0, done.stderr
    assert get_json(installed[0], "computenode", "agent-registered")["status"]["backend"] == "cpu"
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "consortium-agent-agent-registered", "namespace": NS},
             "spec": {"holderIdentity": "agent-registered", "leaseDurationSeconds": 15}}
    assert _as(installed, "agent:agent-registered", "apply", "-f", "-", input=json.dumps(lease)).returncode == 0
    assert _can(installed, "agent", "watch", "stageassignments", SESSIONS)
    assert _can(installed, "agent", "patch", "stageassignments", SESSIONS, subresource="status")


def test_agent_cannot_approve_itself(installed):
    _as(installed, "agent:agent-greedy", "apply", "-f", "-", input=json.dumps(r.ComputeNode(
        metadata={"name": "agent-greedy"}, spec=r.ComputeNodeSpec(
            endpoint="10.0.0.8:50051", public_key="0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=")).to_k8s()))

    def refused():
        done = _as(installed, "agent:agent-greedy", "patch", "computenode", "agent-greedy", "--type=merge",
                   "-p", json.dumps({"spec": {"approved": True}}))
        assert done.returncode != 0 and "a node agent cannot approve a ComputeNode" in done.stderr, done.stderr
    eventually(refused)  # the admission policy takes effect a moment after install
    greedy = r.ComputeNode(metadata={"name": "agent-approved-at-birth"}, spec=r.ComputeNodeSpec(
        endpoint="10.0.0.9:50051", public_key="0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=", approved=True))
    done = _as(installed, "agent:agent-approved-at-birth", "create", "-f", "-", input=json.dumps(greedy.to_k8s()))
    assert done.returncode != 0 and "a node agent cannot approve a ComputeNode" in done.stderr
    # The admin still can.
    installed[0].kubectl("patch", "computenode", "agent-greedy", "--type=merge", "-p", '{"spec":{"approved":true}}')
    assert get_json(installed[0], "computenode", "agent-greedy")["spec"]["approved"] is True


def test_agent_cannot_touch_sessions_receipts_or_secrets(installed):
    _wait_until_bound(installed, "agent", "get", "computenodes")
    assert _forbidden(_as(installed, "agent", "delete", "inferencesession", "minimal", "-n", SESSIONS))
    assert _forbidden(_as(installed, "agent", "get", "inferencesessions", "-n", SESSIONS))
    receipt = {"apiVersion": r.API_VERSION, "kind": "Receipt", "metadata": {"name": "forged", "namespace": SESSIONS},
               "spec": {"session": "minimal", "stage": 0, "node": "n", "epoch": 0, "window": {"start": 0, "count": 1},
                        "commitments": [HEX], "merkleRoot": HEX, "inputDigest": HEX, "grid": {},
                        "signature": "c2ln", "publicKeyFingerprint": HEX}}
    assert _forbidden(_as(installed, "agent", "create", "-f", "-", input=json.dumps(receipt)))
    assert _forbidden(_as(installed, "agent", "get", "secrets", "-n", NS))
    assert _forbidden(_as(installed, "agent", "delete", "computenode", "agent-registered"))
    assert not _can(installed, "agent", "create", "leases", SESSIONS)
    assert not _can(installed, "agent", "create", "stageassignments", SESSIONS)


# -- one agent cannot speak for another (the agents-own-node-only admission policy) ---------------

def _node(name: str) -> str:
    return json.dumps(r.ComputeNode(metadata={"name": name}, spec=r.ComputeNodeSpec(
        endpoint="10.0.0.10:50051", public_key="0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=")).to_k8s())


def _lease(node: str, holder: str | None = None) -> str:
    return json.dumps({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": f"consortium-agent-{node}", "namespace": NS},
                       "spec": {"holderIdentity": holder or node, "leaseDurationSeconds": 15}})


def test_agent_token_bound_to_no_node_is_refused(installed):
    def refused():
        done = _as(installed, "agent", "apply", "-f", "-", input=_node("agent-unbound"))
        assert done.returncode != 0 and "token must be bound to its node" in done.stderr, done.stderr
    eventually(refused)
    done = _as(installed, "agent", "apply", "-f", "-", input=_lease("agent-unbound"))
    assert done.returncode != 0 and "token must be bound to its node" in done.stderr


def test_agent_cannot_write_another_nodes_computenode_lease_or_assignment(installed):
    cluster = installed[0]

    def own_node_ok():
        done = _as(installed, "agent:id-a", "apply", "-f", "-", input=_node("id-a"))
        assert done.returncode == 0, done.stderr
    eventually(own_node_ok)
    assert _as(installed, "agent:id-a", "apply", "-f", "-", input=_lease("id-a")).returncode == 0

    # b poses as a: its ComputeNode (spec and status), its Lease; and registering as a from scratch.
    for args in (["patch", "computenode", "id-a", "--type=merge", "-p", '{"spec":{"endpoint":"10.6.6.6:50051"}}'],
                 ["patch", "computenode", "id-a", "--subresource=status", "--type=merge", "-p",
                  '{"status":{"backend":"cuda"}}']):
        done = _as(installed, "agent:id-b", *args)
        assert done.returncode != 0 and "the agent of node id-b cannot write ComputeNode id-a" in done.stderr, done.stderr
    done = _as(installed, "agent:id-b", "apply", "-f", "-", input=_lease("id-a", holder="id-b"))
    assert done.returncode != 0 and "the agent of node id-b cannot write Lease consortium-agent-id-a" in done.stderr
    done = _as(installed, "agent:id-b", "create", "-f", "-", input=_node("id-c"))
    assert done.returncode != 0 and "cannot write ComputeNode id-c" in done.stderr
    assert get_json(cluster, "computenode", "id-a")["spec"]["endpoint"] == "10.0.0.10:50051"

    # StageAssignments: only the status of one placed on the caller's node.
    sa = r.StageAssignment(metadata={"name": "minimal-s1"}, spec=r.StageAssignmentSpec(
        session="minimal", stage_index=1, layers=r.LayerRange(start=0, end=29), node_name="id-a")).to_k8s()
    cluster.kubectl("apply", "-n", SESSIONS, "-f", "-", input=json.dumps(sa))
    status = ["patch", "stageassignment", "minimal-s1", "-n", SESSIONS, "--subresource=status", "--type=merge",
              "-p", '{"status":{"observedEpoch":1}}']
    done = _as(installed, "agent:id-b", *status)
    assert done.returncode != 0 and "cannot write StageAssignment minimal-s1 (placed on id-a)" in done.stderr
    done = _as(installed, "agent:id-a", *status)
    assert done.returncode == 0, done.stderr
    # The admin is not an agent: the policy does not apply.
    cluster.kubectl("patch", "computenode", "id-a", "--type=merge", "-p", '{"spec":{"endpoint":"10.0.0.11:50051"}}')


# -- the OpenAI-compatible endpoint's identity ------------------------------------------------------

def test_the_endpoint_makes_and_follows_sessions_in_its_namespace_and_nothing_more(installed, tmp_path):
    def bound():   # the Role is in the sessions' namespace
        assert _can(installed, "api", "create", "inferencesessions", SESSIONS)
    eventually(bound)
    for verb in ("create", "get", "list", "watch", "patch"):   # patch: to stop a session whose client left
        assert _can(installed, "api", verb, "inferencesessions", SESSIONS), verb
    for verb in ("delete", "update"):
        assert not _can(installed, "api", verb, "inferencesessions", SESSIONS), verb
    # What patch allows is the stop annotation: the spec stays as it was made.
    changed = _as(installed, "api", "patch", "inferencesession", "minimal", "-n", SESSIONS, "--type=merge",
                  "-p", json.dumps({"spec": {"maxTokens": 7}}))
    assert changed.returncode != 0 and "immutable" in changed.stderr, changed.stderr
    stop = _as(installed, "api", "patch", "inferencesession", "minimal", "-n", SESSIONS, "--type=merge",
               "-p", json.dumps({"metadata": {"annotations": {r.ANNOTATION_STOP: "test"}}}))
    assert stop.returncode == 0, stop.stderr
    assert not _can(installed, "api", "create", "inferencesessions", NS)
    assert not _can(installed, "api", "patch", "inferencesessions", SESSIONS, subresource="status")
    for resource in ("receipts", "stageassignments", "secrets"):
        assert not _can(installed, "api", "get", resource, SESSIONS), resource
    assert not _can(installed, "api", "get", "computenodes")

    # The process itself, with that token: a request makes a session (no operator runs here, so it
    # stays Pending and the answer times out, saying so), and nothing else is needed.
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from consortium.cluster import free_port

    cluster, tokens = installed
    kubeconfig = cluster.write_kubeconfig(tmp_path / "api.kubeconfig", token=tokens["api"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "consortium.cli", "api", "--listen", f"127.0.0.1:{port}",
                             "-n", SESSIONS, "--kubeconfig", kubeconfig, "--timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r_:
                assert r_.status == 200
        eventually(lambda: _no_refusal(up), timeout=30)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode())
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("a session no operator runs cannot complete")
        except urllib.error.HTTPError as e:
            code, err = e.code, json.loads(e.read())["error"]
        assert code == 504 and "still" in err["message"], err
        name = err["consortium"]["session"].split("/")[1]
        made = get_json(cluster, "inferencesession", name, "-n", SESSIONS)
        assert made["metadata"]["labels"][f"{r.GROUP}/created-by"] == "openai-api"
        assert made["spec"]["messages"] == [{"role": "user", "content": "Hi"}] and made["spec"]["maxTokens"] == 4
    finally:
        proc.terminate()
        proc.wait(10)


def test_prune_deletes_ended_sessions_in_its_namespace_and_nothing_more(installed, tmp_path):
    def bound():
        assert _can(installed, "prune", "delete", "inferencesessions", SESSIONS)
    eventually(bound)
    for verb in ("get", "list", "delete"):
        assert _can(installed, "prune", verb, "inferencesessions", SESSIONS), verb
    for verb in ("create", "patch", "update"):
        assert not _can(installed, "prune", verb, "inferencesessions", SESSIONS), verb
    assert not _can(installed, "prune", "patch", "inferencesessions", SESSIONS, subresource="status")
    assert not _can(installed, "prune", "delete", "inferencesessions", NS)
    assert _can(installed, "prune", "list", "receipts", SESSIONS)
    for verb in ("create", "patch", "delete"):
        assert not _can(installed, "prune", verb, "receipts", SESSIONS), verb
    assert _can(installed, "prune", "get", "computenodes") and not _can(installed, "prune", "patch", "computenodes")
    assert not _can(installed, "prune", "get", "secrets", SESSIONS)

    # The CronJob's own command line, with its token: the ended session the endpoint made goes, archived
    # (its nodes' keys read); the one applied by hand and a session still pending stay.
    cluster, tokens = installed
    keys = register_nodes(cluster, ("prune-a", "prune-b"))
    try:
        signed_ended_session(cluster, SESSIONS, "chat-ended", keys, ago=dt.timedelta(days=8),
                             labels={f"{r.GROUP}/created-by": "openai-api"})
        signed_ended_session(cluster, SESSIONS, "by-hand-ended", keys, ago=dt.timedelta(days=8))
        job = get_json(cluster, "cronjob", f"{RELEASE}-prune", "-n", NS)["spec"]["jobTemplate"]["spec"]["template"]
        container = job["spec"]["containers"][0]
        assert container["command"] == ["consortium", "prune"]
        assert job["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "session-archive"
        notes = cluster.helm("get", "notes", RELEASE, "-n", NS).stdout
        assert f"CronJob {RELEASE}-prune" in notes and "archived first in claim session-archive" in notes, notes
        args = [a.replace("=/archive", f"={tmp_path}") for a in container["args"]]
        assert f"--archive-dir={tmp_path}" in args and f"--namespace={SESSIONS}" in args
        kubeconfig = cluster.write_kubeconfig(tmp_path / "prune.kubeconfig", token=tokens["prune"])
        done = run_cli("prune", *args, "--kubeconfig", kubeconfig, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "1 of 1 sessions pruned" in done.stderr and "(all verify)" in done.stdout, done.stdout + done.stderr
        left = {s["metadata"]["name"] for s in get_json(cluster, "inferencesessions", "-n", SESSIONS)["items"]}
        assert "chat-ended" not in left and {"by-hand-ended", "minimal"} <= left
        archived = run_cli("verify-receipts", "--archive", *[str(p) for p in tmp_path.glob("*.json.gz")], cwd=tmp_path)
        assert archived.returncode == 0 and "OK: all 5 receipts verify" in archived.stdout, archived.stdout
    finally:
        cluster.kubectl("delete", "computenode", "prune-a", "prune-b", "--ignore-not-found")


def _no_refusal(check):
    """`check`, with a refused connection (the server not listening yet) as a failed assertion."""
    try:
        check()
    except OSError as e:
        raise AssertionError(str(e)) from e
