"""The wire types of the protocols rayms speaks, as pydantic models.

Why this exists: one readable, validated description of every JSON body that crosses the HTTP boundary, the
Open Inference Protocol (KServe V2 / Triton HTTP) with its model repository extension, KServe V1, and rayms's
additions to the repository index. The metadata and repository routes build their answers from these types
(:meth:`RepositoryIndexItem.from_status` is the wire form of :class:`rayms.status.ModelStatus`), and the
OpenAPI docs show them. The inference hot path does not: :mod:`rayms.codecs` decodes and encodes those bodies
with orjson and numpy, because validating every tensor element through pydantic costs far more than the model
call for small models; the inference types here describe those bodies, and the tests check that what the codecs
write validates against them.

All types share :class:`WireModel`: unknown fields are kept (clients send extras such as ``model_name`` or ``id``,
and the spec forbids nothing), and dumps leave out fields that are unset or None (Triton omits empty fields too).
The grammar quoted in each docstring is the one of the OIP prose spec (``inference_rest.md``) and of Triton's
``extension_binary_data.md`` / ``extension_model_repository.md``.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rayms.redact import redact
from rayms.status import ModelState, ModelStatus, ReplicaReport, Source

Parameters = dict[str, Any]
"""``$parameters = { $parameter, ... }`` with ``$parameter = $string : $string | $number | $boolean``."""

TensorData = list[Any]
"""``$tensor_data = [ $element | $tensor_data, ... ]``: row-major, nested or flat."""

REPOSITORY_STATES = tuple(state.value for state in ModelState)
"""The ``state`` values of a repository index entry: rayms's lifecycle states. Triton's own are UNKNOWN,
READY, UNAVAILABLE, LOADING and UNLOADING; READY, LOADING and UNLOADING mean the same here, and clients that
only test for READY (tritonclient's ``is_model_ready``, MLServer's) work unchanged."""

SOURCES = tuple(source.value for source in Source)


class WireModel(BaseModel):
    """Base of all wire types: extra fields allowed, unset and None fields dropped when dumping."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("exclude_none", True)
        kwargs.setdefault("exclude_unset", True)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("exclude_none", True)
        kwargs.setdefault("exclude_unset", True)
        return super().model_dump_json(**kwargs)


# ---------------------------------------------------------------------------------------------------- inference


class RequestInput(WireModel):
    """``$request_input = { "name": $string, "shape": [ $number, ... ], "datatype": $string,
    "parameters": $parameters #optional, "data": $tensor_data }``.

    With the binary extension ``data`` is absent and ``parameters.binary_data_size`` gives the byte count.
    """

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: TensorData | None = None


class RequestOutput(WireModel):
    """``$request_output = { "name": $string, "parameters": $parameters #optional }``.

    ``parameters.binary_data`` (bool) asks for this output as binary.
    """

    name: str
    parameters: Parameters | None = None


class InferenceRequest(WireModel):
    """``$inference_request = { "id": $string #optional, "parameters": $parameters #optional,
    "inputs": [ $request_input, ... ], "outputs": [ $request_output, ... ] #optional }``.

    ``parameters.binary_data_output`` (bool) asks for every output as binary unless an output overrides it.
    """

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(WireModel):
    """``$response_output = { "name": $string, "shape": [ $number, ... ], "datatype": $string,
    "parameters": $parameters #optional, "data": $tensor_data }``.

    A binary output has no ``data`` and carries ``parameters.binary_data_size``.
    """

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: TensorData | None = None


class InferenceResponse(WireModel):
    """``$inference_response = { "model_name": $string, "model_version": $string #optional, "id": $string,
    "parameters": $parameters #optional, "outputs": [ $response_output, ... ] }``."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(WireModel):
    """``$inference_error_response = { "error": $string }``, the body of every rayms error answer."""

    error: str


# ---------------------------------------------------------------------------------------------------- metadata


class MetadataTensor(WireModel):
    """``$metadata_tensor = { "name": $string, "datatype": $string, "shape": [ $number, ... ] }``;
    ``-1`` marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]


class MetadataServerResponse(WireModel):
    """``$metadata_server_response = { "name": $string, "version": $string, "extensions": [ $string, ... ] }``."""

    name: str
    version: str
    extensions: list[str]


class MetadataModelResponse(WireModel):
    """``$metadata_model_response = { "name": $string, "versions": [ $string, ... ] #optional,
    "platform": $string, "inputs": [ $metadata_tensor, ... ], "outputs": [ $metadata_tensor, ... ] }``,
    plus ``"properties": { $string: $string }`` (optional, from the OIP yaml and proto)."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor] | None = None
    outputs: list[MetadataTensor] | None = None
    properties: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------------- repository


class RepositoryIndexRequest(WireModel):
    """``$repository_index_request = { "ready": $bool #optional }``; false (the default) lists every model,
    true only the ready ones. An empty body means ``{}``."""

    ready: bool = False


class RepositoryIndexItem(WireModel):
    """One entry of ``$repository_index_response = [ { "name": $string, "version": $string #optional,
    "state": $string, "reason": $string }, ... ]``.

    ``state`` is one of :data:`REPOSITORY_STATES`. rayms adds, all optional: ``framework``, ``storageUri``,
    ``source`` (who registered the model, one of :data:`SOURCES`), ``declaredMemory`` and ``measuredMemory``
    (bytes), ``loadTimeS`` (seconds of the last load), ``replicas`` (identifiers of the replicas holding the
    model) and ``updatedAt`` (ISO 8601, UTC, of the last change).
    """

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None
    framework: str | None = None
    storage_uri: str | None = Field(default=None, alias="storageUri")
    source: str | None = None
    declared_memory: int | None = Field(default=None, alias="declaredMemory")
    measured_memory: int | None = Field(default=None, alias="measuredMemory")
    load_time_s: float | None = Field(default=None, alias="loadTimeS")
    replicas: list[str] | None = None
    updated_at: str | None = Field(default=None, alias="updatedAt")

    @classmethod
    def from_status(cls, status: ModelStatus) -> RepositoryIndexItem:
        return cls(
            name=status.name, version=str(status.version), state=status.state.value, reason=redact(status.reason),
            framework=status.framework, storage_uri=redact(status.storage_uri), source=status.source.value,
            declared_memory=status.declared_bytes, measured_memory=status.measured_bytes,
            load_time_s=status.load_time_s, replicas=list(status.replicas),
            updated_at=datetime.fromtimestamp(status.updated_at, timezone.utc).isoformat(timespec="milliseconds"),
        )


class RepositoryLoadRequest(WireModel):
    """``$repository_load_request = { "parameters": $parameters #optional }``, extended by rayms.

    A body may give the model spec at the top level (``storageUri``, ``framework``, ``memory``) or as
    ``parameters`` holding a TrainedModel's ``spec.model`` (the same keys). Without either, the model is looked up
    in the configured model repository. Load on a loaded model reloads it.
    """

    storage_uri: str | None = Field(default=None, alias="storageUri")
    framework: str | None = None
    memory: str | int | None = None
    parameters: Parameters | None = None


class RepositoryUnloadRequest(WireModel):
    """``$repository_unload_request = { "parameters": $parameters #optional }``
    (``unload_dependents`` is accepted and has no effect: rayms models have no dependents)."""

    parameters: Parameters | None = None


# ---------------------------------------------------------------------------------------------------- KServe V1


class V1PredictRequest(WireModel):
    """``{ "instances": [ <value>|<(nested)list>|<object>, ... ] }`` or the equivalent ``{ "inputs": [...] }``."""

    instances: list[Any] | None = None
    inputs: list[Any] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> V1PredictRequest:
        if (self.instances is None) == (self.inputs is None):
            raise ValueError('give exactly one of "instances" or "inputs"')
        return self


class V1PredictResponse(WireModel):
    """``{ "predictions": [ <value>|<(nested)list>|<object>, ... ] }``."""

    predictions: list[Any]


# ---------------------------------------------------------------------------------------------------- rayms


def replica_entry(report: ReplicaReport) -> dict[str, Any]:
    """One entry of ``GET /v2/repository/replicas`` (a rayms addition): what one model replica holds."""
    return {"replica": report.replica, "node": report.node, "used_bytes": report.used_bytes,
            "budget_bytes": report.budget_bytes, "evictions": report.evictions,
            "models": {name: asdict(model) for name, model in report.models.items()}}
