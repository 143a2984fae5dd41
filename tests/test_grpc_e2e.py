"""gRPC end to end as users get it: ``rayms serve --grpc-port`` in its own process (its own Ray, HAProxy in front of
the replicas' gRPC servers), called with tritonclient's gRPC client and with KServe's ``InferenceGRPCClient``,
unchanged. Every prediction is checked against the model in this process.

KServe's generated messages clash with tritonclient's in one process (kserve/kserve#3099), so the KServe client
runs in a subprocess of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, wait_for
from tests.model_factory import make_data, make_sklearn, make_xgboost

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    expected = {"g-sk": make_sklearn(repo / "g-sk")[1], "g-xgb": make_xgboost(repo / "g-xgb")[1]}
    extra_path, extra_expected = make_sklearn(tmp_path_factory.mktemp("extra") / "m", kind="rf")
    port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "RAYMS_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rayms.cli", "serve", "--model-repository", str(repo), "--port", str(port),
             "--grpc-port", str(grpc_port), "--replicas", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "is serving" in log.read_text() or process.poll() is not None, timeout_s=240,
                 what="rayms serve to start")
        assert process.poll() is None, log.read_text()[-3000:]
        assert f"gRPC on 127.0.0.1:{grpc_port}" in log.read_text()
        yield {"target": f"127.0.0.1:{grpc_port}", "expected": expected, "extra": (extra_path, extra_expected),
               "repo": repo}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def client(served):
    with triton.InferenceServerClient(served["target"]) as c:
        yield c


def raw_input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("g-sk") and client.is_model_ready("g-sk", model_version="1")
    assert not client.is_model_ready("g-no-such-model") and not client.is_model_ready("g-sk", model_version="7")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "rayms" and "model_repository" in server["extensions"]
    meta = client.get_model_metadata("g-sk", as_json=True)
    assert meta["name"] == "g-sk" and meta["versions"] == ["1"]
    assert [o["name"] for o in meta["outputs"]] == ["predict", "predict_proba"]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("g-no-such-model")
    assert missing.value.status() == "StatusCode.NOT_FOUND" and missing.value.message() == \
        "Model g-no-such-model not found"


def test_raw_infer_matches_the_models_in_process(served, client):
    rows = make_data(n=5, seed=21)[0]
    both = [triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba")]
    for name, expected in served["expected"].items():
        for _ in range(4):  # HAProxy spreads calls over both replicas: each answers the same
            result = client.infer(name, [raw_input(rows)], request_id="e2e", outputs=both)
            assert result.get_response().id == "e2e" and result.get_response().model_name == name
            assert result.as_numpy("predict").tolist() == np.asarray(expected(rows)).tolist()
            assert np.allclose(result.as_numpy("predict_proba"), expected(rows, proba=True))
        # a request parameter travels as an InferParameter
        proba = client.infer(name, [raw_input(rows)], parameters={"predict_proba": True})
        assert [o.name for o in proba.get_response().outputs] == ["predict_proba"]
        assert np.allclose(proba.as_numpy("predict_proba"), expected(rows, proba=True))


def test_typed_infer_through_tritonclients_stub(served):
    rows = make_data(n=3, seed=22)[0]
    request = triton_pb.ModelInferRequest(model_name="g-sk")
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=list(rows.shape))
    tensor.contents.fp64_contents.extend(rows.ravel().tolist())
    request.outputs.add(name="predict")
    with grpc.insecure_channel(served["target"]) as channel:
        response = triton_pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert not response.raw_output_contents and [o.name for o in response.outputs] == ["predict"]
    assert list(response.outputs[0].contents.int64_contents) == served["expected"]["g-sk"](rows).tolist()


def test_errors_reach_the_client_with_their_codes(client):
    with pytest.raises(InferenceServerException) as missing:
        client.infer("g-no-such-model", [raw_input(np.ones((1, 4)))])
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    wrong = triton.InferInput("input-0", [1, 4], "FP64")
    wrong.set_data_from_numpy(np.ones((1, 4)))
    wrong.set_shape([2, 4])  # the shape now says 8 elements; 4 are sent
    with pytest.raises(InferenceServerException) as invalid:
        client.infer("g-sk", [wrong])
    assert invalid.value.status() == "StatusCode.INVALID_ARGUMENT" and "needs 64 bytes" in invalid.value.message()
    assert client.is_server_live()


def test_repository_index_load_infer_unload(served, client):
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["g-sk"]["state"] == "READY" and index["g-xgb"]["state"] == "READY"
    path, expected = served["extra"]
    client.load_model("g-extra", config=json.dumps({"storageUri": str(path.parent), "framework": "sklearn"}))
    assert client.is_model_ready("g-extra")
    rows = make_data(n=4, seed=23)[0]
    assert client.infer("g-extra", [raw_input(rows)]).as_numpy("predict").tolist() == expected(rows).tolist()
    client.unload_model("g-extra")
    assert not client.is_model_ready("g-extra")
    with pytest.raises(InferenceServerException) as gone:
        client.infer("g-extra", [raw_input(rows)])
    assert gone.value.status() == "StatusCode.NOT_FOUND"


KSERVE_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    async def main(target, rows):
        rows = np.asarray(rows)
        answers = {}
        async with InferenceGRPCClient(target, timeout=60) as client:
            answers["live"] = await client.is_server_live()
            answers["ready"] = await client.is_server_ready()
            answers["model_ready"] = await client.is_model_ready("g-xgb")
            for binary in (True, False):
                tensor = InferInput("input-0", list(rows.shape), "FP64")
                tensor.set_data_from_numpy(rows, binary_data=binary)
                response = await client.infer(InferRequest(model_name="g-xgb", infer_inputs=[tensor],
                                                           request_id="k"))
                answers[f"predict_{binary}"] = response.get_output_by_name("predict").as_numpy().tolist()
                answers["model_name"] = response.model_name
            # KServe's schema for the repository RPCs: the model's name is field 1
            stub = GRPCInferenceServiceStub(client._channel)
            unloaded = await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="g-xgb"))
            answers["unloaded"] = [unloaded.model_name, unloaded.isUnloaded]
            answers["ready_after_unload"] = await client.is_model_ready("g-xgb")
            loaded = await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="g-xgb"))
            answers["loaded"] = [loaded.model_name, loaded.isLoaded]
            answers["ready_after_load"] = await client.is_model_ready("g-xgb")
        print(json.dumps(answers))

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
""")


def test_kserves_grpc_client(served):
    if importlib.util.find_spec("kserve") is None:  # not imported here: it would clash with tritonclient.grpc
        pytest.skip("KServe's SDK is not installed (.ci/setup installs it without its server dependencies)")
    rows = make_data(n=4, seed=24)[0]
    done = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, served["target"], json.dumps(rows.tolist())],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    want = served["expected"]["g-xgb"](rows).tolist()
    assert answers["live"] and answers["ready"] and answers["model_ready"]
    assert answers["predict_True"] == want and answers["predict_False"] == want and answers["model_name"] == "g-xgb"
    assert answers["unloaded"] == ["g-xgb", True] and not answers["ready_after_unload"]
    # a load without a spec takes the model of that name from the served repository folder
    assert answers["loaded"] == ["g-xgb", True] and answers["ready_after_load"]
