"""Custom resources checked offline against their CRD's schema, the way the API server would check them.

``kubernetes-validate`` has no schemas for custom kinds (it passes them with a warning), so TrainedModels and
RayServices are validated here with ``jsonschema`` against the ``openAPIV3Schema`` of their CRD. Undeclared
fields count as errors: a real API server would prune them without a word, so a typo would go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml


def json_schema(node):
    """A CRD's OpenAPI v3 schema as JSON Schema, read the way the API server reads it, except that fields the
    schema does not declare are errors: the API server would drop them without a word."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = json_schema(value)
        elif key != "nullable" and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        for field in ("apiVersion", "kind", "metadata"):
            out.setdefault("properties", {}).setdefault(field, {"type": "object" if field == "metadata" else "string"})
    declared_only = not node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and declared_only:
        out["additionalProperties"] = False
    return out


def crd_problems(obj: dict, crd: dict) -> list[str]:
    """Why the API server would refuse (or prune) ``obj``. An object the CRD does not define is an error, not
    a pass: a wrong apiVersion or kind must not slip through unchecked."""
    group, _, version = obj["apiVersion"].rpartition("/")
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    if group != crd["spec"]["group"] or obj["kind"] != crd["spec"]["names"]["kind"] or not served:
        raise ValueError(f"{obj['apiVersion']} {obj['kind']} is not served by {crd['metadata']['name']}")
    [served] = served
    validator = jsonschema.Draft4Validator(json_schema(served["schema"]["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def load_crd(path: Path) -> dict:
    """The one CustomResourceDefinition in a YAML file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # KubeRay's RayService CRD is 1 MB
    [crd] = [d for d in yaml.load_all(path.read_text(), Loader=loader) if d and d["kind"] == "CustomResourceDefinition"]
    return crd
