"""The gRPC service in-process (no Ray): tritonclient's gRPC client against a real grpc.aio server.

The server runs :class:`rayms.grpc_api.InferenceService` over the real :class:`~rayms.dataplane.DataPlane`, whose
backend is a stand-in for the model replicas: it answers every input back as an output of the same name (and the
row sums as ``total``), so each datatype's round trip through protobuf is checked value by value. The same
data plane also serves HTTP in-process, so gRPC's error messages can be compared with HTTP's.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

from rayms.codecs import InferResult, Tensor
from rayms.config import ModelSpec, Settings
from rayms.dataplane import DataPlane
from rayms.errors import (
    InferenceError, InvalidInput, InvalidSpec, MemoryUnavailable, ModelNotReady, NotSupported, Overloaded,
    PayloadTooLarge, RaymsError, StorageError,
)
from rayms.grpc_api import RPCS, InferenceService, grpc_status
from rayms.cluster.grpc import GrpcIngress
from rayms.protos import inference_pb2 as pb
from rayms.protos import inference_pb2_grpc as pb_grpc
from rayms.router import build_api
from rayms.ports import free_port
from rayms.status import Changes, ModelState, ModelStatus, Source
from rayms.view import RegistryView

REPO = Path(__file__).resolve().parent.parent
METADATA = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}],
            "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}]}
READY = ModelStatus(name="m", version=1, state=ModelState.READY, source=Source.API,
                    spec=ModelSpec(storage_uri="/m", framework="sklearn"), metadata=METADATA)
LOADING = ModelStatus(name="slow", version=1, state=ModelState.LOADING, source=Source.API,
                      spec=ModelSpec(storage_uri="/slow", framework="sklearn"))
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}


class EchoBackend:
    """Answers each input back, plus ``total`` (row sums) for numeric inputs; ``fail`` makes infer raise it."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = 0
        self.loads: list[tuple[str, dict]] = []
        self.unregistered: list[str] = []

    async def infer(self, name, request):
        self.entered += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        outputs = [Tensor(name=t.name, datatype=t.datatype, shape=t.shape, data=t.data) for t in request.inputs]
        first = request.inputs[0]
        if first.datatype not in ("BYTES", "BOOL"):
            outputs.append(Tensor.from_numpy("total", np.asarray(first.data, dtype=np.float64).reshape(
                first.shape[0], -1).sum(axis=1)))
        return InferResult(outputs=outputs, parameters={"rows": first.shape[0], "ok": True}, model_version="1")

    async def metadata(self, name):
        return METADATA

    async def load(self, name, spec, source, *, force=False):
        self.loads.append((name, spec.to_wire()))
        failed = "broken" in spec.storage_uri
        return ModelStatus(name=name, version=1, state=ModelState.FAILED if failed else ModelState.READY,
                           source=source, spec=spec, reason="cannot unpickle" if failed else "", updated_at=1)

    async def unregister(self, name, source=None, *, force=False):
        self.unregistered.append(name)

    async def replicas(self):
        return []


async def _no_watch(epoch, since, timeout_s=30.0):
    return Changes(epoch="e", change=1, reset=False, models=[], deleted=[])


def _servicer(service: InferenceService) -> pb_grpc.GRPCInferenceServiceServicer:
    """The service on a plain grpc.aio server: each failure aborts the call with :func:`grpc_status`."""

    def rpc(name):
        async def method(self, request, context):
            try:
                return await service.call(name, request)
            except RaymsError as exc:
                await context.abort(*grpc_status(exc))

        return method

    return type("Servicer", (pb_grpc.GRPCInferenceServiceServicer,), {n: rpc(n) for n in RPCS})()


@pytest.fixture
async def served():
    view = RegistryView(_no_watch)
    view.apply(Changes(epoch="e", change=1, reset=True, models=[READY, LOADING], deleted=[]))
    backend = EchoBackend()
    settings = Settings(max_ongoing_requests=3, max_request_bytes=2**20)
    plane = DataPlane(settings, view=view, models=backend, control=backend)
    service = InferenceService(plane, max_in_flight=3, max_request_bytes=2**20)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_servicer(service), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield {"target": f"127.0.0.1:{port}", "client": client, "backend": backend, "view": view, "plane": plane, "settings": settings,
               "rayms": pb_grpc.GRPCInferenceServiceStub(channel),
               "triton": triton_pb_grpc.GRPCInferenceServiceStub(channel)}
    finally:
        await client.close()
        await channel.close()
        await server.stop(None)


def triton_input(name: str, array: np.ndarray, datatype: str) -> triton_aio.InferInput:
    tensor = triton_aio.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# ------------------------------------------------------------------------------------------ health and metadata
async def test_health_and_metadata_through_tritonclient(served):
    client = served["client"]
    assert await client.is_server_live() and await client.is_server_ready()
    assert await client.is_model_ready("m") and await client.is_model_ready("m", model_version="1")
    assert not await client.is_model_ready("m", model_version="2")
    assert not await client.is_model_ready("slow")
    assert not await client.is_model_ready("no-such-model")  # Triton's answer: false, not an error
    server = await client.get_server_metadata(as_json=True)
    assert server["name"] == "rayms" and {"model_repository", "binary_tensor_data"} <= set(server["extensions"])
    meta = await client.get_model_metadata("m", as_json=True)
    assert meta["name"] == "m" and meta["versions"] == ["1"] and meta["platform"] == "sklearn_sklearn"
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": ["-1"]}]
    ours = await served["rayms"].ModelMetadata(pb.ModelMetadataRequest(name="m"))
    assert dict(ours.properties) == {"framework": "sklearn", "state": "READY"}
    with pytest.raises(InferenceServerException) as missing:
        await client.get_model_metadata("no-such-model")
    assert missing.value.status() == "StatusCode.NOT_FOUND" and missing.value.message() == "Model no-such-model not found"


async def test_server_ready_is_false_until_the_registry_has_answered():
    echo = EchoBackend()
    plane = DataPlane(Settings(), view=RegistryView(_no_watch), models=echo, control=echo)
    service = InferenceService(plane, max_in_flight=1, max_request_bytes=100)
    assert not (await service.call("ServerReady", pb.ServerReadyRequest())).ready
    with pytest.raises(Overloaded):  # "does it exist?" cannot be answered yet: retry, not NOT_FOUND
        await service.call("ModelReady", pb.ModelReadyRequest(name="m"))


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("datatype", [*DATATYPES, "BYTES"])
async def test_raw_inputs_of_every_datatype_come_back_raw(served, datatype):
    if datatype == "BYTES":
        array = np.array([[b"a", b"\x00\xff"], [b"", "z\u00e9".encode()]], dtype=object)
    elif datatype == "BOOL":
        array = np.array([[True, False], [False, True]])
    else:
        array = (np.arange(6).reshape(2, 3) * (1 if datatype.startswith(("UINT", "INT")) else 1.5)).astype(
            DATATYPES[datatype])
    result = await served["client"].infer("m", [triton_input("x", array, datatype)], request_id="r-7")
    response = result.get_response()
    assert response.id == "r-7" and response.model_name == "m" and response.model_version == "1"
    assert len(response.raw_output_contents) == len(response.outputs)
    echoed = result.as_numpy("x")
    assert echoed.dtype == array.dtype and echoed.shape == array.shape and (echoed == array).all()
    if datatype not in ("BYTES", "BOOL"):
        assert result.as_numpy("total").tolist() == array.astype(np.float64).sum(axis=1).tolist()
    assert response.parameters["rows"].int64_param == 2 and response.parameters["ok"].bool_param


async def test_requested_outputs_come_in_the_requested_order_and_unknown_ones_are_refused(served):
    client, rows = served["client"], np.ones((2, 2), dtype=np.float32)
    wanted = [triton_aio.InferRequestedOutput("total"), triton_aio.InferRequestedOutput("x")]
    result = await client.infer("m", [triton_input("x", rows, "FP32")], outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["total", "x"]
    with pytest.raises(InferenceServerException) as refused:
        await client.infer("m", [triton_input("x", rows, "FP32")], outputs=[triton_aio.InferRequestedOutput("nope")])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "nope" in refused.value.message()


@pytest.mark.parametrize(("datatype", "field", "values"), [
    ("BOOL", "bool_contents", [True, False]), ("INT8", "int_contents", [-128, 127]),
    ("INT16", "int_contents", [-300, 300]), ("INT32", "int_contents", [-2**31, 2**31 - 1]),
    ("INT64", "int64_contents", [-2**63, 2**63 - 1]), ("UINT8", "uint_contents", [0, 255]),
    ("UINT16", "uint_contents", [0, 65535]), ("UINT32", "uint_contents", [0, 2**32 - 1]),
    ("UINT64", "uint64_contents", [0, 2**64 - 1]), ("FP32", "fp32_contents", [0.5, -1.25]),
    ("FP64", "fp64_contents", [1e300, -2.5]), ("BYTES", "bytes_contents", [b"\x00a", b""]),
])
async def test_typed_contents_come_back_typed(served, datatype, field, values):
    """Sent with tritonclient's own generated stub: the Triton schema's typed contents, unchanged."""
    request = triton_pb.ModelInferRequest(model_name="m", id="t")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 1])
    getattr(tensor.contents, field).extend(values)
    response = await served["triton"].ModelInfer(request)
    assert not response.raw_output_contents
    echoed = next(o for o in response.outputs if o.name == "x")
    assert echoed.datatype == datatype and list(echoed.shape) == [2, 1]
    assert list(getattr(echoed.contents, field)) == values
    if datatype not in ("BOOL", "BYTES"):
        total = next(o for o in response.outputs if o.name == "total")
        assert list(total.contents.fp64_contents) == [float(v) for v in values]


async def test_fp16_outputs_go_raw_even_for_a_typed_request(served):
    request = triton_pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP64", shape=[1, 1]).contents.fp64_contents.append(2.0)
    request.outputs.add(name="x")
    response = await served["triton"].ModelInfer(request)
    assert not response.raw_output_contents  # FP64: typed

    served["backend"].fail = None
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="FP16", shape=[1])
    raw.raw_input_contents.append(np.array([1.5], dtype="<f2").tobytes())
    answered = await served["rayms"].ModelInfer(raw)
    assert np.frombuffer(answered.raw_output_contents[0], dtype="<f2").tolist() == [1.5]


def _typed(datatype: str = "FP32", shape=(2,), **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def _raw(datatype: str, shape, *chunks: bytes, inputs: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for n in range(inputs):
        request.inputs.add(name=f"x{n}", datatype=datatype, shape=list(shape))
    request.raw_input_contents.extend(chunks)
    return request


def _with_contents_and_raw() -> pb.ModelInferRequest:
    request = _raw("FP32", [1], b"\x00" * 4)
    request.inputs[0].contents.fp32_contents.append(1.0)
    return request


def _duplicated() -> pb.ModelInferRequest:
    request = _typed(fp32_contents=[1, 2])
    request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    return request


HOSTILE = {
    "no inputs": (pb.ModelInferRequest(model_name="m"), "has no inputs"),
    "no model name": (pb.ModelInferRequest(inputs=[{"name": "x", "datatype": "FP32", "shape": [1]}]), "names no model"),
    "shape needs more data": (_typed(shape=(3,), fp32_contents=[1, 2]), "needs 3 elements, got 2"),
    "data in the wrong field": (_typed(fp64_contents=[1, 2]), "goes in contents.fp32_contents, got fp64_contents"),
    "unknown datatype": (_typed("FP8", fp32_contents=[1, 2]), "unknown datatype 'FP8'"),
    "empty datatype": (_typed("", fp32_contents=[1, 2]), "unknown datatype ''"),
    "typed FP16": (_typed("FP16", fp32_contents=[1, 2]), "send it in raw_input_contents"),
    "INT8 out of range": (_typed("INT8", int_contents=[1, 300]), "300 is out of range for INT8"),
    "UINT8 out of range": (_typed("UINT8", uint_contents=[256, 0]), "256 is out of range for UINT8"),
    "negative dimension": (_typed(shape=(-1,), fp32_contents=[1]), "non-negative"),
    "huge shape": (_typed(shape=(2**40, 2**40), fp32_contents=[1]), "elements, got 1"),
    "input without a name": (pb.ModelInferRequest(model_name="m", inputs=[{"datatype": "FP32", "shape": [0]}]),
                             "missing a name"),
    "duplicate input": (_duplicated(), "given more than once"),
    "raw count differs from inputs": (_raw("FP32", [1], b"\x00" * 4, inputs=2), "1 entries for 2 inputs"),
    "raw too short": (_raw("FP32", [2], b"\x00" * 5), "needs 8 bytes"),
    "raw BYTES truncated": (_raw("BYTES", [1], b"\x05\x00\x00\x00ab"), "needs 5 bytes"),
    "raw BYTES length cut": (_raw("BYTES", [1], b"\x05\x00"), "truncated 4-byte length"),
    "raw and typed contents": (_with_contents_and_raw(), "has contents although the request uses raw"),
    "raw of unknown datatype": (_raw("COMPLEX", [1], b"\x00" * 8), "unknown datatype"),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_malformed_requests_get_invalid_argument_with_a_reason(served, case):
    request, fragment = HOSTILE[case]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served["rayms"].ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert fragment in refused.value.details()
    assert await served["client"].is_server_live()  # and the server goes on answering


async def test_garbage_bytes_are_refused_and_the_server_goes_on(served):
    async with grpc.aio.insecure_channel(served["target"]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"\xff\xff\xff\xff garbage")
    assert refused.value.code() != grpc.StatusCode.OK
    assert await served["client"].is_server_live()


# ------------------------------------------------------------------------------------------ errors
ERRORS = [
    (InvalidInput("input x: bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidSpec("model m: bad spec"), grpc.StatusCode.INVALID_ARGUMENT),
    (MemoryUnavailable("model m: too big"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotReady("m", "LOADING"), grpc.StatusCode.UNAVAILABLE),
    (Overloaded("retry shortly"), grpc.StatusCode.UNAVAILABLE),
    (NotSupported("raw binary"), grpc.StatusCode.UNIMPLEMENTED),
    (PayloadTooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InferenceError("the model raised ValueError: boom"), grpc.StatusCode.INTERNAL),
    (StorageError("bucket gone", True), grpc.StatusCode.INTERNAL),
    (ZeroDivisionError("division by zero"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
async def test_errors_map_to_grpc_codes_with_the_message_http_answers(served, error, code):
    served["backend"].fail = error
    rows = np.ones((1, 2), dtype=np.float32)
    with pytest.raises(InferenceServerException) as failed:
        await served["client"].infer("m", [triton_input("x", rows, "FP32")])
    api = build_api(served["plane"], served["settings"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://rayms") as http:
        answer = await http.post("/v2/models/m/infer", json={
            "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1]}]})
    assert failed.value.status() == f"StatusCode.{code.name}"
    assert failed.value.message() == answer.json()["error"]
    assert grpc_status(error)[0] == code


async def test_unknown_and_unready_models(served):
    client, rows = served["client"], [triton_input("x", np.ones((1, 1), dtype=np.float32), "FP32")]
    for name, version, code, message in [
        ("nope", "", "NOT_FOUND", "Model nope not found"),
        ("m", "9", "NOT_FOUND", "Model m version 9 not found"),
        ("slow", "", "UNAVAILABLE", "Model slow is not ready (state LOADING)"),
    ]:
        with pytest.raises(InferenceServerException) as failed:
            await client.infer(name, rows, model_version=version)
        assert (failed.value.status(), failed.value.message()) == (f"StatusCode.{code}", message)


async def test_beyond_the_in_flight_limit_inference_is_refused_but_health_answers(served):
    backend, stub = served["backend"], served["rayms"]
    backend.gate.clear()
    held = [asyncio.ensure_future(stub.ModelInfer(_typed(fp32_contents=[1, 2]))) for _ in range(3)]
    try:
        while backend.entered < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(_typed(fp32_contents=[1, 2]))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "limit of 3 inference requests in flight" in refused.value.details()
        assert await served["client"].is_server_live() and await served["client"].get_model_repository_index()
    finally:
        backend.gate.set()
    answers = await asyncio.gather(*held)
    assert all(a.model_name == "m" for a in answers)


async def test_a_request_over_the_size_limit_is_resource_exhausted(served):
    big = _raw("UINT8", [2**20 + 1], b"\x00" * (2**20 + 1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served["rayms"].ModelInfer(big)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in refused.value.details()


# ------------------------------------------------------------------------------------------ repository
async def test_repository_index_load_and_unload_through_tritonclient(served):
    client, backend = served["client"], served["backend"]
    index = await client.get_model_repository_index(as_json=True)
    assert [(m["name"], m["state"]) for m in index["models"]] == [("m", "READY"), ("slow", "LOADING")]
    ready_only = await served["rayms"].RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [m.name for m in ready_only.models] == ["m"]

    config = json.dumps({"storageUri": "/models/new", "framework": "xgboost"})
    await client.load_model("new", config=config)
    assert backend.loads[-1] == ("new", {"storageUri": "/models/new", "framework": "xgboost"})
    assert await client.is_model_ready("new")

    with pytest.raises(InferenceServerException) as failed:
        await client.load_model("bad", config=json.dumps({"storageUri": "/models/broken", "framework": "sklearn"}))
    assert failed.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert failed.value.message() == "model bad failed to load: cannot unpickle"
    with pytest.raises(InferenceServerException) as unsupported:
        await client.load_model("f", files={"file:1/model.onnx": b"\x00"})
    assert unsupported.value.status() == "StatusCode.UNIMPLEMENTED"

    await client.unload_model("new")
    assert backend.unregistered == ["new"]
    assert not await client.is_model_ready("new")
    with pytest.raises(InferenceServerException) as missing:
        await client.unload_model("never-loaded")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


async def test_repository_loads_take_the_spec_as_parameters_and_kserves_field_one(served):
    stub, backend = served["rayms"], served["backend"]
    request = pb.RepositoryModelLoadRequest(model_name="p")
    request.parameters["storageUri"].string_param = "/models/p"
    request.parameters["framework"].string_param = "lightgbm"
    answer = await stub.RepositoryModelLoad(request)
    assert (answer.model_name, answer.isLoaded) == ("p", True)
    assert backend.loads[-1][1]["framework"] == "lightgbm"
    # KServe's schema has only `string model_name = 1`: Triton's repository_name
    kserve_style = await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(repository_name="p"))
    assert (kserve_style.model_name, kserve_style.isUnloaded) == ("p", True) and backend.unregistered == ["p"]
    with pytest.raises(grpc.aio.AioRpcError) as nameless:
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest())
    assert nameless.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------------ the Serve binding
class FakeServeContext:
    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.details = ""

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details


async def test_the_serve_ingress_methods_answer_errors_with_status_and_an_empty_message(served):
    class Ingress(GrpcIngress):
        def __init__(self) -> None:
            self._plane, self._settings = served["plane"], served["settings"]

    ingress, context = Ingress(), FakeServeContext()
    assert all(callable(getattr(ingress, name)) for name in RPCS)
    answer = await ingress.ModelInfer(_typed(fp32_contents=[1, 2]), grpc_context=context)
    assert context.code == grpc.StatusCode.OK and [o.name for o in answer.outputs] == ["x", "total"]
    missing = await ingress.ModelMetadata(pb.ModelMetadataRequest(name="nope"), grpc_context=context)
    assert missing == pb.ModelMetadataResponse()
    assert (context.code, context.details) == (grpc.StatusCode.NOT_FOUND, "Model nope not found")


# ------------------------------------------------------------------------------------------ the schema
def _fields(descriptor) -> dict:
    """Every field of a message and its nested messages: name -> (number, type, label, message type name)."""
    found = {}
    for field in descriptor.fields:
        kind = field.message_type.full_name if field.message_type else None
        found[f"{descriptor.full_name}.{field.name}"] = (field.number, field.type, field.is_repeated, kind)
        if field.message_type and field.message_type.full_name.startswith(descriptor.full_name):
            found |= _fields(field.message_type)
    return found


# Where rayms's schema knowingly differs from Triton's: fields Triton's messages do not have.
NOT_IN_TRITON = {"inference.ModelMetadataResponse.properties", "inference.ModelMetadataResponse.PropertiesEntry.key",
                 "inference.ModelMetadataResponse.PropertiesEntry.value",
                 "inference.RepositoryModelLoadResponse.model_name", "inference.RepositoryModelLoadResponse.isLoaded",
                 "inference.RepositoryModelUnloadResponse.model_name",
                 "inference.RepositoryModelUnloadResponse.isUnloaded"}


def test_every_message_and_rpc_matches_tritons_schema():
    ours = pb.DESCRIPTOR
    service = ours.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.package == "inference" and service.full_name == theirs.full_name
    assert [m.name for m in service.methods] == list(RPCS)
    for method in service.methods:
        twin = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            twin.input_type.full_name, twin.output_type.full_name)
        for message in (method.input_type, method.output_type):
            mine = _fields(message)
            triton = _fields(triton_pb.DESCRIPTOR.message_types_by_name[message.name])
            assert {k: v for k, v in mine.items() if k not in NOT_IN_TRITON} == triton, message.name
            assert set(mine) - set(triton) <= NOT_IN_TRITON


def test_every_message_kserve_declares_matches_it():
    """KServe's generated module clashes with tritonclient's in one process, so this runs in another."""
    code = """
import json
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb
from rayms.protos import inference_pb2 as pb
""" + inspect.getsource(_fields) + """
differences = []
for name in kserve_pb.DESCRIPTOR.message_types_by_name:
    theirs = _fields(kserve_pb.DESCRIPTOR.message_types_by_name[name])
    mine = _fields(pb.DESCRIPTOR.message_types_by_name[name])
    differences += [key for key in theirs if mine.get(key) != theirs[key]]
methods = [m.name for m in kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
print(json.dumps({"differences": differences, "methods": methods}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["methods"]) <= set(RPCS)
    # KServe's load/unload requests put the model's name in field 1 (Triton's repository_name; see inference.proto)
    assert sorted(result["differences"]) == ["inference.RepositoryModelLoadRequest.model_name",
                                             "inference.RepositoryModelUnloadRequest.model_name"]


def test_the_generated_modules_are_up_to_date():
    pytest.importorskip("grpc_tools")
    done = subprocess.run([sys.executable, "-m", "rayms.protos.generate", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
