"""KServe's own REST client (``kserve.InferenceRESTClient``, V1 and V2) against the session server.

KServe's package loads its generated gRPC messages into protobuf's default pool, where tritonclient's gRPC
messages (used by the gRPC tests) define the same names (kserve/kserve#3099): the two cannot share a process.
So each check here runs KServe's client in a process of its own and reports what it got as JSON; the answers
are compared with the in-process model here.
"""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import pytest

from tests.model_factory import make_data, make_sklearn
from tests.support import with_kserve

MODEL = "conf-kserve"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed")


@pytest.fixture(scope="module")
def model(rayms_server, tmp_path_factory):
    path, expected = make_sklearn(tmp_path_factory.mktemp("conformance-kserve") / MODEL)
    response = rayms_server.load(MODEL, str(path), "sklearn")
    assert response.status_code == 200, response.text
    yield expected
    rayms_server.post(f"/v2/repository/models/{MODEL}/unload")


def kserve(body: str, url: str, **values) -> dict:
    """Run ``body`` with KServe's client; ``url`` and ``values`` are its inputs."""
    return with_kserve("url = values['url']\n" + textwrap.dedent(body), url=url, **values)


def integral_rows(n: int = 6) -> np.ndarray:
    return np.round(make_data(n=n, seed=5)[0] * 2)


def test_kserve_v1_predict_readiness_and_404(rayms_server, model):
    rows = make_data(n=5, seed=11)[0]
    got = kserve("""
        async with InferenceRESTClient(RESTConfig(protocol="v1", timeout=120)) as v1:
            live = await v1.is_server_live(url)
            ready = await v1.is_model_ready(url, values["model"])
            answer = await v1.infer(url, data={"instances": values["rows"]}, model_name=values["model"])
            as_ints = await v1.infer(url, data={"instances": values["ints"]}, model_name=values["model"])
            try:
                await v1.infer(url, data={"instances": [[1, 2, 3, 4]]}, model_name="conf-no-such-model")
                missing = None
            except httpx.HTTPStatusError as exc:
                missing = [exc.response.status_code, str(exc)]
        return {"live": live, "ready": ready, "answer": answer, "as_ints": as_ints, "missing": missing}
    """, rayms_server.url, model=MODEL, rows=rows.tolist(), ints=integral_rows().astype(int).tolist())
    assert got["live"] and got["ready"]
    assert got["answer"] == {"predictions": model(rows).tolist()}
    assert got["as_ints"] == {"predictions": model(integral_rows()).tolist()}
    status, message = got["missing"]
    assert status == 404 and "conf-no-such-model" in message  # the client copies the server's "error" string


def test_kserve_v2_health_and_readiness(rayms_server, model):
    got = kserve("""
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120)) as v2:
            return {"ready": await v2.is_server_ready(url), "live": await v2.is_server_live(url),
                    "model": await v2.is_model_ready(url, values["model"]),
                    "missing": await v2.is_model_ready(url, "conf-no-such-model")}
    """, rayms_server.url, model=MODEL)
    assert got == {"ready": True, "live": True, "model": True, "missing": False}


@pytest.mark.parametrize("binary_inputs", [True, False], ids=["binary-in", "json-in"])
def test_kserve_v2_infer(rayms_server, model, binary_inputs):
    rows = integral_rows().astype(np.float32)
    got = kserve("""
        rows = np.asarray(values["rows"], dtype=np.float32)
        binary = values["binary"]
        tensor = InferInput(name="input-0", shape=list(rows.shape), datatype="FP32")
        tensor.set_data_from_numpy(rows, binary_data=binary)
        request = InferRequest(
            model_name=values["model"], infer_inputs=[tensor], request_id=f"kserve-{binary}",
            request_outputs=[RequestedOutput("predict", parameters={"binary_data": binary}),
                             RequestedOutput("predict_proba", parameters={"binary_data": not binary})])
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120)) as v2:
            response = await v2.infer(url, request, model_name=values["model"])
        return {"id": response.id, "model": response.model_name,
                "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs}}
    """, rayms_server.url, model=MODEL, rows=rows.tolist(), binary=binary_inputs)
    assert got["id"] == f"kserve-{binary_inputs}" and got["model"] == MODEL
    assert list(got["outputs"]) == ["predict", "predict_proba"]
    assert np.array_equal(got["outputs"]["predict"], model(rows))
    assert np.allclose(got["outputs"]["predict_proba"], model(rows, proba=True), rtol=1e-5, atol=1e-7)
