"""What a plain install of rayms with some of its extras brings, read from pyproject.toml and the metadata of
the installed distributions, so tests can hold code that runs after such an install to those modules.

``declared(extras)`` is the closure of rayms's requirements (and those extras') over the installed
distributions' own requirements, markers evaluated for this interpreter. ``modules_of(distributions)`` is
the set of top-level modules they provide. ``ImportFence`` refuses, in one process, imports of modules that
only some other installed distribution provides: with it, a notebook kernel in the test environment imports
what it would import in an environment holding exactly rayms and the declared extras.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.metadata
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = "rayms"


def _project_requirements(extras: Iterable[str], pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = set(extras) - set(optional)
    if unknown:
        raise KeyError(f"pyproject.toml declares no extra {sorted(unknown)}")
    return [*project["dependencies"], *(r for extra in extras for r in optional[extra])]


def declared(extras: Iterable[str] = (), *, pyproject: Path = REPO / "pyproject.toml") -> set[str]:
    """Canonical names of rayms and every distribution a plain install of ``rayms[extras]`` brings along."""
    seen: set[str] = {PROJECT}
    pending: list[tuple[str, frozenset[str]]] = []

    def want(requirement: str, *, for_extras: frozenset[str]) -> None:
        req = Requirement(requirement)
        if req.marker is not None and not any(
                req.marker.evaluate({**default_environment(), "extra": extra}) for extra in for_extras or {""}):
            return
        name = canonicalize_name(req.name)
        if name == PROJECT:  # an extra naming another of rayms's own extras
            for requirement_of_extra in _project_requirements(req.extras, pyproject):
                want(requirement_of_extra, for_extras=frozenset())
            return
        pending.append((name, frozenset(req.extras)))

    for requirement in _project_requirements(extras, pyproject):
        want(requirement, for_extras=frozenset())
    visited: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted_extras = pending.pop()
        if (name, wanted_extras) in visited:
            continue
        visited.add((name, wanted_extras))
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing of it can be imported either
        for requirement in requires:
            want(requirement, for_extras=wanted_extras)
    return seen


def providers() -> dict[str, set[str]]:
    """Top-level module name -> canonical names of the installed distributions that provide it."""
    return {module: {canonicalize_name(d) for d in dists}
            for module, dists in importlib.metadata.packages_distributions().items()}


def modules_of(distributions: set[str]) -> set[str]:
    return {module for module, dists in providers().items() if dists & distributions}


def imported_modules(source: str) -> set[str]:
    """Top-level modules a piece of code (a notebook cell: top-level ``await`` allowed) imports."""
    tree = compile(source, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def undeclared(modules: Iterable[str], extras: Iterable[str]) -> set[str]:
    """The modules, of ``modules``, that neither the standard library nor ``rayms[extras]`` provides."""
    allowed = modules_of(declared(extras)) | {PROJECT}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in allowed}


class ImportFence(importlib.abc.MetaPathFinder):
    """Refuses top-level imports of modules that only undeclared installed distributions provide.

    Modules no installed distribution claims (the standard library, this repository's folders) pass, and so
    do modules already imported when the fence goes up."""

    def __init__(self, extras: Iterable[str]) -> None:
        self.extras = tuple(extras)
        allowed = declared(self.extras)
        self._refused = {module: dists for module, dists in providers().items()
                         if not dists & allowed and module not in sys.stdlib_module_names}

    def find_spec(self, fullname, path, target=None):
        if path is None and fullname in self._refused and fullname not in sys.modules:
            extras = ",".join(self.extras)
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: it comes with {', '.join(sorted(self._refused[fullname]))}, "
                f"which rayms[{extras}] does not install", name=fullname)
        return None

    def install(self) -> "ImportFence":
        sys.meta_path.insert(0, self)
        return self
