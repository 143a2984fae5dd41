"""LightGBM runtime: serves a saved Booster in LightGBM's text format (``.txt`` or ``.bst``).

It exists to keep lightgbm out of every other module. Decisions:

* The artifact is loaded with ``lightgbm.Booster(model_file=...)``; a ``.bst`` is the same text format
  (KServe's LightGBM server names its models ``model.bst``). Whether a ``.bst`` is XGBoost or LightGBM
  is decided by the model's declared framework, never guessed here.
* Prediction runs ``Booster.predict`` on a float64 array with ``num_threads=1`` (passed on every call:
  the model file remembers the training thread count, which must not leak into serving). It uses the
  best iteration when the model has one, like ``LGBMClassifier``.
* Classifiers (objective ``binary``, ``multiclass``, ``multiclassova``): ``predict_proba`` is an
  ``[N, classes]`` float64 array (``[1-p, p]`` for binary, as sklearn); ``predict`` is the class index
  (int64, arg-max). The Booster does not store the wrapper's original labels, so labels are 0..K-1.
* Every other objective returns the Booster's output as ``predict`` and has no ``predict_proba``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import library_message, require, tensor_info
from rayms.frameworks.boosters import BoosterRuntime

CLASSIFIERS = {"binary": "binary", "multiclass": "multi", "multiclassova": "multi"}


class LightGBMRuntime(BoosterRuntime):
    framework = "lightgbm"
    dtype = np.float64

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], input_errors: tuple) -> None:
        self.objective = str(booster.params.get("objective", "")).split(" ")[0]
        super().__init__(path, booster, defaults, kind=CLASSIFIERS.get(self.objective, "regression"),
                         num_class=max(int(booster.params.get("num_class", 1)), 2))
        self.input_errors = input_errors

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raw = np.asarray(self.booster.predict(matrix, num_threads=1))
        if self.kind == "regression":
            return {"predict": raw}
        proba = np.column_stack([1.0 - raw, raw]) if self.kind == "binary" else raw
        return self._classes(proba, np.argmax(proba, axis=1), names)

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float64, [-1, self.booster.num_feature()])]


def load(path: Path, defaults: Mapping[str, Any]) -> LightGBMRuntime:
    lightgbm = require("lightgbm", "lightgbm")
    try:
        booster = lightgbm.Booster(model_file=str(path))
        # LightGBM reports a wrong feature count as LightGBMError, not ValueError.
        input_errors = (ValueError, TypeError, lightgbm.basic.LightGBMError)
        return LightGBMRuntime(path, booster, defaults, input_errors)
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load lightgbm model {path.name}: {message}") from exc
