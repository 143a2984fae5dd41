"""Small pieces several test modules share."""

from __future__ import annotations

from rayms.registry import ModelRegistry


class DirectRegistry:
    """The Kubernetes bridge's RegistryClient over an in-process ModelRegistry (no Ray)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def register(self, name, spec, source):
        return await self.registry.register(name, spec, source)

    async def unregister(self, name, source=None):
        await self.registry.unregister(name, source)

    async def list(self, source=None):
        return self.registry.list(source)

    async def watch(self, epoch, since, timeout_s=30.0):
        return await self.registry.watch(epoch, since, timeout_s)
