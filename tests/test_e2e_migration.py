"""Migration fidelity over real HTTP: what KServe, MLServer and Triton clients read, they read from rayms.

Boosters are loaded into the session server and must answer V1 and V2 with ``Booster.predict``'s values.
A second app, deployed next to it under its own route prefix, starts on one repository folder that mixes
an MLServer repository (built as MLServer's docs build it), a Triton ONNX repository, a KServe ``.bst``
folder, a ``models.json`` and folders that cannot be served: the good models answer as their old servers
did, the bad ones are FAILED with the reason, and none stops the others.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import Server, wait_for
from tests.model_factory import make_data, make_lightgbm, make_onnx, make_sklearn, make_xgboost
from tests.support import v2_body, with_kserve
from tests.test_layouts import mlserver_mms_repository, write_json

ROWS = make_data(n=5, seed=3)[0]
BOOSTERS = {
    "mig-xgb-softprob": ("xgboost", make_xgboost, {"task": "multiclass"}),
    "mig-xgb-softmax": ("xgboost", make_xgboost, {"task": "softmax", "ext": ".ubj"}),
    "mig-xgb-binary": ("xgboost", make_xgboost, {"task": "binary", "ext": ".bst"}),
    "mig-xgb-regression": ("xgboost", make_xgboost, {"task": "regression"}),
    "mig-lgb-multiclass": ("lightgbm", make_lightgbm, {"task": "multiclass", "ext": ".bst"}),
    "mig-lgb-binary": ("lightgbm", make_lightgbm, {"task": "binary"}),
    "mig-lgb-regression": ("lightgbm", make_lightgbm, {"task": "regression"}),
}


def same(actual, want: np.ndarray) -> None:
    """Equal at the precision the library computed in (JSON carries float32 values in their shortest form)."""
    got = np.asarray(actual, dtype=want.dtype).reshape(want.shape)
    assert np.array_equal(got, want), (got, want)


@pytest.fixture(scope="module")
def boosters(rayms_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("boosters")
    made = {}
    for name, (framework, builder, options) in BOOSTERS.items():
        _, expected = builder(root / name, **options)
        response = rayms_server.load(name, str(root / name), framework)
        assert response.status_code == 200, response.text
        made[name] = expected
    yield made
    for name in BOOSTERS:
        rayms_server.post(f"/v2/repository/models/{name}/unload")


def test_boosters_answer_booster_predict_over_v1_and_v2(rayms_server, boosters):
    for name, expected in boosters.items():
        want = np.asarray(expected(ROWS))  # Booster.predict in this process
        payload = {"instances": ROWS.tolist()}
        # KServe's V1 answer, built by KServe's own request and response helpers around Booster.predict
        # (in a process of its own: see tests.support.with_kserve).
        kserve = with_kserve("""
            given = get_predict_input(values["payload"])
            response = get_predict_response(values["payload"], np.asarray(values["result"]), values["name"])
            return {"input": np.asarray(given).tolist(), "response": response}
        """, payload=payload, result=want.tolist(), name=name)
        assert np.array_equal(kserve["input"], ROWS), "KServe hands Booster.predict these very rows"
        kserve = kserve["response"]
        v1 = rayms_server.post(f"/v1/models/{name}:predict", json=payload)
        assert v1.status_code == 200, v1.text
        assert np.shape(v1.json()["predictions"]) == np.shape(kserve["predictions"]), name
        same(v1.json()["predictions"], np.asarray(kserve["predictions"], dtype=want.dtype))
        same(v1.json()["predictions"], want)
        v2 = rayms_server.post(f"/v2/models/{name}/infer", json=v2_body(ROWS))
        assert v2.status_code == 200, v2.text
        [output] = v2.json()["outputs"]
        assert output["name"] == "predict" and output["shape"] == list(want.shape), name
        assert output["datatype"] == {np.float32: "FP32", np.float64: "FP64"}[want.dtype.type]
        same(output["data"], want)


def test_labels_and_probabilities_stay_available_on_request(rayms_server, boosters):
    for name in ("mig-xgb-softprob", "mig-xgb-binary", "mig-lgb-multiclass"):
        expected = boosters[name]
        body = v2_body(ROWS) | {"outputs": [{"name": "label"}, {"name": "predict_proba"}]}
        outputs = {o["name"]: o for o in rayms_server.post(f"/v2/models/{name}/infer", json=body).json()["outputs"]}
        assert outputs["label"]["data"] == expected(ROWS, labels=True).tolist()
        assert np.allclose(np.reshape(outputs["predict_proba"]["data"], outputs["predict_proba"]["shape"]),
                           expected(ROWS, proba=True), atol=1e-6)
        proba = rayms_server.post(f"/v2/models/{name}/infer", json=v2_body(ROWS) | {"parameters": {"predict_proba": True}})
        assert [o["name"] for o in proba.json()["outputs"]] == ["predict_proba"]


# ------------------------------------------------------------------------------------------ a mixed repository
CUSTOM_MODEL = '''
import numpy as np


class Doubler:
    @classmethod
    def load(cls, path, parameters):
        return cls()

    def predict(self, inputs, parameters):
        return np.asarray(next(iter(inputs.values())), dtype=np.float64).sum(axis=1) * 2
'''


@pytest.fixture(scope="module")
def repository_app(rayms_server, tmp_path_factory):
    """The second app over a repository in every layout, and what each good model must answer."""
    from ray import serve

    from rayms.app import build_app
    from rayms.local import kill_agents

    tmp = tmp_path_factory.mktemp("migration")
    repo = tmp / "repository"
    expected = mlserver_mms_repository(repo)  # mnist-svm (scikit-learn), mushroom-xgboost (Booster.save_model)
    # A classifier saved by XGBClassifier.save_model: MLServer answered its class labels.
    _, clf_expected = make_xgboost(repo / "models" / "xgb-classifier", task="multiclass", save="sklearn")
    write_json(repo / "models" / "xgb-classifier" / "model-settings.json",
               {"name": "xgb-classifier", "implementation": "mlserver_xgboost.XGBoostModel"})
    expected["xgb-classifier"] = lambda rows: clf_expected(rows, labels=True)
    # Triton: versions 1 and 2, the newest served, outputs under the config's names.
    for version, kind in ((1, "linreg"), (2, "logreg")):
        _, onnx_expected = make_onnx(repo / "tri-onnx" / str(version), kind=kind)
    expected["tri-onnx"] = onnx_expected
    (repo / "tri-onnx" / "config.pbtxt").write_text(
        'name: "tri-onnx"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "float_input" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        'output [ { name: "label" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')
    # KServe: a LightGBM model.bst in its own folder, its framework told by content.
    _, expected["kserve-lgb"] = make_lightgbm(repo / "kserve-lgb", ext=".bst")
    # What cannot be served.
    (repo / "empty-folder").mkdir()
    write_json(repo / "models" / "wine" / "model-settings.json",
               {"name": "wine", "implementation": "mlserver_mlflow.MLflowRuntime"})
    # models.json next to it, with a custom model (allowed in this app).
    (tmp / "doubler").mkdir()
    (tmp / "doubler" / "doubler_model.py").write_text(CUSTOM_MODEL)
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps([{"modelName": "custom-doubler", "modelSpec": {
        "storageUri": str(tmp / "doubler"), "framework": "custom",
        "parameters": {"implementation": "doubler_model.Doubler", "max_batch_size": 8}}}]))
    expected["custom-doubler"] = lambda rows: rows.sum(axis=1) * 2

    settings = rayms_server.settings.model_copy(update={
        "app_name": "rayms-migration", "num_replicas": 1, "model_repository": str(repo),
        "models_file": str(models_file), "allow_custom_code": True,
        "cache_dir": str(tmp / "cache"), "state_uri": str(tmp / "state" / "models.json")})
    serve.run(build_app(settings), name=settings.app_name, route_prefix="/migration")
    server = Server(url=rayms_server.url + "/migration", settings=settings, tmp=tmp)
    wait_for(lambda: server.get("/v2/health/ready").status_code == 200, timeout_s=180, what="migration app ready")

    def settled():
        rows = {row["name"]: row for row in server.post("/v2/repository/index").json()}
        return rows if len(rows) == len(expected) + 2 and all(
            r["state"] in ("READY", "FAILED") for r in rows.values()) else None
    wait_for(settled, timeout_s=240, what="every model READY or FAILED")
    yield server, expected
    serve.delete(settings.app_name)
    kill_agents(settings.app_name)


def test_bad_models_are_failed_with_their_reason_and_the_rest_serve(repository_app):
    server, expected = repository_app
    index = {row["name"]: row for row in server.post("/v2/repository/index").json()}
    assert {name for name, row in index.items() if row["state"] == "READY"} == set(expected)
    assert index["empty-folder"]["state"] == "FAILED" and "no model file in" in index["empty-folder"]["reason"]
    assert index["wine"]["state"] == "FAILED" and "mlserver_mlflow.MLflowRuntime" in index["wine"]["reason"]
    refused = server.post("/v2/models/wine/infer", json=v2_body(ROWS))
    assert refused.status_code == 503 and "mlserver_mlflow.MLflowRuntime" in refused.json()["error"]


def test_the_mlserver_repository_answers_as_mlserver_did(repository_app):
    server, expected = repository_app
    digits = ROWS
    for name in ("mnist-svm", "mushroom-xgboost", "xgb-classifier"):
        want = np.asarray(expected[name](digits))
        # The request MLServer's docs send: the model's version in the URL, a V2 body.
        response = server.post(f"/v2/models/{name}/versions/v0.1.0/infer" if name != "xgb-classifier"
                               else f"/v2/models/{name}/infer", json=v2_body(digits))
        assert response.status_code == 200, response.text
        [output] = response.json()["outputs"]
        # MLServer's codec sends one value per row as [N, 1], with the estimator's datatype.
        assert output["name"] == "predict" and output["shape"] == [len(digits), 1], output
        assert output["datatype"] == {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32"}[want.dtype]
        same(output["data"], want)
        if name != "xgb-classifier":
            assert response.json()["model_version"] == "v0.1.0"
    v1 = server.post("/v1/models/mnist-svm:predict", json={"instances": digits.tolist()})
    assert v1.json() == {"predictions": expected["mnist-svm"](digits).reshape(-1, 1).tolist()}


def test_the_triton_repository_answers_tritonclient_as_triton_did(repository_app):
    server, expected = repository_app
    with triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120.0) as client:
        assert client.is_model_ready("tri-onnx", model_version="2")
        assert client.get_model_metadata("tri-onnx")["versions"] == ["2"]
        tensor = triton.InferInput("float_input", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS.astype(np.float32))
        result = client.infer("tri-onnx", [tensor], model_version="2")
        assert result.get_response()["model_version"] == "2"
        assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
        assert result.as_numpy("label").tolist() == expected["tri-onnx"](ROWS.astype(np.float32)).tolist()


def test_kserve_bst_folder_and_custom_model_from_models_json(repository_app):
    server, expected = repository_app
    lgb = server.post("/v1/models/kserve-lgb:predict", json={"instances": ROWS.tolist()})
    same(lgb.json()["predictions"], np.asarray(expected["kserve-lgb"](ROWS)))
    custom = server.post("/v1/models/custom-doubler:predict", json={"instances": ROWS.tolist()})
    assert custom.status_code == 200, custom.text
    same(custom.json()["predictions"], expected["custom-doubler"](ROWS))
    index = {row["name"]: row for row in server.post("/v2/repository/index").json()}
    assert index["custom-doubler"]["framework"] == "custom" and index["custom-doubler"]["measuredMemory"] > 0


def test_custom_code_is_refused_where_not_allowed(rayms_server, tmp_path):
    (tmp_path / "doubler_model.py").write_text(CUSTOM_MODEL)
    response = rayms_server.post("/v2/repository/models/mig-custom-refused/load", json={
        "storageUri": str(tmp_path), "framework": "custom", "parameters": {"implementation": "doubler_model.Doubler"}})
    assert response.status_code == 400 and "RAYMS_ALLOW_CUSTOM_CODE" in response.json()["error"]
    rayms_server.post("/v2/repository/models/mig-custom-refused/unload")


def test_a_framework_nobody_serves_is_refused_by_name(rayms_server, tmp_path):
    path, _ = make_sklearn(tmp_path / "m")
    response = rayms_server.load("mig-tf", str(path), "tensorflow")
    assert response.status_code == 400 and "framework 'tensorflow' is not supported" in response.json()["error"]
