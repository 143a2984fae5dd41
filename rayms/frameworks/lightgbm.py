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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import (
    as_dtype, choose_outputs, guarded, library_message, parse_parameters, require, stack_inputs, tensor_info,
)

CLASSIFIERS = {"binary": "binary", "multiclass": "multi", "multiclassova": "multi"}


class LightGBMRuntime:
    framework = "lightgbm"

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], input_errors: tuple) -> None:
        self.path, self.booster, self.defaults = path, booster, dict(defaults)
        self.input_errors = input_errors
        self.objective = str(booster.params.get("objective", "")).split(" ")[0]
        self.kind = CLASSIFIERS.get(self.objective, "regression")
        self.num_class = max(int(booster.params.get("num_class", 1)), 2)
        self.outputs = ("predict",) if self.kind == "regression" else ("predict", "predict_proba")
        self._size = path.stat().st_size

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        options = parse_parameters(self.defaults, parameters or {})
        names = choose_outputs(requested, options.get("predict_proba", False), self.outputs)
        matrix = as_dtype(stack_inputs(inputs), np.float64)
        return guarded(self.framework, lambda: self._run(matrix, names), self.input_errors)

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raw = np.asarray(self.booster.predict(matrix, num_threads=1))
        if self.kind == "regression":
            return {"predict": raw}
        proba = np.column_stack([1.0 - raw, raw]) if self.kind == "binary" else raw
        found = {"predict_proba": proba, "predict": np.argmax(proba, axis=1).astype(np.int64)}
        return {name: found[name] for name in names}

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info("input-0", np.float64, [-1, self.booster.num_feature()])]

    def output_metadata(self) -> list[dict[str, Any]]:
        if self.kind == "regression":
            return [tensor_info("predict", np.float64, [-1])]
        return [tensor_info("predict", np.int64, [-1]), tensor_info("predict_proba", np.float64, [-1, self.num_class])]

    def size_bytes(self) -> int:
        """The artifact's size on disk (the text model is larger than the loaded trees: an upper bound)."""
        return self._size


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
