"""Tiny real models for tests: train on a small synthetic table and save into a folder.

Any test that needs a servable artifact uses these instead of checked-in binaries. Every builder
trains on :func:`make_data` (4 float features; classifiers learn 3 classes, or 2 with ``binary``),
saves ``model<ext>`` into ``folder`` and returns ``(path, expected)`` where ``expected(x, proba=False)``
gives the in-process model's predictions (or probabilities) for a 2-D array: ``predict`` for scikit-learn
and ONNX, ``Booster.predict`` for XGBoost and LightGBM (what a server answers by default). Each takes
well under 1 s.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

Expected = Callable[..., np.ndarray]
N_FEATURES = 4


def make_data(n: int = 120, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, labels, target)``: float64 features, int labels in ``0..classes-1``, a float regression target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES))
    score = x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2]
    labels = np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]))
    target = 2.0 * x[:, 0] - x[:, 3] + 0.1 * rng.normal(size=n)
    return x, labels.astype(np.int64), target


def _expect(model) -> Expected:
    def expected(x: np.ndarray, proba: bool = False) -> np.ndarray:
        return model.predict_proba(x) if proba else model.predict(x)
    return expected


def _target(folder: Path | str, ext: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"model{ext}"


def make_sklearn(folder: Path | str, kind: str = "logreg", ext: str = ".joblib") -> tuple[Path, Expected]:
    """``kind``: ``logreg`` or ``rf`` (classifiers), ``linreg`` or ``rf_regressor``. ``.joblib`` is written
    with joblib, ``.pkl``/``.pickle`` with plain pickle."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression

    x, labels, target = make_data()
    builders = {
        "logreg": lambda: LogisticRegression(max_iter=200).fit(x, labels),
        "rf": lambda: RandomForestClassifier(n_estimators=10, max_depth=4, n_jobs=2, random_state=0).fit(x, labels),
        "linreg": lambda: LinearRegression().fit(x, target),
        "rf_regressor": lambda: RandomForestRegressor(n_estimators=10, max_depth=4, random_state=0).fit(x, target),
    }
    model = builders[kind]()
    path = _target(folder, ext)
    if ext == ".joblib":
        import joblib

        joblib.dump(model, path)
    else:
        path.write_bytes(pickle.dumps(model))
    return path, _expect(model)


def _expect_booster(model, booster_predict: Callable[[np.ndarray], np.ndarray]) -> Expected:
    """``expected(x)`` is ``Booster.predict`` (what KServe's servers answer); ``proba=True`` the wrapper's
    ``predict_proba``; ``labels=True`` the wrapper's ``predict`` (class labels for classifiers)."""
    def expected(x: np.ndarray, proba: bool = False, labels: bool = False) -> np.ndarray:
        if proba:
            return model.predict_proba(x)
        return model.predict(x) if labels else booster_predict(x)
    return expected


XGBOOST_TASKS = {"multiclass": "multi:softprob", "softmax": "multi:softmax", "binary": "binary:logistic",
                 "regression": "reg:squarederror"}


def make_xgboost(folder: Path | str, ext: str = ".json", task: str = "multiclass",
                 save: str = "booster") -> tuple[Path, Expected]:
    """``task``: ``multiclass`` (multi:softprob), ``softmax`` (multi:softmax), ``binary`` (binary:logistic) or
    ``regression`` (reg:squarederror). ``save``: ``booster`` (``Booster.save_model``, as KServe's examples
    do) or ``sklearn`` (``XGBClassifier.save_model``, which records that a classifier saved it)."""
    import xgboost

    x, labels, target = make_data(classes=2 if task == "binary" else 3)
    params = {"n_estimators": 5, "max_depth": 3, "n_jobs": 1, "objective": XGBOOST_TASKS[task]}
    if task == "regression":
        model = xgboost.XGBRegressor(**params).fit(x, target)
    else:
        model = xgboost.XGBClassifier(**params).fit(x, labels)
    path = _target(folder, ext)
    saver = model if save == "sklearn" else model.get_booster()
    saver.save_model(str(path) if ext != ".bst" else str(path.with_suffix(".ubj")))
    if ext == ".bst":  # XGBoost warns on unknown extensions; a .bst is UBJSON under another name
        path.with_suffix(".ubj").rename(path)
    booster = model.get_booster()
    return path, _expect_booster(model, lambda rows: booster.predict(xgboost.DMatrix(rows)))


def make_lightgbm(folder: Path | str, ext: str = ".txt", task: str = "multiclass") -> tuple[Path, Expected]:
    """``task``: ``multiclass``, ``binary`` or ``regression``; saved in LightGBM's text format."""
    import lightgbm

    x, labels, target = make_data(classes=2 if task == "binary" else 3)
    params = {"n_estimators": 5, "min_child_samples": 5, "n_jobs": 1, "verbose": -1}
    if task == "regression":
        model = lightgbm.LGBMRegressor(**params).fit(x, target)
    else:
        model = lightgbm.LGBMClassifier(**params).fit(x, labels)
    path = _target(folder, ext)
    model.booster_.save_model(str(path))
    return path, _expect_booster(model, model.booster_.predict)


def make_onnx(folder: Path | str, kind: str = "logreg", zipmap: bool = False) -> tuple[Path, Expected]:
    """A scikit-learn ``logreg`` classifier (outputs ``label`` and ``probabilities``; with ``zipmap``
    skl2onnx's default ``output_label`` and ``output_probability``, a list of ``{class: p}``) or a
    ``linreg`` regressor (output ``variable``) converted with skl2onnx; float32 input ``float_input``."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LinearRegression, LogisticRegression

    x, labels, target = make_data()
    x = x.astype(np.float32)
    if kind == "logreg":
        model = LogisticRegression(max_iter=200).fit(x, labels)
        options = None if zipmap else {id(model): {"zipmap": False}}
    else:
        model = LinearRegression().fit(x, target)
        options = None
    onx = to_onnx(model, initial_types=[("float_input", FloatTensorType([None, N_FEATURES]))],
                  options=options, target_opset=17)
    path = _target(folder, ".onnx")
    path.write_bytes(onx.SerializeToString())
    return path, _expect(model)


def make_segment_models(root: Path | str) -> dict[str, Expected]:
    """Three per-segment models of three frameworks in a model repository folder (``seg-a``: scikit-learn
    classifier, ``seg-b``: XGBoost binary, answering P(positive), ``seg-c``: LightGBM regression), each
    answering one value a row; returns their in-process answers by name."""
    root = Path(root)
    return {
        "seg-a": make_sklearn(root / "seg-a", kind="logreg")[1],
        "seg-b": make_xgboost(root / "seg-b", task="binary")[1],
        "seg-c": make_lightgbm(root / "seg-c", task="regression")[1],
    }
