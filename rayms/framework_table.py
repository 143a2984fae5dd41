"""The one list of frameworks rayms serves: names, aliases, model-file extensions and V2 platform names.

The spec validator, the file-name rules of :mod:`rayms.frameworks`, the TrainedModel bridge and the V2
model metadata all read this table, so adding a framework is one row here plus its runtime module.
Standard library and :mod:`rayms.errors` only: it sits at the bottom of the layers.

``custom`` is the framework of a model class the user supplies (:mod:`rayms.frameworks.custom`); it has
no file extension, so it is never guessed from a folder's files.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayms.errors import UnsupportedFramework


@dataclass(frozen=True)
class Framework:
    name: str
    """What a spec's ``framework`` says once normalised, and the name of the runtime module."""
    aliases: tuple[str, ...]
    """Other spellings accepted in a spec (KServe's ``modelFormat`` names among them)."""
    extensions: tuple[str, ...]
    """File name endings of its model files, lower case, in the order a folder is searched."""
    platform: str
    """The ``platform`` field of V2 model metadata."""


TABLE: tuple[Framework, ...] = (
    Framework("sklearn", ("scikit-learn",), (".joblib", ".pkl", ".pickle"), "sklearn_sklearn"),
    Framework("xgboost", (), (".json", ".ubj", ".bst"), "xgboost_xgboost"),
    Framework("lightgbm", ("lgbm",), (".txt", ".bst"), "lightgbm_lightgbm"),
    Framework("onnx", (), (".onnx",), "onnx_onnxv1"),
    Framework("custom", (), (), "custom"),
)
FRAMEWORKS: dict[str, Framework] = {f.name: f for f in TABLE}
NAMES: tuple[str, ...] = tuple(FRAMEWORKS)
_BY_SPELLING = {spelling: f.name for f in TABLE for spelling in (f.name, *f.aliases)}


def canonical(framework: object) -> str:
    """The framework's name for any accepted spelling (any case); :class:`UnsupportedFramework` otherwise."""
    text = str(getattr(framework, "value", framework)).strip().lower()
    if text not in _BY_SPELLING:
        raise UnsupportedFramework(framework, NAMES)
    return _BY_SPELLING[text]


def extensions(framework: str) -> tuple[str, ...]:
    return FRAMEWORKS[canonical(framework)].extensions


def platform(framework: str) -> str:
    """V2 ``platform`` of a framework name; an unknown one is reported as ``<name>_<name>``, none as ``""``."""
    known = FRAMEWORKS.get(str(framework))
    return known.platform if known else (f"{framework}_{framework}" if framework else "")


def by_extension(suffix: str) -> list[str]:
    """Every framework whose model files may end in ``suffix`` (``.bst`` has two)."""
    return [f.name for f in TABLE if suffix.lower() in f.extensions]
