"""ONNX runtime: serves an ``.onnx`` graph with onnxruntime on the CPU.

It exists to keep onnxruntime out of every other module. Decisions:

* One :class:`onnxruntime.InferenceSession` per model with ``intra_op_num_threads=1`` and
  ``inter_op_num_threads=1`` (many models share a replica) on ``CPUExecutionProvider``.
* Inputs: when every tensor the client named is a model input, they are matched by name; otherwise by
  position. Several tensors sent to a single-input model are column-stacked into one matrix. Each is
  cast to the input's declared type (int to float works; float to int is refused, not truncated).
* Outputs: by default every model output is returned, the first one under the name ``predict`` and
  the others under their own names. A client may request any model output by its own name, ``predict``
  (the first output) or ``predict_proba``: the first other output whose name contains ``prob`` (as
  skl2onnx's ``probabilities``/``output_probability``); ``predict_proba: true`` returns only that one.
  The ``default_outputs`` parameter changes the default: ``"all"`` answers every output under its own
  name (a model from a Triton repository answers as Triton did), a list answers those.
  A ZipMap output (a list of ``{label: probability}``) is turned into an ``[N, classes]`` array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import InvalidInput, ModelLoadError
from rayms.frameworks import (
    as_dtype, default_outputs, guarded, library_message, outputs_for, require, stack_inputs, tensor_info,
)

_TYPES = {
    "float": np.float32, "double": np.float64, "float16": np.float16, "bool": np.bool_, "string": np.object_,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}


def numpy_type(onnx_type: str) -> Any:
    """``tensor(float)`` -> float32; sequences and maps (ZipMap) report float32, as they are converted."""
    inner = onnx_type.removeprefix("tensor(").removesuffix(")")
    return _TYPES.get(inner, np.float32)


def _dims(shape: Any) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in (shape or [])] or [-1, -1]


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        labels = list(value[0])
        return np.array([[row[label] for label in labels] for row in value], dtype=np.float32)
    return np.asarray(value)


class OnnxRuntime:
    framework = "onnx"

    def __init__(self, path: Path, session: Any, defaults: Mapping[str, Any], input_errors: tuple) -> None:
        self.path, self.session, self.defaults = path, session, dict(defaults)
        self.input_errors = input_errors
        self.inputs, self.model_outputs = session.get_inputs(), session.get_outputs()
        names = [o.name for o in self.model_outputs]
        self.aliases = {"predict": names[0]}
        proba = next((n for n in names[1:] if "prob" in n.lower()), None)
        if proba is not None:
            self.aliases["predict_proba"] = proba
        self.outputs = tuple(dict.fromkeys([*self.aliases, *names]))
        # By default the first output is answered as "predict"; a Triton model answers its own names ("all").
        self.default = default_outputs(self.defaults, self.outputs, ["predict", *names[1:]], every=names)
        self._size = path.stat().st_size

    def _feeds(self, inputs: Sequence[np.ndarray], input_names: Sequence[str] | None) -> dict[str, np.ndarray]:
        arrays = [np.asarray(a) for a in inputs]
        wanted = [i.name for i in self.inputs]
        if input_names and len(input_names) == len(arrays) and set(input_names) <= set(wanted):
            by_name = dict(zip(input_names, arrays))
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise InvalidInput(f"onnx: missing input(s) {', '.join(missing)}")
            arrays = [by_name[name] for name in wanted]
        elif len(self.inputs) == 1 and len(arrays) > 1:
            arrays = [stack_inputs(arrays)]
        if len(arrays) != len(self.inputs):
            raise InvalidInput(f"onnx: the model takes {len(self.inputs)} input(s) ({', '.join(wanted)}), "
                               f"got {len(arrays)}")
        return {spec.name: as_dtype(a, numpy_type(spec.type)) for spec, a in zip(self.inputs, arrays)}

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs_for(self.defaults, parameters, requested, self.outputs, self.default)
        feeds = self._feeds(inputs, input_names)
        fetch = list(dict.fromkeys(self.aliases.get(name, name) for name in names))
        values = guarded(self.framework, lambda: self.session.run(fetch, feeds), self.input_errors)
        found = dict(zip(fetch, values))
        return {name: _as_array(found[self.aliases.get(name, name)]) for name in names}

    def input_metadata(self) -> list[dict[str, Any]]:
        return [tensor_info(i.name, numpy_type(i.type), _dims(i.shape)) for i in self.inputs]

    def output_metadata(self) -> list[dict[str, Any]]:
        """Every name a client may request: the aliases first, then the model's own outputs."""
        by_name = {o.name: o for o in self.model_outputs}
        specs = [(name, by_name[self.aliases.get(name, name)]) for name in self.outputs]
        return [tensor_info(name, numpy_type(o.type), _dims(o.shape)) for name, o in specs]

    def size_bytes(self) -> int:
        """The artifact's size on disk: the weights dominate a loaded session's memory."""
        return self._size


def load(path: Path, defaults: Mapping[str, Any]) -> OnnxRuntime:
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = library_message(exc, with_type=True)
        raise ModelLoadError(f"cannot load onnx model {path.name}: {message}") from exc
    # onnxruntime reports bad shapes and types as InvalidArgument; everything else is a model failure.
    errors = require("onnxruntime.capi.onnxruntime_pybind11_state", "onnx")
    return OnnxRuntime(path, session, defaults, (errors.InvalidArgument,))
