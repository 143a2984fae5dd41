"""The transport-neutral data plane: every operation the HTTP routes and the Python handle expose.

Routes in :mod:`rayms.router` only translate HTTP to these calls and back; notebooks call the same
methods through ``serve.get_app_handle("rayms")``. Existence and readiness come from the local
:class:`~rayms.view.RegistryView`, so an unknown or unready model is answered here without a round-trip;
only requests for registered models travel to a replica.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from rayms import framework_table
from rayms.codecs import InferRequest, InferResult
from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import (
    InferenceError, InvalidInput, InvalidSpec, ModelNotFound, ModelNotReady, NotSupported, Overloaded, RaymsError,
)
from rayms.view import RegistryView

EXTENSIONS = ["model_repository", "binary_tensor_data", "parameters"]
LOAD_TIMEOUT_S = 600.0


class Backend(Protocol):
    """What the data plane needs from the rest of the system (Ray handles in production).

    A :class:`~rayms.errors.RaymsError` raised behind it arrives as itself, not wrapped by the transport."""

    async def infer(self, name: str, request: InferRequest) -> InferResult: ...
    async def metadata(self, name: str) -> dict[str, Any]: ...
    async def load(self, name: str, spec: dict[str, Any], source: str, timeout_s: float) -> dict[str, Any]: ...
    async def unregister(self, name: str) -> None: ...
    async def replicas(self) -> list[dict[str, Any]]: ...


def server_version() -> str:
    try:
        return version("rayms")
    except PackageNotFoundError:
        return "0.0.0"


@contextmanager
def naming_model(name: str) -> Iterator[None]:
    """Say which model a request error is about: a runtime's or a codec's message names only the input."""
    try:
        yield
    except (InvalidInput, InferenceError, NotSupported) as exc:
        raise type(exc)(f"model {name}: {exc}") from exc


class DataPlane:
    def __init__(self, settings: Settings, *, view: RegistryView, backend: Backend) -> None:
        self._settings = settings
        self._view = view
        self._backend = backend

    # ---------------------------------------------------------------- server
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._view.synced.is_set()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "rayms", "version": server_version(), "extensions": EXTENSIONS}

    # ---------------------------------------------------------------- models
    def status(self, name: str, model_version: str | None = None) -> dict[str, Any]:
        """The registry's status of ``name``; 404 when unknown or when ``model_version`` is not current."""
        status = self._view.models.get(name)
        if status is None:
            if not self._view.synced.is_set():
                # Just started and not yet told what exists: "unknown" would be a lie, so ask to retry.
                raise Overloaded(f"model {name}: this replica has not heard from the model registry yet; retry shortly")
            raise ModelNotFound(name)
        if model_version is not None and model_version not in (status["version"], _declared(status)):
            raise ModelNotFound(name, model_version)
        return status

    def model_ready(self, name: str, model_version: str | None = None) -> bool:
        return self.status(name, model_version)["state"] == "READY"

    def list_models(self) -> list[str]:
        return sorted(self._view.models)

    async def model_metadata(self, name: str, model_version: str | None = None) -> dict[str, Any]:
        status = self.status(name, model_version)
        metadata = status.get("metadata") or {}
        if not metadata and status["state"] == "READY":
            metadata = await self._backend.metadata(name)
        return {
            "name": name,
            "versions": [_declared(status) or status["version"]],
            "platform": _platform(status["framework"]),
            "inputs": metadata.get("inputs", []),
            "outputs": metadata.get("outputs", []),
            "properties": {"framework": status["framework"], "state": status["state"]},
        }

    def _servable(self, name: str, model_version: str | None) -> dict[str, Any]:
        status = self.status(name, model_version)
        # READY models serve even when evicted from every replica (they reload on demand).
        if status["state"] != "READY":
            raise ModelNotReady(name, status["state"], status.get("reason", ""))
        return status

    async def infer(self, name: str, request: InferRequest, model_version: str | None = None) -> tuple[str, InferResult]:
        """Run V2 inference; returns the version that answered and the result."""
        status = self._servable(name, model_version)
        with naming_model(name):
            result = await self._backend.infer(name, request)
        # The replica's word, not the view's: the view names a new version as soon as it is registered.
        answered = result.model_version or status["version"]
        return (_declared(status) or answered) if answered == status["version"] else answered, result

    # ---------------------------------------------------------------- repository
    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        items = []
        for name in sorted(self._view.models):
            status = self._view.models[name]
            if ready_only and status["state"] != "READY":
                continue
            items.append({k: v for k, v in status.items() if k not in ("spec", "metadata")})
        return items

    async def load(self, name: str, body: dict[str, Any] | None, *, source: str = "repository") -> dict[str, Any]:
        """Register ``name`` and wait until it is READY (200) or FAILED (error), like Triton's load."""
        validate_model_name(name)
        spec = self._spec_for(name, body)
        status = await self._backend.load(name, spec.to_wire() | {"parameters": spec.parameters}, source,
                                          LOAD_TIMEOUT_S)
        # The view's long poll may answer after the load settled: take the status now, so the caller's next request
        # sees the model (a full refresh per load would cost a copy of every changed model, per load).
        self._view.note(status)
        if status["state"] == "FAILED":
            raise ModelLoadFailed(f"model {name} failed to load: {status['reason']}")
        return status

    async def unload(self, name: str) -> None:
        validate_model_name(name)
        if name not in self._view.models:
            await self._view.refresh()
        if name not in self._view.models:
            raise ModelNotFound(name)
        await self._backend.unregister(name)
        self._view.forget(name)

    def _spec_for(self, name: str, body: dict[str, Any] | None) -> ModelSpec:
        """The spec a load asks for: in the body, in its ``parameters``, or in the repository folder."""
        body = {k: v for k, v in (body or {}).items() if v is not None}
        if "storageUri" in body or "storage_uri" in body:
            return ModelSpec.parse(body, name=name)
        if set(body) - {"parameters"}:
            raise InvalidSpec(f"model {name}: a load body needs storageUri and framework (a TrainedModel's spec.model)")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidSpec(f"model {name}: 'parameters' of a load body must be an object")
        if any(key.startswith("file:") for key in parameters):
            raise NotSupported(f"model {name}: loading model files sent in the request is not supported; "
                               "give a storageUri")
        if "config" in parameters:
            # tritonclient's load_model(name, config=...) sends the config as a JSON string.
            return ModelSpec.parse(_config_spec(name, parameters["config"]), name=name)
        if "storageUri" in parameters or "storage_uri" in parameters:
            return ModelSpec.parse(parameters, name=name)
        if not self._settings.model_repository:
            raise InvalidSpec(f"model {name}: the load request gives no storageUri and this server has no model "
                              "repository; send {\"storageUri\": ..., \"framework\": ...}")
        # No spec given: the model of that name in the configured repository folder.
        from rayms.repository import spec_from_repository

        spec = spec_from_repository(self._settings.model_repository, name)
        if spec is None:
            raise ModelNotFound(name)
        return spec

    async def replicas(self) -> list[dict[str, Any]]:
        return await self._backend.replicas()


class ModelLoadFailed(RaymsError):
    """A repository load ended FAILED. The repository extension answers load failures with 400."""

    status_code = 400


def _config_spec(name: str, config: Any) -> Any:
    """Triton's load ``parameters.config``; rayms reads it as a JSON TrainedModel ``spec.model``."""
    try:
        value = json.loads(config) if isinstance(config, str) else config
    except ValueError as exc:
        raise InvalidSpec(f"model {name}: parameters.config is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or not ("storageUri" in value or "storage_uri" in value):
        raise InvalidSpec(f"model {name}: parameters.config must be a JSON object with storageUri and framework "
                          "(a TrainedModel's spec.model); Triton model configurations are not supported")
    return value


def _declared(status: dict[str, Any]) -> str | None:
    """The version a model had where it came from (MLServer's, a Triton folder's): clients may name it."""
    return (status.get("spec") or {}).get("version")


def _platform(framework: str) -> str:
    return framework_table.platform(framework)

