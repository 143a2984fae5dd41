"""Bad input over real HTTP: every one gets ``{"error": "..."}`` with the right status, and the server keeps serving.

The table below is the contract: what a client sends, the status it gets, and a fragment of the message. Every
message must also name what it is about (the model, the input, the URI or the path asked for). After each bad
request a good one to another model must still succeed, so no bad input can take a replica down.
"""

from __future__ import annotations

import gzip
import http.client
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from tests.model_factory import make_data, make_sklearn, make_xgboost

MODEL = "bad-sk"  # the target of bad requests: a scikit-learn classifier taking 4 FP64 features
OTHER = "bad-ok"  # the model that must keep answering
CORRUPT = "bad-corrupt"  # its artifact is not a pickle: loading fails, the model stays FAILED
UNREACHABLE_URI = "http://127.0.0.1:1/models/unreachable/model.joblib"  # nothing listens on port 1
LIMIT = 64 * 2**20  # the session server's max_request_bytes: bodies with binary tensors
JSON_LIMIT = 8 * 2**20  # its max_json_bytes: JSON bodies


def v2(shape: list[int], data: list, datatype: str = "FP64", name: str = "input-0", **extra: Any) -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}


GOOD = v2([1, 4], [0.1, 0.2, 0.3, 0.4])


def binary_body(header_length_delta: int = 0, size_delta: int = 0) -> tuple[bytes, dict[str, str]]:
    """One FP64 [1, 4] input as a binary tensor; the deltas make the header length or the size lie."""
    tensor = np.arange(4, dtype="<f8").tobytes()
    header = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                     "parameters": {"binary_data_size": len(tensor) + size_delta}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header) + header_length_delta),
               "Content-Type": "application/octet-stream"}
    return header + tensor, headers


def over_limit_chunks(limit: int) -> Any:
    """A body just over ``limit``, streamed without Content-Length (chunked), so only the reader can catch it."""
    def chunks():
        chunk = b" " * 2**20
        for _ in range(limit // len(chunk) + 1):
            yield chunk
    return chunks


@dataclass(frozen=True)
class Bad:
    """One row: a request, the status it must get, a fragment of the error and what the error must name."""

    method: str
    path: str  # sent as is: no dot-segment normalisation, no re-quoting
    status: int
    fragment: str
    names: str | None  # None: the message names only the problem (e.g. the size limit)
    json: Any = None
    data: bytes | Callable[[], Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    declared_length: int | None = None  # send this Content-Length with a short body (http.client)
    timeout_s: float = 120  # hostile rows get HOSTILE_S: each once held a replica for minutes


def nested(depth: int, leaf: str) -> str:
    """``leaf`` inside ``depth`` JSON lists, written by hand (json.dumps itself recurses)."""
    return "[" * depth + leaf + "]" * depth


def raw_v2(shape: str, data: str, datatype: str = "FP64") -> bytes:
    return ('{"inputs": [{"name": "input-0", "shape": %s, "datatype": "%s", "data": %s}]}'
            % (shape, datatype, data)).encode()


HOSTILE_S = 10  # far more than the milliseconds each refusal takes; far less than the minutes it once took
JSON_HEADERS = {"Content-Type": "application/json"}
SPEC = {"storageUri": "/tmp/x", "framework": "sklearn"}
BINARY, BINARY_HEADERS = binary_body()
HEADER_TOO_LONG, HEADER_TOO_LONG_HEADERS = binary_body(header_length_delta=100)
SIZE_TOO_BIG, SIZE_TOO_BIG_HEADERS = binary_body(size_delta=8)
INFER = f"/v2/models/{MODEL}/infer"
LOAD = "/v2/repository/models/{}/load"

TABLE: dict[str, Bad] = {
    # ---- malformed bodies
    "malformed JSON (V2)": Bad("POST", INFER, 400, "not valid JSON", MODEL, data=b'{"inputs": ['),
    "malformed JSON (V1)": Bad("POST", f"/v1/models/{MODEL}:predict", 400, "not valid JSON", MODEL,
                               data=b'{"instances": [[1, 2'),
    "body is a JSON list": Bad("POST", INFER, 400, "must be a JSON object", MODEL, json=[1, 2, 3]),
    "request id is an object": Bad("POST", INFER, 400, "'id' must be a string", MODEL, json=GOOD | {"id": {"a": 1}}),
    "missing inputs": Bad("POST", INFER, 400, "has no inputs", MODEL, json={"id": "no-inputs"}),
    "input without data": Bad("POST", INFER, 400, "missing 'data'", "input-0",
                              json={"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64"}]}),
    # ---- tensors that do not describe themselves correctly
    "unknown datatype": Bad("POST", INFER, 400, "unknown datatype 'FP99'", "input-0",
                            json=v2([1, 4], [1, 2, 3, 4], datatype="FP99")),
    "strings in an FP64 tensor": Bad("POST", INFER, 400, "FP64 data must be numbers", "input-0",
                                     json=v2([1, 4], ["a", "b", "c", "d"])),
    "fractions in an INT64 tensor": Bad("POST", INFER, 400, "INT64 data must be integers", "input-0",
                                        json=v2([1, 4], [0.5, 1, 2, 3], datatype="INT64")),
    "shape does not match data": Bad("POST", INFER, 400, "shape [2, 4] needs 8 elements, got 4", "input-0",
                                     json=v2([2, 4], [1, 2, 3, 4])),
    "negative dimension": Bad("POST", INFER, 400, "shape must be a list of non-negative integers", "input-0",
                              json=v2([-1, 4], [1, 2, 3, 4])),
    # ---- tensors the model cannot take
    "wrong number of features (V2)": Bad("POST", INFER, 400, "3 features", MODEL, json=v2([1, 3], [1, 2, 3])),
    "wrong number of features (V1)": Bad("POST", f"/v1/models/{MODEL}:predict", 400, "3 features", MODEL,
                                         json={"instances": [[1, 2, 3]]}),
    "BYTES to a numeric model": Bad("POST", INFER, 400, "could not convert string to float", MODEL,
                                    json=v2([1, 4], ["a", "b", "c", "d"], datatype="BYTES")),
    "V1 feature maps": Bad("POST", f"/v1/models/{MODEL}:predict", 400, "feature maps", MODEL,
                           json={"instances": [{"a": 1, "b": 2}]}),
    "unknown requested output": Bad("POST", INFER, 400, "unknown output(s) nope", MODEL,
                                    json=GOOD | {"outputs": [{"name": "nope"}]}),
    # ---- binary tensor extension
    "header length beyond the body": Bad("POST", INFER, 400, "is outside the body", MODEL,
                                         data=HEADER_TOO_LONG, headers=HEADER_TOO_LONG_HEADERS),
    "binary_data_size beyond the body": Bad("POST", INFER, 400, "exceeds the 32 bytes left", "input-0",
                                            data=SIZE_TOO_BIG, headers=SIZE_TOO_BIG_HEADERS),
    "header length not a number": Bad("POST", INFER, 400, "is not an integer", MODEL, data=BINARY,
                                      headers=BINARY_HEADERS | {"Inference-Header-Content-Length": "12a"}),
    "raw binary request": Bad("POST", INFER, 501, "raw binary requests", MODEL, data=BINARY,
                              headers=BINARY_HEADERS | {"Inference-Header-Content-Length": "0"}),
    # ---- hostile tensors: bounded work whatever the body holds
    "shape of 300,000 dimensions": Bad("POST", INFER, 400, "shape has 300000 dimensions, more than the 32",
                                       "input-0", data=raw_v2(json.dumps([2**63 - 1] * 300_000), "[]"),
                                       headers=JSON_HEADERS, timeout_s=HOSTILE_S),  # 6 MB: under max_json_bytes
    "shape of huge dimensions": Bad("POST", INFER, 400, "has more than 4294967296 elements", "input-0",
                                    json=v2([2**62] * 4, []), timeout_s=HOSTILE_S),
    "BYTES nested a thousand deep": Bad("POST", INFER, 400, "data is nested more than 32 lists deep", "input-0",
                                        data=raw_v2("[1]", nested(1000, '"a"'), "BYTES"), headers=JSON_HEADERS,
                                        timeout_s=HOSTILE_S),
    "V1 instances nested a thousand deep": Bad("POST", f"/v1/models/{MODEL}:predict", 400, "lists deep, more than 32",
                                               MODEL, data=b'{"instances": [%s]}' % nested(1000, "1").encode(),
                                               headers=JSON_HEADERS, timeout_s=HOSTILE_S),
    # ---- unknown models, versions and routes
    "unknown model": Bad("POST", "/v2/models/no-such-model/infer", 404, "not found", "no-such-model", json=GOOD),
    "unknown model (V1)": Bad("POST", "/v1/models/no-such-model:predict", 404, "not found", "no-such-model",
                              json={"instances": [[1, 2, 3, 4]]}),
    "unknown model with a bad body": Bad("POST", "/v2/models/no-such-model/infer", 404, "not found",
                                         "no-such-model", data=b"{"),
    "unknown version": Bad("POST", f"/v2/models/{MODEL}/versions/9/infer", 404, "version 9 not found", MODEL,
                           json=GOOD),
    "metadata of an unknown model": Bad("GET", "/v2/models/no-such-model", 404, "not found", "no-such-model"),
    "name with a slash": Bad("POST", "/v2/models/a/b/infer", 404, "Not Found", "/v2/models/a/b/infer", json=GOOD),
    "name with an encoded slash": Bad("POST", "/v2/models/a%2Fb/infer", 404, "Not Found", "a/b", json=GOOD),
    "name '..' (infer)": Bad("POST", "/v2/models/../infer", 404, "not found", "..", json=GOOD),
    "name '..' (load)": Bad("POST", LOAD.format(".."), 400, "is invalid", "'..'",
                            json={"storageUri": "/tmp", "framework": "sklearn"}),
    "name '../..' encoded (load)": Bad("POST", LOAD.format("..%2F..%2Fetc"), 404, "Not Found", "../../etc",
                                       json={"storageUri": "/tmp", "framework": "sklearn"}),
    "dot segments around a name": Bad("POST", f"/v2/models/{MODEL}/../{MODEL}/infer", 404, "Not Found",
                                      f"/{MODEL}/../{MODEL}/", json=GOOD),
    "wrong method": Bad("GET", INFER, 405, "Method Not Allowed", INFER),
    # ---- too large
    "JSON body over the limit, streamed": Bad("POST", INFER, 413, f"exceeds the limit of {JSON_LIMIT} bytes",
                                              None, data=over_limit_chunks(JSON_LIMIT)),
    "binary body over the limit, streamed": Bad("POST", INFER, 413, f"exceeds the limit of {LIMIT} bytes", None,
                                                data=over_limit_chunks(LIMIT),
                                                headers={"Inference-Header-Content-Length": "10"}),
    "Content-Length over the limit": Bad("POST", INFER, 413, f"of {JSON_LIMIT + 1} bytes exceeds the limit", None,
                                         declared_length=JSON_LIMIT + 1),
    # ---- repository loads
    "load: malformed JSON": Bad("POST", LOAD.format("bad-load"), 400, "not valid JSON", "bad-load", data=b"{'x'"),
    "load: unknown framework": Bad("POST", LOAD.format("bad-load"), 400, "framework 'tensorflow' is not supported",
                                   "bad-load", json={"storageUri": "/tmp/x", "framework": "tensorflow"}),
    "load: bad memory quantity": Bad("POST", LOAD.format("bad-load"), 400, "not a Kubernetes quantity", "bad-load",
                                     json={"storageUri": "/tmp/x", "framework": "sklearn", "memory": "lots"}),
    "load: memory 1e999999999": Bad("POST", LOAD.format("bad-load"), 400, "more than the largest quantity accepted",
                                    "bad-load", json=SPEC | {"memory": "1e999999999"}, timeout_s=HOSTILE_S),
    "load: memory that backtracks": Bad("POST", LOAD.format("bad-load"), 400, "characters long, more than 64",
                                        "bad-load", json=SPEC | {"memory": "1" + " " * 100_000 + "x"},
                                        timeout_s=HOSTILE_S),
    "load: sha256 not hex": Bad("POST", LOAD.format("bad-load"), 400, "sha256: must be 64 hexadecimal digits",
                                "bad-load", json=SPEC | {"sha256": "not-a-digest"}),
    "load: http at a non-public address": Bad("POST", LOAD.format("bad-private"), 400,
                                              "refusing to connect: 0.0.0.0 is a private or reserved address",
                                              "bad-private", json={"storageUri": "http://0.0.0.0:1/model.joblib",
                                                                   "framework": "sklearn"}, timeout_s=HOSTILE_S),
    "load: archive bomb": Bad("POST", LOAD.format("bad-bomb"), 400, "(max_unpacked_bytes)", "bad-bomb",
                              json={"storageUri": "{bomb}", "framework": "sklearn"}, timeout_s=HOSTILE_S),
    "load: sha256 mismatch": Bad("POST", LOAD.format("bad-digest"), 400, "sha256 mismatch: expected " + "0" * 64,
                                 "bad-digest", json={"storageUri": "{packed}", "framework": "sklearn",
                                                     "sha256": "0" * 64}),
    "load: no storageUri": Bad("POST", LOAD.format("bad-load"), 400, "needs storageUri", "bad-load",
                               json={"framework": "sklearn"}),
    "load: no body, no repository": Bad("POST", LOAD.format("bad-load"), 400, "no model repository", "bad-load"),
    "load: Triton model config": Bad("POST", LOAD.format("bad-load"), 400, "Triton model configurations",
                                     "bad-load", json={"parameters": {"config": '{"backend": "python"}'}}),
    "load: unreachable storageUri": Bad("POST", LOAD.format("bad-unreachable"), 400, UNREACHABLE_URI,
                                        "bad-unreachable", json={"storageUri": UNREACHABLE_URI,
                                                                 "framework": "sklearn"}),
    "load: corrupt artifact": Bad("POST", LOAD.format(CORRUPT), 400, "cannot load sklearn model", CORRUPT,
                                  json={"storageUri": "{corrupt}", "framework": "sklearn"}),
    "infer on a FAILED model": Bad("POST", f"/v2/models/{CORRUPT}/infer", 503, "not ready (state FAILED)", CORRUPT,
                                   json=GOOD),
    "unload an unknown model": Bad("POST", "/v2/repository/models/no-such-model/unload", 404, "not found",
                                   "no-such-model"),
}


@pytest.fixture(scope="module")
def models(rayms_server, tmp_path_factory):
    """The target, the bystander and the corrupt model (loaded once, so it is FAILED before any row runs)."""
    root = tmp_path_factory.mktemp("bad-models")
    make_sklearn(root / MODEL)
    _, other_expected = make_xgboost(root / OTHER)
    corrupt = root / CORRUPT
    corrupt.mkdir()
    (corrupt / "model.joblib").write_bytes(b"these bytes are not a pickle")
    for name, framework in ((MODEL, "sklearn"), (OTHER, "xgboost")):
        response = rayms_server.load(name, str(root / name), framework)
        assert response.status_code == 200, response.text
    assert rayms_server.load(CORRUPT, str(corrupt), "sklearn").status_code == 400
    bomb = root / "bomb.tar.gz"  # one member declaring 20 GiB, in a few hundred bytes
    header = tarfile.TarInfo("model.joblib")
    header.size = 20 * 2**30
    bomb.write_bytes(gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT)))
    packed = root / "packed.tgz"  # a good model, packed: its sha256 is not zeros
    with tarfile.open(packed, "w:gz") as tf:
        tf.add(root / MODEL / "model.joblib", arcname="model.joblib")
    paths = {"corrupt": str(corrupt), "bomb": str(bomb), "packed": str(packed)}
    yield {"paths": paths, "corrupt": str(corrupt), "other_expected": other_expected}
    for row in rayms_server.post("/v2/repository/index").json():
        if row["name"].startswith("bad-"):
            rayms_server.post(f"/v2/repository/models/{row['name']}/unload")


def send(url: str, case: Bad, paths: dict[str, str]) -> tuple[int, str, bytes]:
    """Send one row exactly as written (``{name}`` in its JSON becomes ``paths[name]``); returns status, content
    type and body."""
    if case.declared_length is not None:
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            connection.putrequest(case.method, case.path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(case.declared_length))
            connection.endheaders()
            connection.send(b'{"inputs": [')  # the server must answer without waiting for the rest
            response = connection.getresponse()
            return response.status, response.getheader("content-type", ""), response.read()
        finally:
            connection.close()
    body = case.data
    if case.json is not None:
        text = json.dumps(case.json)
        for name, path in paths.items():
            text = text.replace("{%s}" % name, path)
        body = text.encode()
    if callable(body):
        body = body()
    headers = ({"Content-Type": "application/json"} | case.headers) if case.json is not None else case.headers
    prepared = requests.Request(case.method, url + case.path, data=body, headers=headers).prepare()
    prepared.url = url + case.path  # keep "..", "%2F" and friends exactly as written
    with requests.Session() as session:
        response = session.send(prepared, timeout=case.timeout_s)
    return response.status_code, response.headers.get("content-type", ""), response.content


@pytest.mark.parametrize("case", TABLE.values(), ids=TABLE.keys())
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(rayms_server, models, case):
    status, content_type, body = send(rayms_server.url, case, models["paths"])

    assert status == case.status, body
    assert content_type == "application/json"
    answer = json.loads(body)
    assert list(answer) == ["error"] and isinstance(answer["error"], str), answer
    assert "Traceback" not in answer["error"] and "ray::" not in answer["error"], answer
    assert case.fragment in answer["error"], answer
    if case.names is not None:
        assert case.names in answer["error"], answer

    rows = make_data(n=3, seed=7)[0]
    good = rayms_server.post(f"/v2/models/{OTHER}/infer", json=v2(list(rows.shape), rows.ravel().tolist()))
    assert good.status_code == 200, good.text
    output = good.json()["outputs"][0]  # the XGBoost neighbour's Booster.predict: float32 probabilities
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    assert np.array_equal(got, models["other_expected"](rows))


def test_a_failed_load_shows_in_the_index_with_the_frameworks_reason(rayms_server, models):
    row = rayms_server.status(CORRUPT)
    assert row["state"] == "FAILED"
    assert "cannot load sklearn model model.joblib" in row["reason"]
    ready = rayms_server.get(f"/v2/models/{CORRUPT}/ready")
    assert ready.status_code == 503 and "FAILED" in ready.json()["error"]
    answer = rayms_server.post(f"/v2/models/{CORRUPT}/infer", json=GOOD).json()
    assert row["reason"] in answer["error"]
