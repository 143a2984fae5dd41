"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on the transport-neutral data plane.

:class:`InferenceService` translates protobuf messages (:mod:`rayms.protos`) to :class:`~rayms.dataplane.DataPlane`
calls and back, as the HTTP routes translate JSON; it raises the same :class:`~rayms.errors.RaymsError` values, and
:func:`grpc_status` maps each to a gRPC status code by the HTTP status it carries, with the message HTTP answers:

=========================================================  ====  ======================
error                                                      HTTP  gRPC
=========================================================  ====  ======================
InvalidInput, InvalidSpec, MemoryUnavailable, load failed   400  INVALID_ARGUMENT
ModelNotFound                                               404  NOT_FOUND
PayloadTooLarge                                             413  RESOURCE_EXHAUSTED
NotSupported                                                501  UNIMPLEMENTED
ModelNotReady, Overloaded                                   503  UNAVAILABLE
anything else (a model that raised, a storage failure)      500  INTERNAL
=========================================================  ====  ======================

Decisions clients can observe:

* Inputs come as typed ``contents`` or as ``raw_input_contents`` (one entry per input, in order; then no input may
  have ``contents``). Typed data must sit in its datatype's field (FP32 in ``fp32_contents``, INT8/16/32 in
  ``int_contents``, ...), hold exactly as many elements as the shape says, and fit the datatype; FP16 and BF16 have
  no field and must come raw.
* Outputs are answered the way inputs came: raw when the request used ``raw_input_contents`` (what tritonclient
  sends, and the only form its ``as_numpy`` reads for numbers), typed otherwise; raw as well whenever an output
  is FP16 or BF16. This is KServe's rule.
* ``ModelReady`` answers ``ready: false`` for a model or version that does not exist, as Triton does (tritonclient's
  ``is_model_ready`` is then False over gRPC as over HTTP); ``ModelMetadata`` and ``ModelInfer`` answer NOT_FOUND.
* ``ServerReady`` is false until the replica has heard from the model registry.
* Repository loads take the model's spec from their parameters, as the HTTP body's ``parameters``: string
  parameters ``storageUri`` and ``framework`` (and ``memory``), or ``config``, a JSON TrainedModel ``spec.model``
  (tritonclient's ``load_model(name, config=...)``); none loads the model of that name from the server's model
  repository. A request whose ``model_name`` (field 2) is empty names the model in field 1, which is where KServe's
  schema puts it.
* The response ``id`` echoes the request's, empty when none was given.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
import numpy as np

from rayms.codecs import (
    DATATYPES, InferRequest, InferResult, RequestedOutput, Tensor, decode_raw_tensor, encode_raw_tensor,
    selected_outputs,
)
from rayms.dataplane import DataPlane, naming_model
from rayms.redact import redact
from rayms.errors import InferenceError, InvalidInput, ModelNotFound, Overloaded, PayloadTooLarge, RaymsError
from rayms.protocol import MetadataTensor
from rayms.protos import inference_pb2 as pb

logger = logging.getLogger("rayms.grpc")

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED,
          503: grpc.StatusCode.UNAVAILABLE}

# datatype -> the InferTensorContents field holding it, and the numpy dtype its values are checked against
_FIELDS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype("?")),
    "INT8": ("int_contents", np.dtype("<i1")), "INT16": ("int_contents", np.dtype("<i2")),
    "INT32": ("int_contents", np.dtype("<i4")), "INT64": ("int64_contents", np.dtype("<i8")),
    "UINT8": ("uint_contents", np.dtype("<u1")), "UINT16": ("uint_contents", np.dtype("<u2")),
    "UINT32": ("uint_contents", np.dtype("<u4")), "UINT64": ("uint64_contents", np.dtype("<u8")),
    "FP32": ("fp32_contents", np.dtype("<f4")), "FP64": ("fp64_contents", np.dtype("<f8")),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_CONTENT_FIELDS = tuple(dict.fromkeys(field for field, _ in _FIELDS.values()))
_RAW_ONLY = ("FP16", "BF16")
_INT64_MAX = 2**63 - 1

RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
"""The RPCs of ``inference.GRPCInferenceService`` rayms serves (Triton's others answer UNIMPLEMENTED)."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with (see the module docstring's table)."""
    if isinstance(exc, RaymsError):
        return _CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}"


class InferenceService:
    """The RPCs as plain async methods: a request message in, a response message out, a RaymsError when the call
    fails. Transports (:mod:`rayms.cluster.grpc`) call :meth:`call` and answer its error with the status.

    Inference requests beyond ``max_in_flight`` at once are refused with UNAVAILABLE at once, as HTTP answers 503;
    health, metadata and repository calls are never refused. An inference request larger than
    ``max_request_bytes`` is refused with RESOURCE_EXHAUSTED, as HTTP answers 413."""

    def __init__(self, plane: DataPlane, *, max_in_flight: int, max_request_bytes: int) -> None:
        self._plane = plane
        self._max_in_flight = max_in_flight
        self._max_request_bytes = max_request_bytes
        self._in_flight = 0

    async def call(self, method: str, request: Any) -> Any:
        """Run RPC ``method``; anything raised becomes a RaymsError (unexpected ones are logged)."""
        try:
            return await getattr(self, method)(request)
        except RaymsError as exc:
            if exc.status_code == 500:
                logger.error("%s failed: %s", method, exc)
            raise
        except Exception as exc:
            logger.exception("%s failed", method)
            raise RaymsError(grpc_status(exc)[1]) from exc

    # ---------------------------------------------------------------- health and metadata
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:  # noqa: N802 (RPC names)
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:  # noqa: N802
        try:
            ready = self._plane.model_ready(_model_name(request.name), request.version or None)
        except ModelNotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:  # noqa: N802
        metadata = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version,
                                         extensions=metadata.extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:  # noqa: N802
        metadata = await self._plane.model_metadata(_model_name(request.name), request.version or None)
        return pb.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions or [], platform=metadata.platform,
            inputs=[_tensor_metadata(t) for t in metadata.inputs or []],
            outputs=[_tensor_metadata(t) for t in metadata.outputs or []],
            properties={str(k): str(v) for k, v in (metadata.properties or {}).items()},
        )

    # ---------------------------------------------------------------- inference
    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:  # noqa: N802
        name, version = _model_name(request.model_name), request.model_version or None
        if self._in_flight >= self._max_in_flight:
            raise Overloaded(f"this replica is at its limit of {self._max_in_flight} inference requests in flight; "
                             "retry shortly")
        if (size := request.ByteSize()) > self._max_request_bytes:
            raise PayloadTooLarge(f"request of {size} bytes exceeds the limit of {self._max_request_bytes} bytes")
        self._in_flight += 1
        try:
            self._plane.status(name, version)  # an unknown model or version is NOT_FOUND whatever the request holds
            with naming_model(name):
                infer_request = decode_infer_request(request)
            answered, result = await self._plane.infer(name, infer_request, version)
            with naming_model(name):
                return encode_infer_response(model_name=name, model_version=answered, request=infer_request,
                                             result=result, raw=len(request.raw_input_contents) > 0)
        finally:
            self._in_flight -= 1

    # ---------------------------------------------------------------- repository
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:  # noqa: N802
        rows = self._plane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=row.name, version=str(row.version), state=row.state.value,
                                                  reason=redact(row.reason))
            for row in rows])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:  # noqa: N802
        name = _repository_model_name(request)
        parameters = {key: _repository_value(value) for key, value in request.parameters.items()}
        await self._plane.load(name, {"parameters": parameters} if parameters else None)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:  # noqa: N802
        name = _repository_model_name(request)
        await self._plane.unload(name)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)


# ------------------------------------------------------------------------------------------ requests
def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """Validate a ``ModelInferRequest`` into an :class:`~rayms.codecs.InferRequest`."""
    if not request.inputs:
        raise InvalidInput("request has no inputs: 'inputs' must be a non-empty list")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                           "give one per input, in the order of 'inputs'")
    inputs: list[Tensor] = []
    names: set[str] = set()
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"input #{position}: missing a name")
        if name in names:
            raise InvalidInput(f"input {name}: given more than once")
        names.add(name)
        shape = list(tensor.shape)
        parameters = {key: _parameter_value(value) for key, value in tensor.parameters.items()}
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name}: has contents although the request uses raw_input_contents")
            inputs.append(decode_raw_tensor(raw[position], name=name, datatype=tensor.datatype, shape=shape,
                                            parameters=parameters))
        else:
            data = _typed_data(tensor, name=name, shape=shape)
            inputs.append(Tensor(name=name, datatype=tensor.datatype, shape=shape, data=data, parameters=parameters))
    return InferRequest(
        id=request.id or None, inputs=inputs,
        outputs=[RequestedOutput(name=o.name) for o in request.outputs],
        parameters={key: _parameter_value(value) for key, value in request.parameters.items()},
    )


def _typed_data(tensor: Any, *, name: str, shape: list[int]) -> np.ndarray:
    datatype = tensor.datatype
    if datatype in _RAW_ONLY:
        raise InvalidInput(f"input {name}: {datatype} data has no typed contents field; send it in raw_input_contents")
    if datatype not in _FIELDS:
        raise InvalidInput(f"input {name}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input {name}: shape must be a list of non-negative integers, got {shape!r}")
    field, dtype = _FIELDS[datatype]
    contents = tensor.contents
    misplaced = [other for other in _CONTENT_FIELDS if other != field and len(getattr(contents, other))]
    if misplaced:
        raise InvalidInput(f"input {name}: {datatype} data goes in contents.{field}, got {', '.join(misplaced)}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name}: shape {shape} needs {count} elements, got {len(values)}")
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.array(values, dtype=_wide(dtype))
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InvalidInput(f"input {name}: value {low if low < info.min else high} is out of range for {datatype}")
    return array.astype(dtype, copy=False).reshape(shape)


def _wide(dtype: np.dtype) -> np.dtype:
    """The dtype the protobuf field's values arrive in (int_contents is int32 for INT8/16 too, ...)."""
    if dtype.kind == "i":
        return np.dtype("<i8") if dtype.itemsize == 8 else np.dtype("<i4")
    if dtype.kind == "u":
        return np.dtype("<u8") if dtype.itemsize == 8 else np.dtype("<u4")
    return dtype


def _model_name(name: str) -> str:
    if not name:
        raise InvalidInput("the request names no model: set model_name (or name)")
    return name


def _repository_model_name(request: Any) -> str:
    # Triton's schema: model_name is field 2; KServe's puts the name in field 1, Triton's repository_name.
    return _model_name(request.model_name or request.repository_name)


def _parameter_value(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _repository_value(value: pb.ModelRepositoryParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _tensor_metadata(tensor: MetadataTensor) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype,
                                                   shape=[int(d) for d in tensor.shape])


# ------------------------------------------------------------------------------------------ responses
def encode_infer_response(*, model_name: str, model_version: str | None, request: InferRequest, result: InferResult,
                          raw: bool) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` of the requested outputs; ``raw`` answers in ``raw_output_contents``."""
    outputs = selected_outputs(request, result)
    raw = raw or any(tensor.datatype in _RAW_ONLY for tensor in outputs)
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version or "", id=request.id or "")
    _set_parameters(response.parameters, result.parameters, where="response")
    for tensor in outputs:
        entry = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[int(d) for d in tensor.shape])
        _set_parameters(entry.parameters, tensor.parameters, where=f"output {tensor.name}")
        if raw:
            response.raw_output_contents.append(encode_raw_tensor(tensor))
        else:
            _set_typed(entry.contents, tensor)
    return response


def _set_typed(contents: Any, tensor: Tensor) -> None:
    data = tensor.data if isinstance(tensor.data, np.ndarray) else np.asarray(tensor.data)
    if data.size != math.prod(tensor.shape):
        raise InferenceError(f"output {tensor.name}: shape {list(tensor.shape)} does not hold the model's "
                             f"{data.size} elements")
    if tensor.datatype not in _FIELDS:
        raise InferenceError(f"output {tensor.name}: unknown datatype {tensor.datatype!r}")
    field, dtype = _FIELDS[tensor.datatype]
    flat = data.reshape(-1)
    try:
        if tensor.datatype == "BYTES":
            getattr(contents, field).extend(
                bytes(x) if isinstance(x, (bytes, bytearray)) else str(x).encode() for x in flat.tolist())
        else:
            getattr(contents, field).extend(flat.astype(dtype, copy=False).tolist())
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferenceError(f"output {tensor.name}: cannot be encoded as {tensor.datatype}: {exc}") from exc


def _set_parameters(target: Any, parameters: dict[str, Any], *, where: str) -> None:
    for key, value in parameters.items():
        entry = target[str(key)]
        if isinstance(value, (bool, np.bool_)):
            entry.bool_param = bool(value)
        elif isinstance(value, (int, np.integer)):
            if int(value) > _INT64_MAX:
                entry.uint64_param = int(value)
            else:
                entry.int64_param = int(value)
        elif isinstance(value, (float, np.floating)):
            entry.double_param = float(value)
        elif isinstance(value, str):
            entry.string_param = value
        elif isinstance(value, bytes):
            entry.string_param = value.decode(errors="replace")
        else:
            raise InferenceError(f"{where}: parameter {key} of type {type(value).__name__} has no gRPC form")
