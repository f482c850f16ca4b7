"""The resource models, the CRDs generated from them, and the example manifests agree (no cluster needed).

The API server's side of the same facts is in tests/k8s/test_api.py.
"""
import datetime
import pathlib
import subprocess
import sys
import types
import typing

import pydantic
import pytest
import yaml

from consortium import crdgen
from consortium import resources as r

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((ROOT / "tests/k8s/invalid/cases.yaml").read_text())
BY_KIND = {kind.kind_name: kind for kind in r.KINDS}


def example_manifests():
    return list(_example_manifests())


def _example_manifests():
    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion") == r.API_VERSION:
                yield pytest.param(doc, id=f"{path.relative_to(ROOT / 'manifests')}:{doc['metadata']['name']}")


def test_crds_are_generated_from_the_models():
    for name, text in crdgen.render_all().items():
        on_disk = ROOT / "crds" / name
        assert on_disk.is_file(), f"crds/{name} missing: run scripts/gen-crds.py"
        assert on_disk.read_text() == text, f"crds/{name} is stale: run scripts/gen-crds.py"
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(crdgen.render_all())


def test_gen_crds_check_mode_agrees():
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gen-crds.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_installs_the_same_crds():
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (ROOT / "charts/consortium/crds").glob("*.yaml")}
    assert ours and chart == ours
    assert not any(p.is_symlink() for p in (ROOT / "charts/consortium/crds").iterdir())


def test_generated_schemas_are_structural_and_name_every_model_field():
    # Walk model and schema together: every field appears under its camelCase name, required
    # exactly when the model requires it.
    def walk(model, schema, where):
        assert schema["type"] == "object", where
        props = schema["properties"]
        for name, field in model.model_fields.items():
            alias = field.alias or name
            assert alias in props, f"{where}.{alias} missing from the CRD"
            assert (alias in schema.get("required", [])) == field.is_required(), f"{where}.{alias}"
            descend(field.annotation, props[alias], f"{where}.{alias}")
        assert set(props) == {f.alias or n for n, f in model.model_fields.items()}, where

    def descend(annotation, schema, where):
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, r._Model):
            walk(annotation, schema, where)
        elif origin is list:
            assert schema["type"] == "array", where
            descend(typing.get_args(annotation)[0], schema["items"], f"{where}[]")
        elif origin is dict:
            assert schema["type"] == "object", where
            value = typing.get_args(annotation)[1]
            if value is not typing.Any:
                descend(value, schema["additionalProperties"], f"{where}{{}}")
        elif origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(annotation):
                if arg is not type(None):
                    descend(arg, schema, where)
        elif origin is typing.Literal:
            assert schema["enum"] == list(typing.get_args(annotation)), where
        elif origin is typing.Annotated:
            descend(typing.get_args(annotation)[0], schema, where)
        else:
            expected = {str: "string", int: "integer", float: "number", bool: "boolean",
                        datetime.datetime: "string"}[annotation]
            assert schema["type"] == expected, where

    for kind in r.KINDS:
        crd = crdgen.crd(kind)
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        spec_model, status_model = crdgen._model_fields(kind)
        walk(spec_model, root["properties"]["spec"], f"{kind.kind_name}.spec")
        walk(status_model, root["properties"]["status"], f"{kind.kind_name}.status")


def test_conditions_are_a_list_map_keyed_by_type():
    for kind in r.KINDS:
        status = crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        if "conditions" in status["properties"]:
            conditions = status["properties"]["conditions"]
            assert conditions["x-kubernetes-list-type"] == "map"
            assert conditions["x-kubernetes-list-map-keys"] == ["type"]
            assert {"type", "status"} <= set(conditions["items"]["required"])


def test_receipt_spec_is_immutable_in_the_crd():
    spec = crdgen.crd(r.Receipt)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"rule": "self == oldSelf", "message": "Receipt spec is immutable once written"} in \
        spec["x-kubernetes-validations"]


@pytest.mark.parametrize("doc", example_manifests())
def test_example_manifests_parse_as_models(doc):
    obj = BY_KIND[doc["kind"]].model_validate(doc)
    # What the model writes back is what the manifest said, plus defaults.
    _assert_contains(obj.to_k8s()["spec"], doc["spec"], "spec")


def _assert_contains(actual, expected, where):
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} lost"
            _assert_contains(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_contains(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def test_test_case_v1_split():
    doc = yaml.safe_load((ROOT / "manifests/sessions/sky-is-blue.yaml").read_text())
    spec = r.InferenceSession.model_validate(doc).spec
    assert [str(s.layer_range) for s in spec.stages] == ["0-9", "10-19", "20-29"]
    assert spec.prompt == "Explain in one paragraph why the sky appears blue."
    assert (spec.max_tokens, spec.audit.probability, spec.sampling.temperature) == (64, 0.2, 0)
    assert spec.stages[1].node_selector.match_labels == {r.LABEL_ACCELERATOR: "metal"}


def test_defaults_match_the_design():
    spec = r.InferenceSessionSpec.model_validate(
        {"model": {"name": "m", "file": "m.gguf"}, "prompt": "p", "stages": [{"layers": "0-29"}]})
    assert spec.audit.probability == 0.2 and spec.sampling.temperature == 0
    assert (spec.canonical_grid.dtype, spec.canonical_grid.grid, spec.canonical_grid.clamp) == ("float16", 64, 100)
    assert spec.receipt_window == 16


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_models_refuse_what_the_server_refuses(case):
    kind = BY_KIND[case["manifest"]["kind"]]
    if case.get("models") == "accept":
        kind.model_validate(case["manifest"])
        return
    with pytest.raises(pydantic.ValidationError):
        kind.model_validate(case["manifest"])


def test_stage_assignment_names_and_layer_range():
    spec = r.StageAssignmentSpec(session="sky", stage_index=1, layers=r.LayerRange.parse("10-19"), node_name="n2")
    assert spec.to_k8s()["layerRange"] == "10-19"
    assert r.StageAssignment.name_for("sky", 1) == "sky-s1"
    with pytest.raises(pydantic.ValidationError):
        r.StageAssignment.model_validate({"kind": "Receipt", "spec": spec.to_k8s()})
