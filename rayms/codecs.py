"""Encoders and decoders between HTTP bodies and numpy tensors: Open Inference Protocol (V2) and KServe V1. The
gRPC service (:mod:`rayms.grpc_api`) shares the raw-tensor layout through :func:`decode_raw_tensor`,
:func:`encode_raw_tensor` and :func:`selected_outputs`.

Every inference request passes through here, so this module stays on the fast path: no pydantic, orjson for JSON,
and binary tensors (OIP binary tensor data extension) mapped with ``np.frombuffer`` without copying. The value types
are transport-neutral: the HTTP layer (:mod:`rayms.router`) decodes a body into an :class:`InferRequest`, the model
host answers with an :class:`InferResult`, and the HTTP layer encodes it with :func:`encode_v2_response`.
:mod:`rayms.protocol` describes the same wire shapes as pydantic models for documentation and tests. Decisions clients can observe:

* BYTES elements are Python ``bytes`` in an object array whatever the transport (JSON strings are UTF-8 encoded;
  binary elements are a 4-byte little-endian length plus bytes). Outputs may hold bytes, str or other objects
  (``str()``); a non-UTF-8 element asked for as JSON raises NotSupported (the client should ask for binary).
* BF16 inputs are accepted only as binary (tritonclient refuses JSON BF16 too) and widened exactly to float32, the
  datatype staying ``"BF16"``; JSON BF16 raises NotSupported. BF16 outputs (``ml_dtypes.bfloat16`` data, or float
  data labelled BF16, rounded to nearest even) go out as 2-byte binary or as JSON numbers.
* The raw binary form (``Inference-Header-Content-Length: 0``) raises NotSupported: it needs model metadata.
* Binary inputs are read-only, possibly unaligned views of the body; copy them to write.
* JSON values are checked, not coerced: strings, booleans and nulls in numeric tensors, fractions or out-of-range
  values in integer tensors, and non-booleans in BOOL tensors are rejected. Nested (rectangular) and flat data are
  both accepted. An empty ``outputs`` list means all outputs, like an absent one.
* V1: numeric rows give a numeric ndarray (``null`` -> NaN), rows with strings an object ndarray of the Python
  values; feature maps (dict instances) are rejected because their column order cannot be known here.
* Work is bounded by the body's size whatever it holds: shapes have at most :data:`MAX_RANK` dimensions and
  :data:`MAX_ELEMENTS` elements (counted with an early exit, never as one product of huge integers), data is
  flattened without recursion and nested at most :data:`MAX_RANK` lists deep, and values echoed in an error
  are cut short. Each refusal is an :class:`~rayms.errors.InvalidInput` naming the limit.
"""

from __future__ import annotations

import math
import reprlib
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from rayms.errors import InferenceError, InvalidInput, NotSupported

_NUMERIC: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "?"), ("UINT8", "<u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
        ("INT8", "<i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
        ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"),
    )
}
DATATYPES: tuple[str, ...] = (*_NUMERIC, "BF16", "BYTES")
"""Every datatype the codecs understand, in the order of the OIP datatype table (BF16 from KServe's)."""

MAX_RANK = 32
"""Most dimensions a tensor may have, and most lists its JSON data may be nested in (numpy stops at 64)."""
MAX_ELEMENTS = 2**32
"""Most elements a tensor may have: more than a request body can carry (4 GiB even as BOOL)."""
_SHOWN_CHARS = 80  # longest rendering of a client's value inside an error message
_REPR = reprlib.Repr()  # depth and breadth capped: renders any nesting without recursing into all of it
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, _SHOWN_CHARS, _SHOWN_CHARS

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")
_KIND_WORDS = {"U": "strings", "b": "booleans", "O": "nulls, objects or mixed values", "f": "non-integral numbers",
               "i": "numbers", "u": "numbers"}


@dataclass(slots=True)
class Tensor:
    """One named tensor. ``data`` has the given ``shape``; BYTES data is an object array of ``bytes``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_numpy(cls, name: str, array: Any, parameters: dict[str, Any] | None = None) -> Tensor:
        """Build a tensor whose datatype and shape come from the array."""
        data = np.asarray(array)
        return cls(name=name, datatype=datatype_of(data), shape=list(data.shape), data=data,
                   parameters=parameters or {})


@dataclass(slots=True)
class RequestedOutput:
    """An entry of the request's ``outputs``; ``binary`` is its ``parameters.binary_data`` (None when unset)."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request. ``outputs`` empty means all outputs; ``parameters`` are the request's."""

    id: str | None = None
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResult:
    """What a model produced: every output it has, response-level parameters, and the version that ran
    (while a new version loads, a replica may still answer with the previous one)."""

    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array: ``float32`` -> ``FP32``, object/str/bytes -> ``BYTES``, ..."""
    dtype = array.dtype
    if dtype.name == "bfloat16":
        return "BF16"
    kind = dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "OUS":
        return "BYTES"
    if kind in "iuf":
        name = {"i": "INT", "u": "UINT", "f": "FP"}[kind] + str(8 * dtype.itemsize)
        if name in _NUMERIC:
            return name
    raise NotSupported(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def v2_metadata_tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    """A ``$metadata_tensor`` (``-1`` marks a variable dimension)."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"tensor {name}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def encode_error(message: str) -> bytes:
    """The body of every error answer: ``{"error": message}``."""
    return orjson.dumps({"error": message})


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut short in length and depth (reprlib): a hostile value must
    neither come back a million times nor exhaust the stack on its way."""
    text = _REPR.repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}..."


# ---------------------------------------------------------------------------------------------------- V2 decode


def decode_v2_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode an inference request: JSON, or a JSON header of ``header_length`` bytes followed by binary tensors.

    ``header_length`` is the value of the ``Inference-Header-Content-Length`` header (None when absent).
    """
    view = memoryview(body)
    binary = header_length is not None
    if header_length is None:
        header = _loads(view, what="request body")
    elif header_length == 0:
        raise NotSupported("raw binary requests (Inference-Header-Content-Length: 0) are not supported; "
                           "send a JSON header with parameters.binary_data_size for each input")
    elif not 0 < header_length <= len(view):
        raise InvalidInput(f"Inference-Header-Content-Length {header_length} is outside the body of {len(view)} bytes")
    else:
        header = _loads(view[:header_length], what=f"inference header (first {header_length} bytes of the body)")
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request has no inputs: 'inputs' must be a non-empty list")
    offset = header_length or 0
    inputs: list[Tensor] = []
    names: set[str] = set()
    for position, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(raw, position=position, view=view, offset=offset, binary=binary)
        if tensor.name in names:
            raise InvalidInput(f"input {tensor.name}: given more than once")
        names.add(tensor.name)
        inputs.append(tensor)
    if binary and offset != len(view):
        raise InvalidInput(f"body has {len(view) - offset} bytes after the last binary input; "
                           "check each input's binary_data_size")
    return InferRequest(id=_request_id(header.get("id")), inputs=inputs,
                        outputs=_requested_outputs(header.get("outputs")),
                        parameters=_parameters(header.get("parameters"), where="request"))


def _loads(data: Any, *, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc


def _request_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise InvalidInput(f"request 'id' must be a string, got {_shown(value)}")


def _parameters(value: Any, *, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object, got {_shown(value)}")
    return value


def _requested_outputs(value: Any) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    requested = []
    for position, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"requested output #{position}: must be an object with a string 'name'")
        name = item["name"]
        flag = _parameters(item.get("parameters"), where=f"requested output {name}").get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise InvalidInput(f"requested output {name}: parameters.binary_data must be true or false, "
                               f"got {_shown(flag)}")
        requested.append(RequestedOutput(name=name, binary=flag))
    return requested


def _decode_input(raw: Any, *, position: int, view: memoryview, offset: int, binary: bool) -> tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"input #{position}: must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"input #{position}: missing a string 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or (datatype not in _NUMERIC and datatype not in ("BYTES", "BF16")):
        raise InvalidInput(f"input {name}: unknown datatype {_shown(datatype)}; "
                           f"expected one of {', '.join(DATATYPES)}")
    shape = raw.get("shape")
    count = _element_count(shape, name=name)
    parameters = _parameters(raw.get("parameters"), where=f"input {name}")
    size = parameters.pop("binary_data_size", None)
    if size is None:
        if "data" not in raw:
            raise InvalidInput(f"input {name}: missing 'data' (or parameters.binary_data_size for binary data)")
        data = _from_json(raw["data"], name=name, datatype=datatype, shape=shape, count=count)
        return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), offset
    if not binary:
        raise InvalidInput(f"input {name}: binary_data_size is set but the request has no "
                           "Inference-Header-Content-Length header")
    if "data" in raw:
        raise InvalidInput(f"input {name}: has both 'data' and parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name}: binary_data_size must be a non-negative integer, got {_shown(size)}")
    if offset + size > len(view):
        raise InvalidInput(f"input {name}: binary_data_size {size} exceeds the {len(view) - offset} bytes left "
                           "in the body")
    chunk = view[offset:offset + size]
    data = _from_binary(chunk, name=name, datatype=datatype, shape=shape, count=count)
    return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), offset + size


def _element_count(shape: Any, *, name: str) -> int:
    """The number of elements of a valid ``shape``; at most :data:`MAX_RANK` multiplications of numbers that
    stay at most :data:`MAX_ELEMENTS`."""
    if not isinstance(shape, list):
        raise InvalidInput(f"input {name}: shape must be a list of non-negative integers, got {_shown(shape)}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name}: shape has {len(shape)} dimensions, more than the {MAX_RANK} a tensor "
                           "may have")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(f"input {name}: shape must be a list of non-negative integers, got {_shown(shape)}")
        count *= dim
        if dim > MAX_ELEMENTS or count > MAX_ELEMENTS:
            raise InvalidInput(f"input {name}: shape {shape} has more than {MAX_ELEMENTS} elements, the most a "
                               "tensor may have")
    return count


def _from_json(data: Any, *, name: str, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BF16":
        raise NotSupported(f"input {name}: BF16 data must be sent as binary (binary tensor data extension), "
                           "not as JSON")
    if datatype == "BYTES":
        return _bytes_from_json(data, name=name, shape=shape, count=count)
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name}: data is not a rectangular array of values: {exc}") from exc
    if array.size != count:
        raise InvalidInput(f"input {name}: shape {shape} needs {count} elements, got {array.size}")
    if not count:
        return array.astype(_NUMERIC[datatype]).reshape(shape)
    return _numeric_from_json(array, data, name=name, datatype=datatype).reshape(shape)


def _numeric_from_json(array: np.ndarray, data: Any, *, name: str, datatype: str) -> np.ndarray:
    """Check and convert the values numpy inferred from JSON; integers never round-trip through float64."""
    target = _NUMERIC[datatype]
    kind = array.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input {name}: BOOL data must be true or false, got {_KIND_WORDS.get(kind, kind)}")
        return array
    if target.kind == "f":
        if kind not in "iuf":
            raise InvalidInput(f"input {name}: {datatype} data must be numbers, got {_KIND_WORDS.get(kind, kind)}")
        return array.astype(target, copy=False)
    if kind in "iu":
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InvalidInput(f"input {name}: value {low if low < info.min else high} is out of range for {datatype}")
        return array.astype(target, copy=False)
    if kind not in "fO" or (kind == "f" and not bool(np.all(array == np.trunc(array)))):
        raise InvalidInput(f"input {name}: {datatype} data must be integers, got {_KIND_WORDS.get(kind, kind)}")
    # Mixed signs beyond int64, or integral floats: convert each Python value exactly.
    try:
        return np.array(data, dtype=target)
    except OverflowError as exc:
        raise InvalidInput(f"input {name}: a value is out of range for {datatype}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input {name}: {datatype} data must be integers, got "
                           f"{_KIND_WORDS.get(kind, kind)}") from exc


def _bytes_from_json(data: Any, *, name: str, shape: list[int], count: int) -> np.ndarray:
    flat = _leaves(data, name=name)
    if len(flat) != count:
        raise InvalidInput(f"input {name}: shape {shape} needs {count} elements, got {len(flat)}")
    if not all(type(item) is str for item in flat):
        raise InvalidInput(f"input {name}: BYTES data must be strings in JSON")
    array = np.empty(count, dtype=object)
    array[:] = [item.encode() for item in flat]
    return array.reshape(shape)


def _leaves(data: Any, *, name: str) -> list[Any]:
    """The non-list values of nested lists, in order. A loop over a stack of iterators, not recursion, so
    no nesting can exhaust Python's stack; nesting deeper than :data:`MAX_RANK` is refused at that depth."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) == MAX_RANK:
                    raise InvalidInput(f"input {name}: data is nested more than {MAX_RANK} lists deep")
                stack.append(iter(item))
                break  # continue with the inner list; this iterator resumes after it
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_binary(chunk: memoryview, *, name: str, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_binary(chunk, name=name, shape=shape, count=count)
    dtype = np.dtype("<u2") if datatype == "BF16" else _NUMERIC[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(f"input {name}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                           f"binary_data_size is {len(chunk)}")
    array = np.frombuffer(chunk, dtype=dtype, count=count)
    if datatype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)


def _bytes_from_binary(chunk: memoryview, *, name: str, shape: list[int], count: int) -> np.ndarray:
    items: list[bytes] = []
    position, end = 0, len(chunk)
    while position < end:
        if len(items) == count:
            raise InvalidInput(f"input {name}: shape {shape} needs {count} elements, the binary data holds more")
        if position + 4 > end:
            raise InvalidInput(f"input {name}: BYTES element {len(items)} has a truncated 4-byte length")
        (length,) = _LENGTH.unpack_from(chunk, position)
        position += 4
        if position + length > end:
            raise InvalidInput(f"input {name}: BYTES element {len(items)} needs {length} bytes, "
                               f"only {end - position} are left")
        items.append(chunk[position:position + length].tobytes())
        position += length
    if len(items) != count:
        raise InvalidInput(f"input {name}: shape {shape} needs {count} elements, got {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


# ---------------------------------------------------------------------------------------------------- V2 encode


def encode_v2_response(
    *, model_name: str, model_version: str | None, request: InferRequest, result: InferResult
) -> tuple[bytes, dict[str, str]]:
    """Encode the response body and its headers (``content-type``, plus ``inference-header-content-length``
    when any output is binary). Only the requested outputs are sent, in the requested order."""
    default_binary = request.parameters.get("binary_data_output") is True
    outputs: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for tensor, binary in _selected_outputs(request=request, result=result, default_binary=default_binary):
        entry, chunk = _encode_output(tensor, binary=binary)
        outputs.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    response["id"] = request.id if request.id is not None else uuid.uuid4().hex
    if result.parameters:
        response["parameters"] = result.parameters
    response["outputs"] = outputs
    header = _dumps(response, what="inference response")
    if not chunks:
        return header, {"content-type": JSON_CONTENT_TYPE}
    headers = {"content-type": BINARY_CONTENT_TYPE, "inference-header-content-length": str(len(header))}
    return b"".join([header, *chunks]), headers


def selected_outputs(request: InferRequest, result: InferResult) -> list[Tensor]:
    """The outputs a request asked for, in its order (every output when it named none); an output the model does
    not produce raises InvalidInput. Any transport's encoder starts from this."""
    return [tensor for tensor, _ in _selected_outputs(request=request, result=result, default_binary=False)]


def decode_raw_tensor(raw: Any, *, name: str, datatype: str, shape: list[int],
                      parameters: dict[str, Any] | None = None) -> Tensor:
    """A tensor from its raw bytes: row-major, little-endian, no padding; BYTES elements each a 4-byte
    little-endian length and the bytes (a binary tensor of the HTTP extension, a gRPC ``raw_input_contents``
    entry). The data is a read-only view of ``raw``."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    if not all(dim >= 0 for dim in shape):
        raise InvalidInput(f"input {name}: shape must be a list of non-negative integers, got {shape!r}")
    data = _from_binary(memoryview(raw), name=name, datatype=datatype, shape=shape, count=math.prod(shape))
    return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters or {})


def encode_raw_tensor(tensor: Tensor) -> bytes:
    """The raw bytes of an output tensor (the layout :func:`decode_raw_tensor` reads)."""
    data = tensor.data if isinstance(tensor.data, np.ndarray) else np.asarray(tensor.data)
    datatype = tensor.datatype or datatype_of(data)
    if data.size != math.prod(tensor.shape):
        raise InferenceError(f"output {tensor.name}: shape {list(tensor.shape)} needs {math.prod(tensor.shape)} "
                             f"elements, the model returned {data.size}")
    if datatype not in DATATYPES:
        raise NotSupported(f"output {tensor.name}: unknown datatype {datatype!r}")
    try:
        chunk = _binary_data(data, datatype=datatype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferenceError(f"output {tensor.name}: cannot be encoded as {datatype}: {exc}") from exc
    return chunk if isinstance(chunk, bytes) else chunk.tobytes()


def _selected_outputs(*, request: InferRequest, result: InferResult, default_binary: bool) -> list[tuple[Tensor, bool]]:
    if not request.outputs:
        return [(tensor, default_binary) for tensor in result.outputs]
    produced = {tensor.name: tensor for tensor in result.outputs}
    selected = []
    for wanted in request.outputs:
        tensor = produced.get(wanted.name)
        if tensor is None:
            raise InvalidInput(f"requested output {wanted.name} is not produced by this model; "
                               f"it produces: {', '.join(produced) or 'nothing'}")
        selected.append((tensor, default_binary if wanted.binary is None else wanted.binary))
    return selected


def _encode_output(tensor: Tensor, *, binary: bool) -> tuple[dict[str, Any], Any]:
    name = tensor.name
    data = tensor.data if isinstance(tensor.data, np.ndarray) else np.asarray(tensor.data)
    datatype = tensor.datatype or datatype_of(data)
    shape = list(tensor.shape)
    if data.size != math.prod(shape):
        raise InferenceError(f"output {name}: shape {shape} needs {math.prod(shape)} elements, "
                             f"the model returned {data.size}")
    if datatype not in DATATYPES:
        raise NotSupported(f"output {name}: unknown datatype {datatype!r}")
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    try:
        if binary:
            chunk = _binary_data(data, datatype=datatype)
            entry["parameters"] = {**tensor.parameters, "binary_data_size": len(chunk)}
            return entry, chunk
        if tensor.parameters:
            entry["parameters"] = tensor.parameters
        entry["data"] = _json_data(data, name=name, datatype=datatype)
        return entry, None
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferenceError(f"output {name}: cannot be encoded as {datatype}: {exc}") from exc


def _binary_data(data: np.ndarray, *, datatype: str) -> Any:
    if datatype == "BYTES":
        raws = [bytes(x) if isinstance(x, (bytes, bytearray)) else str(x).encode() for x in data.ravel().tolist()]
        return b"".join(_LENGTH.pack(len(raw)) + raw for raw in raws)
    if datatype == "BF16":
        return _bf16_bits(data).reshape(-1).view(np.uint8)
    return np.ascontiguousarray(data, dtype=_NUMERIC[datatype]).reshape(-1).view(np.uint8)


def _bf16_bits(data: np.ndarray) -> np.ndarray:
    if data.dtype.name == "bfloat16":
        return np.ascontiguousarray(data).view("<u2")
    single = np.ascontiguousarray(data, dtype="<f4")
    bits = single.view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest, ties to even
    return np.where(np.isnan(single), np.uint16(0x7FC0), rounded).astype("<u2")


def _json_data(data: np.ndarray, *, name: str, datatype: str) -> Any:
    if datatype == "BYTES":
        return [_json_string(item, name=name) for item in data.ravel().tolist()]
    if datatype == "BF16":
        return np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
    return np.ascontiguousarray(data, dtype=_NUMERIC[datatype]).reshape(-1)


def _json_string(item: Any, *, name: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray)):
        try:
            return item.decode()
        except UnicodeDecodeError as exc:
            raise NotSupported(f"output {name}: a BYTES element is not UTF-8 and cannot be sent as JSON; "
                               "request it as binary (parameters.binary_data)") from exc
    return str(item)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return value.decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any, *, what: str) -> bytes:
    try:
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)
    except (orjson.JSONEncodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{what} cannot be encoded as JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------------- V1


def decode_v1_request(body: bytes) -> np.ndarray:
    """Decode ``{"instances": [...]}`` or the equivalent ``{"inputs": [...]}`` into an ndarray.

    Numeric rows give a numeric array (2-D for a list of rows, 1-D for a list of scalars; ``null`` -> NaN). Rows
    holding strings give an object array of the Python values. Ragged rows and dict instances are rejected.
    """
    payload = _loads(body, what="request body")
    if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
        raise InvalidInput('V1 request must be a JSON object with exactly one of "instances" or "inputs"')
    key = "instances" if "instances" in payload else "inputs"
    rows = payload[key]
    if not isinstance(rows, list) or not rows:
        raise InvalidInput(f'V1 request: "{key}" must be a non-empty list')
    if any(isinstance(row, dict) for row in rows):
        raise InvalidInput(f'V1 request: "{key}" holds objects (feature maps), which are not supported; send each '
                           "instance as a list of values in the model's feature order, or use the V2 protocol")
    try:
        array = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        array = np.array(rows, dtype=object)
    if array.ndim > MAX_RANK:
        raise InvalidInput(f'V1 request: "{key}" is nested {array.ndim} lists deep, more than {MAX_RANK}')
    if array.dtype.kind in "biuf":
        return array
    array = np.array(rows, dtype=object)
    flat = array.ravel()
    for item in flat:
        if isinstance(item, (list, dict)):
            raise InvalidInput(f'V1 request: "{key}" rows must all have the same length and hold plain values')
    if all(item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)) for item in flat):
        return array.astype(np.float64)
    return array


def encode_v1_response(predictions: np.ndarray | list) -> bytes:
    """Encode ``{"predictions": [...]}`` from an ndarray (any dtype) or a list."""
    return _dumps({"predictions": predictions}, what="predictions")
