"""The node's artifact agent as a Ray actor, and the model host's way to reach it.

One agent per node (a named, detached actor pinned to the node), so a node downloads an artifact once and a
replica only ever loads from its own node's disk. The agent starts on the first real download: a node that
serves only local, unpacked artifacts in place never runs one. The agent itself is
:class:`rayms.agent.ArtifactAgent`, plain asyncio; its download events become Prometheus metrics here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayms.agent import ArtifactAgent
from rayms.cluster.metrics import Metrics
from rayms.cluster.remote import call
from rayms.config import ModelSpec, Settings
from rayms.redact import install_log_redaction

AGENT_NAMESPACE = "rayms"


class NodeAgent(ArtifactAgent):
    """The agent as a Ray actor: its download events become Prometheus metrics on Ray's endpoint."""

    def __init__(self, settings: Settings) -> None:
        install_log_redaction()
        super().__init__(settings, on_event=Metrics().record_download)


def agent_name(app_name: str, node_id: str) -> str:
    return f"{app_name}-agent-{node_id[:16]}"


def _this_node() -> str:
    return ray.get_runtime_context().get_node_id()


def existing_node_agent(settings: Settings) -> Any | None:
    """The artifact agent actor of this node if some replica here has needed one (blocking lookup)."""
    try:
        return ray.get_actor(agent_name(settings.app_name, _this_node()), namespace=AGENT_NAMESPACE)
    except ValueError:
        return None


def node_agent(settings: Settings) -> Any:
    """The artifact agent actor of the node this process runs on, created on first use."""
    node_id = _this_node()
    return (
        ray.remote(NodeAgent)
        .options(
            name=agent_name(settings.app_name, node_id),
            namespace=AGENT_NAMESPACE,
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


class NodeArtifacts:
    """:class:`rayms.host.ArtifactSource` over this node's agent actor, started when first needed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._agent: Any | None = None

    async def fetch(self, name: str, spec: ModelSpec) -> str:
        if self._agent is None:
            self._agent = node_agent(self._settings)
        return await call(self._agent.fetch.remote(name, spec))

    async def evict(self, name: str, spec: ModelSpec) -> None:
        if self._agent is None:
            self._agent = await asyncio.to_thread(existing_node_agent, self._settings)
        if self._agent is not None:  # no agent on this node: nothing of this model was copied here
            await call(self._agent.evict.remote(name, spec))

    def release(self, name: str, spec: ModelSpec) -> None:
        if self._agent is not None:  # fetch started it; the agent's pin expires anyway if this never arrives
            self._agent.release.remote(name, spec)
