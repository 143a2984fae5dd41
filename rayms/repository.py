"""Model sources on disk: a model repository folder and KServe's ``models.json``.

``rayms serve --model-repository DIR`` serves every sub-folder of DIR as a model, its framework taken
from the model file's extension; a body-less ``POST /v2/repository/models/{name}/load`` loads
``DIR/{name}``. ``rayms serve --models FILE`` reads KServe's ``models.json`` shape,
``[{"modelName": ..., "modelSpec": {"storageUri", "framework", "memory"}}]``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import InvalidSpec, RaymsError
from rayms.frameworks import framework_from_extension, resolve_model_file
from rayms.status import Source


def spec_from_repository(root: str | None, name: str) -> ModelSpec | None:
    """The spec of ``root/name``, or None when there is no such model folder."""
    if not root:
        return None
    validate_model_name(name)
    folder = Path(root).expanduser().resolve() / name
    if not folder.exists():
        return None
    framework = _framework_of(folder)
    return ModelSpec(storage_uri=str(folder), framework=framework)


def _framework_of(folder: Path) -> str:
    candidates = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for path in candidates:
        try:
            framework = framework_from_extension(path)
        except RaymsError:
            continue
        resolve_model_file(folder, framework)  # refuses folders with several model files
        return framework
    raise InvalidSpec(f"model {folder.name}: no model file with a known extension in {folder}")


def scan_repository(root: str) -> dict[str, ModelSpec]:
    """Every sub-folder of ``root`` that holds a model, by folder name."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise InvalidSpec(f"model repository {root} is not a folder")
    specs = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        spec = spec_from_repository(str(base), folder.name)
        if spec is not None:
            specs[folder.name] = spec
    return specs


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
        base = Path(settings.model_repository).expanduser().resolve()
        if not base.is_dir():
            raise InvalidSpec(f"model repository {settings.model_repository} is not a folder")
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                spec = spec_from_repository(str(base), folder.name)
            except RaymsError as exc:
                seeds.append((folder.name, str(exc), Source.REPOSITORY_FOLDER))
                continue
            if spec is not None:
                seeds.append((folder.name, spec, Source.REPOSITORY_FOLDER))
    if settings.models_file:
        seeds += [(n, s, Source.MODELS_FILE) for n, s in read_models_file(settings.models_file).items()]
    return seeds
