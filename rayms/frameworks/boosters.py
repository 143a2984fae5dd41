"""What the XGBoost and LightGBM runtimes share: a booster that is a classifier or a regressor.

Classifiers answer ``predict`` (class index, int64) and ``predict_proba`` (``[N, classes]``); other
objectives answer ``predict`` only. Each subclass sets ``dtype`` (the float type its library predicts
on), builds ``kind``/``num_class``/``outputs`` from the model, and implements ``_run`` and
``input_metadata``. No ML library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.frameworks import as_dtype, guarded, outputs_for, stack_inputs, tensor_info


class BoosterRuntime:
    framework: str
    dtype: Any = np.float64
    input_errors: tuple[type[BaseException], ...] = (ValueError, TypeError)

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], *, kind: str, num_class: int) -> None:
        self.path, self.booster, self.defaults = path, booster, dict(defaults)
        self.kind = kind
        self.num_class = num_class
        self.outputs = ("predict",) if kind == "regression" else ("predict", "predict_proba")
        self._size = path.stat().st_size

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs_for(self.defaults, parameters, requested, self.outputs)
        matrix = as_dtype(stack_inputs(inputs), self.dtype)
        return guarded(self.framework, lambda: self._run(matrix, names), self.input_errors)

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _classes(self, proba: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        found = {"predict_proba": proba, "predict": labels.astype(np.int64)}
        return {name: found[name] for name in names}

    def input_metadata(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def output_metadata(self) -> list[dict[str, Any]]:
        if self.kind == "regression":
            return [tensor_info("predict", self.dtype, [-1])]
        return [tensor_info("predict", np.int64, [-1]), tensor_info("predict_proba", self.dtype, [-1, self.num_class])]

    def size_bytes(self) -> int:
        """The artifact's size on disk (close to the loaded trees; an upper bound for text formats)."""
        return self._size
