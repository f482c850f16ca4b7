"""Typed models of Consortium's four custom resources (group consortium.io, version v1alpha1).

These models are the source of truth: scripts/gen-crds.py turns them into the CustomResourceDefinitions
in crds/ (schemas, defaults, CEL rules, printer columns), and tests/test_crds.py fails when crds/ is
out of date. Field names use Python's snake_case; every model reads and writes the camelCase names the
API server stores (`maxTokens`), so `Model.model_validate(body["spec"])` and `model.to_k8s()` are the
only conversions the operator and the agents need.

What each kind is:
- InferenceSession: one generation run of one model split into stages (what the user applies).
- StageAssignment: stage i of a session bound to one node at one epoch; named `<session>-s<i>`, owned
  by its session. A new epoch fences the node that held it before.
- Receipt: a signed batch of per-token commitments of one stage over a window of positions; its spec
  is immutable once written, audits write only its status.
- ComputeNode: one machine that runs an agent (cluster-scoped, named after the machine).
"""
from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, ClassVar, Literal

import base64
import binascii

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "consortium.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Node labels set by the cluster admin (on Kubernetes Nodes, or in a bare agent's settings).
# The accelerator label is what placement matches; the backend an agent detects is reported beside
# it and never replaces it. Roles are separate boolean labels so one machine can hold several
# (Test Case v1's N2 is worker and verifier).
LABEL_ACCELERATOR = f"{GROUP}/accelerator"          # cuda | metal | cpu
LABEL_COORDINATOR = f"{GROUP}/coordinator"          # "true"
LABEL_WORKER = f"{GROUP}/worker"                    # "true"
LABEL_VERIFIER = f"{GROUP}/verifier"                # "true"
ACCELERATORS = ("cuda", "metal", "cpu")
# A session's owner asks for it to stop with this annotation (any value: the reason). The spec is
# immutable, so a request to stop is metadata: the operator ends generation after the token in hand
# and completes the session with what it has (report.stopped: stop_requested).
ANNOTATION_STOP = f"{GROUP}/stop"


# namespace (63) / name (253) / uid (36)
MAX_SESSION_ID = 63 + 1 + 253 + 1 + 36


def session_id(namespace: str, name: str, uid: str = "") -> str:
    """What agents and signatures know an InferenceSession by: sessions of one name in two
    namespaces must never share an agent's sequences, fences or counters, nor each other's receipts;
    nor must a session deleted and applied again under its name (its uid tells them apart), whose
    agents still fence the old one's epochs. Without a uid (a StageAssignment made by hand, a
    session saved before ids had one): namespace/name."""
    return f"{namespace}/{name}/{uid}" if uid else f"{namespace}/{name}"


def session_name(session: str) -> str:
    """The object name in a session id (a standalone session's id is its name)."""
    parts = session.split("/")
    return parts[1] if len(parts) > 1 else session


# Limits that bound CEL evaluation cost and object size; raising one is an API change.
MAX_STAGES = 16
MAX_MESSAGES = 64
MAX_WINDOW = 1024
MAX_AUDITS = 1024
# A proof holds two rows (about 11 bytes of JSON per element) and ~3 KiB more: 1 MiB covers a final
# stage's logit row of up to ~90000 entries. The operator keeps a Receipt's proofs together under
# this size too, since etcd refuses objects beyond 1.5 MiB.
MAX_PROOF_BYTES = 1048576

HEX64 = r"^[0-9a-f]{64}$"
LAYERS_PATTERN = r"^[0-9]{1,4}-[0-9]{1,4}$"
# A session's stage may leave its layers to the operator: every stage "auto", or none.
AUTO_LAYERS = "auto"
STAGE_LAYERS_PATTERN = r"^(auto|[0-9]{1,4}-[0-9]{1,4})$"


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    return value


# Bytes carried as standard base64. A pattern, not `format: byte`: the API server lets a JSON array
# through a `type: string, format: byte` field (found by tests/k8s/test_fuzz_resources.py), and its
# CEL turns a byte-formatted string into bytes with a decoder that refuses standard base64's '/' and
# '+', so `self == oldSelf` on a Receipt whose signature held one failed every status update (422).
# The pattern sits in json_schema_extra because a field's own Field(...) would drop an Annotated one.
Base64 = Annotated[str, AfterValidator(_base64), Field(json_schema_extra={"pattern": r"^[A-Za-z0-9+/]*={0,2}$"})]


def _cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


def _extra(**schema: Any) -> dict[str, Any]:
    """Schema keywords for the CRD that pydantic has no spelling for (CEL rules, list types, formats)."""
    out = {}
    for key, value in schema.items():
        out[{"validations": "x-kubernetes-validations",
             "list_type": "x-kubernetes-list-type",
             "list_map_keys": "x-kubernetes-list-map-keys",
             "preserve_unknown": "x-kubernetes-preserve-unknown-fields"}.get(key, key)] = value
    return out


def _defaulted(model: type) -> Any:
    # The server defaults a missing object to {} and then fills in its fields' own defaults.
    return Field(default_factory=model, json_schema_extra={"default": {}})


class _Model(BaseModel):
    # extra="forbid": a misspelt field in operator code fails here, not as a silently pruned field.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_assignment=True)

    def to_k8s(self) -> dict[str, Any]:
        """The JSON body the API server stores (camelCase, unset optional fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------------------------
# Shared pieces


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """One observation about the resource, in the Kubernetes convention (one entry per type)."""
    type: str = Field(min_length=1, max_length=64)
    status: ConditionStatus
    reason: str | None = Field(default=None, max_length=128)
    message: str | None = Field(default=None, max_length=4096)
    last_transition_time: _dt.datetime | None = None
    observed_generation: int | None = Field(default=None, ge=0)


Conditions = Annotated[
    list[Condition],
    Field(max_length=32, json_schema_extra=_extra(list_type="map", list_map_keys=["type"])),
]


class LabelSelector(_Model):
    """Selects ComputeNodes by the labels they carry (ComputeNode spec.labels)."""
    match_labels: dict[str, str] | None = Field(default=None, max_length=32)


class LayerRange(_Model):
    """Inclusive range of transformer blocks, counted from 0."""
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        _cel("self.start <= self.end", "layers: start must not be after end")]))
    start: int = Field(ge=0, le=9999)
    end: int = Field(ge=0, le=9999)

    @model_validator(mode="after")
    def _ordered(self) -> "LayerRange":
        if self.start > self.end:
            raise ValueError(f"layers {self.start}-{self.end}: start must not be after end")
        return self

    @classmethod
    def parse(cls, text: str) -> "LayerRange":
        """'10-19' -> LayerRange(start=10, end=19)."""
        if not re.fullmatch(LAYERS_PATTERN[1:-1], text):
            raise ValueError(f"layers {text!r}: write them as 'a-b', e.g. '0-9'")
        start, end = (int(part) for part in text.split("-"))
        return cls(start=start, end=end)

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    @property
    def count(self) -> int:
        return self.end - self.start + 1


class ModelRef(_Model):
    """The GGUF file every stage slices its layers from; every node must hold the same file."""
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        _cel("!has(self.source) || !(self.source.startsWith('http://') || self.source.startsWith('https://')) "
             "|| has(self.sha256)",
             "a model fetched by URL needs its sha256: every node must load the same bytes")]))
    name: str = Field(min_length=1, max_length=253, description="Display name, e.g. SmolLM2-135M-Instruct.")
    file: str = Field(min_length=1, max_length=4096, description=(
        "Path of the GGUF file on the nodes. Relative paths resolve against the agent's model "
        "directory, or inside the installed package when source is pypi:<distribution>."))
    sha256: str | None = Field(default=None, pattern=HEX64, description=(
        "Lower-case hex SHA-256 of the whole file; agents refuse a file that differs."))
    source: str | None = Field(default=None, max_length=2048,
                               pattern=r"^(path|pypi:[A-Za-z0-9._-]+|https?://[^\s]+)$", description=(
                                   "Where the file comes from: 'path' (default), 'pypi:<distribution>' for a model "
                                   "shipped in a Python package, or an http(s) URL that the operator and every "
                                   "node fetch it from into their own cache (sha256 required)."))

    @model_validator(mode="after")
    def _pinned(self) -> "ModelRef":
        if self.source and self.source.startswith(("http://", "https://")) and not self.sha256:
            raise ValueError("a model fetched by URL needs its sha256: every node must load the same bytes")
        return self


class CanonicalGrid(_Model):
    """How stage outputs are canonicalized before hashing: cast, snap to 1/grid, clip to +-clamp."""
    dtype: Literal["float16"] = "float16"
    grid: int = Field(default=64, ge=1, le=65536)
    clamp: float = Field(default=100.0, gt=0)


# ---------------------------------------------------------------------------------------------
# InferenceSession


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=65536)


class Sampling(_Model):
    """Token sampling; temperature 0 is greedy. Randomness comes from (seed, position)."""
    temperature: float = Field(default=0.0, ge=0, le=100)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = Field(default=0, ge=0)


class Stage(_Model):
    """One pipeline stage: a layer range (or "auto") and the nodes that may run it."""
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        _cel("self.layers == 'auto' || int(self.layers.split('-')[0]) <= int(self.layers.split('-')[1])",
             "layers 'a-b' needs a <= b", fieldPath=".layers")]))
    layers: str = Field(pattern=STAGE_LAYERS_PATTERN, max_length=9, description=(
        "Inclusive layer range 'a-b', e.g. '0-9'; or 'auto' on every stage: the operator splits the "
        "model's layers over the nodes it places the stages on, in proportion to the memory each declares "
        "(status.layers says the split)."))
    node_selector: LabelSelector | None = None

    @property
    def auto(self) -> bool:
        return self.layers == AUTO_LAYERS

    @property
    def layer_range(self) -> LayerRange:
        if self.auto:
            raise ValueError("this stage's layers are 'auto': the operator chooses them (status.layers)")
        return LayerRange.parse(self.layers)

    @model_validator(mode="after")
    def _ordered(self) -> "Stage":
        if not self.auto:
            LayerRange.parse(self.layers)  # raises ValueError when start > end
        return self


_STAGE_START = "int(self[{i}].layers.split('-')[0])"
_STAGE_END = "int(self[{i}].layers.split('-')[1])"
_ALL_AUTO = "self.all(s, s.layers == 'auto')"
_ANY_AUTO = "self.exists(s, s.layers == 'auto')"   # the rule above then speaks; a range rule would not parse 'auto'
# CEL has no index loop that every supported server knows, so the indices are a literal list,
# bounded by MAX_STAGES (which also bounds the rule's cost).
_CONTIGUOUS = (f"{_ANY_AUTO} || [{', '.join(str(i) for i in range(1, MAX_STAGES))}].all(i, i >= self.size() || "
               + _STAGE_START.format(i="i") + " == " + _STAGE_END.format(i="i - 1") + " + 1)")

Stages = Annotated[list[Stage], Field(min_length=1, max_length=MAX_STAGES, json_schema_extra=_extra(validations=[
    _cel(f"{_ALL_AUTO} || self.all(s, s.layers != 'auto')",
         "either every stage's layers are 'auto' (the operator splits the model) or none"),
    _cel(f"{_ANY_AUTO} || " + _STAGE_START.format(i=0) + " == 0", "stages[0].layers must start at layer 0"),
    _cel(_CONTIGUOUS, "stages must cover contiguous layer ranges in order: each stage starts at "
                      "the layer after the previous stage's last layer (no gaps, no overlaps)"),
]))]


class Audit(_Model):
    """Optimistic audits: each (stage, position) unit is recomputed elsewhere with this probability."""
    probability: float = Field(default=0.2, ge=0, le=1)
    seed: int = Field(default=0, ge=0)
    verifier_selector: LabelSelector | None = None
    from_window_states: bool = Field(default=False, description=(
        "Audit whole state windows (the probability is then per window; the prompt counts as one), each "
        "replayed alone from the KV states of the windows before it, which the node holding the stage "
        "signs as they close, instead of replaying every earlier position. Far cheaper (docs/dataplane.md, "
        "Audits from window states), but a lie in a node's keys and values is caught only when its own "
        "window is audited."))
    # The same default as consortium.verification.receipts.DEFAULT_STATE_WINDOW (this module imports nothing of ours).
    state_window: int = Field(default=4, ge=1, le=MAX_WINDOW, description=(
        "Positions per state window with fromWindowStates: each node signs its KV state as one closes, and "
        "an audit replays one whole window. Shorter windows replay less per audit and give a cheating node "
        "more windows' odds of being drawn; each costs the node a state export and a signature."))


class Failover(_Model):
    """When a stage counts as lost, and where its replacement may run."""
    rpc_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    lease_timeout_seconds: int = Field(default=15, ge=1, le=3600)
    backup_selector: LabelSelector | None = None
    warm_backups: bool = Field(default=True, description=(
        "Each stage's likely backup loads the stage's layers when the session starts, so that a "
        "failover only replays the stage's inputs; costs that node the memory of those layers for the "
        "whole session (skipped where its ComputeNode's memoryBytes cannot hold them)."))


MAX_STOP_SEQUENCE = 64   # characters


class InferenceSessionSpec(_Model):
    # Immutable, as a Job's template: the operator runs a session with the spec it was created with,
    # and one resumed after an operator restart would join a changed spec to the state saved under
    # the old one. A session deleted and applied again runs as a new one.
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        _cel("has(self.prompt) != has(self.messages)", "exactly one of prompt or messages must be set"),
        _cel("self == oldSelf", "InferenceSession spec is immutable: delete the session and apply it again "
             "to run it with another spec")]))
    model: ModelRef
    prompt: str | None = Field(default=None, max_length=65536)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(default=64, ge=1, le=32768)
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_SEQUENCE)]] | None = Field(
        default=None, max_length=4, description=(
            "Generation ends once the generated text contains one of these (OpenAI's stop): the tokens up "
            "to the one that completed it are kept, signed and audited as any; report.stopped is "
            "stop_sequence and report.stopSequence the one found. status.text keeps the whole decoded text."))
    sampling: Sampling = _defaulted(Sampling)
    stages: Stages
    audit: Audit = _defaulted(Audit)
    canonical_grid: CanonicalGrid = _defaulted(CanonicalGrid)
    receipt_window: int = Field(default=16, ge=1, le=MAX_WINDOW,
                                description="Positions per signed window, and so per Receipt.")
    signing: Literal["PerStep", "PerWindow"] = Field(default="PerStep", description=(
        "PerStep: every forward response carries its node's signature, so a crashed node's last rows "
        "are provable by its own key. PerWindow: agents commit and sign once per receipt window, a "
        "quarter of the work per token; a node that dies leaves its open window's rows signed only by "
        "its replacement, and audits see a row up to a window later."))
    failover: Failover = _defaulted(Failover)

    @property
    def auto_split(self) -> bool:
        """Every stage's layers are 'auto': the operator splits the model (status.layers)."""
        return self.stages[0].auto

    # The same rules as the CEL above, so objects built in Python fail before they reach the server.
    @model_validator(mode="after")
    def _check(self) -> "InferenceSessionSpec":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages must be set")
        autos = [stage.auto for stage in self.stages]
        if any(autos):
            if not all(autos):
                raise ValueError("either every stage's layers are 'auto' (the operator splits the model) or none")
            return self
        ranges = [stage.layer_range for stage in self.stages]
        if ranges[0].start != 0:
            raise ValueError("stages[0].layers must start at layer 0")
        for before, after in zip(ranges, ranges[1:]):
            if after.start != before.end + 1:
                raise ValueError(f"stages must cover contiguous layer ranges in order: {after} does not follow {before}")
        return self


SessionPhase = Literal["Pending", "Scheduling", "Running", "Failover", "Completed", "Failed"]


class InferenceSessionStatus(_Model):
    phase: SessionPhase | None = None
    conditions: Conditions | None = None
    observed_generation: int | None = Field(default=None, ge=0)
    tokens: list[int] | None = Field(default=None, description="Token ids generated so far.")
    text: str | None = None
    position: int | None = Field(default=None, ge=0, description=(
        "Number of tokens generated so far (the index of the next token)."))
    stages_ready: str | None = Field(default=None, pattern=r"^[0-9]+/[0-9]+$",
                                     description="Ready stages over all stages, e.g. '3/3'.")
    stage_epochs: list[int] | None = Field(default=None, max_length=MAX_STAGES,
                                           description="Current epoch of each stage, by stage index.")
    layers: list[Annotated[str, Field(pattern=LAYERS_PATTERN, max_length=9)]] | None = Field(
        default=None, max_length=MAX_STAGES, description=(
            "Each stage's layer range, by stage index, as the session runs them: the spec's, or the "
            "operator's split when the spec says 'auto'."))
    metrics: dict[str, float] | None = None
    proof_key: Base64 | None = Field(default=None, max_length=64, description=(
        "The Ed25519 public key (base64) that signs this session's fraud proofs: a proof's "
        "verifierPublicKey must be this key (consortium verify-proof --verifier-key)."))
    report: dict[str, Any] | None = Field(default=None, json_schema_extra=_extra(preserve_unknown=True))
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None


# ---------------------------------------------------------------------------------------------
# StageAssignment


class StageAssignmentSpec(_Model):
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        # Parsed rather than formatted: string(int) has no cost bound the server can estimate.
        _cel("!has(self.layerRange) || (int(self.layerRange.split('-')[0]) == self.layers.start "
             "&& int(self.layerRange.split('-')[1]) == self.layers.end)",
             "layerRange must equal layers written as 'start-end'")]))
    session: str = Field(min_length=1, max_length=253)
    stage_index: int = Field(ge=0, lt=MAX_STAGES)
    layers: LayerRange
    layer_range: str | None = Field(default=None, max_length=9, pattern=LAYERS_PATTERN, description=(
        "layers as 'start-end', for display (kubectl get); filled in by the model, checked by the server."))
    node_name: str = Field(min_length=1, max_length=253, description="The ComputeNode that runs this stage.")
    epoch: int = Field(default=0, ge=0, description="Bumped on every reassignment; stale epochs are refused.")
    role: Literal["worker", "verifier"] = Field(default="worker", description=(
        "worker: computes the stage for the session; verifier: loads the same layers to recompute audits."))
    model: ModelRef | None = Field(default=None, description="Copy of the session's model, so agents need not read sessions.")

    @model_validator(mode="after")
    def _fill_layer_range(self) -> "StageAssignmentSpec":
        text = str(self.layers)
        if self.layer_range != text:
            # object.__setattr__: avoid re-entering validation (validate_assignment is on).
            object.__setattr__(self, "layer_range", text)
        return self


class StageAssignmentStatus(_Model):
    conditions: Conditions | None = Field(default=None, description="Bound, Loaded, Ready, Fenced.")
    observed_epoch: int | None = Field(default=None, ge=0)
    endpoint: str | None = Field(default=None, max_length=261)
    last_position: int | None = Field(default=None, ge=0, description="Last position this stage served.")


# ---------------------------------------------------------------------------------------------
# Receipt


class Window(_Model):
    start: int = Field(ge=0, description="First position covered.")
    count: int = Field(ge=1, le=MAX_WINDOW, description="Number of positions (tokens) covered.")


class SampledToken(_Model):
    position: int = Field(ge=0, description="The logit row's position; the token is the one after it.")
    token: int = Field(ge=0)


class SampledTokens(_Model):
    """Final stage: the tokens the node sampled from the window's logit rows, signed with them."""
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    seed: int = Field(ge=0)
    tokens: list[SampledToken] = Field(max_length=MAX_WINDOW)


class ReceiptSpec(_Model):
    """What a node signed for one stage and window; the operator writes it once and never changes it."""
    model_config = ConfigDict(json_schema_extra=_extra(validations=[
        _cel("self == oldSelf", "Receipt spec is immutable once written"),
        _cel("size(self.commitments) == self.window.count",
             "commitments must hold one entry per position of the window"),
    ]))
    session: str = Field(min_length=1, max_length=253)
    stage: int = Field(ge=0, lt=MAX_STAGES)
    node: str = Field(min_length=1, max_length=253)
    node_id: str | None = Field(default=None, min_length=1, max_length=253, description=(
        "The id the node signs its windows with (its ComputeNode name, or one derived from its key); "
        "with the node's published key, what re-checks the signature."))
    epoch: int = Field(ge=0)
    window: Window
    commitments: list[Annotated[str, Field(pattern=HEX64, max_length=64)]] = Field(
        max_length=MAX_WINDOW, description="Per-position SHA-256 of the canonicalized stage output, hex.")
    merkle_root: str = Field(pattern=HEX64, max_length=64)
    input_digest: str = Field(pattern=HEX64, max_length=64, description="SHA-256 over the window's stage inputs.")
    grid: CanonicalGrid
    signature: Base64 = Field(max_length=256,
                           description="Ed25519 signature by the node, base64.")
    public_key_fingerprint: str = Field(pattern=HEX64, max_length=64,
                                        description="SHA-256 of the node's raw public key, hex.")
    sampled: SampledTokens | None = Field(default=None, description=(
        "Final stage: the tokens it sampled from this window's logit rows and the sampling "
        "parameters, part of what it signed."))
    rollbacks: int = Field(default=0, ge=0, description=(
        "The session's rollbacks before this window was flushed. A rollback to a position has its "
        "positions from there computed and signed again: at those positions a window with more "
        "rollbacks supersedes one with fewer."))

    @model_validator(mode="after")
    def _one_per_position(self) -> "ReceiptSpec":
        if len(self.commitments) != self.window.count:
            raise ValueError("commitments must hold one entry per position of the window")
        return self


Verdict = Literal["Pending", "Passed", "PassedWithinTolerance", "Mismatch", "Fraud"]


class AuditResult(_Model):
    position: int = Field(ge=0)
    verdict: Verdict
    figures: dict[str, float] | None = Field(default=None, description="Distance figures, e.g. relL2.")


class ReceiptStatus(_Model):
    verdict: Verdict | None = None
    verifier: str | None = Field(default=None, max_length=253)
    audits: list[AuditResult] | None = Field(default=None, max_length=MAX_AUDITS)
    message: str | None = Field(default=None, max_length=4096)
    fraud_proofs: list[Annotated[str, Field(max_length=MAX_PROOF_BYTES)]] | None = Field(
        default=None, max_length=MAX_WINDOW, description=(
            "Signed FraudProofs of this window's Fraud units, each the JSON text that "
            "`consortium verify-proof FILE` checks."))


# ---------------------------------------------------------------------------------------------
# ComputeNode


class ComputeNodeSpec(_Model):
    endpoint: str = Field(max_length=261, pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
                          description="host:port of the agent's gRPC server.")
    public_key: Base64 = Field(max_length=128,
                            description="Raw Ed25519 public key, base64.")
    memory_bytes: int | None = Field(default=None, ge=0)
    labels: dict[str, str] | None = Field(default=None, max_length=64, description=(
        "Placement labels (consortium.io/accelerator, roles); from the Node or the bare agent's settings."))
    approved: bool = Field(default=False, description="Set by an admin; unapproved nodes get no stage.")


Backend = Literal["cuda", "metal", "cpu"]


class LlamaCppBuild(_Model):
    version: str | None = Field(default=None, max_length=64)
    commit: str | None = Field(default=None, max_length=64)


class LeaseRef(_Model):
    namespace: str = Field(max_length=63)
    name: str = Field(max_length=253)


class AuditRecord(_Model):
    audits: int = Field(default=0, ge=0)
    mismatches: int = Field(default=0, ge=0)
    frauds: int = Field(default=0, ge=0)


class VerifierRecord(_Model):
    verdicts: int = Field(default=0, ge=0, description="Audit verdicts this node gave as a verifier.")
    overruled: int = Field(default=0, ge=0, description="Of them, accusations a second verifier did not bear out.")


# Sessions whose share of a ComputeNode's records the node keeps (the most recent ones).
MAX_SESSION_RECORDS = 32


class SessionRecord(_Model):
    """One session's share of a node's audit and verifier records, as last written: a restarted
    operator adds to the totals only what its session's share lacks, so nothing counts twice."""
    session: str = Field(max_length=317, description="namespace/name of the InferenceSession.")
    uid: str = Field(max_length=64, description="Its uid: a deleted namesake's share is another one.")
    audits: int = Field(default=0, ge=0)
    mismatches: int = Field(default=0, ge=0)
    frauds: int = Field(default=0, ge=0)
    verdicts: int = Field(default=0, ge=0)
    overruled: int = Field(default=0, ge=0)


class ComputeNodeStatus(_Model):
    backend: Backend | None = Field(default=None, description="Detected by the agent, never claimed.")
    llama_cpp: LlamaCppBuild | None = None
    conditions: Conditions | None = Field(default=None, description="Ready, Quarantined.")
    heartbeat_lease: LeaseRef | None = None
    audit_record: AuditRecord | None = Field(default=None, description="Verdicts on its work, across sessions.")
    verifier_record: VerifierRecord | None = Field(default=None, description="Its verdicts on others' work, "
                                                   "across sessions.")
    session_records: list[SessionRecord] | None = Field(
        default=None, max_length=MAX_SESSION_RECORDS,
        description="Each recent session's share of auditRecord and verifierRecord, most recent last.")


# ---------------------------------------------------------------------------------------------
# Whole objects


class _Resource(_Model):
    """Common envelope; subclasses name their kind, plural and scope for clients and the CRD generator."""
    model_config = ConfigDict(extra="ignore")
    kind_name: ClassVar[str]
    plural: ClassVar[str]
    singular: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    namespaced: ClassVar[bool]

    api_version: str = API_VERSION
    kind: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind(self) -> "_Resource":
        if not self.kind:
            object.__setattr__(self, "kind", self.kind_name)
        elif self.kind != self.kind_name:
            raise ValueError(f"kind {self.kind!r} is not {self.kind_name}")
        return self


class InferenceSession(_Resource):
    """One generation run of one model split into pipeline stages across ComputeNodes."""

    kind_name = "InferenceSession"
    plural, singular, short_names, namespaced = "inferencesessions", "inferencesession", ("isess",), True
    spec: InferenceSessionSpec
    status: InferenceSessionStatus | None = None


class StageAssignment(_Resource):
    """Stage i of an InferenceSession bound to one ComputeNode at one epoch; named <session>-s<i>."""

    kind_name = "StageAssignment"
    plural, singular, short_names, namespaced = "stageassignments", "stageassignment", ("stasg",), True
    spec: StageAssignmentSpec
    status: StageAssignmentStatus | None = None

    @staticmethod
    def name_for(session: str, stage_index: int) -> str:
        return f"{session}-s{stage_index}"


class Receipt(_Resource):
    """Signed per-token commitments of one stage over a window of positions; spec immutable, audits write status."""

    kind_name = "Receipt"
    plural, singular, short_names, namespaced = "receipts", "receipt", ("rcpt",), True
    spec: ReceiptSpec
    status: ReceiptStatus | None = None


class ComputeNode(_Resource):
    """A machine running a Consortium node agent: its endpoint, identity key, labels and detected backend."""

    kind_name = "ComputeNode"
    plural, singular, short_names, namespaced = "computenodes", "computenode", ("cnode",), False
    spec: ComputeNodeSpec
    status: ComputeNodeStatus | None = None


KINDS: tuple[type[_Resource], ...] = (InferenceSession, StageAssignment, Receipt, ComputeNode)
