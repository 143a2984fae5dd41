"""The Serve deployments of a rayms application, and the graph that wires them.

- ``Registry`` (one replica) owns the :class:`~rayms.registry.ModelRegistry`: the desired set, its state file
  and every model's lifecycle.
- ``ModelReplica`` owns a :class:`~rayms.host.ModelHost`. With the default ingress it *is* the ingress
  (:class:`IngressReplica`): it also has a :class:`~rayms.dataplane.DataPlane` whose models are its own
  host, and answers HTTP with :func:`rayms.router.build_api` (and gRPC with :class:`~rayms.cluster.grpc.GrpcIngress`),
  so a request is decoded, predicted and encoded in one process. With ``ingress="router"`` a separate :class:`Router` answers HTTP and reaches the replicas
  through a handle.
- ``KubernetesBridge`` (one replica, only with ``kubernetes=True``) runs the TrainedModel bridge.

Each class builds its plain-asyncio object from :class:`~rayms.config.Settings` and the handle-based
Protocol implementations of :mod:`rayms.cluster.handles`, then only delegates to it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from rayms.cluster.agent import NodeArtifacts
from rayms.cluster.grpc import GrpcIngress
from rayms.cluster.handles import ClusterControl, HandlePlacer, RegistryHandle, RegistryReporterHandle, ReplicaModels
from rayms.cluster.metrics import Metrics
from rayms.cluster.serve_private import report_model_ids
from rayms.codecs import InferRequest, InferResult
from rayms.config import ModelSpec, Settings
from rayms.dataplane import DataPlane, PythonApi
from rayms.host import ModelHost
from rayms.ray_env import deployment_env
from rayms.redact import install_log_redaction
from rayms.registry import ModelRegistry
from rayms.repository import seed_models
from rayms.router import build_api
from rayms.statestore import StateStore
from rayms.status import Changes, LoadReport, ModelState, ModelStatus, ReplicaReport, Source
from rayms.view import RegistryView

logger = logging.getLogger("rayms.app")

REGISTRY = "Registry"
REPLICA = "ModelReplica"
ROUTER = "Router"
BRIDGE = "KubernetesBridge"

REPLICA_CENSUS_INTERVAL_S = 5.0

# Serve's own per-replica request limit, set far above anything reached: the replica's data plane applies
# back-pressure to inference itself (a JSON 503 with Retry-After), while control calls must always get in. A
# repository load holds its HTTP request until the model is READY, and the registry's call that loads it
# goes to these same replicas: with Serve's limit in the way, many waiting loads would starve that call.
REPLICA_MAX_ONGOING = 10_000


def _app_name() -> str:
    return serve.get_replica_context().app_name


def _registry_handle() -> RegistryHandle:
    return RegistryHandle(serve.get_deployment_handle(REGISTRY, _app_name()))


# ---------------------------------------------------------------------------------------------- registry
class Registry:
    """Serve deployment around :class:`~rayms.registry.ModelRegistry` (exactly one replica)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        install_log_redaction()
        self._settings = Settings(**settings)
        app_name = _app_name()
        store = StateStore(self._settings.resolved_state_uri(), env=self._settings.storage_env)
        self._placer = HandlePlacer(lambda: serve.get_deployment_handle(REPLICA, app_name))
        self._registry = ModelRegistry(self._settings, store=store, placer=self._placer)
        await self._registry.restore()
        await self._registry.seed(seed_models(self._settings))
        self._census_task = asyncio.get_running_loop().create_task(self._census())

    async def _census(self) -> None:
        """Ask every replica what it holds, at start and now and then, so the index says who holds what: a
        restored registry learns what replicas that outlived it hold, and a replica that died holds nothing."""
        while True:
            try:
                await self._registry.reconcile(await self._placer.census())
            except Exception as exc:  # replicas starting or restarting: try again next round
                logger.debug("replica census failed: %s", exc)
            await asyncio.sleep(REPLICA_CENSUS_INTERVAL_S)

    async def register(self, name: str, spec: ModelSpec, source: Source = Source.API) -> ModelStatus:
        return await self._registry.register(name, spec, source)

    async def load(self, name: str, spec: ModelSpec, source: Source = Source.API, force: bool = False) -> ModelStatus:
        return await self._registry.load(name, spec, source, force=force)

    async def unregister(self, name: str, source: Source | None = None, force: bool = False) -> None:
        await self._registry.unregister(name, source, force=force)

    async def get(self, name: str) -> ModelStatus:
        return self._registry.get(name)

    async def list(self, source: Source | None = None) -> list[ModelStatus]:
        return self._registry.list(source)

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> Changes:
        return await self._registry.watch(epoch, since, timeout_s)

    async def report(self, name: str, version: int, state: ModelState) -> None:
        await self._registry.report(name, version, state)

    async def report_residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        await self._registry.report_residency(replica, loaded, evicted)

    async def quarantine(self, name: str, version: int, reason: str) -> None:
        await self._registry.quarantine(name, version, reason)


# ---------------------------------------------------------------------------------------------- replicas
async def _start_host(settings: Settings) -> tuple[ModelHost, RegistryView]:
    install_log_redaction()
    context = serve.get_replica_context()
    registry = serve.get_deployment_handle(REGISTRY, context.app_name)
    view = RegistryView(RegistryHandle(registry).watch)
    host = ModelHost(settings, view=view, artifacts=NodeArtifacts(settings), reporter=RegistryReporterHandle(registry),
                     replica_id=context.replica_id.unique_id, node_id=ray.get_runtime_context().get_node_id(),
                     replicas_on_node=_replicas_per_node(settings), telemetry=Metrics(), announce=report_model_ids)
    await host.start()
    return host, view


def _replicas_per_node(settings: Settings) -> int:
    """How many model replicas share this node's memory, if Serve spreads them evenly over the live nodes."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(1, -(-settings.num_replicas // max(1, nodes)))


class _ReplicaCalls:
    """What the registry and the router call on a model replica; each call goes to its host."""

    _host: ModelHost

    async def run_inference(self, name: str, request: InferRequest) -> InferResult:
        return await self._host.infer(name, request)

    async def model_metadata(self, name: str) -> dict[str, Any]:
        return await self._host.metadata(name)

    async def load_model(self, name: str, spec: ModelSpec, version: int) -> LoadReport:
        return await self._host.load_model(name, spec, version)

    async def unload_model(self, name: str, spec: ModelSpec | None = None) -> bool:
        return await self._host.unload_model(name, spec)

    async def report(self) -> ReplicaReport:
        return self._host.report()

    async def check_health(self) -> None:
        self._host.check_health()


class _PythonCalls:
    """What ``serve.get_app_handle("rayms")`` offers; each call goes to the ingress's :class:`PythonApi`."""

    _api: PythonApi

    async def infer(self, name: str, inputs: Any, parameters: dict[str, Any] | None = None,
                    outputs: list[str] | None = None) -> dict[str, Any]:
        return await self._api.infer(name, inputs, parameters=parameters, outputs=outputs)

    async def predict(self, name: str, instances: Any, parameters: dict[str, Any] | None = None) -> list:
        return await self._api.predict(name, instances, parameters=parameters)

    async def load(self, name: str, storage_uri: str | None = None, framework: str | None = None,
                   memory: str | None = None, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._api.load(name, storage_uri=storage_uri, framework=framework, memory=memory,
                                    parameters=parameters)

    async def unload(self, name: str) -> None:
        await self._api.unload(name)

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._api.list_models()

    async def replicas(self) -> list[dict[str, Any]]:
        return await self._api.replicas()


class ModelReplica(_ReplicaCalls):
    """A model replica without HTTP (the two-hop layout's replicas)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self._host, _ = await _start_host(Settings(**settings))


@serve.ingress()
class IngressReplica(_ReplicaCalls, _PythonCalls, GrpcIngress):
    """The default ingress: a model replica that also answers HTTP, so a request for a model it holds is
    served in this process with no Ray hop. Put HAProxy in front with ``balance uri`` (what ``rayms serve``
    does) and each model gets a home replica; behind Serve's own proxy any replica serves any model, loading
    it on first use."""

    async def __init__(self, settings: dict[str, Any], registry: Any = None, bridge: Any = None) -> None:
        # ``registry`` and ``bridge`` are bound only to put those deployments into the application graph.
        self._settings = Settings(**settings)
        self._host, view = await _start_host(self._settings)
        control = ClusterControl(_registry_handle(), serve.get_deployment_handle(REPLICA, _app_name()))
        self._plane = DataPlane(self._settings, view=view, models=self._host, control=control)
        self._api = PythonApi(self._plane, view)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self._plane, self._settings)


@serve.ingress()
class Router(_PythonCalls, GrpcIngress):
    """The two-hop ingress (``Settings.ingress = "router"``): HTTP here, models on separate replicas reached
    through a handle with ``multiplexed_model_id``. Suits models too heavy to share a process with HTTP."""

    async def __init__(self, settings: dict[str, Any], registry: Any = None, models: Any = None,
                       bridge: Any = None) -> None:
        install_log_redaction()
        self._settings = Settings(**settings)
        registry_handle = _registry_handle()
        replicas = serve.get_deployment_handle(REPLICA, _app_name())
        self._view = RegistryView(registry_handle.watch)
        self._view.start()
        self._plane = DataPlane(self._settings, view=self._view, models=ReplicaModels(replicas),
                                control=ClusterControl(registry_handle, replicas))
        self._api = PythonApi(self._plane, self._view)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self._plane, self._settings)


# ---------------------------------------------------------------------------------------------- bridge
class KubernetesBridge:
    """Serve deployment (one replica) running the TrainedModel bridge inside the application."""

    async def __init__(self, settings: dict[str, Any], registry: Any = None) -> None:
        from rayms.k8s import TrainedModelBridge, connect

        install_log_redaction()
        self._settings = Settings(**settings)
        api, namespace = connect(self._settings)
        self._bridge = TrainedModelBridge(self._settings, registry=_registry_handle(), api=api, namespace=namespace)
        await self._bridge.start()

    async def stats(self) -> dict[str, Any]:
        return self._bridge.stats()

    async def check_health(self) -> None:
        """Serve's liveness probe: a stuck watch fails it, and Serve replaces this replica."""
        self._bridge.check_health()

    def __del__(self) -> None:
        self._bridge.close()


# ---------------------------------------------------------------------------------------------- graph
def build_application(settings: Settings) -> Application:
    """The Serve application for ``settings`` (already validated)."""
    payload = settings.model_dump()
    quiet = {"enable_access_log": False}
    env = {"env_vars": deployment_env()}
    # The registry always holds the subscribers' long-poll watch calls in flight, so Serve's default graceful
    # shutdown (wait up to 20 s for ongoing requests) would hold every stop for 20 s; watchers simply retry.
    registry = serve.deployment(
        Registry, name=REGISTRY, num_replicas=1, max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0, "runtime_env": env}, logging_config=quiet, graceful_shutdown_timeout_s=1,
    ).bind(payload)
    bridge = None
    if settings.kubernetes:
        bridge = serve.deployment(
            KubernetesBridge, name=BRIDGE, num_replicas=1,
            ray_actor_options={"num_cpus": 0, "runtime_env": env}, logging_config=quiet,
        ).bind(payload, registry)
    replica_options = {
        "name": REPLICA, "num_replicas": settings.num_replicas, "max_ongoing_requests": REPLICA_MAX_ONGOING,
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "runtime_env": env}, "logging_config": quiet,
    }
    if settings.ingress == "replica":
        # The model replicas are the ingress: a request is decoded, predicted and encoded in one process.
        return serve.deployment(IngressReplica, **replica_options).bind(payload, registry, bridge)
    replicas = serve.deployment(ModelReplica, **replica_options).bind(payload)
    return serve.deployment(
        Router, name=ROUTER, num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0, "runtime_env": env}, logging_config=quiet,
    ).bind(payload, registry, replicas, bridge)
