"""Repository layouts: MLServer's and Triton's read into specs, KServe folders, bad folders (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rayms import pbtxt
from rayms.config import ModelSpec, Settings
from rayms.errors import InvalidSpec
from rayms.frameworks import load_runtime
from rayms.registry import ModelRegistry
from rayms.repository import scan_repository, spec_from_repository
from rayms.statestore import StateStore
from rayms.status import LoadReport, ModelState
from tests import model_factory as mf

X, _, _ = mf.make_data(n=12, seed=9)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4))


def mlserver_mms_repository(root: Path) -> dict:
    """MLServer's multi-model example, as its docs build it: a server settings.json at the top, and
    models/<name>/ holding model-settings.json with the model file named model.joblib / model.json."""
    import xgboost

    write_json(root / "settings.json", {"debug": "true"})
    _, sk_expected = mf.make_sklearn(root / "models" / "mnist-svm", kind="logreg")
    write_json(root / "models" / "mnist-svm" / "model-settings.json", {
        "name": "mnist-svm", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"version": "v0.1.0"}})
    x, labels, _ = mf.make_data(classes=2)
    booster = xgboost.train({"max_depth": 2, "eta": 1, "objective": "binary:logistic"},
                            xgboost.DMatrix(x, label=labels), num_boost_round=2)
    (root / "models" / "mushroom-xgboost").mkdir(parents=True)
    booster.save_model(str(root / "models" / "mushroom-xgboost" / "model.json"))
    write_json(root / "models" / "mushroom-xgboost" / "model-settings.json", {
        "name": "mushroom-xgboost", "implementation": "mlserver_xgboost.XGBoostModel",
        "parameters": {"version": "v0.1.0"}})
    return {"mnist-svm": sk_expected, "mushroom-xgboost": lambda rows: booster.predict(xgboost.DMatrix(rows))}


# ------------------------------------------------------------------------------------------ MLServer
def test_mlserver_multi_model_repository_as_documented(tmp_path):
    expected = mlserver_mms_repository(tmp_path)
    specs, problems = scan_repository(str(tmp_path))
    assert problems == {} and sorted(specs) == ["mnist-svm", "mushroom-xgboost"]  # settings.json is no model
    sk = specs["mnist-svm"]
    assert (sk.framework, sk.version, Path(sk.storage_uri).name) == ("sklearn", "v0.1.0", "model.joblib")
    assert sk.parameters == {"answer_as": "mlserver"}
    assert specs["mushroom-xgboost"].framework == "xgboost"
    for name, spec in specs.items():  # MLServer sends one value per row as [N, 1]
        runtime = load_runtime(spec.framework, spec.storage_uri, spec.parameters)
        assert runtime.predict([X])["predict"].tolist() == expected[name](X).reshape(-1, 1).tolist(), name


def test_mlserver_single_model_folder_with_uri_and_options(tmp_path):
    """MLServer's scikit-learn example: model-settings.json at the top, parameters.uri naming the file."""
    path, expected = mf.make_sklearn(tmp_path / "artifacts", kind="rf")
    path.rename(tmp_path / "mnist-svm.joblib")
    write_json(tmp_path / "settings.json", {"debug": "true"})
    write_json(tmp_path / "model-settings.json", {
        "name": "mnist-svm", "implementation": "mlserver_sklearn.SKLearnModel",
        "max_batch_size": 16, "max_batch_time": 0.25,
        "parameters": {"uri": "./mnist-svm.joblib", "version": "v0.1.0", "extra": {"predict_fn": "predict_proba"}}})
    specs, problems = scan_repository(str(tmp_path))
    assert "mnist-svm" in specs, problems
    spec = specs["mnist-svm"]
    assert spec.storage_uri == str(tmp_path / "mnist-svm.joblib")
    assert spec.parameters == {"answer_as": "mlserver", "max_batch_size": 16, "max_batch_latency_ms": 250.0,
                               "predict_proba": True}
    assert problems == {"artifacts": f"no model file in {tmp_path / 'artifacts'} "
                                     "(looked for .joblib, .pkl, .pickle, .json, .ubj, .bst, .txt, .onnx)"}


def test_mlserver_versions_nested_folders_and_names(tmp_path):
    for version in ("1", "2", "10"):
        mf.make_sklearn(tmp_path / "iris" / version, kind="logreg")
        write_json(tmp_path / "iris" / version / "model-settings.json", {
            "name": "iris", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"version": version}})
    # no name: the folder's name, as MLServer does
    mf.make_lightgbm(tmp_path / "team" / "lgb-model", ext=".bst")
    write_json(tmp_path / "team" / "lgb-model" / "model-settings.json",
               {"implementation": "mlserver_lightgbm.LightGBMModel"})
    specs, problems = scan_repository(str(tmp_path))
    assert problems == {}
    assert specs["iris"].version == "10" and specs["iris"].storage_uri.endswith("/iris/10/model.joblib")
    assert specs["lgb-model"].framework == "lightgbm" and specs["lgb-model"].storage_uri.endswith("model.bst")
    assert "team" not in specs  # the folder holding MLServer models is not a KServe model folder too


def test_mlserver_problems_are_reported_per_model(tmp_path):
    mf.make_sklearn(tmp_path / "good")
    write_json(tmp_path / "good" / "model-settings.json", {"name": "good", "implementation": "mlserver_sklearn.SKLearnModel"})
    write_json(tmp_path / "mlflow" / "model-settings.json", {"name": "wine", "implementation": "mlserver_mlflow.MLflowRuntime"})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model-settings.json").write_text("{not json")
    write_json(tmp_path / "nouri" / "model-settings.json", {
        "name": "nouri", "implementation": "mlserver_xgboost.XGBoostModel", "parameters": {"uri": "./missing.json"}})
    write_json(tmp_path / "transform" / "model-settings.json", {
        "name": "transform", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"extra": {"predict_fn": "transform"}}})
    specs, problems = scan_repository(str(tmp_path))
    assert list(specs) == ["good"]
    assert sorted(problems) == ["broken", "nouri", "transform", "wine"]
    assert "the MLServer runtime 'mlserver_mlflow.MLflowRuntime' is not one rayms serves" in problems["wine"]
    assert "model-settings.json cannot be read" in problems["broken"]
    assert "'./missing.json' does not exist" in problems["nouri"]
    assert "predict_fn 'transform' is not supported" in problems["transform"]
    with pytest.raises(InvalidSpec, match="model wine: .*mlserver_mlflow.MLflowRuntime"):
        spec_from_repository(str(tmp_path), "wine")
    assert spec_from_repository(str(tmp_path), "good").framework == "sklearn"


# ------------------------------------------------------------------------------------------ Triton
def triton_model(root: Path, name: str, config: str, versions=(1, 2, 3)) -> dict[int, object]:
    expected = {}
    for version in versions:
        path, fn = mf.make_onnx(root / name / str(version), kind="logreg" if version % 2 else "linreg")
        expected[version] = fn
    (root / name / "config.pbtxt").write_text(config)
    return expected


ONNX_CONFIG = '''
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
{policy}
input [ {{ name: "float_input" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "label" data_type: TYPE_INT64 dims: [ 1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
'''


@pytest.mark.parametrize(("policy", "served"), [
    ("", 3),
    ("version_policy: { latest: { num_versions: 2 } }", 3),
    ("version_policy: { all { } }", 3),
    ("version_policy: { specific: { versions: [1, 2] } }", 2),
    ("version_policy { specific { versions: 1 } }", 1),
])
def test_triton_version_policy_serves_the_newest_selected_version(tmp_path, policy, served):
    triton_model(tmp_path, "tri", ONNX_CONFIG.format(name="tri", policy=policy))
    specs, problems = scan_repository(str(tmp_path))
    assert problems == {}
    spec = specs["tri"]
    assert (spec.framework, spec.version) == ("onnx", str(served))
    assert spec.storage_uri == str(tmp_path / "tri" / str(served) / "model.onnx")
    assert spec.parameters == {"default_outputs": ["label"], "max_batch_size": 8, "max_batch_latency_ms": 2.0}


def test_triton_outputs_by_their_own_names(tmp_path):
    expected = triton_model(tmp_path, "tri", 'backend: "onnxruntime"\n', versions=(1,))
    spec = scan_repository(str(tmp_path))[0]["tri"]
    assert spec.parameters == {"default_outputs": "all"}
    runtime = load_runtime(spec.framework, spec.storage_uri, spec.parameters)
    out = runtime.predict([X.astype(np.float32)], input_names=["float_input"])
    assert list(out) == ["label", "probabilities"] and out["label"].tolist() == expected[1](X).tolist()


def test_triton_problems(tmp_path):
    triton_model(tmp_path, "torch", 'platform: "pytorch_libtorch"', versions=(1,))
    triton_model(tmp_path, "renamed", 'name: "other"', versions=(1,))
    triton_model(tmp_path, "gone", 'version_policy: { specific: { versions: [7] } }', versions=(1,))
    triton_model(tmp_path, "garbled", 'input [ { name: "x" ', versions=(1,))
    (tmp_path / "empty" / "4").mkdir(parents=True)
    (tmp_path / "empty" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"')
    specs, problems = scan_repository(str(tmp_path))
    assert specs == {}
    assert "Triton platform 'pytorch_libtorch' is not one rayms serves" in problems["torch"]
    assert "names the model 'other', but its folder is 'renamed'" in problems["renamed"]
    assert "no version folder the version policy selects (found: [1])" in problems["gone"]
    assert "config.pbtxt: unexpected end of text" in problems["garbled"]
    assert "version 4 has no model.onnx" in problems["empty"]


TRITON_EXAMPLE = '''
# a Triton configuration with fields rayms does not read
name: "densenet"
platform: "onnxruntime_onnx"
max_batch_size : 0
version_policy: { specific: { versions: [1, 3] }}
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  { name: "fc6_1", data_type: TYPE_FP32, dims: [ 1000 ], label_filename: "densenet_labels.txt" }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
optimization { execution_accelerators { cpu_execution_accelerator : [ { name : "openvino" } ] } }
'''


def test_pbtxt_reader_reads_what_protobuf_reads():
    message = pbtxt.parse(TRITON_EXAMPLE)
    assert pbtxt.single(message, "name") == "densenet" and pbtxt.single(message, "max_batch_size") == 0
    assert message["version_policy"] == [{"specific": [{"versions": [1, 3]}]}]
    assert [pbtxt.single(o, "name") for o in message["output"]] == ["fc6_1"]
    assert message["input"][0]["dims"] == [3, 224, 224] and message["input"][0]["data_type"] == ["TYPE_FP32"]
    # The same text through protobuf's own parser and Triton's schema, where the test environment has them.
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config = text_format.Parse(TRITON_EXAMPLE, model_config.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("densenet", "onnxruntime_onnx", 0)
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert [i.name for i in config.input] == ["data_0"] and list(config.input[0].dims) == [3, 224, 224]
    assert [o.name for o in config.output] == ["fc6_1"]


def test_pbtxt_errors_name_the_line():
    with pytest.raises(pbtxt.PbtxtError, match="line 2: expected a field name"):
        pbtxt.parse('name: "a"\n{ }')
    assert pbtxt.parse("s: 'it\\'s' \"!\"; n: -2.5e1, flag: true") == {"s": ["it's!"], "n": [-25.0], "flag": [True]}


# ------------------------------------------------------------------------------------------ KServe and bad folders
def test_bad_folders_never_stop_the_good_ones(tmp_path):
    _, expected = mf.make_sklearn(tmp_path / "good-sk")
    mf.make_lightgbm(tmp_path / "good-lgb", ext=".bst")  # KServe's own name for a LightGBM model
    (tmp_path / "empty").mkdir()
    mf.make_sklearn(tmp_path / "two")
    mf.make_sklearn(tmp_path / "two" / "x")
    (tmp_path / "two" / "x" / "model.joblib").rename(tmp_path / "two" / "other.joblib")
    (tmp_path / "settings-only").mkdir()
    write_json(tmp_path / "settings-only" / "settings.json", {"debug": "true"})
    (tmp_path / ".hidden").mkdir()
    specs, problems = scan_repository(str(tmp_path))
    assert sorted(specs) == ["good-lgb", "good-sk"]
    assert specs["good-lgb"].framework == "lightgbm"
    assert sorted(problems) == ["empty", "settings-only", "two"]
    assert "2 model files (model.joblib, other.joblib)" in problems["two"]
    assert problems["settings-only"].startswith("no model file in")
    with pytest.raises(InvalidSpec, match="model two: cannot tell the framework"):
        spec_from_repository(str(tmp_path), "two")
    assert spec_from_repository(str(tmp_path), "absent") is None
    with pytest.raises(InvalidSpec, match="not a folder"):
        scan_repository(str(tmp_path / "nowhere"))


async def test_registry_shows_a_model_that_cannot_be_served_as_failed(tmp_path):
    class Placer:
        def __init__(self) -> None:
            self.unloads: list[str] = []

        async def load(self, name, spec, version):
            return LoadReport(replica="r1", measured_bytes=1, load_time_s=0.01, metadata={})

        async def unload(self, name, spec):
            self.unloads.append(name)

    store, placer = StateStore(str(tmp_path / "models.json")), Placer()
    registry = ModelRegistry(Settings(cache_dir=str(tmp_path)), store=store, placer=placer)
    status = await registry.register_failed("empty", "no model file in /repo/empty", "repository-folder")
    assert (status.state, status.reason, status.framework) == ("FAILED", "no model file in /repo/empty", "")
    assert [s.name for s in registry.list()] == ["empty"]
    await registry.register("good", ModelSpec(storage_uri="/m", framework="sklearn"), "repository")
    assert [e["modelName"] for e in store.read()] == ["good"]  # never persisted: the next scan finds it again
    # Fixing the folder and loading it replaces the FAILED record.
    await registry.register("empty", ModelSpec(storage_uri="/repo/empty", framework="sklearn"), "repository")
    assert (await registry.wait_settled("empty", timeout_s=5)).state == "READY"
    # A real model of that name is never replaced by a FAILED record.
    assert (await registry.register_failed("good", "whatever", "repository-folder")).state is not ModelState.FAILED
    await registry.unregister("empty")
    await registry.register_failed("gone", "no model file", "repository-folder")
    await registry.unregister("gone")
    assert placer.unloads == ["empty"]  # nothing of "gone" was ever on a replica
    assert sorted(s.name for s in registry.list()) == ["good"]


# ------------------------------------------------------------------------------------------ declared versions
async def test_clients_may_name_the_version_the_model_had_before(tmp_path):
    """MLServer's docs call /v2/models/mnist-svm/versions/v0.1.0/infer; that URL keeps working."""
    import httpx

    from rayms.codecs import InferResult, Tensor
    from rayms.dataplane import DataPlane
    from rayms.router import build_api
    from rayms.view import RegistryView

    class Backend:
        async def infer(self, name, request):
            return InferResult(outputs=[Tensor.from_numpy("predict", np.array([1]))], model_version="1")

    async def no_watch(epoch, since, timeout_s=30.0):
        raise AssertionError("not used")

    from rayms.status import Changes, ModelState, ModelStatus, Source

    spec = ModelSpec(storage_uri="/m", framework="sklearn", version="v0.1.0")
    status = ModelStatus(name="mnist-svm", version=1, state=ModelState.READY, source=Source.REPOSITORY_FOLDER,
                         spec=spec, metadata={"inputs": [], "outputs": []})
    view = RegistryView(no_watch)
    view.apply(Changes(epoch="e", change=1, reset=True, models=[status], deleted=[]))
    backend = Backend()
    app = build_api(DataPlane(Settings(), view=view, models=backend, control=backend), Settings())
    body = {"inputs": [{"name": "predict", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rayms") as http:
        named = await http.post("/v2/models/mnist-svm/versions/v0.1.0/infer", json=body)
        assert named.status_code == 200 and named.json()["model_version"] == "v0.1.0"
        assert (await http.post("/v2/models/mnist-svm/versions/1/infer", json=body)).status_code == 200
        assert (await http.post("/v2/models/mnist-svm/versions/v0.2.0/infer", json=body)).status_code == 404
        assert (await http.get("/v2/models/mnist-svm/versions/v0.1.0/ready")).status_code == 200
        assert (await http.get("/v2/models/mnist-svm")).json()["versions"] == ["v0.1.0"]


def test_symlinked_folders_are_followed_once(tmp_path):
    mf.make_sklearn(tmp_path / "real" / "m")
    write_json(tmp_path / "real" / "m" / "model-settings.json", {"name": "m", "implementation": "mlserver_sklearn.SKLearnModel"})
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")  # a cycle must not hang the scan
    specs, problems = scan_repository(str(tmp_path / "repo"))
    assert list(specs) == ["m"] and problems == {}


def test_hostile_configuration_files_are_problems_not_crashes(tmp_path):
    configs = {
        "deep": "a { " * 5000 + "}" * 5000,
        "binary": b"\xff\xfe\x00garbage",
        "policy-text": 'version_policy: "newest"',
        "escape": 'default_model_filename: "../../secrets.onnx"',
        "outputs-text": 'output: "label"',
    }
    for name, config in configs.items():
        mf.make_onnx(tmp_path / name / "1")
        target = tmp_path / name / "config.pbtxt"
        target.write_bytes(config) if isinstance(config, bytes) else target.write_text(config)
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "model-settings.json").write_text(" " * (2 << 20) + "{}")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "model-settings.json").write_text("[" * 100_000 + "]" * 100_000)
    specs, problems = scan_repository(str(tmp_path))
    assert specs == {} and sorted(problems) == sorted([*configs, "huge", "nested"])
    assert "nested deeper than 64" in problems["deep"]
    assert "cannot be read" in problems["binary"]
    assert "version_policy must be a message" in problems["policy-text"]
    assert "default_model_filename must be a file name" in problems["escape"]
    assert "output must hold messages" in problems["outputs-text"]
    assert "larger than" in problems["huge"] and "cannot be read" in problems["nested"]
