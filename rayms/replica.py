"""The model replicas: a multiplexed Serve deployment that loads, evicts and runs models.

Each replica holds an LRU of loaded models (:mod:`rayms.model_cache`). Requests reach it through a Serve
handle called with ``multiplexed_model_id=<model name>``, so Serve routes a model's requests to the
replicas that report holding it (:mod:`rayms._serve_private`). Artifacts come from the node's agent actor
(:mod:`rayms.agent`): one per node, so a node downloads an artifact once and a replica only ever loads
from its own node's disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayms import frameworks, storage
from rayms._serve_private import report_model_ids
from rayms.agent import ArtifactAgent
from rayms.batching import Batcher, BatchPolicy, split_parameters
from rayms.codecs import InferRequest, InferResult, Tensor
from rayms.config import ModelSpec, Settings
from rayms.errors import ModelNotFound, ModelNotReady, RaymsError
from rayms.metrics import Metrics
from rayms.model_cache import LoadedModel, ModelCache
from rayms.view import RegistryView

logger = logging.getLogger("rayms.replica")

REGISTRY = "Registry"
REPLICA = "ModelReplica"
ROUTING_PUSH_INTERVAL_S = 0.1


class NodeAgent(ArtifactAgent):
    """The agent as a Ray actor: its download events become Prometheus metrics on Ray's endpoint."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, on_event=Metrics().record_download)


def _agent_name(settings: Settings) -> str:
    return f"{settings.app_name}-agent-{ray.get_runtime_context().get_node_id()[:16]}"


def existing_node_agent(settings: Settings) -> Any | None:
    """The artifact agent actor of this node if some replica here has needed one (blocking lookup)."""
    try:
        return ray.get_actor(_agent_name(settings), namespace="rayms")
    except ValueError:
        return None


def node_agent(settings: Settings) -> Any:
    """The artifact agent actor of the node this process runs on, created on first use. It starts only
    when a model needs copying or unpacking: a node that serves local artifacts in place never runs one."""
    node_id = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(NodeAgent)
        .options(
            name=_agent_name(settings),
            namespace="rayms",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            runtime_env={"env_vars": dict(settings.storage_env)} if settings.storage_env else None,
        )
        .remote(settings)
    )


class ModelReplica:
    """Serve deployment class; :func:`rayms.app.build_app` applies ``@serve.deployment`` options."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self._registry = serve.get_deployment_handle(REGISTRY, context.app_name)
        self._agent: Any | None = None  # this node's artifact agent, looked up or started when first needed
        self._metrics = Metrics()
        self._batch_default = BatchPolicy(max_batch_size=self._settings.max_batch_size,
                                          max_latency_s=self._settings.max_batch_latency_ms / 1000)
        self._cache = ModelCache(
            max_models=self._settings.max_models_per_replica,
            budget_bytes=self._settings.replica_memory_bytes,
            load_fn=self._load_runtime,
            on_change=self._resident_changed,
        )
        self._view = RegistryView(self._watch, on_update=self._registry_changed)
        self._view.start()
        self._routing_dirty = True
        self._pusher = asyncio.get_running_loop().create_task(self._push_routing())
        # Serve routes requests to a replica once its constructor returns. Before the first registry answer
        # every model would look unknown (404), so a replica that replaces a dead one waits for it.
        await self._view.synced.wait()

    # ---------------------------------------------------------------- data plane
    async def run_inference(self, name: str, request: InferRequest) -> InferResult:
        model = await self._model(name)
        requested = [o.name for o in request.outputs] or None
        inputs, input_names = [t.data for t in request.inputs], [t.name for t in request.inputs]
        started = time.perf_counter()
        if model.batcher is None:
            model.batcher = self._batcher(model)
        if model.batcher:
            outputs = await model.batcher.predict(inputs, request.parameters, requested, input_names)
        else:
            outputs = model.runtime.predict(inputs, request.parameters, requested=requested, input_names=input_names)
        self._metrics.observe_request(name, time.perf_counter() - started)
        return InferResult(outputs=[Tensor.from_numpy(k, v) for k, v in outputs.items()],
                           model_version=str(model.version))

    def _batcher(self, model: LoadedModel) -> Batcher | bool:
        policy, _ = split_parameters(model.spec.parameters, self._batch_default)
        if not policy.enabled:
            return False
        runtime = model.runtime
        return Batcher(lambda inputs, parameters, requested, input_names: runtime.predict(
            inputs, parameters, requested=requested, input_names=input_names), policy)

    async def model_metadata(self, name: str) -> dict[str, Any]:
        model = await self._model(name)
        return {"inputs": model.runtime.input_metadata(), "outputs": model.runtime.output_metadata()}

    async def _model(self, name: str) -> LoadedModel:
        status = self._view.models.get(name)
        if status is None:
            # Registered a moment ago and not pushed yet: ask once, on this miss only.
            await self._view.refresh()
            status = self._view.models.get(name)
            if status is None:
                raise ModelNotFound(name)
        if status["state"] == "UNLOADING":
            raise ModelNotReady(name, status["state"])
        version = int(status["version"])
        # The hot path: a resident, current model is served without validating its spec again.
        model = self._cache.hit(name, version)
        if model is not None:
            return model
        return await self._cache.get(name, ModelSpec.parse(status["spec"], name=name), version)

    # ---------------------------------------------------------------- control plane
    async def load_model(self, name: str, spec: dict[str, Any], version: int) -> dict[str, Any]:
        """Load ``name`` here (called by the registry); report what it costs."""
        model = await self._cache.load(name, ModelSpec.parse(spec, name=name), version)
        try:
            metadata = {"inputs": model.runtime.input_metadata(), "outputs": model.runtime.output_metadata()}
        except Exception:  # metadata is best effort; serving does not depend on it
            metadata = {}
        return {"measured_bytes": model.measured_bytes, "load_time_s": model.load_time_s,
                "replica": self._replica_id, "metadata": metadata}

    async def unload_model(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """Drop ``name`` from memory and its artifact from this node's cache (called on every replica)."""
        dropped = self._cache.unload(name)
        if spec is not None:
            try:
                if self._agent is None:
                    self._agent = await asyncio.to_thread(existing_node_agent, self._settings)
                if self._agent is not None:  # no agent on this node: nothing of this model was copied here
                    await self._agent.evict.remote(name, ModelSpec.parse(spec, name=name))
            except Exception as exc:
                logger.warning("model %s: cache eviction failed: %s", name, exc)
        return {"replica": self._replica_id, "dropped": dropped}

    async def resident(self) -> dict[str, Any]:
        """Which models this replica holds now (for tests, notebooks and the CLI)."""
        return {"replica": self._replica_id, "node": self._node_id, "models": self._cache.resident(),
                "used_bytes": self._cache.used_bytes, "budget_bytes": self._cache.budget_bytes,
                "evictions": self._cache.evictions}

    async def check_health(self) -> None:
        if self._pusher.done() and self._pusher.exception():
            raise RuntimeError(f"routing reporter stopped: {self._pusher.exception()}")

    # ---------------------------------------------------------------- wiring
    async def _load_runtime(self, name: str, spec: ModelSpec, version: int) -> tuple[Any, int]:
        started = time.perf_counter()
        _, parameters = split_parameters(spec.parameters, self._batch_default)  # bad batch settings fail here
        self._routing_dirty = True  # announce "loading here" early so Serve routes this model's requests here
        try:
            # A local, unpacked artifact is read where it is: no copy to make, so no call to the node's agent.
            path = await asyncio.to_thread(storage.in_place, spec.storage_uri, settings=self._settings)
            if path is None:
                if self._agent is None:
                    self._agent = node_agent(self._settings)
                path = await self._agent.fetch.remote(name, spec)
        except Exception as exc:
            raise _unwrap(exc) from None
        self._registry.report.remote(name, version, "LOADING")
        try:
            runtime = await asyncio.to_thread(frameworks.load_runtime, spec.framework, Path(path), parameters)
        except Exception:
            self._metrics.count_load(name, ok=False)
            raise
        finally:  # the artifact has been read: the node's cache may remove it once replaced or over quota
            if self._agent is not None:
                self._agent.release.remote(name, spec)
        self._metrics.count_load(name, ok=True, seconds=time.perf_counter() - started)
        logger.info("model %s: version %d loaded on replica %s", name, version, self._replica_id)
        return runtime, frameworks.measure_size(runtime)

    def _resident_changed(self, loaded: list[str], evicted: list[str]) -> None:
        self._routing_dirty = True
        if evicted:
            self._metrics.count_evictions(len(evicted))
        self._registry.report_residency.remote(self._replica_id, loaded, evicted)

    def _registry_changed(self, changed: list[str], removed: list[str]) -> None:
        for name in removed:
            self._cache.unload(name)
        # A newer version of a model held here: load it now. Left to the next request, that request and any
        # before the swap would still be answered by the old version, however long ago the change was.
        for name in changed:
            status, model = self._view.models.get(name), self._cache.peek(name)
            if model is None or status is None or status["state"] in ("FAILED", "UNLOADING"):
                continue
            if int(status["version"]) > model.version:
                spec = ModelSpec.parse(status["spec"], name=name)
                self._cache.refresh_in_background(name, spec, int(status["version"]))

    async def _watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> dict[str, Any]:
        return await self._registry.watch.remote(epoch, since, timeout_s)

    async def _push_routing(self) -> None:
        while True:
            if self._routing_dirty:
                self._routing_dirty = False
                report_model_ids(self._cache.names_loaded_or_loading())
            await asyncio.sleep(ROUTING_PUSH_INTERVAL_S)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors raised in another process; give back the original rayms error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RaymsError):
        return cause
    return exc
