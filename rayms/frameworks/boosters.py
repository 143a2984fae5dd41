"""What the XGBoost and LightGBM runtimes share: a booster whose default answer is ``Booster.predict``.

KServe's XGBoost and LightGBM servers answer with whatever ``Booster.predict`` returns, and clients parse
that, so it is rayms's default output too, under the name ``predict``:

* probabilistic classifiers (``multi:softprob``, ``binary:logistic``, LightGBM ``multiclass``/``binary``):
  the probabilities, ``[N, classes]`` for multi-class and ``[N]`` P(positive class) for binary;
* ``multi:softmax``: the class index (a float, as XGBoost returns it); ``binary:logitraw``: the margin;
* every other objective (regression, ranking, ...): the raw values.

Classifiers also answer, on request (V2 ``outputs``), ``predict_proba`` (``[N, classes]``, ``[1-p, p]``
for binary, as scikit-learn) and ``label`` (the class index, int64: arg-max, or p > 0.5 for binary). The
``predict_proba`` parameter makes ``predict_proba`` the default, as for every framework. A Booster does
not store a wrapper's original class labels, so labels are 0..K-1.

Each subclass sets ``dtype`` (the float type its library predicts on), tells ``kind``/``num_class`` from
the model, and implements ``_value`` (``Booster.predict``) and ``_probabilities``. No ML library is
imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.frameworks import (
    as_dtype, default_outputs, guarded, metadata_for, outputs_for, shaped_for, stack_inputs, tensor_info,
)

CLASS_OUTPUTS = ("predict", "predict_proba", "label")


class BoosterRuntime:
    framework: str
    dtype: Any = np.float64
    input_errors: tuple[type[BaseException], ...] = (ValueError, TypeError)

    def __init__(self, path: Path, booster: Any, defaults: Mapping[str, Any], *, kind: str, num_class: int,
                 value_shape: Sequence[int]) -> None:
        """``kind`` is ``binary``, ``multi`` or ``regression``; ``value_shape`` the shape ``Booster.predict``
        answers with (``[-1]`` or ``[-1, classes]``)."""
        self.path, self.booster, self.defaults = path, booster, dict(defaults)
        self.kind = kind
        self.num_class = num_class
        self.value_shape = list(value_shape)
        self.outputs = ("predict",) if kind == "regression" else CLASS_OUTPUTS
        self.default = default_outputs(self.defaults, self.outputs, ("predict",))
        self._size = path.stat().st_size

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs_for(self.defaults, parameters, requested, self.outputs, self.default)
        matrix = as_dtype(stack_inputs(inputs), self.dtype)
        return shaped_for(self.defaults, guarded(self.framework, lambda: self._run(matrix, names), self.input_errors))

    def _run(self, matrix: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if "predict" in names:
            found["predict"] = self._value(matrix)
        if "predict_proba" in names or "label" in names:
            proba = self._probabilities(matrix, found.get("predict"))
            found["predict_proba"] = proba
            found["label"] = (proba[:, 1] > 0.5 if self.kind == "binary" else np.argmax(proba, axis=1)).astype(np.int64)
        return {name: found[name] for name in names}

    def _value(self, matrix: np.ndarray) -> np.ndarray:
        """The default answer: ``Booster.predict`` (see the module's description)."""
        raise NotImplementedError

    def _probabilities(self, matrix: np.ndarray, value: np.ndarray | None) -> np.ndarray:
        """``[N, classes]`` probabilities; ``value`` is ``_value(matrix)`` when already computed."""
        raise NotImplementedError

    def input_metadata(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def output_metadata(self) -> list[dict[str, Any]]:
        meta = [tensor_info("predict", self.dtype, self.value_shape)]
        if self.kind != "regression":
            meta += [tensor_info("predict_proba", self.dtype, [-1, self.num_class]),
                     tensor_info("label", np.int64, [-1])]
        return metadata_for(self.defaults, meta)

    def size_bytes(self) -> int:
        """The artifact's size on disk (close to the loaded trees; an upper bound for text formats)."""
        return self._size


def binary_columns(positive: np.ndarray, dtype: Any) -> np.ndarray:
    """``[1-p, p]`` rows from P(positive class), as scikit-learn's ``predict_proba``."""
    positive = positive.reshape(-1)
    return np.column_stack([1.0 - positive, positive]).astype(dtype)
