"""Resource types, CRD parsing and a small OpenAPI v3 validator.

A :class:`ResourceType` describes one served resource (plural, kind, scope,
versions, schema per version, status subresource).  ``resource_type_from_crd``
builds one from a ``CustomResourceDefinition`` object, checking the parts the
real server checks before it accepts a CRD (name, scope, one storage version,
a structural schema).

For custom-resource bodies the fake does what apiextensions-apiserver does,
in the same order:

1. **prune** fields the schema does not declare (unless
   ``x-kubernetes-preserve-unknown-fields``), drop ``null`` for non-nullable
   fields, and apply ``default:`` values (:func:`prune_and_default`);
2. **validate** types, ``required``, ``enum``, ``pattern``, numeric and length
   bounds, ``nullable`` and ``x-kubernetes-int-or-string``
   (:func:`validate`).  ``anyOf``/``oneOf``/``allOf``/``not``, ``format`` and
   CEL ``x-kubernetes-validations`` are *not* evaluated.

Error causes use the field paths and wording of the real server, e.g.
``spec.model.storageUri: Required value``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError

Cause = tuple[str, str, str]  # (field path, reason, message body)


@dataclass
class ResourceType:
    """One served resource, built in or defined by a CRD."""

    group: str
    plural: str
    kind: str
    namespaced: bool
    versions: list[str]
    storage_version: str
    singular: str = ""
    list_kind: str = ""
    schemas: dict[str, dict | None] = field(default_factory=dict)
    status_versions: set[str] = field(default_factory=set)
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    custom: bool = False  # custom resources get the stricter CR semantics

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.list_kind = self.list_kind or self.kind + "List"

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    def api_version(self, version: str | None = None) -> str:
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version

    def has_status(self, version: str | None = None) -> bool:
        return (version or self.storage_version) in self.status_versions

    def schema(self, version: str | None = None) -> dict | None:
        return self.schemas.get(version or self.storage_version)


def _crd_invalid(name: str, causes: list[Cause]) -> ApiError:
    from .errors import invalid
    return invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, causes)


def resource_type_from_crd(crd: dict) -> ResourceType:
    """Parse an ``apiextensions.k8s.io/v1`` CRD, raising 422 like the real server."""
    name = (crd.get("metadata") or {}).get("name", "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    causes: list[Cause] = []
    group, plural, kind = spec.get("group", ""), names.get("plural", ""), names.get("kind", "")
    for path, value in (("spec.group", group), ("spec.names.plural", plural),
                        ("spec.names.kind", kind)):
        if not value:
            causes.append((path, "FieldValueRequired", "Required value"))
    if plural and group and name != f"{plural}.{group}":
        causes.append(("metadata.name", "FieldValueInvalid",
                       f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(("spec.scope", "FieldValueNotSupported",
                       f'Unsupported value: {json.dumps(spec.get("scope"))}: supported values: '
                       f'"Cluster", "Namespaced"'))
    versions = spec.get("versions") or []
    if not versions:
        causes.append(("spec.versions", "FieldValueInvalid", "Invalid value: must have exactly one version marked as storage version"))
    storage = [v.get("name") for v in versions if v.get("storage") is True]
    if versions and len(storage) != 1:
        causes.append(("spec.versions", "FieldValueInvalid",
                       "Invalid value: must have exactly one version marked as storage version"))
    schemas: dict[str, dict | None] = {}
    status_versions: set[str] = set()
    served: list[str] = []
    for i, version in enumerate(versions):
        vname = version.get("name", "")
        schema = ((version.get("schema") or {}).get("openAPIV3Schema"))
        if schema is None:
            causes.append((f"spec.versions[{i}].schema.openAPIV3Schema", "FieldValueRequired",
                           "Required value: schemas are required"))
        else:
            for path, problem in structural_problems(schema, f"spec.versions[{i}].schema.openAPIV3Schema"):
                causes.append((path, "FieldValueRequired" if "Required" in problem else "FieldValueInvalid", problem))
        schemas[vname] = schema
        if "status" in (version.get("subresources") or {}):
            status_versions.add(vname)
        if version.get("served", False):
            served.append(vname)
    if causes:
        raise _crd_invalid(name, causes)
    return ResourceType(
        group=group, plural=plural, kind=kind, namespaced=spec["scope"] == "Namespaced",
        versions=served, storage_version=storage[0], singular=names.get("singular", ""),
        list_kind=names.get("listKind", ""), schemas=schemas, status_versions=status_versions,
        short_names=list(names.get("shortNames") or []),
        categories=list(names.get("categories") or []), custom=True)


# --------------------------------------------------------------------------- structural check

_JUNCTORS = ("anyOf", "allOf", "oneOf", "not")


def structural_problems(schema: Any, path: str = "openAPIV3Schema") -> list[tuple[str, str]]:
    """A small subset of the structural-schema rules: every node outside
    ``anyOf``/``allOf``/``oneOf``/``not`` has a ``type`` (unless it is
    int-or-string or preserves unknown fields), the root is an object,
    ``properties`` and ``additionalProperties`` are not both set, arrays have
    ``items``."""
    problems: list[tuple[str, str]] = []

    def walk(node: Any, where: str, root: bool = False) -> None:
        if not isinstance(node, dict):
            problems.append((where, "Invalid value: must be an object"))
            return
        exempt = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not exempt:
            problems.append((f"{where}.type", "Required value: must not be empty for specified object fields"))
        if root and node.get("type") != "object":
            problems.append((f"{where}.type", "Invalid value: must be object at the root"))
        if "properties" in node and "additionalProperties" in node:
            problems.append((f"{where}.additionalProperties", "Forbidden: additionalProperties and properties are mutual exclusive"))
        if node.get("type") == "array" and "items" not in node:
            problems.append((f"{where}.items", "Required value: must be specified"))
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{where}.properties[{key}]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.additionalProperties")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}.items")

    walk(schema, path, root=True)
    return problems


# --------------------------------------------------------------------------- pruning & defaults

_ROOT_KEEP = ("apiVersion", "kind", "metadata")


def prune_and_default(obj: dict, schema: dict | None) -> tuple[dict, list[str]]:
    """Return ``(new_obj, pruned_paths)``.  ``obj`` is not modified."""
    if schema is None:
        return copy.deepcopy(obj), []
    pruned: list[str] = []

    def walk(value: Any, node: dict, path: str, root: bool = False) -> Any:
        if isinstance(value, dict) and (node.get("type") == "object" or "properties" in node
                                        or "additionalProperties" in node or root):
            props = node.get("properties") or {}
            additional = node.get("additionalProperties")
            preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
            embedded = bool(node.get("x-kubernetes-embedded-resource"))
            out = {}
            for key, child in value.items():
                child_path = f"{path}.{key}" if path else key
                if (root or embedded) and key in _ROOT_KEEP:
                    out[key] = copy.deepcopy(child)
                elif key in props:
                    if child is None and not props[key].get("nullable"):
                        continue  # nulls of non-nullable fields are dropped before defaulting
                    out[key] = walk(child, props[key], child_path)
                elif isinstance(additional, dict):
                    out[key] = walk(child, additional, child_path)
                elif preserve or additional is True:
                    out[key] = copy.deepcopy(child)
                else:
                    pruned.append(child_path)
            for key, child in props.items():
                if key not in out and "default" in child:
                    out[key] = walk(copy.deepcopy(child["default"]), child,
                                    f"{path}.{key}" if path else key)
            return out
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [walk(item, node["items"], f"{path}[{i}]") for i, item in enumerate(value)]
        return copy.deepcopy(value)

    return walk(obj, schema, "", root=True), pruned


# --------------------------------------------------------------------------- validation

def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(value: Any, expected: str) -> bool:
    actual = _type_name(value)
    return actual == expected or (expected == "number" and actual == "integer")


def _render(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def validate(obj: Any, schema: dict | None) -> list[Cause]:
    """Validate ``obj`` (after pruning) and return the causes; empty means valid."""
    if schema is None:
        return []
    causes: list[Cause] = []

    def walk(value: Any, node: dict, path: str, root: bool = False) -> None:
        shown = path or "<root>"
        if value is None:
            if not node.get("nullable"):
                causes.append((shown, "FieldValueTypeInvalid",
                               f'Invalid value: "null": {shown} in body must be of type '
                               f'{node.get("type", "object")}: "null"'))
            return
        if node.get("x-kubernetes-int-or-string"):
            if _type_name(value) not in ("integer", "string"):
                causes.append((shown, "FieldValueTypeInvalid",
                               f'Invalid value: "{_type_name(value)}": {shown} in body must be of '
                               f'type integer,string: "{_type_name(value)}"'))
                return
        elif "type" in node and not _type_ok(value, node["type"]):
            causes.append((shown, "FieldValueTypeInvalid",
                           f'Invalid value: "{_type_name(value)}": {shown} in body must be of type '
                           f'{node["type"]}: "{_type_name(value)}"'))
            return
        if "enum" in node and value not in node["enum"]:
            allowed = ", ".join(_render(v) for v in node["enum"])
            causes.append((shown, "FieldValueNotSupported",
                           f"Unsupported value: {_render(value)}: supported values: {allowed}"))
        if isinstance(value, str):
            if "pattern" in node and not re.search(node["pattern"], value):
                causes.append((shown, "FieldValueInvalid",
                               f"Invalid value: {_render(value)}: {shown} in body should match "
                               f"'{node['pattern']}'"))
            if "maxLength" in node and len(value) > node["maxLength"]:
                causes.append((shown, "FieldValueTooLong",
                               f"Too long: may not be more than {node['maxLength']} bytes"))
            if "minLength" in node and len(value) < node["minLength"]:
                causes.append((shown, "FieldValueInvalid",
                               f"Invalid value: {_render(value)}: {shown} in body should be at "
                               f"least {node['minLength']} chars long"))
        if _type_name(value) in ("integer", "number"):
            if "minimum" in node and value < node["minimum"]:
                causes.append((shown, "FieldValueInvalid",
                               f"Invalid value: {_render(value)}: {shown} in body should be greater "
                               f"than or equal to {node['minimum']}"))
            if "maximum" in node and value > node["maximum"]:
                causes.append((shown, "FieldValueInvalid",
                               f"Invalid value: {_render(value)}: {shown} in body should be less "
                               f"than or equal to {node['maximum']}"))
        if isinstance(value, list):
            if "maxItems" in node and len(value) > node["maxItems"]:
                causes.append((shown, "FieldValueTooMany",
                               f"Too many: {len(value)}: must have at most {node['maxItems']} items"))
            if "minItems" in node and len(value) < node["minItems"]:
                causes.append((shown, "FieldValueInvalid",
                               f"Invalid value: {len(value)}: {shown} in body should have at "
                               f"least {node['minItems']} items"))
            if isinstance(node.get("items"), dict):
                for i, item in enumerate(value):
                    walk(item, node["items"], f"{path}[{i}]")
        if isinstance(value, dict):
            for key in node.get("required") or []:
                if key not in value:
                    causes.append((f"{path}.{key}" if path else key, "FieldValueRequired",
                                   "Required value"))
            props = node.get("properties") or {}
            additional = node.get("additionalProperties")
            for key, child in value.items():
                child_path = f"{path}.{key}" if path else key
                if root and key in _ROOT_KEEP:
                    continue
                if key in props:
                    walk(child, props[key], child_path)
                elif isinstance(additional, dict):
                    walk(child, additional, child_path)

    walk(obj, schema, "", root=True)
    return causes
