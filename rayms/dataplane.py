"""The transport-neutral data plane: every operation the HTTP routes and the Python handle expose.

Routes in :mod:`rayms.router` only translate HTTP to these calls and back; notebooks call the same
operations through ``serve.get_app_handle("rayms")`` (:class:`PythonApi`). Existence and readiness come from
the local :class:`~rayms.view.RegistryView`, so an unknown or unready model is answered here without a
round-trip; only requests for registered models reach :class:`Models`, which is the model host in this very
process (the default ingress) or a handle to the model replicas (the two-hop router).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import numpy as np

from rayms import framework_table
from rayms.codecs import InferRequest, InferResult, RequestedOutput, Tensor
from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import (
    InferenceError, InvalidInput, InvalidSpec, ModelLoadFailed, ModelNotFound, ModelNotReady, NotSupported,
    Overloaded,
)
from rayms.protocol import MetadataModelResponse, MetadataServerResponse, RepositoryIndexItem, replica_entry
from rayms.status import ModelState, ModelStatus, ReplicaReport, Source
from rayms.view import RegistryView

EXTENSIONS = ["model_repository", "binary_tensor_data", "parameters"]


class Models(Protocol):
    """Where inference runs: :class:`rayms.host.ModelHost` in process, or the replicas behind a handle.

    A :class:`~rayms.errors.RaymsError` raised behind it arrives as itself, not wrapped by the transport."""

    async def infer(self, name: str, request: InferRequest) -> InferResult: ...
    async def metadata(self, name: str) -> dict[str, Any]: ...


class Control(Protocol):
    """The control calls: the registry (load, unregister) and the replicas' census."""

    async def load(self, name: str, spec: ModelSpec, source: Source, *, force: bool = False) -> ModelStatus: ...
    async def unregister(self, name: str, source: Source | None = None, *, force: bool = False) -> None: ...
    async def replicas(self) -> list[ReplicaReport]: ...


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
    def __init__(self, settings: Settings, *, view: RegistryView, models: Models, control: Control) -> None:
        self._settings = settings
        self._view = view
        self._models = models
        self._control = control

    # ---------------------------------------------------------------- server
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._view.synced.is_set()

    def server_metadata(self) -> MetadataServerResponse:
        return MetadataServerResponse(name="rayms", version=server_version(), extensions=EXTENSIONS)

    # ---------------------------------------------------------------- models
    def status(self, name: str, model_version: str | None = None) -> ModelStatus:
        """The registry's status of ``name``; 404 when unknown or when ``model_version`` is not current."""
        status = self._view.models.get(name)
        if status is None:
            if not self._view.synced.is_set():
                # Just started and not yet told what exists: "unknown" would be a lie, so ask to retry.
                raise Overloaded(f"model {name}: this replica has not heard from the model registry yet; retry shortly")
            raise ModelNotFound(name)
        if model_version is not None and model_version not in (str(status.version), _declared(status)):
            raise ModelNotFound(name, model_version)
        return status

    def model_ready(self, name: str, model_version: str | None = None) -> bool:
        return self.status(name, model_version).ready

    def list_models(self) -> list[str]:
        return sorted(self._view.models)

    async def model_metadata(self, name: str, model_version: str | None = None) -> MetadataModelResponse:
        status = self.status(name, model_version)
        metadata = status.metadata
        if not metadata and status.ready:
            metadata = await self._models.metadata(name)
        return MetadataModelResponse(
            name=name, versions=[_declared(status) or str(status.version)], platform=_platform(status.framework),
            inputs=metadata.get("inputs", []), outputs=metadata.get("outputs", []),
            properties={"framework": status.framework, "state": status.state.value},
        )

    def _servable(self, name: str, model_version: str | None) -> ModelStatus:
        status = self.status(name, model_version)
        # READY models serve even when evicted from every replica (they reload on demand).
        if not status.ready:
            raise ModelNotReady(name, status.state.value, status.reason)
        return status

    async def infer(self, name: str, request: InferRequest, model_version: str | None = None) -> tuple[str, InferResult]:
        """Run V2 inference; returns the version that answered and the result."""
        status = self._servable(name, model_version)
        with naming_model(name):
            result = await self._models.infer(name, request)
        # The replica's word, not the view's: the view names a new version as soon as it is registered.
        answered = result.model_version or str(status.version)
        return (_declared(status) or answered) if answered == str(status.version) else answered, result

    # ---------------------------------------------------------------- repository
    def repository_index(self, ready_only: bool = False) -> list[ModelStatus]:
        models = self._view.models
        return [models[name] for name in sorted(models) if not ready_only or models[name].ready]

    async def load(self, name: str, body: dict[str, Any] | None, *, source: Source = Source.API,
                   force: bool = False) -> ModelStatus:
        """Register ``name`` and wait until it is READY (200) or FAILED (error), like Triton's load; a wait
        longer than ``load_timeout_s`` is :class:`~rayms.errors.LoadTimedOut`. A model a TrainedModel
        declares is replaced only with ``force``."""
        validate_model_name(name)
        spec = self._spec_for(name, body)
        status = await self._control.load(name, spec, source, force=force)
        # The view's long poll may answer after the load settled: take the status now, so the caller's next request
        # sees the model (a full refresh per load would cost a copy of every changed model, per load).
        self._view.note(status)
        if status.state is ModelState.FAILED:
            raise ModelLoadFailed(f"model {name} failed to load: {status.reason}")
        return status

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Unregister ``name``; a model a TrainedModel declares is removed only with ``force``."""
        validate_model_name(name)
        if name not in self._view.models:
            await self._view.refresh()
        if name not in self._view.models:
            raise ModelNotFound(name)
        await self._control.unregister(name, force=force)
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

    async def replicas(self) -> list[ReplicaReport]:
        return await self._control.replicas()


class PythonApi:
    """The operations notebooks and scripts call through ``serve.get_app_handle("rayms")``, taking and
    returning plain Python and numpy values."""

    def __init__(self, plane: DataPlane, view: RegistryView) -> None:
        self._plane = plane
        self._view = view

    async def infer(self, name: str, inputs: Any, parameters: dict[str, Any] | None = None,
                    outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run a model on numpy inputs (an array, or a dict of named arrays); returns named outputs."""
        named = inputs if isinstance(inputs, dict) else {"input-0": inputs}
        request = InferRequest(
            inputs=[Tensor.from_numpy(input_name, np.asarray(value)) for input_name, value in named.items()],
            outputs=[RequestedOutput(name=o) for o in outputs or []],
            parameters=dict(parameters or {}),
        )
        _, result = await self._plane.infer(name, request)
        return {t.name: t.data for t in result.outputs}

    async def predict(self, name: str, instances: Any, parameters: dict[str, Any] | None = None) -> list:
        """V1-style prediction: rows in, a list of predictions out."""
        result = await self.infer(name, np.asarray(instances), parameters=parameters)
        return (result.get("predict") if "predict" in result else next(iter(result.values()))).tolist()

    async def load(self, name: str, storage_uri: str | None = None, framework: str | None = None,
                   memory: str | None = None, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a model and wait until it is READY (raises when it fails); returns its index entry."""
        body = {"storageUri": storage_uri, "framework": framework, "memory": memory, "parameters": parameters}
        status = await self._plane.load(name, {k: v for k, v in body.items() if v is not None} or None)
        return RepositoryIndexItem.from_status(status).model_dump()

    async def unload(self, name: str) -> None:
        await self._plane.unload(name)

    async def list_models(self) -> list[dict[str, Any]]:
        """The repository index, as the HTTP API gives it."""
        await self._view.refresh()
        return [RepositoryIndexItem.from_status(status).model_dump() for status in self._plane.repository_index()]

    async def replicas(self) -> list[dict[str, Any]]:
        """What each model replica holds, as ``GET /v2/repository/replicas`` gives it."""
        return [replica_entry(report) for report in await self._plane.replicas()]


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


def _declared(status: ModelStatus) -> str | None:
    """The version a model had where it came from (MLServer's, a Triton folder's): clients may name it."""
    return status.spec.version if status.spec is not None else None


def _platform(framework: str) -> str:
    return framework_table.platform(framework)

