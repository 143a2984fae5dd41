"""Protocol conformance: the clients people actually use, against the real app over HTTP.

tritonclient's HTTP client speaks the Open Inference Protocol with Triton's binary tensor and model repository
extensions (KServe's ``InferenceRESTClient`` is in ``test_conformance_kserve``). It is pointed at the session
server, and every answer is checked against the in-process model, so a codec or routing slip shows up as a wrong
number.

rayms's answer to tritonclient's ``load_model(name, config=...)``: ``config`` is read as a JSON TrainedModel
``spec.model`` (``{"storageUri": ..., "framework": ...}``); anything else is 400. A load without a body needs
the server's model repository, so that part runs on a second, small app with one, deployed next to the session
app under its own route prefix.
"""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.model_factory import make_data, make_sklearn

MODEL = "conf-sk"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


@pytest.fixture(scope="module")
def model(rayms_server, tmp_path_factory):
    """A scikit-learn classifier loaded through the repository API; yields its artifact path and predictions."""
    path, expected = make_sklearn(tmp_path_factory.mktemp("conformance") / MODEL)
    response = rayms_server.load(MODEL, str(path), "sklearn")
    assert response.status_code == 200, response.text
    yield path, expected
    rayms_server.post(f"/v2/repository/models/{MODEL}/unload")


@pytest.fixture
def client(rayms_server):
    with triton.InferenceServerClient(url=rayms_server.url.removeprefix("http://"), network_timeout=120.0) as c:
        yield c


def integral_rows(n: int = 6) -> np.ndarray:
    """Feature rows with whole values, so every input datatype carries them exactly."""
    return np.round(make_data(n=n, seed=5)[0] * 2)


# ------------------------------------------------------------------------------------------ tritonclient
def test_triton_health_and_metadata(client, model):
    path, _ = model
    estimator = joblib.load(path)

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready("conf-no-such-model")
    assert not client.is_model_ready(MODEL, model_version="2")
    server = client.get_server_metadata()
    assert server["name"] == "rayms" and {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, estimator.n_features_in_]}]
    assert meta["outputs"] == [
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(estimator.classes_)]},
    ]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("conf-no-such-model")
    assert missing.value.status() == "404" and "conf-no-such-model" in missing.value.message()


def test_triton_repository_index(client, model):
    index = {row["name"]: row for row in client.get_model_repository_index()}  # POSTs an empty body
    assert index[MODEL]["state"] == "READY" and index[MODEL]["version"] == "1"


@pytest.mark.parametrize("binary_outputs", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("binary_inputs", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_triton_infer_every_tabular_datatype(client, model, datatype, binary_inputs, binary_outputs):
    _, expected = model
    rows = integral_rows()
    tensor = triton.InferInput("input-0", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows.astype(DATATYPES[datatype]), binary_data=binary_inputs)
    outputs = [triton.InferRequestedOutput("predict", binary_data=binary_outputs),
               triton.InferRequestedOutput("predict_proba", binary_data=binary_outputs)]
    request_id = f"conf-{datatype}-{binary_inputs}-{binary_outputs}"

    result = client.infer(MODEL, [tensor], outputs=outputs, request_id=request_id)

    response = result.get_response()
    assert response["id"] == request_id and response["model_name"] == MODEL and response["model_version"] == "1"
    sent_binary = {o["name"]: "binary_data_size" in o.get("parameters", {}) for o in response["outputs"]}
    assert sent_binary == {"predict": binary_outputs, "predict_proba": binary_outputs}
    assert np.array_equal(result.as_numpy("predict"), expected(rows))
    assert np.allclose(result.as_numpy("predict_proba"), expected(rows, proba=True), rtol=1e-5, atol=1e-7)


def test_triton_default_outputs_come_back_binary(client, model):
    """Without outputs, tritonclient asks for binary_data_output: every output the model gives, as binary."""
    _, expected = model
    rows = integral_rows(3)
    tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows)

    result = client.infer(MODEL, [tensor])

    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict"]
    assert "binary_data_size" in result.get_response()["outputs"][0]["parameters"]
    assert np.array_equal(result.as_numpy("predict"), expected(rows))


def test_triton_load_with_config_infer_and_unload(client, model):
    path, expected = model
    name = "conf-triton-loaded"
    client.load_model(name, config=json.dumps({"storageUri": str(path), "framework": "sklearn"}))
    try:
        assert client.is_model_ready(name)
        rows = integral_rows(2)
        tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows)
        assert np.array_equal(client.infer(name, [tensor]).as_numpy("predict"), expected(rows))
    finally:
        client.unload_model(name)
    assert not client.is_model_ready(name)
    assert name not in {row["name"] for row in client.get_model_repository_index()}
    with pytest.raises(InferenceServerException) as gone:
        client.unload_model(name)
    assert gone.value.status() == "404"


@pytest.mark.parametrize(("options", "status", "fragment"), [
    ({}, "400", "this server has no model repository"),
    ({"config": "{not json"}, "400", "parameters.config is not valid JSON"),
    ({"config": '{"backend": "python", "max_batch_size": 8}'}, "400", "Triton model configurations are not supported"),
    ({"config": '{"storageUri": "/tmp/x", "framework": "tensorflow"}'}, "400", "framework 'tensorflow' is not"),
    ({"config": "{}", "files": {"file:1/model.onnx": b"onnx bytes"}}, "501", "files sent in the request"),
], ids=["no-body", "not-json", "triton-config", "unknown-framework", "files"])
def test_triton_load_refusals(client, model, options, status, fragment):
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("conf-refused", **options)
    assert refused.value.status() == status
    assert fragment in refused.value.message() and "conf-refused" in refused.value.message()
    assert not client.is_model_ready("conf-refused")


def test_load_body_may_give_the_spec_as_parameters(rayms_server, model):
    """The repository extension's ``{"parameters": {...}}`` may hold a TrainedModel's ``spec.model``."""
    path, expected = model
    name = "conf-spec-in-parameters"
    loaded = rayms_server.post(f"/v2/repository/models/{name}/load",
                               json={"parameters": {"storageUri": str(path), "framework": "sklearn"}})
    assert loaded.status_code == 200, loaded.text
    try:
        rows = integral_rows(3)
        answer = rayms_server.post(f"/v1/models/{name}:predict", json={"instances": rows.tolist()})
        assert answer.json() == {"predictions": expected(rows).tolist()}
    finally:
        assert rayms_server.post(f"/v2/repository/models/{name}/unload").status_code == 200


@pytest.fixture(scope="module")
def repository_app(rayms_server, tmp_path_factory):
    """A second rayms app whose settings name a model repository folder, served under ``/conf-repo``."""
    from ray import serve

    from rayms.app import build_app
    from rayms.local import kill_agents

    tmp = tmp_path_factory.mktemp("conf-repo")
    (tmp / "repository").mkdir()
    settings = rayms_server.settings.model_copy(update={
        "app_name": "rayms-conf-repo", "num_replicas": 1, "model_repository": str(tmp / "repository"),
        "cache_dir": str(tmp / "cache"), "state_uri": str(tmp / "state" / "models.json")})
    serve.run(build_app(settings), name=settings.app_name, route_prefix="/conf-repo")
    yield tmp / "repository", f"{rayms_server.url.removeprefix('http://')}/conf-repo"
    serve.delete(settings.app_name)
    kill_agents(settings.app_name)


def test_triton_load_without_body_reads_the_model_repository(repository_app):
    repository, url = repository_app
    _, expected = make_sklearn(repository / "conf-from-folder", kind="rf")  # added after the app started
    with triton.InferenceServerClient(url=url, network_timeout=120.0) as client:
        assert client.is_server_ready()
        client.load_model("conf-from-folder")
        assert client.is_model_ready("conf-from-folder")
        rows = integral_rows(4)
        tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows)
        assert np.array_equal(client.infer("conf-from-folder", [tensor]).as_numpy("predict"), expected(rows))
        with pytest.raises(InferenceServerException) as missing:
            client.load_model("conf-not-in-folder")
        assert missing.value.status() == "404" and "conf-not-in-folder" in missing.value.message()
        client.unload_model("conf-from-folder")
        assert not client.is_model_ready("conf-from-folder")
