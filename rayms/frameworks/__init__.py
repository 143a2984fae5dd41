"""Framework runtimes: turn one model artifact into something that predicts on numpy arrays.

This package exists so the rest of rayms never touches an ML library. It finds the model file in a
storage folder (KServe's rule: a folder holding exactly one model file, or the file itself), maps a
framework name (:mod:`rayms.framework_table`) to its module with :mod:`importlib` and returns a
:class:`ModelRuntime`. No ML library is imported here; each one is imported by its own module, only
when a model of that framework loads.

Conventions shared by every runtime:

* ``predict(inputs, parameters, requested=..., input_names=...)`` takes the tensors a client sent.
  Tabular runtimes (sklearn, xgboost, lightgbm) use one 2-D tensor as the feature matrix; several
  tensors, or a 1-D one, are column-stacked (a 1-D tensor of length N is one feature column of N rows).
* The default output is ``predict``: what the framework's own server (KServe's) answered, e.g.
  ``Booster.predict`` for XGBoost and LightGBM (see each runtime). The parameter ``predict_proba: true``
  (per request, or per model in ``ModelSpec.parameters``) makes it ``predict_proba``; a model's
  ``default_outputs`` parameter names others; naming outputs in ``requested`` (the V2 ``outputs`` field)
  returns exactly those, e.g. ``["predict", "predict_proba"]`` for both.
* Every runtime runs its library with one intra-op thread: many models share one replica, and the
  replica's request concurrency is the parallelism, not a thread pool per model.
* A bad input (wrong feature count, uncastable data) is :class:`InvalidInput`; any other predict
  failure is :class:`InferenceError`; a corrupt artifact is :class:`ModelLoadError`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rayms import framework_table
from rayms.errors import InferenceError, InvalidInput, InvalidSpec, ModelLoadError, RaymsError
from rayms.frameworks.sniff import is_model_of, sniff_booster

EXTENSIONS: dict[str, tuple[str, ...]] = {f.name: f.extensions for f in framework_table.TABLE if f.extensions}
# Predict options a request may set too, and those only a model's spec sets (see parse_parameters).
REQUEST_PARAMETERS = ("predict_proba",)
MODEL_PARAMETERS = ("predict_proba", "default_outputs", "answer_as")
ANSWER_STYLES = ("kserve", "mlserver")
# V2/Triton request parameters that carry no predict option (the codec uses them); accepted, ignored.
PROTOCOL_PARAMETERS = ("content_type", "headers", "binary_data_output")
# Files that can sit next to a model and share an extension with one (``.json``, ``.txt``).
_NOT_MODELS = {"model-settings.json", "settings.json", "requirements.txt", "metadata.json"}
_NOT_MODEL_STEMS = {"readme", "license", "licence", "notice", "changelog"}
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")  # "[14:44:02] src/json.cc:409: " (XGBoost)


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded model, safe to call from several threads at once. ``input_metadata`` and
    ``output_metadata`` give V2 ``{name, datatype, shape}`` dicts (-1 for any size); the outputs listed
    are every name a client may request."""

    framework: str
    path: Path

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...

    def input_metadata(self) -> list[dict[str, Any]]: ...

    def output_metadata(self) -> list[dict[str, Any]]: ...

    def size_bytes(self) -> int: ...


def _candidates(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        and p.name.lower() not in _NOT_MODELS and p.stem.lower() not in _NOT_MODEL_STEMS
    )


def _only_subfolder(folder: Path) -> Path | None:
    """An extracted archive often wraps the model in one folder: look through it."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else None


def _check_framework(framework: str) -> str:
    return framework_table.canonical(framework)


def _by_content(files: list[Path], framework: str) -> list[Path]:
    """Several candidates: drop the ``.bst``/``.json`` files whose content is not a ``framework`` model
    (a configuration ``.json`` beside an XGBoost model, say)."""
    return [p for p in files if is_model_of(p, framework)] if len(files) > 1 else files


def resolve_model_file(path: Path | str, framework: str) -> Path:
    """Return the model file at ``path``: the file itself, or the one model file in the folder."""
    framework, path = _check_framework(framework), Path(path)
    extensions = EXTENSIONS[framework]
    if path.is_file():
        if path.suffix.lower() not in extensions:
            expected = ", ".join(extensions)
            raise ModelLoadError(f"{path.name} is not a {framework} model file (expected {expected})")
        return path
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    found = _by_content(_candidates(path, extensions), framework)
    if not found and (inner := _only_subfolder(path)) is not None:
        return resolve_model_file(inner, framework)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise ModelLoadError(
            f"model folder {path} must hold exactly one {framework} model file "
            f"({', '.join(extensions)}), found {what}")
    return found[0]


def framework_from_extension(path: Path | str) -> str:
    """Guess the framework of a file, or of the one model file in a folder: by extension, and by content
    where the extension allows two (``.bst``) or also names configuration files (``.json``)."""
    path = Path(path)
    if not path.exists():
        raise InvalidSpec(f"model path {path} does not exist")
    every = tuple(dict.fromkeys(ext for exts in EXTENSIONS.values() for ext in exts))
    files = [path] if path.is_file() else _candidates(path, every)
    if len(files) > 1:  # a .json beside a model is configuration unless it holds an XGBoost model
        files = [p for p in files if p.suffix.lower() != ".json" or sniff_booster(p) == "xgboost"]
    if not files and (inner := _only_subfolder(path)) is not None:
        return framework_from_extension(inner)
    if not files:
        raise InvalidSpec(f"no model file in {path} (looked for {', '.join(every)})")
    if len(files) != 1:
        raise InvalidSpec(f"cannot tell the framework of {path}: it holds {len(files)} model files "
                          f"({', '.join(p.name for p in files)}); name the framework explicitly")
    choices = framework_table.by_extension(files[0].suffix)
    if len(choices) > 1:
        found = sniff_booster(files[0])
        if found not in choices:
            raise InvalidSpec(f"cannot tell the framework of {files[0].name}: its content is in no "
                              f"{' or '.join(choices)} model format; name the framework explicitly")
        return found
    if not choices:
        raise InvalidSpec(f"cannot tell the framework of {files[0].name} from its extension")
    return choices[0]


def load_runtime(framework: str, path: Path | str, parameters: Mapping[str, Any] | None = None, *,
                 allow_code: bool = False) -> ModelRuntime:
    """Load the model at ``path`` (file or folder). ``parameters`` are model-level predict defaults
    (``ModelSpec.parameters``); an unknown one is :class:`InvalidSpec`. ``framework: custom`` runs the
    user's class (:mod:`rayms.frameworks.custom`), which takes any parameters, and only when
    ``allow_code`` (``Settings.allow_custom_code``) says so."""
    framework = _check_framework(framework)
    if framework == "custom":
        from rayms.frameworks import custom

        return custom.load(Path(path), dict(parameters or {}), allow_code=allow_code)
    defaults = parse_parameters({}, parameters or {}, error=InvalidSpec, strict=True)
    model_file = resolve_model_file(path, framework)
    module = importlib.import_module(f"rayms.frameworks.{framework}")
    return module.load(model_file, defaults)


def measure_size(runtime: ModelRuntime) -> int:
    """Estimated memory of a loaded model in bytes (its artifact's size on disk; see ``size_bytes``)."""
    return runtime.size_bytes()


def require(library: str, framework: str) -> Any:
    """Import ``library`` for ``framework`` or fail with the install hint."""
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        hint = f"pip install 'rayms[{framework}]'"
        raise ModelLoadError(f"framework {framework} needs {library}: {hint} ({exc})") from exc


def library_message(exc: BaseException, with_type: bool = False) -> str:
    """The library's own message, without the C++ time/source prefix and stack trace XGBoost adds."""
    text = _CPP_PREFIX.sub("", str(exc).split("Stack trace:")[0].strip())
    if with_type or not text:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def parse_parameters(defaults: Mapping[str, Any], parameters: Mapping[str, Any],
                     error: type[RaymsError] = InvalidInput, strict: bool = False) -> dict[str, Any]:
    """Merge request parameters over model defaults, rejecting bad values of the ones we know.

    Request parameters we do not know are ignored: the protocol passes parameters through, and clients
    send their own (Triton's ``sequence_id``, ``priority``, ``triton_*``...). Model-level parameters are
    configuration, so ``strict`` refuses unknown names there; it also admits the options only a model sets:

    * ``predict_proba`` (true/false): answer ``predict_proba`` instead of the default outputs.
    * ``default_outputs``: the output names a request that names none gets, or ``"all"`` for every output
      under the model's own names (set for models from a Triton repository).
    * ``answer_as``: ``kserve`` (default) or ``mlserver``, whose server's answers to copy where the two
      differ (set for models from an MLServer repository): MLServer's shapes (:func:`shaped_for`) and its
      XGBoost runtime's ``predict`` (see that runtime)."""
    merged = dict(defaults)
    known = MODEL_PARAMETERS if strict else REQUEST_PARAMETERS
    for key, value in parameters.items():
        if key in PROTOCOL_PARAMETERS:
            continue
        if key not in known:
            if strict:
                raise error(f"unknown parameter {key!r}; supported: {', '.join(MODEL_PARAMETERS)}")
            continue
        merged[key] = _PARSERS[key](key, value, error)
    return merged


def _boolean(key: str, value: Any, error: type[RaymsError]) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise error(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def _output_names(key: str, value: Any, error: type[RaymsError]) -> list[str] | str:
    if value == "all":
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise error(f"parameter {key!r} must be a list of output names or \"all\", got {value!r}")
    return list(dict.fromkeys(value))


def _answer_style(key: str, value: Any, error: type[RaymsError]) -> str:
    if value not in ANSWER_STYLES:
        raise error(f"parameter {key!r} must be one of {', '.join(ANSWER_STYLES)}, got {value!r}")
    return value


_PARSERS = {"predict_proba": _boolean, "default_outputs": _output_names, "answer_as": _answer_style}


def choose_outputs(requested: Sequence[str] | None, proba: bool, available: Sequence[str],
                   default: Sequence[str] = ("predict",)) -> list[str]:
    """Which outputs to compute: the requested ones, else ``predict_proba`` or the default."""
    if requested:
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; available: {', '.join(available)}")
        return list(dict.fromkeys(requested))
    if proba:
        if "predict_proba" not in available:
            raise InvalidInput("predict_proba is not available: this model does not return probabilities")
        return ["predict_proba"]
    return list(default)


def default_outputs(defaults: Mapping[str, Any], available: Sequence[str], fallback: Sequence[str],
                    every: Sequence[str] | None = None) -> list[str]:
    """What a request that names no outputs gets: the model's ``default_outputs`` (``"all"`` means
    ``every``, by default ``available``), else ``fallback``. Checked once, when the model loads."""
    configured = defaults.get("default_outputs")
    if configured is None:
        return list(fallback)
    if configured == "all":
        return list(every if every is not None else available)
    unknown = [name for name in configured if name not in available]
    if unknown:
        raise InvalidSpec(f"parameter 'default_outputs' names unknown output(s) {', '.join(unknown)}; "
                          f"this model has {', '.join(available)}")
    return list(configured)


def outputs_for(defaults: Mapping[str, Any], parameters: Mapping[str, Any] | None, requested: Sequence[str] | None,
                available: Sequence[str], default: Sequence[str] = ("predict",)) -> list[str]:
    """The outputs one predict call computes: the request's parameters over the model's, then the choice."""
    options = parse_parameters(defaults, parameters or {})
    return choose_outputs(requested, options.get("predict_proba", False), available, default)


def shaped_for(defaults: Mapping[str, Any], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs in the shapes the copied server answered: MLServer's codec gives a 1-D output a trailing
    dimension (``[N]`` is sent as ``[N, 1]``), so ``answer_as: mlserver`` does too."""
    if defaults.get("answer_as") != "mlserver":
        return outputs
    return {name: value.reshape(-1, 1) if value.ndim == 1 else value for name, value in outputs.items()}


def metadata_for(defaults: Mapping[str, Any], outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output metadata with the shapes :func:`shaped_for` answers in."""
    if defaults.get("answer_as") != "mlserver":
        return outputs
    return [meta | {"shape": [*meta["shape"], 1]} if len(meta["shape"]) == 1 else meta for meta in outputs]


def stack_inputs(inputs: Sequence[np.ndarray]) -> np.ndarray:
    """One feature matrix from the client's tensors: a 2-D tensor as is, else columns side by side."""
    arrays = [np.asarray(a) for a in inputs]
    if not arrays:
        raise InvalidInput("the request has no input tensors")
    for i, array in enumerate(arrays):
        if array.ndim not in (1, 2):
            raise InvalidInput(f"input {i} has shape {list(array.shape)}; tabular models take 1-D or 2-D")
    if len(arrays) == 1 and arrays[0].ndim == 2:
        return arrays[0]
    if len({a.shape[0] for a in arrays}) > 1:
        raise InvalidInput(f"inputs have different row counts: {[a.shape[0] for a in arrays]}")
    return np.column_stack(arrays)


def as_dtype(matrix: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast client data to the model's dtype (int to float works; text to float is InvalidInput)."""
    target = np.dtype(dtype)
    if matrix.dtype.kind == "f" and target.kind in "iub":
        raise InvalidInput(f"input of type {matrix.dtype} would be truncated to the model's {target}")
    try:
        return np.ascontiguousarray(matrix, dtype=target)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input of type {matrix.dtype} cannot be used as {target}: {exc}") from exc


def guarded(framework: str, call: Callable[[], Any], input_errors: tuple[type[BaseException], ...]) -> Any:
    """Run a library call: its input errors become InvalidInput, anything else InferenceError."""
    try:
        return call()
    except RaymsError:
        raise
    except input_errors as exc:
        raise InvalidInput(f"{framework}: {library_message(exc)}") from exc
    except Exception as exc:
        raise InferenceError(f"{framework} prediction failed: {library_message(exc)}") from exc


def v2_datatype(dtype: Any) -> str:
    """The Open Inference Protocol name of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return "BOOL"
    prefix = {"f": "FP", "i": "INT", "u": "UINT"}.get(dtype.kind)
    return f"{prefix}{dtype.itemsize * 8}" if prefix else "BYTES"


def tensor_info(name: str, dtype: Any, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "datatype": v2_datatype(dtype), "shape": list(shape)}
