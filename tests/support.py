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


KSERVE_PRELUDE = """import asyncio, json, sys
import numpy as np
import httpx
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.utils.utils import get_predict_input, get_predict_response
"""


def with_kserve(body: str, **values) -> dict:
    """Run ``body`` (the inside of ``async def main(values) -> dict``, JSON in and out) in a process of its own
    with KServe's package imported. KServe loads its generated gRPC messages into protobuf's default pool,
    where tritonclient's gRPC messages define the same names (kserve/kserve#3099): the two cannot share the
    test process."""
    import json
    import subprocess
    import sys
    import textwrap

    script = KSERVE_PRELUDE + "\nasync def main(values):\n" + textwrap.indent(textwrap.dedent(body), "    ") + \
        "\n\nprint(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))\n"
    done = subprocess.run([sys.executable, "-c", script, json.dumps(values)], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
