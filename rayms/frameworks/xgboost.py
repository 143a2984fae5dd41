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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import (
    as_dtype, choose_outputs, guarded, library_message, parse_parameters, require, stack_inputs, tensor_info,
)

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


class XGBoostRuntime:
    framework = "xgboost"

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any]) -> None:
        self.path, self.booster, self.defaults = path, booster, dict(defaults)
        learner = json.loads(booster.save_config())["learner"]
        self.objective = learner["objective"]["name"]
        self.kind, self.source = CLASSIFIERS.get(self.objective, ("regression", "value"))
        self.num_class = max(int(learner["learner_model_param"].get("num_class", "0")), 2)
        best = booster.attr("best_iteration")
        self.iteration_range = (0, int(best) + 1) if best is not None else (0, 0)
        self.outputs = ("predict",) if self.kind == "regression" else ("predict", "predict_proba")
        self._size = path.stat().st_size

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        options = parse_parameters(self.defaults, parameters or {})
        names = choose_outputs(requested, options.get("predict_proba", False), self.outputs)
        matrix = as_dtype(stack_inputs(inputs), np.float32)
        return guarded(self.framework, lambda: self._run(matrix, names), (ValueError, TypeError))

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raw = np.asarray(self.booster.inplace_predict(
            matrix, iteration_range=self.iteration_range, predict_type=self.source, validate_features=False))
        if self.kind == "regression":
            return {"predict": raw}
        proba = _probabilities(raw, self.kind, self.source)
        labels = proba[:, 1] > 0.5 if self.kind == "binary" else np.argmax(proba, axis=1)
        found = {"predict_proba": proba, "predict": labels.astype(np.int64)}
        return {name: found[name] for name in names}

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float32, [-1, self.booster.num_features()])]

    def output_metadata(self) -> list[dict[str, Any]]:
        if self.kind == "regression":
            return [tensor_info("predict", np.float32, [-1])]
        return [tensor_info("predict", np.int64, [-1]), tensor_info("predict_proba", np.float32, [-1, self.num_class])]

    def size_bytes(self) -> int:
        """The artifact's size on disk (the in-memory trees are smaller than JSON, close to UBJSON)."""
        return self._size


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
