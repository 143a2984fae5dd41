"""Kubernetes ``Status`` errors as the fake API server returns them.

Every failed request is answered with a ``metav1.Status`` body, as the real
kube-apiserver does.  Store and HTTP code raise :class:`ApiError`; the HTTP
layer turns it into the response.  The helper constructors reproduce the
reasons and message wording of ``k8s.io/apimachinery/pkg/api/errors`` so that
client code matching on ``reason`` or ``code`` behaves as against a cluster.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API failure with an HTTP code and a ``Status`` reason."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        """The ``Status`` object for this error."""
        return failure_status(self.code, self.reason, self.message, self.details)


def failure_status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _details(group: str, plural: str, name: str | None) -> dict:
    details: dict[str, Any] = {"kind": plural}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


def qualified(group: str, plural: str) -> str:
    """``trainedmodels.serving.rayms.io`` or ``configmaps`` for the core group."""
    return f"{plural}.{group}" if group else plural


def not_found(group: str, plural: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{qualified(group, plural)} "{name}" not found',
                    _details(group, plural, name))


def no_such_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource",
                    {})


def already_exists(group: str, plural: str, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{qualified(group, plural)} "{name}" already exists',
                    _details(group, plural, name))


def conflict(group: str, plural: str, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {qualified(group, plural)} "{name}": {why}',
                    _details(group, plural, name))


STALE_MESSAGE = ("the object has been modified; please apply your changes to the latest "
                 "version and try again")


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid.  ``causes`` are ``(field, reason, body)`` triples, e.g.
    ``("spec.model.storageUri", "FieldValueRequired", "Required value")``."""
    rendered = [f"{field}: {body}" for field, _, body in causes]
    agg = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    qkind = f"{kind}.{group}" if group else kind
    details = {"name": name, "kind": kind,
               "causes": [{"reason": r, "message": b, "field": f} for f, r, b in causes]}
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{qkind} "{name}" is invalid: {agg}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message, {})


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415, "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json-patch+json, application/merge-patch+json (got {content_type!r}; "
        f"this fake does not implement strategic merge on custom resources nor server-side apply)",
    )


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
