"""Settings and the model spec: the two objects every part of rayms shares.

``Settings`` is read once, in the composition root, from keyword arguments and ``RAYMS_*`` environment
variables; nothing else reads the environment. ``ModelSpec`` is what a TrainedModel's ``spec.model``, a
``models.json`` entry, a repository-API load body and a Python call all turn into before they reach the
registry, so validation happens in one place.
"""

from __future__ import annotations

import hashlib
import os
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rayms import framework_table
from rayms.errors import InvalidSpec, UnsupportedFramework

# Kubernetes resource quantities (apimachinery's resource.Quantity), the subset that means bytes.
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]i?|[kmu]|e[0-9]+)?\s*$")
_SUFFIX = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 1e-3, "u": 1e-6,
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}$")


def parse_quantity(value: str | int | float) -> int:
    """Return the number of bytes in a Kubernetes quantity such as ``256Mi``, ``1G`` or ``1e6``."""
    if isinstance(value, bool):
        raise InvalidSpec(f"memory {value!r} is not a Kubernetes quantity")
    if isinstance(value, (int, float)):
        if value < 0:
            raise InvalidSpec(f"memory {value!r} is negative")
        return int(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise InvalidSpec(f"memory {value!r} is not a Kubernetes quantity (e.g. 256Mi, 1G)")
    number, suffix = match.groups()
    if suffix and suffix.startswith("e"):
        return int(float(number) * 10 ** int(suffix[1:]))
    return int(float(number) * _SUFFIX[suffix])


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
        parse_quantity(value)
        return str(value)

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory) if self.memory else 0

    def digest(self) -> str:
        """A short stable key for the artifact: same URI and framework, same cache entry."""
        raw = json.dumps({"uri": self.storage_uri, "framework": self.framework}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_wire(self) -> dict[str, Any]:
        """The camelCase shape of KServe's ``spec.model`` (and of ``models.json``'s ``modelSpec``)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) | {
            "storageUri": self.storage_uri, "framework": self.framework}

    @classmethod
    def parse(cls, payload: Any, *, name: str = "") -> "ModelSpec":
        """Validate a raw payload into a spec, raising :class:`InvalidSpec` with a readable message."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            prefix = f"model {name}: " if name else ""
            raise InvalidSpec(f"{prefix}invalid model spec: {problems}") from exc
        except UnsupportedFramework as exc:
            raise UnsupportedFramework(exc.args[0], exc.args[1], name) from exc
        except InvalidSpec as exc:
            prefix = f"model {name}: " if name else ""
            raise InvalidSpec(f"{prefix}{exc}") from exc


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

    num_replicas: PositiveInt = Field(default_factory=lambda: os.cpu_count() or 1)
    """Number of model replicas, each with its own LRU of loaded models (default: one per core, since a
    replica serves requests on one core)."""

    ingress: Literal["replica", "router"] = "replica"
    """``replica``: model replicas answer HTTP themselves (one process per request, no Ray hop);
    ``router``: a separate FastAPI router forwards to model replicas through a Serve handle."""

    haproxy: bool = True
    """For ``rayms serve``: put Ray Serve's HAProxy in front, hashing the model's URL so each model has a
    home replica (only when Ray is started by rayms; on a cluster, set Ray's variables yourself)."""

    max_models_per_replica: PositiveInt = 100
    """How many models one replica keeps loaded before evicting the least recently used."""

    replica_memory_bytes: PositiveInt = 2 * 2**30
    """Model-memory budget of one replica; declared model memory is admitted and evicted against it."""

    replica_num_cpus: float = Field(default=0.0, ge=0)
    """CPUs Ray reserves per model replica (0 lets replicas share a small machine)."""

    model_repository: str | None = None
    """Folder whose sub-folders are models: served at start and used by body-less repository loads."""

    models_file: str | None = None
    """A KServe ``models.json`` (``[{"modelName", "modelSpec"}]``) registered at start."""

    state_uri: str | None = None
    """Where the registry persists the desired set of models (local path or fsspec URI).
    Default: ``<cache_dir>/<app_name>-models.json``."""

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
    """Time a replica has to fetch and load a model before the model is FAILED."""

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

    status_protocol: Literal["v1", "v2"] = "v2"
    """Which predict path a TrainedModel's ``status.url`` points at."""

    external_url: str | None = None
    """Base URL clients outside the cluster use (TrainedModel ``status.url``); default: the cluster URL."""

    cluster_url: str | None = None
    """Base URL inside the cluster (``status.address.url``); default: ``http://<inferenceService>-serve-svc.<ns>.svc.cluster.local:8000``."""

    def resolved_state_uri(self) -> str:
        return self.state_uri or str(Path(self.cache_dir) / f"{self.app_name}-models.json")
