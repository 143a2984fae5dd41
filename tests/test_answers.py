"""Default answers are the framework's own in-process answers, objective by objective (no Ray).

KServe's XGBoost and LightGBM servers answer ``Booster.predict``; MLServer's LightGBM runtime does too, and
its XGBoost runtime answers the scikit-learn wrapper's ``predict``. Every expectation here is computed by
the library itself on the same artifact, never by rayms's code.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from rayms.errors import InvalidSpec, UnsupportedFramework
from rayms.framework_table import canonical, platform
from rayms.frameworks import framework_from_extension, load_runtime, resolve_model_file
from rayms.frameworks.sniff import sniff_booster
from tests import model_factory as mf

X, _, _ = mf.make_data(n=30, seed=5)

XGBOOST_CLASSIFIERS = ["multiclass", "softmax", "binary"]
LIGHTGBM_CLASSIFIERS = ["multiclass", "binary"]


def booster_answer(framework: str, path) -> np.ndarray:
    """``Booster.predict`` on the artifact, loaded the way KServe's servers load it."""
    if framework == "xgboost":
        import xgboost

        booster = xgboost.Booster(model_file=bytearray(path.read_bytes()))
        return booster.predict(xgboost.DMatrix(X))
    import lightgbm

    return lightgbm.Booster(model_file=str(path)).predict(X)


CASES = [("xgboost", mf.make_xgboost, task) for task in (*XGBOOST_CLASSIFIERS, "regression")] + [
    ("lightgbm", mf.make_lightgbm, task) for task in (*LIGHTGBM_CLASSIFIERS, "regression")]


@pytest.mark.parametrize(("framework", "builder", "task"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_default_answer_is_booster_predict(tmp_path, framework, builder, task):
    path, expected = builder(tmp_path, task=task)
    runtime = load_runtime(framework, tmp_path)
    out = runtime.predict([X])
    assert list(out) == ["predict"]
    want = booster_answer(framework, path)
    assert out["predict"].dtype == want.dtype and out["predict"].shape == want.shape
    assert out["predict"].tolist() == want.tolist()
    assert runtime.output_metadata()[0]["shape"] == [-1, *want.shape[1:]]
    if task == "regression":
        assert runtime.outputs == ("predict",)
        return
    # Labels and probabilities stay available on request, equal to the scikit-learn wrapper's.
    both = runtime.predict([X], requested=["label", "predict_proba"])
    assert both["label"].tolist() == expected(X, labels=True).tolist()
    np.testing.assert_allclose(both["predict_proba"], expected(X, proba=True), rtol=1e-6, atol=1e-6)
    assert list(runtime.predict([X], {"predict_proba": True})) == ["predict_proba"]


def test_the_shapes_clients_parse(tmp_path):
    """What a KServe client reads in ``predictions``: rows of probabilities, P(positive), class indices."""
    shapes = {}
    for task in ("multiclass", "binary", "softmax"):
        mf.make_xgboost(tmp_path / task, task=task)
        shapes[task] = load_runtime("xgboost", tmp_path / task).predict([X[:2]])["predict"]
    assert shapes["multiclass"].shape == (2, 3) and np.allclose(shapes["multiclass"].sum(axis=1), 1, atol=1e-6)
    assert shapes["binary"].shape == (2,) and ((shapes["binary"] > 0) & (shapes["binary"] < 1)).all()
    assert shapes["softmax"].shape == (2,) and set(shapes["softmax"].tolist()) <= {0.0, 1.0, 2.0}


def test_early_stopped_xgboost_answers_every_tree_like_booster_predict(tmp_path):
    import xgboost

    x, labels, _ = mf.make_data(n=200, seed=1)
    model = xgboost.XGBClassifier(n_estimators=40, max_depth=2, early_stopping_rounds=2, n_jobs=1)
    model.fit(x[:150], labels[:150], eval_set=[(x[150:], labels[150:])], verbose=False)
    booster = model.get_booster()
    assert booster.num_boosted_rounds() > int(booster.attr("best_iteration")) + 1  # it did stop early
    booster.save_model(str(tmp_path / "model.json"))
    runtime = load_runtime("xgboost", tmp_path)
    assert runtime.predict([X])["predict"].tolist() == booster.predict(xgboost.DMatrix(X)).tolist()


# ------------------------------------------------------------------------------------------ MLServer's answers
def mlserver_estimator(path):
    """What MLServer's XGBoost runtime builds from a file: XGBRegressor, or XGBClassifier when it refuses."""
    import xgboost

    try:
        estimator = xgboost.XGBRegressor()
        estimator.load_model(str(path))
    except TypeError:
        estimator = xgboost.XGBClassifier()
        estimator.load_model(str(path))
    return estimator


def as_mlserver_sends(array: np.ndarray) -> np.ndarray:
    """MLServer's NumpyCodec gives a 1-D output a trailing dimension: ``[N]`` goes out as ``[N, 1]``."""
    return array.reshape(-1, 1) if array.ndim == 1 else array


@pytest.mark.parametrize("task", [*XGBOOST_CLASSIFIERS, "regression"])
@pytest.mark.parametrize("save", ["booster", "sklearn"])
def test_xgboost_answer_as_mlserver_is_the_wrappers_predict(tmp_path, task, save):
    path, _ = mf.make_xgboost(tmp_path, task=task, save=save)
    runtime = load_runtime("xgboost", tmp_path, parameters={"answer_as": "mlserver"})
    want = as_mlserver_sends(mlserver_estimator(path).predict(X))
    got = runtime.predict([X])["predict"]
    assert got.tolist() == want.tolist() and got.shape == want.shape and got.dtype == want.dtype
    assert runtime.output_metadata()[0]["shape"] == [-1, want.shape[1]]
    if save == "sklearn" and task != "regression":  # the one case where MLServer and KServe differ
        assert np.issubdtype(got.dtype, np.integer) and runtime.output_metadata()[0]["datatype"] == "INT64"
        if task != "softmax":  # softmax's Booster.predict is the class index already (as a float)
            assert not np.array_equal(got.ravel(), booster_answer("xgboost", path).ravel())
    else:
        assert got.tolist() == as_mlserver_sends(booster_answer("xgboost", path)).tolist()


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_lightgbm_answer_as_mlserver_is_booster_predict_too(tmp_path, task):
    path, _ = mf.make_lightgbm(tmp_path / "m", ext=".bst", task=task)
    runtime = load_runtime("lightgbm", path, parameters={"answer_as": "mlserver"})
    got, want = runtime.predict([X])["predict"], as_mlserver_sends(booster_answer("lightgbm", path))
    assert got.tolist() == want.tolist() and got.shape == want.shape


def test_sklearn_answer_as_mlserver_keeps_predict_in_mlservers_shape(tmp_path):
    _, expected = mf.make_sklearn(tmp_path, kind="rf")
    runtime = load_runtime("sklearn", tmp_path, parameters={"answer_as": "mlserver"})
    got = runtime.predict([X], requested=["predict", "predict_proba"])
    assert got["predict"].tolist() == as_mlserver_sends(expected(X)).tolist()
    assert got["predict_proba"].shape == (len(X), 3)
    assert [m["shape"] for m in runtime.output_metadata()] == [[-1, 1], [-1, 3]]


# ------------------------------------------------------------------------------------------ parameters
def test_default_outputs_parameter(tmp_path):
    mf.make_xgboost(tmp_path / "x", task="binary")
    runtime = load_runtime("xgboost", tmp_path / "x", parameters={"default_outputs": ["label", "predict_proba"]})
    assert list(runtime.predict([X])) == ["label", "predict_proba"]
    assert list(runtime.predict([X], requested=["predict"])) == ["predict"]
    every = load_runtime("xgboost", tmp_path / "x", parameters={"default_outputs": "all"})
    assert list(every.predict([X])) == ["predict", "predict_proba", "label"]
    mf.make_sklearn(tmp_path / "s")
    sk = load_runtime("sklearn", tmp_path / "s", parameters={"default_outputs": ["predict_proba"]})
    assert list(sk.predict([X])) == ["predict_proba"]
    with pytest.raises(InvalidSpec, match="unknown output.*embedding"):
        load_runtime("xgboost", tmp_path / "x", parameters={"default_outputs": ["embedding"]})
    with pytest.raises(InvalidSpec, match="list of output names"):
        load_runtime("xgboost", tmp_path / "x", parameters={"default_outputs": "label"})
    with pytest.raises(InvalidSpec, match="answer_as.*kserve, mlserver"):
        load_runtime("xgboost", tmp_path / "x", parameters={"answer_as": "triton"})
    # model-only options are configuration: a request cannot change them (ignored, like unknown ones)
    assert list(runtime.predict([X], {"default_outputs": ["predict"], "answer_as": "mlserver"})) == ["label", "predict_proba"]


def test_onnx_default_outputs_all_answers_the_models_own_names(tmp_path):
    path, expected = mf.make_onnx(tmp_path)
    runtime = load_runtime("onnx", path, parameters={"default_outputs": "all"})
    out = runtime.predict([X])
    assert list(out) == ["label", "probabilities"]
    assert out["label"].tolist() == expected(X).tolist()


# ------------------------------------------------------------------------------------------ framework by content
def test_bst_and_json_are_told_apart_by_content(tmp_path):
    xgb, _ = mf.make_xgboost(tmp_path / "xgb", ext=".bst")
    lgb, _ = mf.make_lightgbm(tmp_path / "lgb", ext=".bst")
    js, _ = mf.make_xgboost(tmp_path / "js", ext=".json")
    assert (sniff_booster(xgb), sniff_booster(lgb), sniff_booster(js)) == ("xgboost", "lightgbm", "xgboost")
    assert framework_from_extension(xgb.parent) == "xgboost"
    assert framework_from_extension(lgb.parent) == "lightgbm"
    assert load_runtime(framework_from_extension(lgb), lgb).framework == "lightgbm"
    # A .json beside a model is configuration unless it is an XGBoost model.
    sk, _ = mf.make_sklearn(tmp_path / "sk")
    (sk.parent / "config.json").write_text(json.dumps({"learning_rate": 0.1}))
    assert framework_from_extension(sk.parent) == "sklearn"
    (js.parent / "metadata-v2.json").write_text(json.dumps({"owner": "team"}))
    assert framework_from_extension(js.parent) == "xgboost"
    assert resolve_model_file(js.parent, "xgboost") == js
    # Two real models are still two.
    mf.make_xgboost(tmp_path / "js2", ext=".json")
    (tmp_path / "js2" / "model.json").rename(js.parent / "other.json")
    with pytest.raises(InvalidSpec, match="2 model files"):
        framework_from_extension(js.parent)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model.bst").write_bytes(b"\x00\x01 some other format")
    with pytest.raises(InvalidSpec, match="model.bst: its content is in no xgboost or lightgbm model format"):
        framework_from_extension(tmp_path / "odd")


def test_framework_table_and_unsupported_framework():
    assert canonical("Scikit-Learn") == "sklearn" and canonical(" LGBM ") == "lightgbm"
    assert platform("onnx") == "onnx_onnxv1" and platform("xgboost") == "xgboost_xgboost"
    with pytest.raises(UnsupportedFramework) as info:
        canonical("tensorflow")
    assert isinstance(info.value, InvalidSpec) and info.value.status_code == 400
    again = pickle.loads(pickle.dumps(info.value))  # it crosses Ray process boundaries
    assert type(again) is UnsupportedFramework and str(again) == str(info.value)
    assert "'tensorflow' is not supported; use one of sklearn, xgboost" in str(again)
    with pytest.raises(UnsupportedFramework, match="not supported"):
        load_runtime("pytorch", "/nowhere")


def test_the_bridge_tells_an_unsupported_framework_by_its_type():
    """The condition comes from the error's class, not its words (this name mentions memory)."""
    from rayms.k8s.resources import parse

    parsed = parse({"metadata": {"name": "m", "namespace": "default"}, "spec": {
        "inferenceService": "rayms", "model": {"storageUri": "/m", "framework": "in-memory-store", "memory": "1Gi"}}})
    assert parsed.spec is None and parsed.problem_condition == "FrameworkSupported"
    assert "framework 'in-memory-store' is not supported" in parsed.problem
