"""The Protocols of the plain-asyncio parts, implemented over Serve deployment handles.

Each class here is a thin translation: a method call becomes a handle call, awaited through
:func:`rayms.cluster.remote.call` so errors come back as rayms errors. Arguments and answers are the typed
objects of :mod:`rayms.status`, :mod:`rayms.config` and :mod:`rayms.codecs`, pickled by Ray as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from rayms.cluster.remote import call
from rayms.codecs import InferRequest, InferResult
from rayms.config import ModelSpec
from rayms.status import Changes, LoadReport, ModelState, ModelStatus, ReplicaReport, Source


class RegistryHandle:
    """The registry deployment, for the data plane, the replicas and the Kubernetes bridge
    (:class:`rayms.k8s.bridge.RegistryClient`)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def register(self, name: str, spec: ModelSpec, source: Source) -> ModelStatus:
        return await call(self._handle.register.remote(name, spec, source))

    async def load(self, name: str, spec: ModelSpec, source: Source, *, force: bool = False) -> ModelStatus:
        return await call(self._handle.load.remote(name, spec, source, force=force))

    async def unregister(self, name: str, source: Source | None = None, *, force: bool = False) -> None:
        await call(self._handle.unregister.remote(name, source, force=force))

    async def list(self, source: Source | None = None) -> list[ModelStatus]:
        return await call(self._handle.list.remote(source))

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> Changes:
        return await call(self._handle.watch.remote(epoch, since, timeout_s))


class RegistryReporterHandle:
    """:class:`rayms.host.RegistryReporter` over the registry deployment: calls sent, never awaited."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    def loading(self, name: str, version: int) -> None:
        self._handle.report.remote(name, version, ModelState.LOADING)

    def residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        self._handle.report_residency.remote(replica, loaded, evicted)

    def failed(self, name: str, version: int, reason: str) -> None:
        self._handle.quarantine.remote(name, version, reason)


class ReplicaModels:
    """:class:`rayms.dataplane.Models` over the model replicas (the two-hop router): each call is routed by
    ``multiplexed_model_id`` to a replica that holds the model, if one does."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def infer(self, name: str, request: InferRequest) -> InferResult:
        return await call(self._handle.options(multiplexed_model_id=name).run_inference.remote(name, request))

    async def metadata(self, name: str) -> dict[str, Any]:
        return await call(self._handle.options(multiplexed_model_id=name).model_metadata.remote(name))


class ClusterControl:
    """:class:`rayms.dataplane.Control`: loads and unloads through the registry, the census from every replica."""

    def __init__(self, registry: RegistryHandle, replicas: DeploymentHandle) -> None:
        self._registry = registry
        self._replicas = replicas

    async def load(self, name: str, spec: ModelSpec, source: Source, *, force: bool = False) -> ModelStatus:
        return await self._registry.load(name, spec, source, force=force)

    async def unregister(self, name: str, source: Source | None = None, *, force: bool = False) -> None:
        await self._registry.unregister(name, source, force=force)

    async def replicas(self) -> list[ReplicaReport]:
        return await call(self._replicas.broadcast("report").results_async())


class HandlePlacer:
    """The registry's :class:`~rayms.registry.Placer` over the model replicas' handle.

    The handle is looked up on first use: the registry starts before the replicas' deployment exists."""

    def __init__(self, replicas: Callable[[], DeploymentHandle]) -> None:
        self._lookup = replicas
        self._handle: DeploymentHandle | None = None

    @property
    def _replicas(self) -> DeploymentHandle:
        if self._handle is None:
            self._handle = self._lookup()
        return self._handle

    async def load(self, name: str, spec: ModelSpec, version: int) -> LoadReport:
        return await call(self._replicas.options(multiplexed_model_id=name).load_model.remote(name, spec, version))

    async def unload(self, name: str, spec: ModelSpec | None) -> None:
        await call(self._replicas.broadcast("unload_model", name, spec).results_async())

    async def census(self) -> list[ReplicaReport]:
        """What every live replica holds (a replica that died answers nothing)."""
        return await call(self._replicas.broadcast("report").results_async())
