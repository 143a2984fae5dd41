"""Custom models: a class the user writes, served with the same lifecycle as a built-in framework.

A spec says ``framework: custom`` and names the class in ``parameters.implementation``, the way MLServer's
``model-settings.json`` names a runtime: ``"package.module.ClassName"`` from an installed package, or
``"module.ClassName"`` where ``module.py`` sits beside the artifact (in the model's folder). The class is
rayms's only contract with the user's code::

    class MyModel:
        @classmethod
        def load(cls, path: pathlib.Path, parameters: dict) -> "MyModel":
            ...                      # path: the model's folder or file, as fetched from storageUri

        def predict(self, inputs: dict[str, np.ndarray], parameters: dict) -> np.ndarray | dict[str, np.ndarray]:
            ...                      # inputs by tensor name, in request order (V1 rows arrive as "input-0")

        def metadata(self) -> dict:  # optional: {"inputs": [...], "outputs": [...]} as V2 {name, datatype, shape}
        def size_bytes(self) -> int: # optional: memory the loaded model holds (default: its files' size)

``path`` is for ``load`` only: read there everything the model needs, since a copied artifact may leave the
node's cache once the model is loaded (:mod:`rayms.agent`; a local path used in place stays).
``load`` gets the spec's parameters except ``implementation`` and rayms's own predict options; ``predict``
gets those with the request's parameters over them. One array answers as the output ``predict``; a dict
answers its names, and a request's V2 ``outputs`` pick among them. A ``ValueError``/``TypeError`` from
``predict`` is the client's bad input (400), anything else a model failure (500); a failing ``load`` leaves
the model FAILED with the error. Batching, eviction and memory accounting are the same as for any model.

Importing the class runs its code inside the replica, so it is refused unless the operator allows it
(``Settings.allow_custom_code``, ``RAYMS_ALLOW_CUSTOM_CODE=true``). A ``module.py`` beside the artifact is
imported under a name of its own per folder, so two models may each have a ``model.py``; while it runs, its
folder is on ``sys.path`` for the helper modules it imports (those keep their plain names: make them unique).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayms.errors import InvalidInput, InvalidSpec, ModelLoadError
from rayms.frameworks import MODEL_PARAMETERS, guarded, library_message, parse_parameters

_IMPORT_LOCK = threading.Lock()  # sys.path is process-wide: one file import at a time


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _import_from_folder(folder: Path, module_name: str) -> Any:
    source = folder / f"{module_name}.py"
    unique = f"rayms_custom_{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}_{module_name}"
    with _IMPORT_LOCK:
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
        finally:
            sys.path.remove(str(folder))
    return module


def find_class(implementation: str, path: Path) -> Any:
    """The class ``implementation`` names: from ``<module>.py`` beside the artifact, else installed."""
    module_name, _, class_name = implementation.rpartition(".")
    if not module_name or not class_name:
        raise InvalidSpec(f"parameter 'implementation' must name a class as 'module.ClassName', got {implementation!r}")
    folder = _folder_of(path)
    try:
        if "." not in module_name and (folder / f"{module_name}.py").is_file():
            module = _import_from_folder(folder, module_name)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"cannot import {module_name} for custom model class {implementation}: "
                             f"{library_message(exc, with_type=True)}") from exc
    found = getattr(module, class_name, None)
    if found is None:
        raise ModelLoadError(f"custom model class {implementation}: {module_name} has no {class_name}")
    if not callable(getattr(found, "load", None)):
        raise ModelLoadError(f"custom model class {implementation} has no load(path, parameters)")
    return found


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CustomRuntime:
    framework = "custom"

    def __init__(self, path: Path, model: Any, implementation: str, defaults: Mapping[str, Any],
                 own: Mapping[str, Any]) -> None:
        """``defaults``: rayms's predict options; ``own``: the parameters that are the model's."""
        self.path, self.model, self.implementation = path, model, implementation
        self.defaults, self.own = dict(defaults), dict(own)
        meta = model.metadata() if callable(getattr(model, "metadata", None)) else {}
        self._inputs = list(meta.get("inputs") or [])
        self._outputs = list(meta.get("outputs") or [])
        configured = self.defaults.get("default_outputs")
        self.default = None if configured in (None, "all") else list(configured)
        size = getattr(model, "size_bytes", None)
        self._size = int(size()) if callable(size) else _disk_size(path)

    def predict(self, inputs: Sequence[np.ndarray], parameters: Mapping[str, Any] | None = None, *,
                requested: Sequence[str] | None = None,
                input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        options = parse_parameters(self.defaults, parameters or {})
        names = list(input_names or [])
        names += [f"input-{i}" for i in range(len(names), len(inputs))]
        by_name = dict(zip(names, inputs))
        merged = {**self.own, **{k: v for k, v in (parameters or {}).items()}}
        answer = guarded(self.framework, lambda: self.model.predict(by_name, merged), (ValueError, TypeError))
        outputs = dict(answer) if isinstance(answer, Mapping) else {"predict": answer}
        outputs = {str(k): np.asarray(v) for k, v in outputs.items()}
        wanted = list(requested or []) or (["predict_proba"] if options.get("predict_proba") else self.default)
        if not wanted:
            return outputs
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise InvalidInput(f"unknown output(s) {', '.join(missing)}; {self.implementation} answers "
                               f"{', '.join(outputs)}")
        return {name: outputs[name] for name in dict.fromkeys(wanted)}

    def input_metadata(self) -> list[dict[str, Any]]:
        return self._inputs

    def output_metadata(self) -> list[dict[str, Any]]:
        return self._outputs

    def size_bytes(self) -> int:
        """The model's own ``size_bytes()``, else its files' size on disk."""
        return self._size


def load(path: Path, parameters: dict[str, Any], *, allow_code: bool) -> CustomRuntime:
    implementation = parameters.get("implementation")
    if not isinstance(implementation, str) or not implementation.strip():
        raise InvalidSpec("a custom model needs parameters.implementation: the class to load, "
                          "as 'package.module.ClassName' or 'module.ClassName' with module.py beside the model")
    if not allow_code:
        raise ModelLoadError(f"custom model class {implementation} was not loaded: running a model's own code is "
                             "off; allow it with RAYMS_ALLOW_CUSTOM_CODE=true (Settings.allow_custom_code)")
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    ours = {k: v for k, v in parameters.items() if k in MODEL_PARAMETERS}
    own = {k: v for k, v in parameters.items() if k not in MODEL_PARAMETERS and k != "implementation"}
    defaults = parse_parameters({}, ours, error=InvalidSpec, strict=True)
    cls = find_class(implementation.strip(), path)
    try:
        model = cls.load(path, dict(own))
    except Exception as exc:
        raise ModelLoadError(f"custom model class {implementation}: load failed: "
                             f"{library_message(exc, with_type=True)}") from exc
    if not callable(getattr(model, "predict", None)):
        raise ModelLoadError(f"custom model class {implementation}: load returned a {type(model).__name__}, "
                             "which has no predict method")
    try:
        return CustomRuntime(path, model, implementation, defaults, own)
    except Exception as exc:  # its metadata() or size_bytes() raised
        raise ModelLoadError(f"custom model class {implementation}: {library_message(exc, with_type=True)}") from exc
