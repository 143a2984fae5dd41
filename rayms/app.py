"""Composition root: settings in, a Serve application out.

``build_app(...)`` wires three deployments: the Registry (one replica, the source of truth), the model
replicas, and the Router (ingress). It is usable with ``serve.run`` and from a Serve config file
(``import_path: rayms.app:app_builder``, whose ``args`` are :class:`~rayms.config.Settings` fields).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve import Application

from rayms.config import ModelSpec, Settings
from rayms.errors import RaymsError
from rayms.ray_env import deployment_env
from rayms.registry import ModelRegistry
from rayms.replica import REGISTRY, REPLICA, ModelReplica
from rayms.repository import read_models_file, scan_repository
from rayms.router import IngressReplica, Router
from rayms.statestore import StateStore

logger = logging.getLogger("rayms.app")


class HandlePlacer:
    """The registry's :class:`~rayms.registry.Placer` over Serve handles to the model replicas."""

    def __init__(self, app_name: str) -> None:
        self._app_name = app_name
        self._handle = None

    @property
    def models(self):
        if self._handle is None:
            self._handle = serve.get_deployment_handle(REPLICA, self._app_name)
        return self._handle

    async def load(self, name: str, spec: ModelSpec, version: int) -> dict[str, Any]:
        wire = spec.to_wire() | {"parameters": spec.parameters}
        return await self.models.options(multiplexed_model_id=name).load_model.remote(name, wire, version)

    async def unload(self, name: str, spec: ModelSpec) -> None:
        wire = spec.to_wire() | {"parameters": spec.parameters}
        await self.models.broadcast("unload_model", name, wire).results_async()


REPLICA_PRUNE_INTERVAL_S = 5.0


class Registry:
    """Serve deployment around :class:`~rayms.registry.ModelRegistry` (exactly one replica)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)
        store = StateStore(self._settings.resolved_state_uri())
        first_start = not store.read()
        self._placer = HandlePlacer(self._app_name())
        self._registry = ModelRegistry(self._settings, store=store, placer=self._placer)
        await self._registry.restore()
        if first_start:
            # Seed from the models file / repository folder only once: afterwards the persisted desired
            # set is the truth, so a model unloaded by a user does not come back on restart.
            seeds, problems = _seed_models(self._settings)
            for name, spec, source in seeds:
                try:
                    await self._registry.register(name, spec, source)
                except RaymsError as exc:
                    logger.error("model %s: not registered from %s: %s", name, source, exc)
            for name, reason in problems.items():  # one bad folder never stops the others: it shows as FAILED
                try:
                    await self._registry.register_failed(name, reason, "repository-folder")
                except RaymsError as exc:
                    logger.error("model %s: %s (and it cannot be listed: %s)", name, reason, exc)
        self._pruner = asyncio.get_running_loop().create_task(self._prune_dead_replicas())

    async def _prune_dead_replicas(self) -> None:
        """A replica that died reports nothing; ask who is alive now and then, so the index stays true."""
        placer = self._placer
        while True:
            await asyncio.sleep(REPLICA_PRUNE_INTERVAL_S)
            try:
                answers = await placer.models.broadcast("resident").results_async()
                await self._registry.keep_replicas({a["replica"] for a in answers})
            except Exception as exc:  # replicas restarting: try again next round
                logger.debug("replica census failed: %s", exc)

    @staticmethod
    def _app_name() -> str:
        return serve.get_replica_context().app_name

    async def register(self, name: str, spec: dict[str, Any], source: str = "repository") -> dict[str, Any]:
        return await self._registry.register(name, spec, source)

    async def unregister(self, name: str, source: str | None = None) -> None:
        await self._registry.unregister(name, source)

    async def get(self, name: str) -> dict[str, Any]:
        return self._registry.get(name)

    async def list(self, source: str | None = None) -> list[dict[str, Any]]:
        return self._registry.list(source)

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> dict[str, Any]:
        return await self._registry.watch(epoch, since, timeout_s)

    async def load(self, name: str, spec: dict[str, Any], source: str, timeout_s: float) -> dict[str, Any]:
        """Register and wait until READY or FAILED, in one call (the repository API's load)."""
        await self._registry.register(name, spec, source)
        return await self._registry.wait_settled(name, timeout_s)

    async def report(self, name: str, version: int, state: str, reason: str = "") -> None:
        await self._registry.report(name, version, state, reason)

    async def report_residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        await self._registry.report_residency(replica, loaded, evicted)


class HandleRegistry:
    """The bridge's :class:`~rayms.k8s.bridge.RegistryClient` over the Registry deployment's handle."""

    def __init__(self, handle) -> None:
        self._handle = handle

    async def register(self, name: str, spec: dict[str, Any], source: str) -> dict[str, Any]:
        return await self._handle.register.remote(name, spec, source)

    async def unregister(self, name: str, source: str | None = None) -> None:
        await self._handle.unregister.remote(name, source)

    async def list(self, source: str | None = None) -> list[dict[str, Any]]:
        return await self._handle.list.remote(source)

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> dict[str, Any]:
        return await self._handle.watch.remote(epoch, since, timeout_s)


class KubernetesBridge:
    """Serve deployment (one replica) running the TrainedModel bridge inside the application."""

    async def __init__(self, settings: dict[str, Any], registry) -> None:
        from rayms.k8s import TrainedModelBridge, connect

        self._settings = Settings(**settings)
        api, namespace = connect(self._settings)
        self._bridge = TrainedModelBridge(self._settings, registry=HandleRegistry(registry), api=api,
                                          namespace=namespace)
        await self._bridge.start()

    async def stats(self) -> dict[str, Any]:
        return self._bridge.stats()

    def __del__(self) -> None:
        self._bridge.close()


def _seed_models(settings: Settings) -> tuple[list[tuple[str, ModelSpec, str]], dict[str, str]]:
    """The models to register at first start, and the repository's models that cannot be (name -> reason)."""
    seeds: list[tuple[str, ModelSpec, str]] = []
    problems: dict[str, str] = {}
    if settings.model_repository:
        specs, problems = scan_repository(settings.model_repository)
        seeds += [(n, s, "repository-folder") for n, s in specs.items()]
    if settings.models_file:
        seeds += [(n, s, "models-file") for n, s in read_models_file(settings.models_file).items()]
    return seeds, problems


# Serve's own per-replica request limit, set far above anything reached: the replica's data plane applies
# back-pressure to inference itself (a JSON 503 with Retry-After), while control calls must always get in. A
# repository load holds its HTTP request until the model is READY, and the registry's call that loads it
# goes to these same replicas: with Serve's limit in the way, many waiting loads would starve that call.
REPLICA_MAX_ONGOING = 10_000


def build_app(settings: Settings | None = None, **overrides: Any) -> Application:
    """The rayms Serve application. ``overrides`` are :class:`~rayms.config.Settings` fields."""
    settings = (settings or Settings()).model_copy(update=overrides) if overrides else (settings or Settings())
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
            KubernetesBridge, name="KubernetesBridge", num_replicas=1,
            ray_actor_options={"num_cpus": 0, "runtime_env": env}, logging_config=quiet,
        ).bind(payload, registry)
    replica_options = {
        "name": REPLICA, "num_replicas": settings.num_replicas, "max_ongoing_requests": REPLICA_MAX_ONGOING,
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "runtime_env": env}, "logging_config": quiet,
    }
    if settings.ingress == "replica":
        # The model replicas are the ingress: a request is decoded, predicted and encoded in one process.
        return serve.deployment(IngressReplica, **replica_options).bind(payload, registry, bridge)
    # The Router receives the other handles, which puts every deployment in one application graph.
    replicas = serve.deployment(ModelReplica, **replica_options).bind(payload)
    return serve.deployment(
        Router, name="Router", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0, "runtime_env": env}, logging_config=quiet,
    ).bind(payload, registry, replicas, bridge)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files: ``import_path: rayms.app:app_builder``."""
    return build_app(Settings(**(args or {})))
