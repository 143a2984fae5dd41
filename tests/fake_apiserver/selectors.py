"""Label and field selectors, parsed the way kube-apiserver parses them.

Label selectors support ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
``k notin (a,b)``, ``k`` (exists) and ``!k`` (does not exist), joined by
commas.  Field selectors support ``metadata.name`` and ``metadata.namespace``
with ``=``, ``==`` and ``!=``, which is all the real server supports for
custom resources (``selectableFields`` are not implemented).
"""

from __future__ import annotations

import re
from typing import Callable

from .errors import ApiError, bad_request

Predicate = Callable[[dict], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(notin|in)\s*\(([^)]*)\)|(==|!=|=)\s*([A-Za-z0-9_.-]*))?\s*$")


def _split_top_level(selector: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def label_selector(selector: str | None) -> Predicate:
    """A predicate over objects for a ``labelSelector`` query value."""
    if not selector:
        return lambda obj: True
    requirements: list[Callable[[dict], bool]] = []
    for part in _split_top_level(selector):
        m = _SET_RE.match(part)
        if not m:
            raise bad_request(f"unable to parse requirement: {part!r}")
        negate, key, set_op, set_values, op, value = m.groups()
        if negate and (set_op or op):
            raise bad_request(f"unable to parse requirement: {part!r}")
        if set_op:
            values = {v.strip() for v in set_values.split(",") if v.strip()}
            if set_op == "in":
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif op in ("=", "=="):
            requirements.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif op == "!=":
            requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif negate:
            requirements.append(lambda labels, k=key: k not in labels)
        else:
            requirements.append(lambda labels, k=key: k in labels)

    def matches(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req(labels) for req in requirements)

    return matches


_FIELDS = {"metadata.name": "name", "metadata.namespace": "namespace"}


def field_selector(selector: str | None) -> Predicate:
    """A predicate for a ``fieldSelector`` query value."""
    if not selector:
        return lambda obj: True
    requirements: list[Callable[[dict], bool]] = []
    for part in selector.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: {selector!r}; can't understand {part!r}")
        field, op, value = m.groups()
        if field not in _FIELDS:
            raise ApiError(400, "BadRequest",
                           f'"{field}" is not a known field selector: only "metadata.name", '
                           f'"metadata.namespace"')
        attr = _FIELDS[field]
        if op == "!=":
            requirements.append(lambda md, a=attr, v=value: md.get(a, "") != v)
        else:
            requirements.append(lambda md, a=attr, v=value: md.get(a, "") == v)

    def matches(obj: dict) -> bool:
        md = obj.get("metadata") or {}
        return all(req(md) for req in requirements)

    return matches
