"""Unit tests of rayms.codecs (and rayms.protocol), checked against tritonclient, the de-facto OIP client.

Request bodies are built by tritonclient's own request generator and responses are read back by its result parser,
so a pass here means a real tritonclient can talk to rayms in JSON and in binary. No Ray, no network.
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from rayms.codecs import (
    InferRequest,
    InferResult,
    RequestedOutput,
    Tensor,
    datatype_of,
    decode_v1_request,
    decode_v2_request,
    encode_error,
    encode_v1_response,
    encode_v2_response,
    v2_metadata_tensor,
)
from rayms.errors import InferenceError, InvalidInput, NotSupported
from rayms.protocol import InferenceRequest, InferenceResponse, RepositoryIndexItem, V1PredictRequest

rng = np.random.default_rng(7)

SAMPLES = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 7, 255], [1, 2, 3]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535], [1, 2, 3]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1], [1, 2, 3]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1], [1, 2, 3]], dtype=np.uint64),
    "INT8": np.array([[-128, 7, 127], [1, 2, 3]], dtype=np.int8),
    "INT16": np.array([[-32768, 7, 32767], [1, 2, 3]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 7, 2**31 - 1], [1, 2, 3]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 7, 2**63 - 1], [1, 2, 3]], dtype=np.int64),
    "FP16": rng.standard_normal((2, 3)).astype(np.float16),
    "FP32": rng.standard_normal((2, 3)).astype(np.float32),
    "FP64": rng.standard_normal((2, 3)),
    "BYTES": np.array([[b"a", b"", "h\u00e9llo".encode()], [b"x" * 300, b"y", b"z"]], dtype=object),
}


def triton_body(arrays: dict[str, np.ndarray], *, binary: bool, **kwargs) -> tuple[bytes, int | None]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype_of(array))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return triton.InferenceServerClient.generate_request_body(inputs, **kwargs)


def respond(request: InferRequest, *outputs: Tensor, **parameters) -> tuple[bytes, dict[str, str]]:
    result = InferResult(outputs=list(outputs), parameters=parameters)
    return encode_v2_response(model_name="m", model_version="1", request=request, result=result)


def triton_result(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get("inference-header-content-length")
    return triton.InferResult.from_response_body(body, header_length=int(length) if length else None)


def v2(*inputs: dict, **extra) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def fp32(name: str = "x", shape=(2,), data=(1.0, 2.0), **extra) -> dict:
    return {"name": name, "datatype": "FP32", "shape": list(shape), "data": list(data), **extra}


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", list(SAMPLES))
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_round_trip_through_tritonclient(datatype: str, binary_in: bool, binary_out: bool) -> None:
    array = SAMPLES[datatype]
    body, length = triton_body({"in": array}, binary=binary_in, request_id="req-1")
    assert (length is not None) == binary_in
    request = decode_v2_request(body, length)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("in", datatype, [2, 3])
    assert tensor.data.dtype == array.dtype and tensor.parameters == {}
    np.testing.assert_array_equal(tensor.data, array)

    request.outputs = [RequestedOutput(name="out", binary=binary_out)]
    body, headers = respond(request, Tensor.from_numpy("out", tensor.data))
    assert ("inference-header-content-length" in headers) == binary_out
    result = triton_result(body, headers)
    assert result.get_response()["id"] == "req-1"
    output = result.as_numpy("out")
    if datatype == "BYTES":  # tritonclient gives bytes from binary, str from JSON
        expected = array if binary_out else np.vectorize(bytes.decode, otypes=[object])(array)
        assert output.tolist() == expected.tolist()
    else:
        assert output.dtype == array.dtype
        np.testing.assert_array_equal(output, array)


def test_binary_input_is_zero_copy_view_of_body() -> None:
    body, length = triton_body({"x": SAMPLES["FP32"], "y": SAMPLES["INT64"]}, binary=True)
    request = decode_v2_request(body, length)
    for tensor in request.inputs:
        assert not tensor.data.flags.owndata and not tensor.data.flags.writeable
    np.testing.assert_array_equal(request.inputs[1].data, SAMPLES["INT64"])


def test_mixed_json_and_binary_inputs() -> None:
    first = triton.InferInput("a", [2], "FP32").set_data_from_numpy(np.array([1, 2], np.float32), binary_data=False)
    second = triton.InferInput("b", [1], "BYTES").set_data_from_numpy(np.array([b"q"], object), binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([first, second])
    request = decode_v2_request(body, length)
    assert request.inputs[0].data.tolist() == [1.0, 2.0] and request.inputs[1].data.tolist() == [b"q"]


def test_bf16_binary_in_widened_to_float32_and_out_as_bf16() -> None:
    array = np.array([[1.5, -2.0], [3.25, 1e-3]], dtype=ml_dtypes.bfloat16)
    body, length = triton_body({"x": array}, binary=True)
    (tensor,) = decode_v2_request(body, length).inputs
    assert tensor.datatype == "BF16" and tensor.data.dtype == np.float32
    np.testing.assert_array_equal(tensor.data, array.astype(np.float32))
    for out in (Tensor(name="y", datatype="BF16", shape=[2, 2], data=tensor.data), Tensor.from_numpy("y", array)):
        request = InferRequest(outputs=[RequestedOutput(name="y", binary=True)])
        np.testing.assert_array_equal(triton_result(*respond(request, out)).as_numpy("y"), array)


def test_bf16_json_is_not_supported() -> None:
    body = v2({"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]})
    with pytest.raises(NotSupported, match="input x: BF16"):
        decode_v2_request(body)


def test_nested_and_flat_data_are_equivalent() -> None:
    nested = decode_v2_request(v2(fp32(shape=[2, 2], data=[[1, 2], [3, 4]]))).inputs[0].data
    flat = decode_v2_request(v2(fp32(shape=[2, 2], data=[1, 2, 3, 4]))).inputs[0].data
    reshaped = decode_v2_request(v2(fp32(shape=[2, 2], data=[[1], [2], [3], [4]]))).inputs[0].data
    assert nested.dtype == np.float32 and nested.shape == (2, 2)
    np.testing.assert_array_equal(nested, flat)
    np.testing.assert_array_equal(nested, reshaped)
    strings = decode_v2_request(v2({"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["b"]]}))
    assert strings.inputs[0].data.tolist() == [[b"a"], [b"b"]]


def test_json_integers_accept_integral_floats() -> None:
    body = v2({"name": "n", "datatype": "INT32", "shape": [2], "data": [1.0, 2]})
    assert decode_v2_request(body).inputs[0].data.tolist() == [1, 2]


def test_empty_tensor() -> None:
    (tensor,) = decode_v2_request(v2({"name": "e", "datatype": "INT8", "shape": [0, 3], "data": []})).inputs
    assert tensor.data.shape == (0, 3) and tensor.data.dtype == np.int8


# ---------------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("body", "header_length", "error", "message"),
    [
        (b"{not json", None, InvalidInput, "not valid JSON"),
        (b"", None, InvalidInput, "not valid JSON"),
        (b"[1, 2]", None, InvalidInput, "JSON object"),
        (orjson.dumps({"id": "1"}), None, InvalidInput, "no inputs"),
        (v2(), None, InvalidInput, "no inputs"),
        (v2("x"), None, InvalidInput, "input #0"),
        (v2({"shape": [1], "datatype": "FP32", "data": [1]}), None, InvalidInput, "input #0: missing"),
        (v2(fp32(datatype="FP8")), None, InvalidInput, "input x: unknown datatype 'FP8'"),
        (v2(fp32(datatype=None)), None, InvalidInput, "input x: unknown datatype None"),
        (v2(fp32(shape=[2, 2])), None, InvalidInput, r"input x: shape \[2, 2\] needs 4 elements, got 2"),
        (v2(fp32(shape=[-1])), None, InvalidInput, "input x: shape must be"),
        (v2(fp32(shape="2")), None, InvalidInput, "input x: shape must be"),
        (v2({"name": "x", "datatype": "FP32", "shape": [2]}), None, InvalidInput, "input x: missing 'data'"),
        (v2(fp32(data=["a", "b"])), None, InvalidInput, "input x: FP32 data must be numbers, got strings"),
        (v2(fp32(data=[1, None])), None, InvalidInput, "input x: FP32 data must be numbers"),
        (v2(fp32(data=[True, False])), None, InvalidInput, "input x: FP32 data must be numbers, got booleans"),
        (v2(fp32(shape=[3], data=[[1, 2], [3]])), None, InvalidInput, "input x: data is not a rectangular"),
        (v2(fp32(data=[1.5, 2], datatype="INT32")), None, InvalidInput, "input x: INT32 data must be integers"),
        (v2(fp32(data=[300, 1], datatype="UINT8")), None, InvalidInput, "input x: value 300 is out of range"),
        (v2(fp32(data=[-1, 1], datatype="UINT64")), None, InvalidInput, "input x: value -1 is out of range"),
        (v2(fp32(data=[1, None], datatype="INT32")), None, InvalidInput, "input x: INT32 data must be integers"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT64", "shape": [2], "data": [-1, 18446744073709551616]}]}',
         None, InvalidInput, "input x: a value is out of range"),
        (v2(fp32(data=[-1.0, 2.0], datatype="UINT8")), None, InvalidInput, "input x: a value is out of range"),
        (v2(fp32(data=[1, 0], datatype="BOOL")), None, InvalidInput, "input x: BOOL data must be true or false"),
        (v2(fp32(data=[1, 2], datatype="BYTES")), None, InvalidInput, "input x: BYTES data must be strings"),
        (v2(fp32(), fp32()), None, InvalidInput, "input x: given more than once"),
        (v2(fp32(parameters=[1])), None, InvalidInput, "input x: 'parameters' must be an object"),
        (v2(fp32(), outputs=[{"id": 1}]), None, InvalidInput, "requested output #0"),
        (v2(fp32(), outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]), None, InvalidInput,
         "requested output y: parameters.binary_data"),
        (v2(fp32(), id=["a"]), None, InvalidInput, "'id' must be a string"),
        (v2(fp32(data=[], parameters={"binary_data_size": 8})), None, InvalidInput,
         "input x: binary_data_size is set but"),
        (v2(fp32()), 0, NotSupported, "raw binary requests"),
        (v2(fp32()), 10_000, InvalidInput, "outside the body"),
    ],
)
def test_bad_requests(body: bytes, header_length: int | None, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_v2_request(body, header_length)


def binary_body(header: dict, payload: bytes) -> tuple[bytes, int]:
    encoded = orjson.dumps(header)
    return encoded + payload, len(encoded)


def binary_input(name: str, datatype: str, shape: list[int], size) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("header_input", "payload", "message"),
    [
        (binary_input("x", "FP32", [2], 8), b"\0" * 4, "input x: binary_data_size 8 exceeds the 4 bytes left"),
        (binary_input("x", "FP32", [2], 4), b"\0" * 4, r"input x: shape \[2\] of FP32 needs 8 bytes, .* is 4"),
        (binary_input("x", "FP32", [1], 4), b"\0" * 6, "body has 2 bytes after the last binary input"),
        (binary_input("x", "FP32", [1], -4), b"\0" * 4, "input x: binary_data_size must be a non-negative"),
        (binary_input("x", "FP32", [1], "4"), b"\0" * 4, "input x: binary_data_size must be a non-negative"),
        (binary_input("s", "BYTES", [1], 6), struct.pack("<I", 5) + b"ab", "input s: BYTES element 0 needs 5 bytes"),
        (binary_input("s", "BYTES", [2], 6), struct.pack("<I", 1) + b"a" + b"\0", "input s: BYTES element 1 has a "),
        (binary_input("s", "BYTES", [2], 5), struct.pack("<I", 1) + b"a", r"input s: shape \[2\] needs 2 elements"),
        (binary_input("h", "BF16", [2], 2), b"\0\0", "input h: shape"),
        ({**binary_input("x", "FP32", [1], 4), "data": [1.0]}, b"\0" * 4, "input x: has both 'data'"),
    ],
)
def test_bad_binary_requests(header_input: dict, payload: bytes, message: str) -> None:
    body, length = binary_body({"inputs": [header_input]}, payload)
    with pytest.raises(InvalidInput, match=message):
        decode_v2_request(body, length)


def test_truncated_tritonclient_body() -> None:
    body, length = triton_body({"x": SAMPLES["FP64"]}, binary=True)
    with pytest.raises(InvalidInput, match="input x: binary_data_size 48 exceeds"):
        decode_v2_request(body[:-1], length)


# ---------------------------------------------------------------------------------------------------- passthrough


def test_id_and_parameters_pass_through() -> None:
    body = v2(fp32(parameters={"content_type": "np", "binary_data_size": None}), id="abc", model_name="m",
              parameters={"custom": 3, "binary_data_output": False})
    request = decode_v2_request(body)
    assert request.id == "abc"
    assert request.parameters == {"custom": 3, "binary_data_output": False}
    assert request.inputs[0].parameters == {"content_type": "np"}
    body, headers = respond(request, Tensor.from_numpy("y", [1.0], {"content_type": "np"}), extra="v")
    response = orjson.loads(body)
    assert headers == {"content-type": "application/json"}
    assert response == {"model_name": "m", "model_version": "1", "id": "abc", "parameters": {"extra": "v"},
                        "outputs": [{"name": "y", "datatype": "FP64", "shape": [1],
                                     "parameters": {"content_type": "np"}, "data": [1.0]}]}
    InferenceResponse.model_validate(response)


def test_generated_id_when_absent_and_version_omitted() -> None:
    request = decode_v2_request(v2(fp32()))
    assert request.id is None
    result = InferResult(outputs=[Tensor.from_numpy("y", np.zeros(1))])
    first = orjson.loads(encode_v2_response(model_name="m", model_version=None, request=request, result=result)[0])
    second = orjson.loads(encode_v2_response(model_name="m", model_version=None, request=request, result=result)[0])
    assert "model_version" not in first and len(first["id"]) == 32 and first["id"] != second["id"]


def test_binary_data_output_default_and_per_output_override() -> None:
    body, length = triton_body({"x": SAMPLES["FP32"]}, binary=True)
    request = decode_v2_request(body, length)
    assert request.parameters == {"binary_data_output": True}
    outputs = [Tensor.from_numpy("a", np.arange(3)), Tensor.from_numpy("b", np.array(["u", "v"]))]
    body, headers = respond(request, *outputs)
    assert headers["content-type"] == "application/octet-stream"
    header = orjson.loads(body[: int(headers["inference-header-content-length"])])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [24, 10]
    assert triton_result(body, headers).as_numpy("b").tolist() == [b"u", b"v"]

    request.outputs = [RequestedOutput(name="b", binary=False), RequestedOutput(name="a")]
    body, headers = respond(request, *outputs)
    result = triton_result(body, headers)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["b", "a"]
    assert result.get_output("b")["data"] == ["u", "v"] and "data" not in result.get_output("a")
    np.testing.assert_array_equal(result.as_numpy("a"), np.arange(3))


def test_requested_outputs_select_and_unknown_is_invalid() -> None:
    request = decode_v2_request(v2(fp32(), outputs=[{"name": "b"}]))
    assert request.outputs == [RequestedOutput(name="b", binary=None)]
    produced = [Tensor.from_numpy("a", [1]), Tensor.from_numpy("b", [[True, False]])]
    response = orjson.loads(respond(request, *produced)[0])
    assert response["outputs"] == [{"name": "b", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}]
    request.outputs = [RequestedOutput(name="zzz")]
    with pytest.raises(InvalidInput, match="requested output zzz is not produced by this model; it produces: a, b"):
        respond(request, *produced)


def test_bad_outputs_raise_inference_or_not_supported() -> None:
    request = InferRequest()
    with pytest.raises(InferenceError, match=r"output y: shape \[3\] needs 3 elements"):
        respond(request, Tensor(name="y", datatype="FP32", shape=[3], data=np.zeros(2)))
    with pytest.raises(InferenceError, match="output y: cannot be encoded as FP32"):
        respond(request, Tensor(name="y", datatype="FP32", shape=[1], data=np.array(["a"], dtype=object)))
    with pytest.raises(NotSupported, match="output y: a BYTES element is not UTF-8"):
        respond(request, Tensor.from_numpy("y", np.array([b"\xff"], dtype=object)))


def test_datatype_of_and_metadata_tensor() -> None:
    assert [datatype_of(a) for a in SAMPLES.values()] == list(SAMPLES)
    assert datatype_of(np.array(["a"])) == datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.zeros(1, ml_dtypes.bfloat16)) == "BF16"
    with pytest.raises(NotSupported, match="complex128"):
        datatype_of(np.zeros(1, np.complex128))
    assert v2_metadata_tensor("x", "FP32", [-1, 4]) == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    with pytest.raises(InvalidInput, match="tensor x: unknown datatype"):
        v2_metadata_tensor("x", "FLOAT", [1])


# ---------------------------------------------------------------------------------------------------- V1


@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_v1_numeric_rows(key: str) -> None:
    array = decode_v1_request(orjson.dumps({key: [[1, 2.5], [3, 4]]}))
    assert array.shape == (2, 2) and array.dtype == np.float64
    assert decode_v1_request(b'{"instances": [[1, null]]}').tolist()[0][0] == 1.0
    assert np.isnan(decode_v1_request(b'{"instances": [[1, null]]}')[0, 1])


def test_v1_strings_keep_python_values() -> None:
    array = decode_v1_request(b'{"instances": [[1, "a"], [2, "b"]]}')
    assert array.dtype == object and array.tolist() == [[1, "a"], [2, "b"]]
    assert decode_v1_request(b'{"instances": ["good movie", "bad"]}').tolist() == ["good movie", "bad"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"instances": [{"a": 1}]}', "instances.*feature maps"),
        (b'{"instances": [[1, 2], [3]]}', "instances.* same length"),
        (b'{"instances": [], "x": 1}', "instances.*non-empty list"),
        (b'{"instances": [[1]], "inputs": [[1]]}', "exactly one"),
        (b'{"rows": [[1]]}', "exactly one"),
        (b"nope", "not valid JSON"),
    ],
)
def test_v1_bad_requests(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_v1_request(body)


def test_v1_response_and_error_body() -> None:
    assert orjson.loads(encode_v1_response(np.array([[0.5, 1.5]], np.float32))) == {"predictions": [[0.5, 1.5]]}
    assert orjson.loads(encode_v1_response(np.array(["a", b"b", 3], dtype=object))) == {"predictions": ["a", "b", 3]}
    assert orjson.loads(encode_v1_response([np.int64(1), 2])) == {"predictions": [1, 2]}
    assert orjson.loads(encode_error("Model x not found")) == {"error": "Model x not found"}


# ---------------------------------------------------------------------------------------------------- protocol


def test_protocol_types_keep_extras_and_drop_unset() -> None:
    body, _ = triton_body({"x": SAMPLES["INT32"]}, binary=False, request_id="r")
    payload = orjson.loads(body) | {"model_name": "m"}
    parsed = InferenceRequest.model_validate(payload)
    assert parsed.model_dump() == payload
    item = RepositoryIndexItem(name="m", state="READY", storageUri="s3://b/m", measured_memory=10, replicas=["r0"])
    assert item.model_dump() == {"name": "m", "state": "READY", "storageUri": "s3://b/m", "measuredMemory": 10,
                                 "replicas": ["r0"]}
    assert V1PredictRequest.model_validate({"inputs": [[1]]}).inputs == [[1]]
    with pytest.raises(ValueError, match="exactly one"):
        V1PredictRequest.model_validate({})


# -- inputs that cannot hurt: bounded work and a 400 naming the limit, whatever the body holds ---------------

def nested(depth: int, leaf: str) -> str:
    """JSON text of ``leaf`` inside ``depth`` lists, written by hand (json.dumps itself recurses)."""
    return "[" * depth + leaf + "]" * depth


def v2_text(shape: str, data: str, datatype: str = "FP32") -> bytes:
    return ('{"inputs": [{"name": "x", "shape": %s, "datatype": "%s", "data": %s}]}' % (shape, datatype, data)).encode()


@pytest.mark.timeout(20)  # each refusal takes milliseconds; the first two rows once took minutes
@pytest.mark.parametrize(("body", "message"), [
    (v2_text(orjson.dumps([2**63 - 1] * 2_000_000).decode(), "[]"),
     "input x: shape has 2000000 dimensions, more than the 32 a tensor may have"),
    (v2_text(nested(1000, '"a"'), nested(1000, '"a"'), "BYTES"), "input x: shape must be a list"),
    (v2_text("[1]", nested(1000, '"a"'), "BYTES"), "input x: data is nested more than 32 lists deep"),
    (v2_text("[1]", nested(1000, "1.0")), "input x: data is not a rectangular array"),
    (v2_text(orjson.dumps([1] * 33).decode(), "[1.0]"), "input x: shape has 33 dimensions, more than the 32"),
    (v2_text(orjson.dumps([2**32, 2**32]).decode(), "[]"), "more than 4294967296 elements"),
    (v2_text(orjson.dumps([2**31] * 3).decode(), "[]"), "more than 4294967296 elements"),
    (v2_text("[0, 4294967297]", "[]"), "more than 4294967296 elements"),
    (v2_text(orjson.dumps([2**16] * 4).decode(), "[]"), "more than 4294967296 elements"),
    (orjson.dumps({"id": {"k": "v" * 1_000_000}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                          "data": [1.0]}]}),
     "request 'id' must be a string, got {'k': 'vvv"),
    (v2_text("[1]", "[1.0]", "F" * 1_000_000), "input x: unknown datatype 'FFFF"),
])
def test_hostile_tensors_are_refused_at_once(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_v2_request(body)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 400  # a hostile value is not echoed back whole


def test_the_limits_themselves_are_accepted() -> None:
    deepest = decode_v2_request(v2_text(orjson.dumps([1] * 32).decode(), nested(32, '"a"'), "BYTES"))
    assert deepest.inputs[0].data.shape == (1,) * 32 and deepest.inputs[0].data.item() == b"a"
    wide = decode_v2_request(v2_text("[2, 0, 4294967296]", "[]"))
    assert wide.inputs[0].data.shape == (2, 0, 2**32)


@pytest.mark.timeout(20)
def test_binary_bytes_with_more_elements_than_the_shape_stop_at_the_first_extra() -> None:
    payload = b"".join(struct.pack("<I", 0) for _ in range(2_000_000))  # two million empty strings
    body, length = binary_body({"inputs": [binary_input("s", "BYTES", [2], len(payload))]}, payload)
    with pytest.raises(InvalidInput, match=r"input s: shape \[2\] needs 2 elements, the binary data holds more"):
        decode_v2_request(body, length)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("leaf", ["1.0", '"a"'])
def test_v1_instances_nested_a_thousand_deep_are_refused(leaf: str) -> None:
    with pytest.raises(InvalidInput, match=r'V1 request: "instances" is nested \d+ lists deep, more than 32'):
        decode_v1_request(b'{"instances": [%s]}' % nested(1000, leaf).encode())
