"""TrainedModel objects in and out: which group to watch, spec validation, and the status we write.

The spec is KServe's, field for field (``spec.inferenceService``, ``spec.model.storageUri``,
``spec.model.framework``, ``spec.model.memory``), so a KServe manifest works by changing its apiVersion,
and unchanged in compatibility mode (``serving.kserve.io``). Pure functions: no client, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rayms.config import ModelSpec, validate_model_name
from rayms.errors import InvalidMemory, InvalidSpec, MemoryUnavailable, RaymsError, UnsupportedFramework
from rayms.redact import redact
from rayms.status import ModelState, ModelStatus, Source

RAYMS_GROUP = "serving.rayms.io"
KSERVE_GROUP = "serving.kserve.io"
VERSION = "v1alpha1"
PLURAL = "trainedmodels"
SOURCE = Source.KUBERNETES
CONDITION_TYPES = ("InferenceServiceReady", "FrameworkSupported", "MemoryResourceAvailable", "ModelLoaded", "Ready")


@dataclass(frozen=True)
class Coordinates:
    group: str
    version: str = VERSION
    plural: str = PLURAL

    @classmethod
    def for_mode(cls, kserve_compat: bool) -> "Coordinates":
        return cls(group=KSERVE_GROUP if kserve_compat else RAYMS_GROUP)


@dataclass(frozen=True)
class Parsed:
    """A TrainedModel reduced to what the bridge acts on. ``problem`` is set when it is invalid."""

    name: str
    namespace: str
    generation: int
    inference_service: str
    spec: ModelSpec | None
    problem: str = ""
    problem_condition: str = "FrameworkSupported"


def parse(obj: dict[str, Any]) -> Parsed:
    meta = obj.get("metadata") or {}
    body = obj.get("spec") or {}
    model = body.get("model") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace", "")
    generation = int(meta.get("generation") or 0)
    service = str(body.get("inferenceService") or "")
    common = {"name": name, "namespace": namespace, "generation": generation, "inference_service": service}
    try:
        validate_model_name(name)
        spec = ModelSpec.parse(model, name=name)
    except InvalidSpec as exc:
        return Parsed(**common, spec=None, problem=redact(str(exc)), problem_condition=condition_for(exc))
    return Parsed(**common, spec=spec)


def condition_for(error: RaymsError) -> str:
    """The TrainedModel condition a refusal belongs to, by the error's type (KServe's conditions)."""
    if isinstance(error, UnsupportedFramework):
        return "FrameworkSupported"
    if isinstance(error, (InvalidMemory, MemoryUnavailable)):
        return "MemoryResourceAvailable"
    return "ModelLoaded"


def _condition(kind: str, ok: bool | None, reason: str = "", message: str = "") -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    condition = {"type": kind, "status": status}
    if status != "True":
        condition["reason"] = reason
        condition["message"] = message
    return condition


def desired_status(*, parsed: Parsed, model: ModelStatus | None, refusal: str, refusal_condition: str,
                   url: str, address_url: str, service_ready: bool = True) -> dict[str, Any]:
    """The TrainedModel status for ``parsed`` given the registry's status of the model (or why it was refused).

    ``lastTransitionTime`` is filled in by :func:`with_transition_times`, so a write happens only when
    something a reader cares about changed.
    """
    conditions = {k: _condition(k, True) for k in CONDITION_TYPES}
    conditions["InferenceServiceReady"] = _condition(
        "InferenceServiceReady", service_ready, "InferenceServiceNotReady", "the rayms application is not running")
    problem, where = (parsed.problem, parsed.problem_condition) if parsed.problem else (refusal, refusal_condition)
    state = "FAILED" if problem else "PENDING"
    if problem:
        reasons = {"FrameworkSupported": "FrameworkNotSupported", "MemoryResourceAvailable": "MemoryResourceNotAvailable",
                   "ModelLoaded": "InvalidSpec"}
        conditions[where] = _condition(where, False, reasons.get(where, "Invalid"), problem)
        if where != "ModelLoaded":
            conditions["ModelLoaded"] = _condition("ModelLoaded", False, "NotLoaded", problem)
    elif model is None:
        conditions["ModelLoaded"] = _condition("ModelLoaded", None, "Pending", "waiting for the registry")
    else:
        state = model.state.value
        if model.state is ModelState.FAILED:
            conditions["ModelLoaded"] = _condition("ModelLoaded", False, "ModelLoadFailed", model.reason)
        elif model.state is not ModelState.READY:
            conditions["ModelLoaded"] = _condition("ModelLoaded", False, state.capitalize(),
                                                   f"model is {state.lower()}")
    others = [c for k, c in conditions.items() if k != "Ready"]
    if all(c["status"] == "True" for c in others):
        conditions["Ready"] = _condition("Ready", True)
    else:
        first = next(c for c in others if c["status"] != "True")
        conditions["Ready"] = _condition("Ready", False if first["status"] == "False" else None,
                                         first.get("reason", ""), first.get("message", ""))
    return {
        "conditions": list(conditions.values()),
        "state": state,
        "url": url,
        "address": {"url": address_url},
        "observedGeneration": parsed.generation,
    }


def with_transition_times(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """Keep each condition's ``lastTransitionTime`` unless its status changed."""
    before = {c.get("type"): c for c in (old or {}).get("conditions", [])}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for condition in new["conditions"]:
        previous = before.get(condition["type"])
        same = previous is not None and previous.get("status") == condition["status"]
        condition["lastTransitionTime"] = previous.get("lastTransitionTime", now) if same else now
    return new


def comparable(status: dict[str, Any] | None) -> dict[str, Any]:
    """A status without timestamps, for deciding whether a write would change anything."""
    if not status:
        return {}
    conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])]
    return {**{k: v for k, v in status.items() if k != "conditions"}, "conditions": conditions}
