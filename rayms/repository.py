"""Model sources on disk: a model repository folder and KServe's ``models.json``.

``rayms serve --model-repository DIR`` serves the models in DIR in any of the layouts teams bring along
(:mod:`rayms.layouts` reads the MLServer and Triton ones):

* every ``model-settings.json`` in DIR or below it is an MLServer model (MLServer's own discovery), and
  the top-level folder holding it is not looked at otherwise; a server ``settings.json`` is ignored;
* a top-level folder holding ``config.pbtxt`` is a Triton model;
* any other top-level folder is a KServe model folder: one model file, its framework told by extension,
  or by content where the extension allows two (``.bst``) or is shared with configuration (``.json``).

Scanning never stops at a bad model: :func:`scan_repository` returns the good specs and, apart, the reason
each other model cannot be served, so the server starts with every good model and shows the others as
FAILED. A body-less ``POST /v2/repository/models/{name}/load`` loads the model of that name
(:func:`spec_from_repository`). ``rayms serve --models FILE`` reads KServe's ``models.json`` shape,
``[{"modelName": ..., "modelSpec": {"storageUri", "framework", "memory"}}]``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import InvalidSpec, RaymsError
from rayms.frameworks import framework_from_extension, resolve_model_file
from rayms.status import Source
from rayms.layouts import MODEL_SETTINGS, TRITON_CONFIG, mlserver_name, mlserver_spec, newest, triton_spec

logger = logging.getLogger("rayms.repository")

Problems = dict[str, str]


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "__"))


def _settings_files(folder: Path) -> list[Path]:
    """Every ``model-settings.json`` in ``folder`` and below it (hidden folders skipped; symlinked folders
    followed, as mounted volumes use them, each real folder once)."""
    found, seen = [], set()
    for parent, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link back up the tree
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if _visible(Path(f)))
        if MODEL_SETTINGS in files:
            found.append(Path(parent) / MODEL_SETTINGS)
    return found


def _folder_spec(folder: Path) -> ModelSpec:
    """The spec of a top-level folder that is not MLServer's: a Triton model or a KServe model folder."""
    if (folder / TRITON_CONFIG).is_file():
        try:
            return triton_spec(folder)
        except RaymsError as exc:
            raise InvalidSpec(f"Triton model {folder}: {exc}") from exc
    framework = framework_from_extension(folder)
    try:
        resolve_model_file(folder, framework)  # refuses folders with several model files
    except RaymsError as exc:
        raise InvalidSpec(str(exc)) from exc
    return ModelSpec(storage_uri=str(folder), framework=framework)


def _mlserver_models(files: list[Path], specs: dict[str, ModelSpec], problems: Problems) -> None:
    versions: dict[str, list[ModelSpec]] = {}
    for settings_file in files:
        try:
            name, spec = mlserver_spec(settings_file)
        except (RaymsError, OSError) as exc:
            problems.setdefault(mlserver_name(settings_file), f"{settings_file}: {exc}")
            continue
        versions.setdefault(name, []).append(spec)
    for name, found in versions.items():
        spec = newest(found)
        if len(found) > 1:
            logger.info("model %s: %d versions in the repository; serving %s, the one MLServer serves by default",
                        name, len(found), spec.version or "the unversioned one")
        specs[name] = spec
        if name in problems:  # a good version of the model serves; a broken one of its versions is only logged
            logger.warning("model %s: a version is not served: %s", name, problems.pop(name))


def scan_repository(root: str) -> tuple[dict[str, ModelSpec], Problems]:
    """The models in ``root`` by name, and the reason for each model that cannot be served."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise InvalidSpec(f"model repository {root} is not a folder")
    specs: dict[str, ModelSpec] = {}
    problems: Problems = {}
    settings_files = _settings_files(base)
    _mlserver_models(settings_files, specs, problems)
    mlserver_folders = {base / f.relative_to(base).parts[0] for f in settings_files if f.parent != base}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and _visible(p) and p not in mlserver_folders):
        if folder.name in specs or folder.name in problems:
            logger.warning("model %s: folder %s is not served: an MLServer model has that name", folder.name, folder)
            continue
        try:
            specs[validate_model_name(folder.name)] = _folder_spec(folder)
        except (RaymsError, OSError) as exc:  # OSError: a folder this process may not read
            problems[folder.name] = str(exc)
    for name, reason in problems.items():
        logger.error("model %s: not served from %s: %s", name, base, reason)
    return specs, problems


def spec_from_repository(root: str | None, name: str) -> ModelSpec | None:
    """The spec of the model ``name`` in ``root``, or None when it has none; a model that cannot be served
    is :class:`InvalidSpec` with the reason."""
    if not root:
        return None
    validate_model_name(name)
    folder = Path(root).expanduser().resolve() / name
    if folder.is_dir() and not _settings_files(folder):
        try:
            return _folder_spec(folder)
        except RaymsError as exc:
            raise InvalidSpec(f"model {name}: {exc}") from exc
    specs, problems = scan_repository(root)  # MLServer models are known by the name in their settings
    if name in problems:
        raise InvalidSpec(f"model {name}: {problems[name]}")
    return specs.get(name)


def read_models_file(path: str) -> dict[str, ModelSpec]:
    """Parse KServe's ``models.json``."""
    try:
        entries = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSpec(f"models file {path}: {exc}") from exc
    if not isinstance(entries, list):
        raise InvalidSpec(f"models file {path}: expected a JSON list of {{modelName, modelSpec}}")
    specs = {}
    for entry in entries:
        if not isinstance(entry, dict) or "modelName" not in entry or "modelSpec" not in entry:
            raise InvalidSpec(f"models file {path}: every entry needs modelName and modelSpec, got {entry!r}")
        name = validate_model_name(entry["modelName"])
        specs[name] = ModelSpec.parse(entry["modelSpec"], name=name)
    return specs


def seed_models(settings: Settings) -> list[tuple[str, ModelSpec | str, Source]]:
    """The models ``--model-repository`` and ``--models`` declare, with the source each registers under.
    A model rayms cannot read comes with the reason instead of a spec: one bad folder never stops the rest."""
    seeds: list[tuple[str, ModelSpec | str, Source]] = []
    if settings.model_repository:
        specs, problems = scan_repository(settings.model_repository)
        seeds += [(n, s, Source.REPOSITORY_FOLDER) for n, s in specs.items()]
        seeds += [(n, reason, Source.REPOSITORY_FOLDER) for n, reason in problems.items()]
    if settings.models_file:
        seeds += [(n, s, Source.MODELS_FILE) for n, s in read_models_file(settings.models_file).items()]
    return seeds
