"""LightGBM runtime: serves a saved Booster in LightGBM's text format (``.txt`` or ``.bst``).

It exists to keep lightgbm out of every other module. Decisions:

* The artifact is loaded with ``lightgbm.Booster(model_file=...)``; a ``.bst`` is the same text format
  (KServe's LightGBM server names its models ``model.bst``). Whether a ``.bst`` is XGBoost or LightGBM
  is decided by the declared framework, or by the file's first bytes when a folder is guessed
  (:mod:`rayms.frameworks.sniff`).
* ``predict`` is ``Booster.predict``, as KServe's and MLServer's LightGBM servers both answer (see
  :mod:`rayms.frameworks.boosters`): ``[N, classes]`` probabilities for ``multiclass``/``multiclassova``,
  P(positive class) for ``binary``, raw values for every other objective. It runs on a float64 array with
  ``num_threads=1`` (passed on every call: the model file remembers the training thread count, which must
  not leak into serving) and, like ``Booster.predict``, stops at the best iteration when the model has one.
* ``predict_proba`` (``[1-p, p]`` for binary) and ``label`` for the classifier objectives come from the
  same probabilities.
* ``answer_as: mlserver`` (models from an MLServer repository) changes only the shape of 1-D outputs:
  ``[N, 1]``, as MLServer's codec sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import library_message, require, tensor_info
from rayms.frameworks.boosters import BoosterRuntime, binary_columns

CLASSIFIERS = {"binary": "binary", "multiclass": "multi", "multiclassova": "multi"}


class LightGBMRuntime(BoosterRuntime):
    framework = "lightgbm"
    dtype = np.float64

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], input_errors: tuple) -> None:
        self.objective = str(booster.params.get("objective", "")).split(" ")[0]
        kind = CLASSIFIERS.get(self.objective, "regression")
        num_class = max(int(booster.params.get("num_class", 1)), 2)
        super().__init__(path, booster, defaults, kind=kind, num_class=num_class,
                         value_shape=[-1, num_class] if kind == "multi" else [-1])
        self.input_errors = input_errors

    def _value(self, matrix: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(matrix, num_threads=1))

    def _probabilities(self, matrix: np.ndarray, value: np.ndarray | None) -> np.ndarray:
        raw = value if value is not None else self._value(matrix)
        return binary_columns(raw, np.float64) if self.kind == "binary" else raw

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float64, [-1, self.booster.num_feature()])]


def load(path: Path, defaults: Mapping[str, Any]) -> LightGBMRuntime:
    lightgbm = require("lightgbm", "lightgbm")
    try:
        booster = lightgbm.Booster(model_file=str(path))
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load lightgbm model {path.name}: {message}") from exc
    # LightGBM reports a wrong feature count as LightGBMError, not ValueError.
    input_errors = (ValueError, TypeError, lightgbm.basic.LightGBMError)
    return LightGBMRuntime(path, booster, defaults, input_errors)
