"""The HTTP layer in-process (httpx over ASGI, no Ray): routes, error shapes and back-pressure.

The data plane gets a backend that holds requests open on demand, so a test can fill a replica up to its
limit and see what the next request gets.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from rayms.codecs import InferResult, Tensor
from rayms.config import ModelSpec, Settings
from rayms.dataplane import DataPlane
from rayms.router import build_api
from rayms.status import Changes, ModelState, ModelStatus, Source
from rayms.view import RegistryView

READY = ModelStatus(name="m", version=1, state=ModelState.READY, source=Source.API,
                    spec=ModelSpec(storage_uri="/m", framework="sklearn"))
LOADING = ModelStatus(name="slow", version=1, state=ModelState.LOADING, source=Source.API,
                      spec=ModelSpec(storage_uri="/slow", framework="sklearn"))


class NoControl:
    async def load(self, name, spec, source):
        raise AssertionError("not used")

    async def unregister(self, name, source=None):
        raise AssertionError("not used")

    async def replicas(self):
        return []


class HeldBackend:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = 0

    async def infer(self, name, request):
        self.entered += 1
        await self.gate.wait()
        return InferResult(outputs=[Tensor.from_numpy("predict", np.array([1, 2]))])


@pytest.fixture
def app_and_backend():
    async def no_watch(epoch, since, timeout_s=30.0):
        raise AssertionError("not used")

    view = RegistryView(no_watch)
    view.apply(Changes(epoch="e", change=1, reset=True, models=[READY, LOADING], deleted=[]))
    backend = HeldBackend()
    plane = DataPlane(Settings(max_ongoing_requests=3), view=view, models=backend, control=NoControl())
    return build_api(plane, Settings(max_ongoing_requests=3)), backend


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rayms")


BODY = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]}]}


async def test_infer_and_states_in_process(app_and_backend):
    app, _ = app_and_backend
    async with client(app) as http:
        ok = await http.post("/v2/models/m/infer", json=BODY | {"id": "7"})
        assert ok.status_code == 200 and ok.json()["id"] == "7" and ok.json()["outputs"][0]["data"] == [1, 2]
        loading = await http.post("/v2/models/slow/infer", json=BODY)
        assert loading.status_code == 503 and loading.json() == {"error": "Model slow is not ready (state LOADING)"}
        assert loading.headers["retry-after"] == "1"
        missing = await http.post("/v2/models/nope/infer", json=BODY)
        assert missing.status_code == 404 and set(missing.json()) == {"error"}
        unknown_route = await http.get("/v3/whatever")
        assert unknown_route.status_code == 404 and "detail" not in unknown_route.json()


async def test_a_full_replica_answers_503_with_retry_after_instead_of_queueing(app_and_backend):
    app, backend = app_and_backend
    backend.gate.clear()
    async with client(app) as http:
        held = [asyncio.create_task(http.post("/v2/models/m/infer", json=BODY)) for _ in range(3)]
        while backend.entered < 3:
            await asyncio.sleep(0.01)
        refused = await http.post("/v2/models/m/infer", json=BODY)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "limit of 3 inference requests in flight" in refused.json()["error"]
        # health probes, metadata and control requests are never refused
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.post("/v2/repository/index")).status_code == 200
        backend.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert (await http.post("/v2/models/m/infer", json=BODY)).status_code == 200


async def test_before_the_first_registry_answer_unknown_models_get_503_not_404():
    async def no_watch(epoch, since, timeout_s=30.0):
        raise AssertionError("not used")

    view = RegistryView(no_watch)  # never synced
    plane = DataPlane(Settings(), view=view, models=HeldBackend(), control=NoControl())
    async with client(build_api(plane, Settings())) as http:
        early = await http.post("/v2/models/m/infer", json=BODY)
        assert early.status_code == 503 and "not heard from the model registry" in early.json()["error"]
        assert early.headers["retry-after"] == "1"
        assert (await http.get("/v2/health/ready")).status_code == 503


@pytest.mark.parametrize(("method", "path", "root", "route"), [
    ("POST", "/v2/models/m/infer", "", ("v2", "m", None)),
    ("POST", "/v2/models/m/versions/3/infer", "", ("v2", "m", "3")),
    ("POST", "/v1/models/m:predict", "", ("v1", "m", None)),
    ("POST", "/rayms/v2/models/m/infer", "/rayms", ("v2", "m", None)),  # deployed under a route prefix
    ("GET", "/v2/models/m/infer", "", None),  # left to FastAPI: 405
    ("POST", "/v2/models//infer", "", None),
    ("POST", "/v2/models/m/versions//infer", "", None),
    ("POST", "/v1/models/:predict", "", None),
    ("POST", "/v2/models/m/ready", "", None),
    ("POST", "/v2/repository/models/m/load", "", None),
])
def test_which_requests_take_the_inference_fast_path(method, path, root, route):
    from rayms.router import inference_route

    assert inference_route({"type": "http", "method": method, "path": path, "root_path": root}) == route


async def test_inference_outside_fastapi_answers_like_the_routes(app_and_backend):
    """Inference is answered before FastAPI's routing; every other path still goes through it."""
    app, _ = app_and_backend
    async with client(app) as http:
        v1 = await http.post("/v1/models/m:predict", json={"instances": [[1.0], [2.0]]})
        assert (v1.status_code, v1.json(), v1.headers["content-type"]) == (200, {"predictions": [1, 2]},
                                                                           "application/json")
        versioned = await http.post("/v2/models/m/versions/1/infer", json=BODY)
        assert versioned.status_code == 200 and versioned.json()["model_version"] == "1"
        assert int(versioned.headers["content-length"]) == len(versioned.content)
        wrong_version = await http.post("/v2/models/m/versions/9/infer", json=BODY)
        assert wrong_version.status_code == 404 and "9" in wrong_version.json()["error"]
        too_big = await http.post("/v2/models/m/infer", content=b"x" * (Settings().max_request_bytes + 1))
        assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
        bad_header = await http.post("/v2/models/m/infer", content=b"{}",
                                     headers={"Inference-Header-Content-Length": "ten"})
        assert bad_header.status_code == 400 and "ten" in bad_header.json()["error"]
        wrong_method = await http.get("/v2/models/m/infer")
        assert wrong_method.status_code == 405 and "GET /v2/models/m/infer" in wrong_method.json()["error"]
