"""The model host: what a model replica does with models, in plain asyncio.

A host keeps a local view of the registry (:mod:`rayms.view`), an LRU of loaded models
(:mod:`rayms.model_cache`), and per model a batcher when the model asks for one (:mod:`rayms.batching`). It
loads a model on the registry's request or on the first request for a READY model it does not hold, runs
predictions, and tells the rest of the system what it holds.

Everything outside the process is behind a small Protocol, implemented over Ray in :mod:`rayms.cluster`:
:class:`ArtifactSource` (the node's artifact agent), :class:`RegistryReporter` (load progress and residency
for the registry), :class:`Telemetry` (metrics) and an ``announce`` callback (which models Serve's handle
router should send here). So the host is unit-tested without Ray (``tests/test_host.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rayms import frameworks, storage
from rayms.batching import Batcher, BatchPolicy, split_parameters
from rayms.codecs import InferRequest, InferResult, Tensor
from rayms.config import ModelSpec, Settings
from rayms.errors import ModelNotFound, ModelNotReady
from rayms.isolation import PredictRunner
from rayms.memory import process_rss_bytes
from rayms.model_cache import LoadedModel, ModelCache
from rayms.status import LoadReport, ModelState, ReplicaReport
from rayms.view import RegistryView

logger = logging.getLogger("rayms.replica")

ROUTING_PUSH_INTERVAL_S = 0.1


class ArtifactSource(Protocol):
    """Makes artifacts local on this node (the node's agent)."""

    async def fetch(self, name: str, spec: ModelSpec) -> str:
        """The local path of ``spec``'s artifact, downloading it if needed."""

    async def evict(self, name: str, spec: ModelSpec) -> None:
        """Remove ``spec``'s artifact from this node's cache, if it was ever copied here."""

    def release(self, name: str, spec: ModelSpec) -> None:
        """The load that fetched ``spec`` has read it: the cache may remove it once replaced or over its quota.
        Fire and forget."""


class RegistryReporter(Protocol):
    """Tells the registry what happens here. Fire and forget: the host never waits for the registry."""

    def loading(self, name: str, version: int) -> None:
        """The artifact is local and the framework is loading it."""

    def residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        """The models this replica holds changed."""

    def failed(self, name: str, version: int, reason: str) -> None:
        """The model at ``version`` must not serve any more (quarantined here)."""


class Telemetry(Protocol):
    def observe_request(self, model: str, seconds: float) -> None: ...
    def count_load(self, model: str, *, ok: bool, seconds: float | None = None) -> None: ...
    def count_evictions(self, count: int) -> None: ...


class NoTelemetry:
    """Telemetry that records nothing (unit tests, tools)."""

    def observe_request(self, model: str, seconds: float) -> None:
        pass

    def count_load(self, model: str, *, ok: bool, seconds: float | None = None) -> None:
        pass

    def count_evictions(self, count: int) -> None:
        pass


class ModelHost:
    """Loads, holds, evicts and runs the models of one replica."""

    def __init__(self, settings: Settings, *, view: RegistryView, artifacts: ArtifactSource,
                 reporter: RegistryReporter, replica_id: str, node_id: str = "", replicas_on_node: int | None = None,
                 telemetry: Telemetry | None = None, announce: Callable[[list[str]], None] | None = None) -> None:
        self._settings = settings
        self._view = view
        self._artifacts = artifacts
        self._reporter = reporter
        self._telemetry = telemetry or NoTelemetry()
        self._announce = announce
        self.replica_id = replica_id
        self.node_id = node_id
        self._batch_default = BatchPolicy(max_batch_size=settings.max_batch_size,
                                          max_latency_s=settings.max_batch_latency_ms / 1000)
        self._cache = ModelCache(max_models=settings.max_models_per_replica,
                                 budget_bytes=settings.model_budget_bytes(replicas_on_node),
                                 load_fn=self._load_runtime, on_change=self._resident_changed)
        self._runner = PredictRunner(threads=settings.predict_threads, timeout_s=settings.predict_timeout_s,
                                     quarantine_after=settings.quarantine_after, on_quarantine=self._quarantine)
        view.add_listener(self._registry_changed)
        self._routing_dirty = True
        self._pusher: asyncio.Task | None = None

    async def start(self) -> None:
        """Start following the registry and, once it has answered, return: before its first answer every
        model would look unknown (404), so a replica that replaces a dead one waits for it."""
        self._view.start()
        if self._announce is not None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_routing())
        await self._view.synced.wait()

    async def stop(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        await self._view.stop()
        self._runner.close()

    # ---------------------------------------------------------------- serving
    async def infer(self, name: str, request: InferRequest) -> InferResult:
        model = await self._model(name)
        requested = [o.name for o in request.outputs] or None
        inputs, input_names = [t.data for t in request.inputs], [t.name for t in request.inputs]
        started = time.perf_counter()
        if model.batcher is None:
            model.batcher = self._batcher(model)
        if model.batcher:
            outputs = await model.batcher.predict(inputs, request.parameters, requested, input_names)
        else:
            runtime, parameters = model.runtime, request.parameters
            outputs = await self._runner.run(name, lambda: runtime.predict(
                inputs, parameters, requested=requested, input_names=input_names))
        self._telemetry.observe_request(name, time.perf_counter() - started)
        return InferResult(outputs=[Tensor.from_numpy(k, v) for k, v in outputs.items()],
                           model_version=str(model.version))

    async def metadata(self, name: str) -> dict[str, Any]:
        """The model's V2 tensor metadata (``{"inputs": [...], "outputs": [...]}``), loading it if needed."""
        return _tensor_metadata(await self._model(name))

    def _batcher(self, model: LoadedModel) -> Batcher | bool:
        policy, _ = split_parameters(model.spec.parameters, self._batch_default)
        if not policy.enabled:
            return False
        runtime, name, runner = model.runtime, model.name, self._runner

        async def predict(inputs, parameters, requested, input_names):
            return await runner.run(name, lambda: runtime.predict(
                inputs, parameters, requested=requested, input_names=input_names))

        return Batcher(predict, policy)

    async def _model(self, name: str) -> LoadedModel:
        status = self._view.models.get(name)
        if status is None:
            # Registered a moment ago and not pushed yet: ask once, on this miss only.
            await self._view.refresh()
            status = self._view.models.get(name)
            if status is None:
                raise ModelNotFound(name)
        if status.state is ModelState.UNLOADING or status.spec is None:
            raise ModelNotReady(name, status.state.value, status.reason)
        self._runner.check(name)
        # The hot path: a resident, current model is served as it is.
        model = self._cache.hit(name, status.version)
        if model is not None:
            return model
        return await self._cache.get(name, status.spec, status.version)

    # ---------------------------------------------------------------- control
    async def load_model(self, name: str, spec: ModelSpec, version: int) -> LoadReport:
        """Load ``name`` here (the registry asks); report what it costs."""
        self._runner.forget(name)  # loaded again: a quarantine ends
        model = await self._cache.load(name, spec, version)
        try:
            metadata = _tensor_metadata(model)
        except Exception:  # metadata is best effort; serving does not depend on it
            metadata = {}
        return LoadReport(replica=self.replica_id, measured_bytes=model.measured_bytes,
                          load_time_s=model.load_time_s, metadata=metadata)

    async def unload_model(self, name: str, spec: ModelSpec | None = None) -> bool:
        """Drop ``name`` from memory and, given its spec, its artifact from this node's cache."""
        dropped = self._cache.unload(name)
        if spec is not None:
            try:
                await self._artifacts.evict(name, spec)
            except Exception as exc:
                logger.warning("model %s: cache eviction failed: %s", name, exc)
        return dropped

    def report(self) -> ReplicaReport:
        """Which models this replica holds now."""
        return ReplicaReport(replica=self.replica_id, node=self.node_id, models=self._cache.resident(),
                             used_bytes=self._cache.used_bytes, budget_bytes=self._cache.budget_bytes,
                             evictions=self._cache.evictions)

    def check_health(self) -> None:
        if self._pusher is not None and self._pusher.done() and not self._pusher.cancelled() \
                and self._pusher.exception() is not None:
            raise RuntimeError(f"routing reporter stopped: {self._pusher.exception()}")

    # ---------------------------------------------------------------- wiring
    async def _load_runtime(self, name: str, spec: ModelSpec, version: int) -> tuple[Any, int]:
        started = time.perf_counter()
        _, parameters = split_parameters(spec.parameters, self._batch_default)  # bad batch settings fail here
        self._routing_dirty = True  # announce "loading here" early so this model's handle calls come here
        # A local, unpacked artifact is read where it is: no copy to make, so no call to the node's agent.
        path = await asyncio.to_thread(storage.in_place, spec.storage_uri, settings=self._settings)
        fetched = path is None
        if fetched:
            path = await self._artifacts.fetch(name, spec)
        self._reporter.loading(name, version)
        before = process_rss_bytes()
        try:
            runtime = await asyncio.to_thread(frameworks.load_runtime, spec.framework, Path(path), parameters,
                                              allow_code=self._settings.allow_custom_code)
        except Exception:
            self._telemetry.count_load(name, ok=False)
            raise
        finally:
            if fetched:  # read: from now on the node's cache may remove it (rayms.agent says when)
                self._artifacts.release(name, spec)
        # What the model occupies: what loading it added to this process (never less than its artifact). Loads
        # running at the same moment add to each other's reading, which errs on the side of charging more.
        grown = process_rss_bytes() - before
        self._telemetry.count_load(name, ok=True, seconds=time.perf_counter() - started)
        logger.info("model %s: version %d loaded on replica %s", name, version, self.replica_id)
        return runtime, max(frameworks.measure_size(runtime), grown)

    def _quarantine(self, name: str, reason: str) -> None:
        model = self._cache.peek(name)
        status = self._view.models.get(name)
        version = model.version if model is not None else status.version if status is not None else 0
        self._cache.unload(name)
        self._reporter.failed(name, version, reason)

    def _resident_changed(self, loaded: list[str], evicted: list[str]) -> None:
        self._routing_dirty = True
        if evicted:
            self._telemetry.count_evictions(len(evicted))
        self._reporter.residency(self.replica_id, loaded, evicted)

    def _registry_changed(self, changed: list[str], removed: list[str]) -> None:
        for name in removed:
            self._cache.unload(name)
        # A newer version of a model held here: load it now. Left to the next request, that request and any
        # before the swap would still be answered by the old version, however long ago the change was.
        for name in changed:
            status, model = self._view.models.get(name), self._cache.peek(name)
            if model is None or status is None or status.spec is None:
                continue
            if status.state in (ModelState.FAILED, ModelState.UNLOADING):
                continue
            if status.version > model.version:
                self._cache.refresh_in_background(name, status.spec, status.version)

    async def _push_routing(self) -> None:
        while True:
            if self._routing_dirty:
                self._routing_dirty = False
                self._announce(self._cache.names_loaded_or_loading())
            await asyncio.sleep(ROUTING_PUSH_INTERVAL_S)


def _tensor_metadata(model: LoadedModel) -> dict[str, Any]:
    return {"inputs": model.runtime.input_metadata(), "outputs": model.runtime.output_metadata()}
