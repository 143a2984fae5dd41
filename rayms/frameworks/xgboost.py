"""XGBoost runtime: serves a saved Booster (``.json``, ``.ubj``, or ``.bst``).

It exists to keep xgboost out of every other module. Decisions:

* The artifact is loaded as a plain :class:`xgboost.Booster` from its bytes (XGBoost detects JSON vs
  UBJSON itself, so a ``.bst`` of either kind loads without an extension warning). Models saved by
  ``XGBClassifier``/``XGBRegressor`` are Boosters too; no sklearn wrapper is rebuilt.
* Prediction uses ``inplace_predict`` on a float32 array (no DMatrix is built) with ``nthread=1``,
  without feature-name validation (V2 tensors carry no column names: the column order is the contract),
  and up to ``best_iteration`` when the model was trained with early stopping, like the sklearn wrapper.
* Classifiers (``binary:logistic``, ``binary:logitraw``, ``multi:softprob``, ``multi:softmax``):
  ``predict_proba`` is an ``[N, classes]`` float32 array (``[1-p, p]`` for binary, as sklearn);
  ``predict`` is the class index (int64): probability > 0.5 for binary, arg-max for multi-class. The
  Booster does not store the wrapper's original labels, so labels are 0..K-1.
* Every other objective (regression, ranking, survival, ``binary:hinge``) returns the Booster's output
  as ``predict`` and has no ``predict_proba``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import library_message, require, tensor_info
from rayms.frameworks.boosters import BoosterRuntime

# objective -> (kind, which output the probabilities come from)
CLASSIFIERS = {
    "binary:logistic": ("binary", "value"),
    "binary:logitraw": ("binary", "margin"),
    "multi:softprob": ("multi", "value"),
    "multi:softmax": ("multi", "margin"),
}


def _probabilities(raw: np.ndarray, kind: str, source: str) -> np.ndarray:
    if kind == "binary":
        positive = raw.reshape(-1) if source == "value" else 1.0 / (1.0 + np.exp(-raw.reshape(-1)))
        return np.column_stack([1.0 - positive, positive]).astype(np.float32)
    if source == "value":
        return raw
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


class XGBoostRuntime(BoosterRuntime):
    framework = "xgboost"
    dtype = np.float32

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any]) -> None:
        learner = json.loads(booster.save_config())["learner"]
        self.objective = learner["objective"]["name"]
        kind, self.source = CLASSIFIERS.get(self.objective, ("regression", "value"))
        super().__init__(path, booster, defaults, kind=kind,
                         num_class=max(int(learner["learner_model_param"].get("num_class", "0")), 2))
        best = booster.attr("best_iteration")
        self.iteration_range = (0, int(best) + 1) if best is not None else (0, 0)

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raw = np.asarray(self.booster.inplace_predict(
            matrix, iteration_range=self.iteration_range, predict_type=self.source, validate_features=False))
        if self.kind == "regression":
            return {"predict": raw}
        proba = _probabilities(raw, self.kind, self.source)
        labels = proba[:, 1] > 0.5 if self.kind == "binary" else np.argmax(proba, axis=1)
        return self._classes(proba, labels, names)

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float32, [-1, self.booster.num_features()])]


def load(path: Path, defaults: Mapping[str, Any]) -> XGBoostRuntime:
    xgboost = require("xgboost", "xgboost")
    try:
        booster = xgboost.Booster()
        booster.load_model(bytearray(path.read_bytes()))
        booster.set_param({"nthread": 1})
        return XGBoostRuntime(path, booster, defaults)
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load xgboost model {path.name}: {message}") from exc
