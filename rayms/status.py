"""The one description of a model's status, as every part of rayms passes it around.

The registry produces a :class:`ModelStatus` per model; the replicas' and the bridge's local views hold
them, the data plane answers from them, the repository index and the CLI show them (through their wire form
in :mod:`rayms.protocol`), and the Kubernetes bridge turns them into TrainedModel conditions. A status crosses
Ray process boundaries as this object (pickled), never as a loose dict, so a field cannot change type on the
way: ``version`` is an ``int`` everywhere and becomes a string only on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rayms.config import ModelSpec


class ModelState(str, Enum):
    """Lifecycle of one model. FAILED keeps its reason until the model is registered again."""

    PENDING = "PENDING"
    DOWNLOADING = "DOWNLOADING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


class Source(str, Enum):
    """Who declared a model. Each way in registers under its own source, so one cannot remove another's."""

    API = "api"
    """The V2 repository API, the CLI (which calls it) and the Python handle."""
    REPOSITORY_FOLDER = "repository-folder"
    """A sub-folder of ``--model-repository``, registered at start."""
    MODELS_FILE = "models-file"
    """An entry of ``--models`` (KServe's ``models.json``), registered at start."""
    KUBERNETES = "kubernetes"
    """A TrainedModel, through the bridge."""

    @classmethod
    def parse(cls, value: Any) -> Source:
        """A source from its value; ``repository`` is how state files written before 0.2 named :attr:`API`."""
        if isinstance(value, cls):
            return value
        return cls.API if value == "repository" else cls(value)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What the registry knows of one model at one moment.

    ``spec`` is None only for a model that never had a valid spec (a repository folder rayms cannot read):
    such a model is FAILED and ``reason`` says why.
    """

    name: str
    version: int
    state: ModelState
    source: Source
    spec: ModelSpec | None
    reason: str = ""
    measured_bytes: int = 0
    load_time_s: float | None = None
    replicas: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    """The model's V2 tensor metadata (``{"inputs": [...], "outputs": [...]}``) as its first load reported it."""
    updated_at: float = 0.0
    """Seconds since the epoch of the last change."""

    @property
    def framework(self) -> str:
        return self.spec.framework if self.spec is not None else ""

    @property
    def storage_uri(self) -> str:
        return self.spec.storage_uri if self.spec is not None else ""

    @property
    def declared_bytes(self) -> int:
        return self.spec.memory_bytes if self.spec is not None else 0

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


@dataclass(frozen=True, slots=True)
class Changes:
    """One answer of the registry's change feed (a long poll).

    ``models`` changed after the subscriber's change number, ``deleted`` were removed since; with ``reset``
    (a subscriber of another registry lifetime, ``epoch`` differs) ``models`` is the whole table.
    """

    epoch: str
    change: int
    reset: bool
    models: list[ModelStatus]
    deleted: list[str]


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a replica reports after loading a model: where it is, what it costs, its tensor metadata."""

    replica: str
    measured_bytes: int
    load_time_s: float
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResidentModel:
    version: int
    charged_bytes: int
    measured_bytes: int
    batches: int = 0
    batched_requests: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """Which models one replica holds now, and its memory budget (``GET /v2/repository/replicas``)."""

    replica: str
    node: str
    models: dict[str, ResidentModel]
    used_bytes: int
    budget_bytes: int
    evictions: int
