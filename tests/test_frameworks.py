"""Framework runtimes against tiny real models: loading, prediction parity, errors, lazy imports."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rayms.errors import InferenceError, InvalidInput, InvalidSpec, ModelLoadError
from rayms.frameworks import (
    ModelRuntime, as_dtype, framework_from_extension, library_message, load_runtime, measure_size, resolve_model_file,
)

try:
    from tests import model_factory as mf
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import model_factory as mf

REPO = Path(__file__).resolve().parents[1]
X, _, _ = mf.make_data(n=25, seed=7)

CLASSIFIERS = [
    ("sklearn", mf.make_sklearn, {"kind": "logreg", "ext": ".joblib"}),
    ("sklearn", mf.make_sklearn, {"kind": "rf", "ext": ".pkl"}),
    ("sklearn", mf.make_sklearn, {"kind": "logreg", "ext": ".pickle"}),
    ("xgboost", mf.make_xgboost, {"ext": ".json"}),
    ("xgboost", mf.make_xgboost, {"ext": ".ubj"}),
    ("xgboost", mf.make_xgboost, {"ext": ".bst", "task": "binary"}),
    ("xgboost", mf.make_xgboost, {"ext": ".json", "task": "binary"}),
    ("lightgbm", mf.make_lightgbm, {"ext": ".txt"}),
    ("lightgbm", mf.make_lightgbm, {"ext": ".bst", "task": "binary"}),
    ("onnx", mf.make_onnx, {"kind": "logreg"}),
]
REGRESSORS = [
    ("sklearn", mf.make_sklearn, {"kind": "linreg"}),
    ("sklearn", mf.make_sklearn, {"kind": "rf_regressor", "ext": ".pkl"}),
    ("xgboost", mf.make_xgboost, {"task": "regression", "ext": ".ubj"}),
    ("lightgbm", mf.make_lightgbm, {"task": "regression"}),
    ("onnx", mf.make_onnx, {"kind": "linreg"}),
]
ONE_PER_FRAMEWORK = [CLASSIFIERS[0], CLASSIFIERS[3], CLASSIFIERS[7], CLASSIFIERS[9]]


def _id(case) -> str:
    return "-".join([case[0], *map(str, case[2].values())])


def _build(tmp_path: Path, case):
    framework, builder, kwargs = case
    path, expected = builder(tmp_path / "model", **kwargs)
    return framework, path, expected


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64).reshape(np.shape(expected)),
                               np.asarray(expected, dtype=np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CLASSIFIERS, ids=_id)
@pytest.mark.parametrize("source", ["folder", "file"])
def test_classifier_matches_in_process_model(tmp_path, case, source):
    framework, path, expected = _build(tmp_path, case)
    runtime = load_runtime(framework, path.parent if source == "folder" else path)
    assert isinstance(runtime, ModelRuntime) and runtime.framework == framework and runtime.path == path
    assert runtime.predict([X])["predict"].tolist() == expected(X).tolist()
    proba = runtime.predict([X], {"predict_proba": True})
    assert list(proba) == ["predict_proba"]
    _close(proba["predict_proba"], expected(X, proba=True))
    both = runtime.predict([X], {}, requested=["predict_proba", "predict"])
    assert list(both) == ["predict_proba", "predict"]
    assert both["predict"].tolist() == expected(X).tolist()
    assert [m["name"] for m in runtime.output_metadata()][:2] == ["predict", "predict_proba"]
    assert runtime.input_metadata()[0]["shape"] == [-1, mf.N_FEATURES]
    assert runtime.size_bytes() == measure_size(runtime) == path.stat().st_size


@pytest.mark.parametrize("case", REGRESSORS, ids=_id)
def test_regressor_matches_and_has_no_probabilities(tmp_path, case):
    framework, path, expected = _build(tmp_path, case)
    runtime = load_runtime(framework, path.parent)
    _close(runtime.predict([X])["predict"], expected(X))
    with pytest.raises(InvalidInput, match="predict_proba"):
        runtime.predict([X], {"predict_proba": True})


@pytest.mark.parametrize("case", ONE_PER_FRAMEWORK, ids=_id)
def test_int_input_and_column_stacking(tmp_path, case):
    framework, path, expected = _build(tmp_path, case)
    runtime = load_runtime(framework, path)
    ints = np.rint(X * 3).astype(np.int64)
    assert runtime.predict([ints])["predict"].tolist() == expected(ints.astype(np.float64)).tolist()
    columns = [X[:, i] for i in range(mf.N_FEATURES)]
    assert runtime.predict(columns)["predict"].tolist() == expected(X).tolist()
    halves = [X[:, :2], X[:, 2:]]
    assert runtime.predict(halves)["predict"].tolist() == expected(X).tolist()
    with pytest.raises(InvalidInput, match="row counts"):
        runtime.predict([X[:, :2], X[:3, 2:]])


@pytest.mark.parametrize(("case", "text"), [
    (CLASSIFIERS[0], "X has 3 features"),
    (CLASSIFIERS[3], "Number of columns in data must equal"),
    (CLASSIFIERS[7], "number of features in data (3)"),
    (CLASSIFIERS[9], "Got invalid dimensions for input"),
], ids=["sklearn", "xgboost", "lightgbm", "onnx"])
def test_wrong_feature_count_is_invalid_input_with_library_text(tmp_path, case, text):
    framework, path, _ = _build(tmp_path, case)
    runtime = load_runtime(framework, path)
    with pytest.raises(InvalidInput) as info:
        runtime.predict([X[:, :3]])
    assert text in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize("case", ONE_PER_FRAMEWORK, ids=_id)
def test_parameters_and_requested_outputs(tmp_path, case):
    framework, path, expected = _build(tmp_path, case)
    runtime = load_runtime(framework, path, parameters={"predict_proba": True})
    _close(runtime.predict([X])["predict_proba"], expected(X, proba=True))
    assert list(runtime.predict([X], {"predict_proba": "false", "content_type": "np", "binary_data_output": True}))[0] == "predict"
    # parameters a client adds for other layers (Triton's sequence_id, priority...) are tolerated
    assert list(runtime.predict([X], {"sequence_id": 3, "triton_enable_empty_final_response": True}))[0] == "predict_proba"
    with pytest.raises(InvalidInput, match="predict_proba"):
        runtime.predict([X], {"predict_proba": 3})
    with pytest.raises(InvalidInput, match="unknown output"):
        runtime.predict([X], requested=["predict", "embedding"])
    with pytest.raises(InvalidInput, match="shape|rank"):
        runtime.predict([X.reshape(25, 2, 2)])
    with pytest.raises(InvalidSpec, match="unknown parameter"):
        load_runtime(framework, path, parameters={"threads": 4})


def test_onnx_outputs_and_inputs_by_name(tmp_path):
    path, expected = mf.make_onnx(tmp_path)
    runtime = load_runtime("onnx", tmp_path)
    out = runtime.predict([X])
    assert list(out) == ["predict", "probabilities"]
    assert out["predict"].tolist() == expected(X).tolist()
    named = runtime.predict([X], input_names=["float_input"], requested=["label", "probabilities"])
    assert named["label"].tolist() == expected(X).tolist()
    assert runtime.predict([X], input_names=["input-0"])["predict"].tolist() == expected(X).tolist()
    assert runtime.input_metadata() == [{"name": "float_input", "datatype": "FP32", "shape": [-1, 4]}]
    with pytest.raises(InvalidInput, match="model takes 1 input"):
        runtime.predict([])


def test_onnx_zipmap_probabilities_become_a_matrix(tmp_path):
    path, expected = mf.make_onnx(tmp_path, zipmap=True)
    runtime = load_runtime("onnx", path)
    out = runtime.predict([X], {"predict_proba": True})
    assert list(out) == ["predict_proba"] and out["predict_proba"].shape == (25, 3)
    _close(out["predict_proba"], expected(X, proba=True))
    assert runtime.predict([X], requested=["output_label"])["output_label"].tolist() == expected(X).tolist()


def test_casting_rules():
    assert as_dtype(np.arange(6).reshape(3, 2), np.float32).dtype == np.float32
    with pytest.raises(InvalidInput, match="truncated"):
        as_dtype(X, np.int64)
    with pytest.raises(InvalidInput, match="cannot be used as float32"):
        as_dtype(np.array([["a", "b"]]), np.float32)


def test_sklearn_estimators_run_single_threaded(tmp_path):
    path, _ = mf.make_sklearn(tmp_path, kind="rf")
    runtime = load_runtime("sklearn", path)
    assert runtime.model.n_jobs == 1


def test_other_predict_failures_are_inference_errors(tmp_path):
    from rayms.frameworks.sklearn import SklearnRuntime

    class Broken:
        def predict(self, x):
            raise RuntimeError("kaboom")

    path = tmp_path / "model.joblib"
    path.write_bytes(b"x")
    with pytest.raises(InferenceError, match="kaboom"):
        SklearnRuntime(path, Broken(), {}).predict([X])


@pytest.mark.parametrize(("framework", "ext"), [
    ("sklearn", ".joblib"), ("sklearn", ".pkl"), ("xgboost", ".json"), ("xgboost", ".ubj"),
    ("lightgbm", ".txt"), ("onnx", ".onnx"),
])
def test_corrupt_artifact_is_model_load_error_with_library_text(tmp_path, framework, ext):
    path = tmp_path / f"model{ext}"
    path.write_bytes(b"definitely not a model \x00\x01\x02")
    with pytest.raises(ModelLoadError) as info:
        load_runtime(framework, tmp_path)
    cause = info.value.__cause__
    assert cause is not None and library_message(cause) in str(info.value)
    assert str(info.value).startswith(f"cannot load {framework} model model{ext}: ")


def test_resolve_model_file_rules(tmp_path):
    path, _ = mf.make_lightgbm(tmp_path / "one")
    for noise in ("README.txt", "model-settings.json", ".hidden.txt", "requirements.txt"):
        (path.parent / noise).write_text("{}")
    assert resolve_model_file(path.parent, "lightgbm") == path
    assert resolve_model_file(tmp_path / "one", "LightGBM") == path
    nested = tmp_path / "wrapped"
    mf.make_onnx(nested / "inner")
    assert resolve_model_file(nested, "onnx") == nested / "inner" / "model.onnx"
    (path.parent / "other.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"exactly one lightgbm model file.*found 2 \(model.txt, other.txt\)"):
        resolve_model_file(path.parent, "lightgbm")
    with pytest.raises(ModelLoadError, match="found no"):
        resolve_model_file(path.parent, "onnx")
    with pytest.raises(ModelLoadError, match="not a xgboost model file"):
        resolve_model_file(path, "xgboost")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_file(tmp_path / "missing", "sklearn")
    with pytest.raises(InvalidSpec, match="not supported"):
        load_runtime("tensorflow", path)


def test_framework_from_extension(tmp_path):
    for name, framework in [("m.joblib", "sklearn"), ("m.PKL", "sklearn"), ("m.pickle", "sklearn"),
                            ("m.json", "xgboost"), ("m.ubj", "xgboost"), ("m.txt", "lightgbm"), ("m.onnx", "onnx")]:
        (tmp_path / name).write_text("x")
        assert framework_from_extension(tmp_path / name) == framework
    (tmp_path / "m.bst").write_text("x")  # two frameworks use .bst: the content decides (tests/test_answers.py)
    with pytest.raises(InvalidSpec, match="no xgboost or lightgbm model format"):
        framework_from_extension(tmp_path / "m.bst")
    folder = tmp_path / "served"
    mf.make_lightgbm(folder)
    (folder / "README.md").write_text("docs")
    assert framework_from_extension(folder) == "lightgbm"
    (folder / "extra.onnx").write_text("x")
    with pytest.raises(InvalidSpec, match="2 model files"):
        framework_from_extension(folder)


@pytest.mark.parametrize("case", ONE_PER_FRAMEWORK, ids=_id)
def test_concurrent_predicts_agree(tmp_path, case):
    framework, path, expected = _build(tmp_path, case)
    runtime = load_runtime(framework, path)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: runtime.predict([X[i:i + 5]])["predict"], range(20)))
    for i, result in enumerate(results):
        assert result.tolist() == expected(X[i:i + 5]).tolist()


def test_missing_library_gives_install_hint(tmp_path, monkeypatch):
    path, _ = mf.make_onnx(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match=r"framework onnx needs onnxruntime: pip install 'rayms\[onnx\]'"):
        load_runtime("onnx", path)


def test_importing_frameworks_imports_no_ml_library():
    code = (
        "import sys, rayms.frameworks, rayms.frameworks.sklearn, rayms.frameworks.xgboost, "
        "rayms.frameworks.lightgbm, rayms.frameworks.onnx\n"
        "print(sorted(m for m in ('sklearn', 'xgboost', 'lightgbm', 'onnxruntime', 'onnx', 'joblib') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
