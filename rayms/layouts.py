"""The model repository layouts of the servers rayms replaces, read into specs: MLServer's and Triton's.

A team leaving MLServer or Triton brings its repository folder as it is. Each reader turns one model's
description into a :class:`~rayms.config.ModelSpec` that answers as that server did, or raises
:class:`~rayms.errors.InvalidSpec` with the reason the model cannot be served; :mod:`rayms.repository`
walks the folder and keeps the good specs apart from the reasons.

MLServer (``model-settings.json``, found in the repository and in any folder below it, as MLServer does):

* ``implementation`` picks the framework (``mlserver_sklearn.SKLearnModel``, ``mlserver_xgboost.XGBoostModel``,
  ``mlserver_lightgbm.LightGBMModel``); any other runtime is refused, naming it.
* ``name`` (default: the folder's name); ``parameters.uri`` relative to the file's folder (default: the
  folder), where a folder holding the runtime's well-known file (``model.joblib``, ``model.json``, ...)
  means that file, as in MLServer; ``parameters.version`` becomes the spec's version.
* ``max_batch_size`` and ``max_batch_time`` (seconds) become rayms's ``max_batch_size`` and
  ``max_batch_latency_ms`` when both enable batching (MLServer's rule), the latency capped at rayms's 1 s.
* ``parameters.extra.predict_fn: predict_proba`` (the scikit-learn runtime's default output) becomes
  ``predict_proba: true``; every spec gets ``answer_as: mlserver``.
* Several files naming the same model are versions: the one MLServer serves by default wins (no
  version, else the highest, compared as integers when both are).

Triton (``<name>/config.pbtxt`` with ``<name>/<version>/model.onnx``), ONNX backend only:

* ``platform: "onnxruntime_onnx"`` or ``backend: "onnxruntime"`` (or neither, with an ``.onnx`` file);
  ``default_model_filename`` is honoured; ``name``, when given, must be the folder's name, as in Triton.
* ``version_policy`` (``latest { num_versions }`` by default, ``all``, ``specific { versions }``) selects
  versions among the numeric sub-folders; the newest selected one is served, under its number.
* The outputs listed in ``output`` are what a request that names none gets, under their own names (all
  the model's outputs when the config lists none); inputs are matched by the names the config gives.
* ``dynamic_batching`` with ``max_batch_size`` > 1 becomes rayms batching (``max_queue_delay_microseconds``
  as the latency).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rayms import pbtxt
from rayms.config import ModelSpec, validate_model_name
from rayms.errors import InvalidSpec

logger = logging.getLogger("rayms.repository")

MODEL_SETTINGS = "model-settings.json"
TRITON_CONFIG = "config.pbtxt"
MAX_BATCH_LATENCY_MS = 1000.0
# MLServer runtime -> (rayms framework, the file names the runtime looks for in a folder, in its order)
MLSERVER_RUNTIMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlserver_sklearn.SKLearnModel": ("sklearn", ("model.joblib", "model.pickle", "model.pkl")),
    "mlserver_xgboost.XGBoostModel": ("xgboost", ("model.bst", "model.json", "model.ubj")),
    "mlserver_lightgbm.LightGBMModel": ("lightgbm", ("model.bst",)),
}
# The same classes by the module that defines them.
MLSERVER_RUNTIMES.update({
    "mlserver_sklearn.sklearn.SKLearnModel": MLSERVER_RUNTIMES["mlserver_sklearn.SKLearnModel"],
    "mlserver_xgboost.xgboost.XGBoostModel": MLSERVER_RUNTIMES["mlserver_xgboost.XGBoostModel"],
    "mlserver_lightgbm.lightgbm.LightGBMModel": MLSERVER_RUNTIMES["mlserver_lightgbm.LightGBMModel"],
})
TRITON_ONNX = {"platform": "onnxruntime_onnx", "backend": "onnxruntime"}


# ------------------------------------------------------------------------------------------ MLServer
MAX_CONFIG_BYTES = 1 << 20  # a model-settings.json or config.pbtxt is a few hundred bytes


def _read_text(path: Path) -> str:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidSpec(f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes: not a configuration file")
    return path.read_text()


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(_read_text(path))
    except (OSError, ValueError, RecursionError) as exc:
        raise InvalidSpec(f"{path.name} cannot be read: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidSpec(f"{path.name} must hold a JSON object, not {type(value).__name__}")
    return value


def mlserver_name(settings_file: Path) -> str:
    """The name MLServer gives the model of ``settings_file``, read without judging the rest."""
    try:
        name = json.loads(_read_text(settings_file)).get("name")
    except (OSError, ValueError, AttributeError, RecursionError, InvalidSpec):
        name = None
    return name if isinstance(name, str) and name else settings_file.parent.name


def _storage_uri(folder: Path, uri: Any, wellknown: tuple[str, ...]) -> str:
    if uri is None:
        uri = "."
    if not isinstance(uri, str) or not uri:
        raise InvalidSpec(f"parameters.uri must be a path or URI, got {uri!r}")
    if urlparse(uri).scheme not in ("", "file"):  # s3://, gs://, https://...: fetched like any storageUri
        return uri
    path = Path(uri.removeprefix("file://"))
    path = path if path.is_absolute() else (folder / path).resolve()
    if path.is_dir():
        # MLServer's runtimes take their well-known file in a folder; the folder itself otherwise.
        return str(next((path / name for name in wellknown if (path / name).is_file()), path))
    if not path.exists():
        raise InvalidSpec(f"parameters.uri {uri!r} does not exist ({path})")
    return str(path)


def _mlserver_batching(settings: dict[str, Any]) -> dict[str, Any]:
    size, seconds = settings.get("max_batch_size", 0), settings.get("max_batch_time", 0.0)
    for field, value in (("max_batch_size", size), ("max_batch_time", seconds)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidSpec(f"{field} must be a non-negative number, got {value!r}")
    if size <= 1 or seconds <= 0:  # MLServer's rule: batching needs both
        return {}
    latency_ms = min(float(seconds) * 1000, MAX_BATCH_LATENCY_MS)
    if latency_ms < float(seconds) * 1000:
        logger.warning("max_batch_time %ss is above rayms's limit; batching waits at most %.0f ms", seconds,
                       MAX_BATCH_LATENCY_MS)
    return {"max_batch_size": int(size), "max_batch_latency_ms": latency_ms}


def mlserver_spec(settings_file: Path) -> tuple[str, ModelSpec]:
    """``(name, spec)`` of the model one ``model-settings.json`` describes."""
    settings = read_json_object(settings_file)
    folder = settings_file.parent
    name = validate_model_name(mlserver_name(settings_file))
    implementation = settings.get("implementation")
    if not implementation:
        raise InvalidSpec(f"{MODEL_SETTINGS} names no implementation (the MLServer runtime to use)")
    if not isinstance(implementation, str) or implementation not in MLSERVER_RUNTIMES:
        known = ", ".join(k for k in MLSERVER_RUNTIMES if k.count(".") == 1)
        raise InvalidSpec(f"the MLServer runtime {implementation!r} is not one rayms serves; it serves {known} "
                          "(and its own custom models: framework custom)")
    framework, wellknown = MLSERVER_RUNTIMES[implementation]
    parameters = settings.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidSpec("parameters must be a JSON object")
    options: dict[str, Any] = {"answer_as": "mlserver", **_mlserver_batching(settings)}
    extra = parameters.get("extra") or {}
    if not isinstance(extra, dict):
        raise InvalidSpec("parameters.extra must be a JSON object")
    predict_fn = extra.get("predict_fn", "predict")
    if predict_fn == "predict_proba":
        options["predict_proba"] = True
    elif predict_fn != "predict":
        raise InvalidSpec(f"parameters.extra.predict_fn {predict_fn!r} is not supported (use predict or predict_proba)")
    version = parameters.get("version")
    spec = ModelSpec.parse({"storageUri": _storage_uri(folder, parameters.get("uri"), wellknown),
                            "framework": framework, "parameters": options,
                            "version": str(version) if version is not None else None}, name=name)
    return name, spec


def _version_key(version: str | None) -> tuple[int, int, str]:
    """MLServer's default version order: no version first, then integers, then strings."""
    if version is None:
        return (2, 0, "")
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def newest(specs: list[ModelSpec]) -> ModelSpec:
    """Of several versions of one model, the one MLServer serves when a request names none."""
    return max(specs, key=lambda spec: _version_key(spec.version))


# ------------------------------------------------------------------------------------------ Triton
def _versions(config: pbtxt.Message, on_disk: list[int]) -> list[int]:
    """The versions (ascending) the config's version policy selects among those on disk."""
    policy = pbtxt.single(config, "version_policy", {"latest": [{}]}, kind=dict)
    if "all" in policy:
        return on_disk
    if "specific" in policy:
        wanted = pbtxt.single(policy, "specific", kind=dict).get("versions", [])
        if not wanted or not all(isinstance(v, int) and not isinstance(v, bool) for v in wanted):
            raise InvalidSpec(f"{TRITON_CONFIG}: version_policy specific needs integer versions, got {wanted!r}")
        return [v for v in on_disk if v in wanted]
    count = pbtxt.single(pbtxt.single(policy, "latest", {}, kind=dict), "num_versions", 1, kind=int)
    if count < 1:
        raise InvalidSpec(f"{TRITON_CONFIG}: version_policy latest num_versions must be at least 1, got {count!r}")
    return on_disk[-count:]


def _triton_batching(config: pbtxt.Message) -> dict[str, Any]:
    size = pbtxt.single(config, "max_batch_size", 0, kind=int)
    dynamic = pbtxt.single(config, "dynamic_batching", kind=dict)
    if dynamic is None or size <= 1:
        return {}
    delay_us = pbtxt.single(dynamic, "max_queue_delay_microseconds", 0, kind=int)
    return {"max_batch_size": size, "max_batch_latency_ms": min(max(delay_us, 0) / 1000, MAX_BATCH_LATENCY_MS)}


def triton_spec(folder: Path) -> ModelSpec:
    """The spec of the Triton model in ``folder`` (holding ``config.pbtxt``): its served version's file."""
    try:
        config = pbtxt.parse(_read_text(folder / TRITON_CONFIG))
        return _triton_spec(folder, config)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"{TRITON_CONFIG} cannot be read: {exc}") from exc
    except pbtxt.PbtxtError as exc:
        raise InvalidSpec(f"{TRITON_CONFIG}: {exc}") from exc


def _triton_spec(folder: Path, config: pbtxt.Message) -> ModelSpec:
    declared = pbtxt.single(config, "name", kind=str)
    if declared not in (None, "", folder.name):
        raise InvalidSpec(f"{TRITON_CONFIG} names the model {declared!r}, but its folder is {folder.name!r} "
                          "(Triton requires them to match)")
    for field, onnx in TRITON_ONNX.items():
        value = pbtxt.single(config, field, kind=str)
        if value not in (None, "", onnx):
            raise InvalidSpec(f"Triton {field} {value!r} is not one rayms serves; it serves ONNX models "
                              f"({', '.join(f'{k} {v!r}' for k, v in TRITON_ONNX.items())})")
    on_disk = {int(p.name): p for p in folder.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()}
    selected = _versions(config, sorted(on_disk))
    if not selected:
        raise InvalidSpec(f"no version folder the version policy selects (found: {sorted(on_disk) or 'none'})")
    version = selected[-1]
    filename = pbtxt.single(config, "default_model_filename", kind=str) or "model.onnx"
    if Path(filename).name != filename or filename in (".", ".."):
        raise InvalidSpec(f"{TRITON_CONFIG}: default_model_filename must be a file name, got {filename!r}")
    artifact = on_disk[version] / filename
    if not artifact.is_file():
        raise InvalidSpec(f"version {version} has no {filename}")
    outputs = [pbtxt.single(o, "name", kind=str) for o in pbtxt.messages(config, "output")]
    if not all(outputs):
        raise InvalidSpec(f"{TRITON_CONFIG}: every output needs a name")
    options = {"default_outputs": outputs or "all", **_triton_batching(config)}
    return ModelSpec.parse({"storageUri": str(artifact), "framework": "onnx", "parameters": options,
                            "version": str(version)}, name=folder.name)
