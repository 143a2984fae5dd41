"""Settings and the model spec: the two objects every part of rayms shares.

``Settings`` is built once, where rayms starts (``rayms serve``, :func:`rayms.build_app`, a Serve config),
from keyword arguments over ``RAYMS_*`` environment variables, then handed to every deployment as plain values.
(The storage layer also honours the storage libraries' own variables, e.g. ``AWS_ENDPOINT_URL``, and
:mod:`rayms.ray_env` Ray's.) ``ModelSpec`` is what a TrainedModel's ``spec.model``, a
``models.json`` entry, a repository-API load body and a Python call all turn into before they reach the
registry, so validation happens in one place.
"""

from __future__ import annotations

import decimal
import hashlib
import os
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rayms import framework_table
from rayms.errors import InvalidMemory, InvalidSpec, UnsupportedFramework
from rayms.memory import replica_budget_bytes

# Kubernetes resource quantities (apimachinery's resource.Quantity), the subset that means bytes. Matched
# against stripped text of at most MAX_QUANTITY_CHARS characters, and no two neighbouring parts of the pattern
# can take the same characters, so a match is linear in the length of the text.
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*([KMGTPE]i?|[kmu]|e[0-9]+)?")
_SUFFIX = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": decimal.Decimal("1e-3"), "u": decimal.Decimal("1e-6"),
}
MAX_QUANTITY_CHARS = 64
"""Longest memory quantity accepted, in characters (``1.5Gi`` has five)."""
MAX_QUANTITY_BYTES = 2**63 - 1
"""Largest memory quantity accepted (8 EiB): Kubernetes holds quantities in an int64."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}$")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def parse_quantity(value: str | int | float) -> int:
    """Return the number of bytes in a Kubernetes quantity such as ``256Mi``, ``1G`` or ``1e6``.

    The work is bounded whatever the input: text longer than :data:`MAX_QUANTITY_CHARS` is refused, the
    arithmetic is decimal with a capped exponent (``1e999999999`` never builds ``10**999999999``), and values
    above :data:`MAX_QUANTITY_BYTES` are refused. Fractions of a byte are dropped.
    """
    if isinstance(value, bool):
        raise InvalidSpec(f"memory {value!r} is not a Kubernetes quantity")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidSpec(f"memory {value!r} is not a finite number")
        if value < 0:
            raise InvalidSpec(f"memory {value!r} is negative")
        return _at_most_max(decimal.Decimal(value), shown=repr(value))
    text = str(value).strip()
    if len(text) > MAX_QUANTITY_CHARS:
        raise InvalidSpec(f"memory {text[:20]!r}... is not a Kubernetes quantity: it is {len(text)} characters "
                          f"long, more than {MAX_QUANTITY_CHARS}")
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise InvalidSpec(f"memory {text!r} is not a Kubernetes quantity (e.g. 256Mi, 1G)")
    number, suffix = match.groups()
    with decimal.localcontext(prec=4 * MAX_QUANTITY_CHARS):  # exact for every text that fits the length cap
        amount = decimal.Decimal(number)
        if suffix and suffix.startswith("e"):
            # A mantissa of at most MAX_QUANTITY_CHARS digits is zero or at least 10**-MAX_QUANTITY_CHARS, so
            # any exponent above 2 * MAX_QUANTITY_CHARS already means more than MAX_QUANTITY_BYTES.
            amount = amount.scaleb(min(int(suffix[1:]), 2 * MAX_QUANTITY_CHARS))
        else:
            amount = amount * _SUFFIX[suffix]
    return _at_most_max(amount, shown=repr(text))


def _at_most_max(amount: decimal.Decimal, *, shown: str) -> int:
    if amount > MAX_QUANTITY_BYTES:
        raise InvalidSpec(f"memory {shown} is more than the largest quantity accepted, {MAX_QUANTITY_BYTES} "
                          "bytes (8 EiB)")
    return int(amount)


def validate_model_name(name: str) -> str:
    """Model names become URL segments and cache folder names: no ``/``, no ``..``, no spaces."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidSpec(
            f"model name {name!r} is invalid: use letters, digits, '-', '_' and '.', "
            "start with a letter or digit, no '..', at most 253 characters"
        )
    return name


class ModelSpec(BaseModel):
    """What to serve: KServe's TrainedModel ``spec.model`` (``storageUri``, ``framework``, ``memory``).

    ``memory`` is kept as the user wrote it; ``memory_bytes`` is the parsed value (0 when undeclared).
    ``parameters`` are model-level defaults for predict options (e.g. ``{"predict_proba": true}``).
    ``version`` is the version the model had where it came from (MLServer's ``parameters.version``, a
    Triton version folder): requests may name it, and answers carry it.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    storage_uri: str = Field(alias="storageUri", min_length=1)
    framework: str
    memory: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    version: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    sha256: str | None = None
    """Hex SHA-256 of the file the URI names (an archive as packed), checked after download, before use."""

    @field_validator("framework", mode="before")
    @classmethod
    def _known_framework(cls, value: Any) -> str:
        # UnsupportedFramework is not a ValueError: pydantic lets it through, and parse() keeps its type.
        return framework_table.canonical(value)

    @field_validator("memory", mode="before")
    @classmethod
    def _valid_memory(cls, value: Any) -> str | None:
        if value is None or value == "":
            return None
        try:
            parse_quantity(value)
        except InvalidSpec as exc:
            raise InvalidMemory(str(exc)) from exc
        return str(value)

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_sha256(cls, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise ValueError(f"must be 64 hexadecimal digits, got {str(value)[:80]!r}")
        return value.lower()

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory) if self.memory else 0

    def digest(self) -> str:
        """A short stable key for the artifact: same URI, framework and sha256, same cache entry."""
        key = {"uri": self.storage_uri, "framework": self.framework}
        if self.sha256:  # only when given, so entries of specs without one keep their keys
            key["sha256"] = self.sha256
        raw = json.dumps(key, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_wire(self) -> dict[str, Any]:
        """The camelCase shape of KServe's ``spec.model`` (and of ``models.json``'s ``modelSpec``)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) | {
            "storageUri": self.storage_uri, "framework": self.framework}

    @classmethod
    def parse(cls, payload: Any, *, name: str = "") -> "ModelSpec":
        """Validate a raw payload into a spec, raising :class:`InvalidSpec` with a readable message."""
        from pydantic import ValidationError

        prefix = f"model {name}: " if name else ""
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            errors = exc.errors()
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg'].removeprefix('Value error, ')}"
                for err in errors
            )
            # The field that failed decides the kind of error (and so a TrainedModel's condition).
            fields = {str(err["loc"][0]) for err in errors if err["loc"]}
            kind = InvalidMemory if "memory" in fields else InvalidSpec
            raise kind(f"{prefix}invalid model spec: {problems}") from exc
        except UnsupportedFramework as exc:
            raise UnsupportedFramework(exc.args[0], exc.args[1], name) from exc
        except InvalidSpec as exc:
            raise type(exc)(f"{prefix}{exc}") from exc


PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    """Everything an operator can tune. Each field can be set as ``RAYMS_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="RAYMS_", extra="forbid")

    app_name: str = "rayms"
    """Name of the Serve application (and prefix of the registry and agent actor names)."""

    host: str = "127.0.0.1"
    """Address the HTTP endpoint binds to (``0.0.0.0`` inside a container)."""

    port: int = Field(default=8000, ge=0, le=65535)
    """HTTP port of the endpoint."""

    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Open Inference Protocol's gRPC endpoint (``inference.GRPCInferenceService``) on ``host``;
    None serves no gRPC."""

    num_replicas: PositiveInt = Field(default_factory=lambda: os.cpu_count() or 1)
    """Number of model replicas, each with its own LRU of loaded models (default: one per core, since a
    replica serves requests on one core)."""

    ingress: Literal["replica", "router"] = "replica"
    """``replica``: model replicas answer HTTP themselves (one process per request, no Ray hop);
    ``router``: a separate FastAPI router forwards to model replicas through a Serve handle."""

    haproxy: bool = True
    """For ``rayms serve``: put Ray Serve's HAProxy in front, hashing the model's URL so each model has a
    home replica (only when Ray is started by rayms; on a cluster, set Ray's variables yourself)."""

    max_models_per_replica: PositiveInt | None = None
    """At most this many models loaded in one replica (least recently used evicted beyond). Default: no count
    limit; the memory budget alone decides how many fit."""

    replica_memory_bytes: PositiveInt | None = None
    """Model-memory budget of one replica: models are admitted and evicted against it, each charged the larger
    of its declared memory and what it measured on load. Default: ``replica_memory_fraction`` of what the
    machine (or container) really has, shared by the replicas on the node."""

    replica_memory_fraction: float = Field(default=0.5, gt=0, le=1)
    """Share of the node's memory the replicas' models may use together when ``replica_memory_bytes`` is unset."""

    replica_num_cpus: float = Field(default=0.0, ge=0)
    """CPUs Ray reserves per model replica (0 lets replicas share a small machine)."""

    model_repository: str | None = None
    """Folder whose sub-folders are models: served at start and used by body-less repository loads."""

    models_file: str | None = None
    """A KServe ``models.json`` (``[{"modelName", "modelSpec"}]``) registered at start."""

    state_uri: str | None = None
    """Where the registry persists the desired set of models (local path or fsspec URI). Default: a file of
    this instance's own under ``<cache_dir>/state/``, named after the app, its port and the repository and
    models file it serves (:meth:`resolved_state_uri`), so two instances never share state by accident."""

    cache_dir: str = str(Path.home() / ".cache" / "rayms")
    """Per-node folder holding downloaded artifacts, keyed by spec. Each node's agent resolves it: ``~`` and
    ``$VARS`` take that node's home and environment."""

    allow_custom_code: bool = False
    """Let ``framework: custom`` models run: their class is user code, imported and run inside the replicas
    (from an installed package or a ``.py`` file beside the artifact). Off by default; a custom model
    then ends FAILED saying so. (Unpickling a scikit-learn model runs code too: serve only trusted ones.)"""

    pvc_root: str = "/mnt/pvc"
    """Where ``pvc://<claim>/<path>`` is mounted: ``<pvc_root>/<claim>/<path>``."""

    storage_env: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the node agents that download artifacts: storage endpoints and credentials
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Without them an agent sees the environment its node
    was started with."""

    max_concurrent_downloads: PositiveInt = 8
    """Downloads one node's agent runs at once."""

    max_concurrent_loads: PositiveInt = 32
    """Loads the registry drives at once across all replicas."""

    download_attempts: PositiveInt = 4
    """Attempts per download for transient errors (timeouts, 5xx, 429)."""

    download_backoff_s: float = Field(default=0.5, gt=0)
    """First retry delay; doubles on every further attempt."""

    download_timeout_s: float = Field(default=300.0, gt=0)
    """Time limit of one download attempt."""

    load_timeout_s: float = Field(default=600.0, gt=0)
    """Time a replica has to fetch and load a model (one attempt). A repository load waits this long (plus
    a second) for READY or FAILED; a wait that runs out is an error (504), never a success."""

    load_attempts: PositiveInt = 3
    """Attempts per load when it fails for a transient reason (the replica died or restarted mid-load, or
    never answered); permanent failures (a bad artifact, an unknown framework) are not retried."""

    load_backoff_s: float = Field(default=1.0, gt=0)
    """Pause before the second load attempt; doubles on each further one, at most 30 s."""

    predict_timeout_s: float = Field(default=30.0, gt=0)
    """Longest one predict call may run; its request is answered 504 then (the call itself cannot be
    stopped and keeps one of its model's threads until it ends)."""

    predict_threads: int = Field(default=4, ge=0)
    """Threads per replica that run predict calls (off the event loop); one model may use at most half.
    0 runs predict on the event loop itself: a little faster per request, but with no deadline and no
    isolation (a hung model stalls its replica)."""

    quarantine_after: PositiveInt = 3
    """A model whose predict calls overrun ``predict_timeout_s`` this many times in a row is FAILED
    (quarantined) until it is loaded again."""

    max_download_bytes: PositiveInt = 4 * 2**30
    """Largest artifact one download may bring (all objects of a folder together); refused before reading
    when the server announces more, and stopped while reading otherwise."""

    max_unpacked_bytes: PositiveInt = 8 * 2**30
    """Most bytes one archive may unpack to; checked before each member is written and while writing."""

    max_archive_members: PositiveInt = 10_000
    """Most files and folders one archive may hold."""

    max_archive_ratio: PositiveInt = 200
    """Largest unpacked-to-packed size ratio of an archive (archives under 1 MiB count as 1 MiB)."""

    artifact_cache_bytes: PositiveInt = 20 * 2**30
    """Disk quota of each node's artifact cache (``<cache_dir>/artifacts``): above it, the entries fetched
    least recently are removed, never one being downloaded or read by a load."""

    allow_private_http: bool = False
    """Let http(s) downloads connect to private, link-local and other non-public addresses (loopback is
    allowed anyway when ``host`` is loopback and ``trust_loopback`` holds)."""

    max_request_bytes: PositiveInt = 64 * 2**20
    """Largest request body accepted (413 beyond)."""

    max_ongoing_requests: PositiveInt = 64
    """Requests one replica works on at once; more get 503 with ``Retry-After`` instead of queueing."""

    max_batch_size: PositiveInt = 1
    """Default for models whose parameters do not say: most rows one batched predict call takes (1: no
    batching). A model sets its own with ``parameters: {"max_batch_size": 32}``."""

    max_batch_latency_ms: float = Field(default=0.0, ge=0, le=1000)
    """Default for models whose parameters do not say (``max_batch_latency_ms``): how long the first request
    of a batch may wait for others. 0 batches only requests that are already waiting."""

    trust_loopback: bool = True
    """Trust every caller of a server bound to loopback (they are this machine's users). Turn it off when
    something forwards other people's traffic to a loopback port (a reverse proxy, a port-forward)."""

    control_token: SecretStr | None = None
    """Bearer token the control API (load, unload, index, listings) requires when set (a secret:
    ``RAYMS_CONTROL_TOKEN``). Without one, the control API answers only on a loopback bind."""

    control_token_file: str | None = None
    """A file holding the control token, e.g. a mounted Kubernetes Secret (read when the server starts)."""

    inference_token: SecretStr | None = None
    """Bearer token inference and model metadata require when set (a secret: ``RAYMS_INFERENCE_TOKEN``);
    the control token is accepted too."""

    inference_token_file: str | None = None
    """A file holding the inference token."""

    model_control: Literal["api", "none"] = "api"
    """``none``: the repository API cannot load or unload models; the server serves what its repository,
    models file or TrainedModels declare (Triton's ``--model-control-mode=none``)."""

    allow_storage: list[str] = Field(default_factory=list)
    """Storage prefixes models may come from (``s3://models/``, ``pvc://models/``, a local folder), besides
    the model repository and the pvc root. Enforced on a non-loopback bind, and on any bind once set."""

    max_control_in_flight: PositiveInt = 256
    """Control requests (loads wait for READY) one replica holds at once; more get 503."""

    max_json_bytes: PositiveInt = 8 * 2**20
    """Largest JSON inference body (413 beyond); bodies with binary tensors may be up to
    ``max_request_bytes``. JSON tensors take several times their size in memory once decoded."""

    max_buffered_bytes: PositiveInt = 256 * 2**20
    """Request bytes one replica holds at once across every request it is reading; beyond, 503."""

    body_timeout_s: float = Field(default=30.0, gt=0)
    """Time a client has to send its whole request body (408 beyond)."""

    kubernetes: bool = False
    """Run the TrainedModel bridge inside the application."""

    namespace: str | None = None
    """Namespace the bridge watches (default: in-cluster namespace or kubeconfig context)."""

    inference_service: str | None = None
    """Only TrainedModels whose ``spec.inferenceService`` equals this are served."""

    kserve_compat: bool = False
    """Watch KServe's ``serving.kserve.io/v1alpha1`` TrainedModels instead of rayms's own."""

    kubeconfig: str | None = None
    """Path to a kubeconfig when running outside the cluster."""

    bridge_request_timeout_s: float = Field(default=10.0, gt=0)
    """Time limit to connect and to read an answer, on every Kubernetes API call of the bridge. A watch may
    stay silent for ``bridge_watch_timeout_s`` plus this before its connection is taken for dead and replaced."""

    bridge_watch_timeout_s: PositiveInt = 60
    """How long the API server keeps one watch open (``timeoutSeconds``) before the bridge watches again."""

    bridge_stale_after_s: float = Field(default=180.0, gt=0)
    """Liveness bound of the bridge: when its watch has had no list, event or bookmark for this long, its
    health check fails and Serve restarts it. Must exceed ``bridge_watch_timeout_s + bridge_request_timeout_s``,
    the longest a healthy but quiet watch stays silent."""

    status_protocol: Literal["v1", "v2"] = "v2"
    """Which predict path a TrainedModel's ``status.url`` points at."""

    external_url: str | None = None
    """Base URL clients outside the cluster use (TrainedModel ``status.url``); default: the cluster URL."""

    cluster_url: str | None = None
    """Base URL inside the cluster (``status.address.url``); default: ``http://<inferenceService>-serve-svc.<ns>.svc.cluster.local:8000``."""

    @model_validator(mode="after")
    def _stale_bound_above_a_quiet_watch(self) -> "Settings":
        quiet = self.bridge_watch_timeout_s + self.bridge_request_timeout_s
        if self.bridge_stale_after_s <= quiet:
            raise ValueError(f"bridge_stale_after_s ({self.bridge_stale_after_s}) must exceed bridge_watch_timeout_s "
                             f"+ bridge_request_timeout_s ({quiet}): a healthy watch may be silent that long")
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> "Settings":
        if self.grpc_port is not None and self.grpc_port == self.port and self.port != 0:
            raise ValueError(f"grpc_port {self.grpc_port} is also the HTTP port; give gRPC a port of its own")
        return self

    def model_budget_bytes(self, replicas_on_node: int | None = None) -> int:
        """One replica's model-memory budget: ``replica_memory_bytes``, or its share of the node's memory."""
        if self.replica_memory_bytes is not None:
            return self.replica_memory_bytes
        return replica_budget_bytes(fraction=self.replica_memory_fraction,
                                    replicas_on_node=replicas_on_node or self.num_replicas)

    def resolved_state_uri(self) -> str:
        """``state_uri``, or the default: one file per (app name, port, model repository, models file)."""
        if self.state_uri:
            return self.state_uri
        sources = [str(Path(p).expanduser().resolve()) if p else "" for p in (self.model_repository, self.models_file)]
        key = hashlib.sha256(json.dumps([self.app_name, self.port, *sources]).encode()).hexdigest()[:12]
        return str(Path(self.cache_dir).expanduser() / "state" / f"{self.app_name}-{self.port}-{key}.json")
