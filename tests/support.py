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


def v2_body(rows) -> dict:
    """A V2 infer body with one FP64 input holding ``rows``."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    return {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64",
                        "data": rows.ravel().tolist()}]}


def prediction(response):
    """The ``predict`` output of a V2 infer response, as float64 in its shape (``[N, classes]`` for a
    booster's probabilities)."""
    import numpy as np

    output = next(o for o in response.json()["outputs"] if o["name"] == "predict")
    return np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])
