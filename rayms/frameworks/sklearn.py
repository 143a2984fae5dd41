"""scikit-learn runtime: serves any pickled estimator or pipeline that has ``predict``.

It exists to keep joblib/scikit-learn out of every other module. Decisions:

* Every extension (``.joblib``, ``.pkl``, ``.pickle``) is read with :func:`joblib.load`, which also reads
  plain pickles; many ``.pkl`` files are in fact written by ``joblib.dump`` and ``pickle`` cannot read
  those. Unpickling runs code from the artifact: serve only trusted models.
* Every ``n_jobs`` parameter (also inside pipelines and meta-estimators) is set to 1. Predicting a
  small batch with a forest through a joblib pool costs more than it saves, and the replica already
  runs requests concurrently.
* ``predict`` is the estimator's ``predict``; ``predict_proba`` (classifiers that have it) is its
  ``predict_proba``; both are computed by the estimator itself, so they match it exactly.
* ``answer_as: mlserver`` (models from an MLServer repository) answers in MLServer's shapes: a 1-D output
  such as ``predict``'s labels is ``[N, 1]``, as MLServer's codec sends it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import ModelLoadError
from rayms.frameworks import (
    default_outputs, guarded, library_message, metadata_for, outputs_for, require, shaped_for, stack_inputs,
    tensor_info,
)

logger = logging.getLogger(__name__)


def single_thread(model: Any) -> list[str]:
    """Set every ``n_jobs`` of the estimator (deep) to 1; return the parameter names changed."""
    if not hasattr(model, "get_params") or not hasattr(model, "set_params"):
        return []
    try:
        names = [key for key in model.get_params(deep=True) if key == "n_jobs" or key.endswith("__n_jobs")]
        if names:
            model.set_params(**dict.fromkeys(names, 1))
        return names
    except Exception as exc:  # an estimator with unusual params must still load
        logger.warning("could not set n_jobs=1 on %s: %s", type(model).__name__, exc)
        return []


class SklearnRuntime:
    framework = "sklearn"

    def __init__(self, path: Path, model: Any, defaults: Mapping[str, Any]) -> None:
        self.path, self.model, self.defaults = path, model, dict(defaults)
        self.outputs = ("predict", "predict_proba") if hasattr(model, "predict_proba") else ("predict",)
        self.default = default_outputs(self.defaults, self.outputs, ("predict",))
        self._size = path.stat().st_size

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs_for(self.defaults, parameters, requested, self.outputs, self.default)
        matrix = stack_inputs(inputs)
        return shaped_for(self.defaults, guarded(
            self.framework,
            lambda: {name: np.asarray(getattr(self.model, name)(matrix)) for name in names},
            (ValueError, TypeError),
        ))

    def input_metadata(self) -> list[dict[str, Any]]:
        features = getattr(self.model, "n_features_in_", -1)
        return [tensor_info("input-0", np.float64, [-1, features])]

    def output_metadata(self) -> list[dict[str, Any]]:
        classes = getattr(self.model, "classes_", None)
        label_dtype = np.asarray(classes).dtype if classes is not None else np.float64
        meta = [tensor_info("predict", label_dtype, [-1])]
        if "predict_proba" in self.outputs:
            meta.append(tensor_info("predict_proba", np.float64, [-1, len(classes) if classes is not None else -1]))
        return metadata_for(self.defaults, meta)

    def size_bytes(self) -> int:
        """The artifact's size on disk: a pickle holds the estimator's arrays nearly byte for byte."""
        return self._size


def load(path: Path, defaults: Mapping[str, Any]) -> SklearnRuntime:
    joblib = require("joblib", "sklearn")
    require("sklearn", "sklearn")
    try:
        model = joblib.load(path)
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load sklearn model {path.name}: {message}") from exc
    if not callable(getattr(model, "predict", None)):
        raise ModelLoadError(f"{path.name} holds a {type(model).__name__}, which has no predict method")
    single_thread(model)
    return SklearnRuntime(path, model, defaults)
