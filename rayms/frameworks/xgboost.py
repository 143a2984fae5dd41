"""XGBoost runtime: serves a saved Booster (``.json``, ``.ubj``, or ``.bst``).

It exists to keep xgboost out of every other module. Decisions:

* The artifact is loaded from its bytes (XGBoost tells JSON from UBJSON itself, so a ``.bst`` of either
  kind loads without an extension warning). Models saved by ``XGBClassifier``/``XGBRegressor`` are
  Boosters too.
* ``predict`` is ``Booster.predict`` on the whole model, as KServe's XGBoost server answers (see
  :mod:`rayms.frameworks.boosters`): probabilities for ``multi:softprob`` and ``binary:logistic``, the
  class index for ``multi:softmax``, the margin for ``binary:logitraw``, raw values for the rest. It runs
  as ``inplace_predict`` on a float32 array (what a DMatrix holds; no DMatrix is built) with ``nthread=1``
  and without feature-name validation (V2 tensors carry no column names: the column order is the contract).
* ``predict_proba`` and ``label`` for the four classifier objectives: probabilities from the Booster's
  value, or from its margin through the sigmoid/softmax for ``binary:logitraw``/``multi:softmax``.
* ``answer_as: mlserver`` (set for models found in an MLServer repository) answers as MLServer's XGBoost
  runtime did: it loads the file into ``XGBRegressor``, or ``XGBClassifier`` when the file says it was
  saved by one, and answers that estimator's ``predict``. That is ``Booster.predict`` too, except for a
  model saved by ``XGBClassifier.save_model``, where it is the class label. The wrappers stop at the best
  iteration of an early-stopped model, so in this mode every output does; and a 1-D output is ``[N, 1]``,
  as MLServer's codec sends it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import library_message, require, tensor_info
from rayms.frameworks.boosters import BoosterRuntime, binary_columns

# objective -> (kind, which output the probabilities come from)
CLASSIFIERS = {
    "binary:logistic": ("binary", "value"),
    "binary:logitraw": ("binary", "margin"),
    "multi:softprob": ("multi", "value"),
    "multi:softmax": ("multi", "margin"),
}


class XGBoostRuntime(BoosterRuntime):
    framework = "xgboost"
    dtype = np.float32

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], estimator: Any = None) -> None:
        """``estimator`` is the scikit-learn wrapper whose ``predict`` answers (``answer_as: mlserver``)."""
        learner = json.loads(booster.save_config())["learner"]
        self.objective = learner["objective"]["name"]
        kind, self.source = CLASSIFIERS.get(self.objective, ("regression", "value"))
        num_class = max(int(learner["learner_model_param"].get("num_class", "0")), 2)
        super().__init__(path, booster, defaults, kind=kind, num_class=num_class,
                         value_shape=[-1, num_class] if self.objective == "multi:softprob" else [-1])
        self.estimator = estimator
        best = booster.attr("best_iteration")
        # Booster.predict uses every tree; the scikit-learn wrappers stop at the best iteration.
        self.iteration_range = (0, int(best) + 1) if estimator is not None and best is not None else (0, 0)

    def _booster_predict(self, matrix: np.ndarray, predict_type: str) -> np.ndarray:
        return np.asarray(self.booster.inplace_predict(
            matrix, iteration_range=self.iteration_range, predict_type=predict_type, validate_features=False))

    def _value(self, matrix: np.ndarray) -> np.ndarray:
        if self.estimator is not None:
            return np.asarray(self.estimator.predict(matrix, validate_features=False))
        return self._booster_predict(matrix, "value")

    def _probabilities(self, matrix: np.ndarray, value: np.ndarray | None) -> np.ndarray:
        if self.source == "value":
            raw = value if value is not None and self.estimator is None else self._booster_predict(matrix, "value")
            return binary_columns(raw, np.float32) if self.kind == "binary" else raw
        margin = self._booster_predict(matrix, "margin")
        if self.kind == "binary":
            return binary_columns(1.0 / (1.0 + np.exp(-margin)), np.float32)
        shifted = np.exp(margin - margin.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float32, [-1, self.booster.num_features()])]

    def output_metadata(self) -> list[dict[str, Any]]:
        meta = super().output_metadata()
        if self.estimator is not None and self.kind != "regression" and _estimator_type(self.estimator) == "classifier":
            meta[0] = tensor_info("predict", np.int64, [-1, 1])  # the wrapper's class labels, as MLServer sends them
        return meta


def _estimator_type(estimator: Any) -> str:
    return "classifier" if hasattr(estimator, "predict_proba") else "regressor"


def _mlserver_estimator(xgboost: Any, data: bytearray) -> Any:
    """The estimator MLServer's XGBoost runtime builds: a regressor, unless the file says classifier."""
    try:
        estimator = xgboost.XGBRegressor(n_jobs=1)
        estimator.load_model(data)
    except TypeError:  # "Loading an estimator with different type": saved by XGBClassifier
        estimator = xgboost.XGBClassifier(n_jobs=1)
        estimator.load_model(data)
    return estimator


def load(path: Path, defaults: Mapping[str, Any]) -> XGBoostRuntime:
    xgboost = require("xgboost", "xgboost")
    try:
        data = bytearray(path.read_bytes())
        estimator = None
        if defaults.get("answer_as") == "mlserver":
            estimator = _mlserver_estimator(xgboost, data)
            booster = estimator.get_booster()
        else:
            booster = xgboost.Booster()
            booster.load_model(data)
        booster.set_param({"nthread": 1})
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load xgboost model {path.name}: {message}") from exc
    return XGBoostRuntime(path, booster, defaults, estimator)
