"""The access rule, storage confinement, owner arbitration, redaction and body limits, in process (no Ray).

The HTTP layer is driven over httpx's ASGI transport with a data plane whose control calls are recorded; a
server "bound beyond loopback" is one with ``trust_loopback=False`` (tests bind only to 127.0.0.1).
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from rayms.access import AccessPolicy, check_storage, is_loopback, route_kind
from rayms.codecs import InferResult, Tensor
from rayms.config import ModelSpec, Settings
from rayms.dataplane import DataPlane
from rayms.errors import Conflict, Forbidden
from rayms.redact import install_log_redaction, redact
from rayms.registry import ModelRegistry
from rayms.router import build_api
from rayms.statestore import StateStore
from rayms.status import Changes, LoadReport, ModelState, ModelStatus, Source
from rayms.view import RegistryView

TOKEN = "s3cr3t-token-value"
READY = ModelStatus(name="m", version=1, state=ModelState.READY, source=Source.API,
                    spec=ModelSpec(storage_uri="https://user:hunter2@example.com/m.joblib?X-Amz-Signature=abc123",
                                   framework="sklearn"), reason="fetched https://bob:pw@h/x?sig=zzz")
BODY = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]}]}


class Models:
    async def infer(self, name, request):
        return InferResult(outputs=[Tensor.from_numpy("predict", np.array([1, 2]))])

    async def metadata(self, name):
        return {}


class Control:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloads: list[tuple[str, bool]] = []

    async def load(self, name, spec, source, *, force=False):
        self.loads.append(name)
        return ModelStatus(name=name, version=1, state=ModelState.READY, source=source, spec=spec)

    async def unregister(self, name, source=None, *, force=False):
        self.unloads.append((name, force))

    async def replicas(self):
        return []


def app(**settings):
    async def no_watch(epoch, since, timeout_s=30.0):
        raise AssertionError("not used")

    view = RegistryView(no_watch)
    view.apply(Changes(epoch="e", change=1, reset=True, models=[READY], deleted=[]))
    control = Control()
    settings = Settings(**settings)
    plane = DataPlane(settings, view=view, models=Models(), control=control)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(plane, settings)), base_url="http://rayms")
    return http, control


LOAD = {"storageUri": "/models/x.joblib", "framework": "sklearn"}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


async def test_a_loopback_server_trusts_its_machine_and_a_wider_one_trusts_nobody_until_configured():
    local, control = app()
    async with local:
        assert (await local.post("/v2/repository/index")).status_code == 200
        assert (await local.post("/v2/repository/models/x/load", json=LOAD)).status_code == 200
    wide, control = app(trust_loopback=False)
    async with wide:
        for method, path in [("POST", "/v2/repository/index"), ("GET", "/v2/repository/index"),
                             ("POST", "/v2/repository/models/x/load"), ("POST", "/v2/repository/models/m/unload"),
                             ("GET", "/v2/repository/replicas"), ("GET", "/v2/models"), ("GET", "/v1/models")]:
            refused = await wide.request(method, path, json=LOAD if path.endswith("load") else None)
            assert refused.status_code == 401, (path, refused.text)
            assert "control_token" in refused.json()["error"] and refused.headers["www-authenticate"].startswith("Bearer")
        assert control.loads == [] and control.unloads == []
        # inference, per-model metadata and health stay open
        assert (await wide.post("/v2/models/m/infer", json=BODY)).status_code == 200
        assert (await wide.get("/v2/models/m/ready")).status_code == 200
        assert (await wide.get("/v2/health/ready")).status_code in (200, 503)


async def test_with_a_control_token_only_its_bearer_may_change_or_list_models():
    http, control = app(trust_loopback=False, control_token=TOKEN)
    async with http:
        assert (await http.post("/v2/repository/models/x/load", json=LOAD)).status_code == 401
        wrong = await http.post("/v2/repository/models/x/load", json=LOAD, headers=bearer("not-it"))
        assert wrong.status_code == 401 and TOKEN not in wrong.text
        basic = await http.post("/v2/repository/index", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401
        assert (await http.post("/v2/repository/models/x/load", json=LOAD, headers=bearer(TOKEN))).status_code == 200
        assert (await http.post("/v2/repository/index", headers=bearer(TOKEN))).status_code == 200
        assert control.loads == ["x"]
    # configured, the token is required on loopback too
    local, _ = app(control_token=TOKEN)
    async with local:
        assert (await local.post("/v2/repository/index")).status_code == 401


async def test_an_inference_token_guards_inference_and_the_control_token_opens_it_too():
    http, _ = app(inference_token="infer-token", control_token=TOKEN)
    async with http:
        assert (await http.post("/v2/models/m/infer", json=BODY)).status_code == 401
        assert (await http.post("/v1/models/m:predict", json={"instances": [[1.0]]})).status_code == 401
        assert (await http.post("/v2/models/m/infer", json=BODY, headers=bearer("infer-token"))).status_code == 200
        assert (await http.post("/v2/models/m/infer", json=BODY, headers=bearer(TOKEN))).status_code == 200
        assert (await http.get("/v2/health/live")).status_code == 200


async def test_the_control_api_can_be_switched_off(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as a mounted Secret holds it
    http, control = app(model_control="none", control_token_file=str(token_file))
    async with http:
        off = await http.post("/v2/repository/models/x/load", json=LOAD, headers=bearer(TOKEN))
        assert off.status_code == 403 and "model_control=none" in off.json()["error"]
        assert (await http.post("/v2/repository/models/m/unload", headers=bearer(TOKEN))).status_code == 403
        assert (await http.post("/v2/repository/index", headers=bearer(TOKEN))).status_code == 200
    assert control.loads == []


async def test_credentials_in_uris_never_reach_the_index_or_an_error():
    http, _ = app()
    async with http:
        [row] = (await http.post("/v2/repository/index")).json()
    text = str(row)
    for secret in ("hunter2", "abc123", "zzz", ":pw@"):
        assert secret not in text
    assert row["storageUri"] == "https://***@example.com/m.joblib?X-Amz-Signature=***"


@pytest.mark.parametrize(("text", "expected"), [
    ("s3://AKIA:SECRET@bucket/m", "s3://***@bucket/m"),
    ("see https://a.blob.core.windows.net/c/m.onnx?sv=2024&sig=abc%2Fdef&se=x for it",
     "see https://a.blob.core.windows.net/c/m.onnx?sv=***&sig=***&se=*** for it"),
    ("gs://b/m.bst?X-Goog-Signature=ff&X-Goog-Credential=c", "gs://b/m.bst?X-Goog-Signature=***&X-Goog-Credential=***"),
    ("/plain/local/path.joblib", "/plain/local/path.joblib"),
    ("user@example.com wrote", "user@example.com wrote"),
])
def test_redaction(text, expected):
    assert redact(text) == expected


def test_log_records_of_rayms_are_redacted(caplog):
    import logging

    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="rayms.test"):
        logging.getLogger("rayms.test").info("downloading %s", "https://u:topsecret@h/m?token=abc")
    assert "topsecret" not in caplog.text and "abc" not in caplog.text and "https://***@h/m?token=***" in caplog.text


async def test_a_body_that_trickles_in_is_refused_in_time_and_big_json_is_413():
    http, _ = app(body_timeout_s=0.3, max_json_bytes=1000)
    async with http:
        async def trickle():
            yield b'{"inputs": ['
            await asyncio.sleep(5)
            yield b"]}"

        started = asyncio.get_running_loop().time()
        slow = await http.post("/v2/models/m/infer", content=trickle())
        assert slow.status_code == 408 and "0.3s" in slow.json()["error"]
        assert asyncio.get_running_loop().time() - started < 2
        big = await http.post("/v2/models/m/infer", json={"inputs": [{"name": "x", "shape": [400], "datatype": "FP32",
                                                                       "data": [1.5] * 400}]})
        assert big.status_code == 413 and "1000" in big.json()["error"]
        assert (await http.post("/v2/models/m/infer", json=BODY)).status_code == 200


async def test_a_replica_holds_at_most_max_buffered_bytes_of_bodies_at_once():
    http, _ = app(max_buffered_bytes=3000, body_timeout_s=5)
    async with http:
        release = asyncio.Event()

        async def held(size):
            yield b"x" * size
            await release.wait()
            yield b""

        first = asyncio.create_task(http.post("/v2/models/m/infer", content=held(2500)))
        await asyncio.sleep(0.2)
        second = await http.post("/v2/models/m/infer", content=b"y" * 1000)
        assert second.status_code == 503 and "3000 bytes" in second.json()["error"]
        release.set()
        assert (await first).status_code == 400  # its body was not JSON: it was read, then refused
        assert (await http.post("/v2/models/m/infer", json=BODY)).status_code == 200


def test_route_kinds_and_loopback():
    assert route_kind("POST", "/v2/models/m/infer") == "inference"
    assert route_kind("GET", "/v2/models/m") == "inference"
    assert route_kind("GET", "/v2/models") == "control"
    assert route_kind("POST", "/v2/repository/models/m/load") == "change"
    assert route_kind("POST", "/v2/repository/index") == "control"
    assert route_kind("GET", "/v2/health/ready") == "open"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert AccessPolicy(Settings(host="0.0.0.0")).trusted is False


def test_storage_outside_the_allowed_prefixes_is_refused_beyond_loopback(tmp_path):
    repo, pvc, elsewhere = tmp_path / "repo", tmp_path / "pvc", tmp_path / "elsewhere"
    for folder in (repo / "a", pvc / "claim", elsewhere):
        folder.mkdir(parents=True)
    (repo / "a" / "link").symlink_to(elsewhere)
    wide = Settings(trust_loopback=False, model_repository=str(repo), pvc_root=str(pvc),
                    allow_storage=["s3://models/", str(tmp_path / "extra")])
    for allowed in (str(repo / "a"), f"file://{repo}/a/m.joblib", "pvc://claim/m.joblib", "s3://models/m.joblib",
                    str(tmp_path / "extra" / "m.joblib")):
        check_storage(wide, allowed)
    for refused in (str(elsewhere / "m.joblib"), str(repo / "a" / "link" / "m.joblib"), f"{repo}/../elsewhere",
                    "pvc://claim/../../elsewhere/m", "s3://other/m.joblib", "s3://models-evil/m.joblib",
                    "https://example.com/m.joblib", "/etc/passwd", "file:///etc/passwd"):
        with pytest.raises(Forbidden):
            check_storage(wide, refused)
    check_storage(Settings(), "/anything/at/all.joblib")  # a loopback server trusts its machine's user
    with pytest.raises(Forbidden):  # ...unless an allow-list is set
        check_storage(Settings(allow_storage=["s3://models/"]), "/anything/at/all.joblib")


class Placer:
    async def load(self, name, spec, version):
        return LoadReport(replica="r0", measured_bytes=1, load_time_s=0.01, metadata={})

    async def unload(self, name, spec):
        pass


async def test_a_trained_models_model_is_changed_through_the_api_only_when_forced(tmp_path):
    settings = Settings(cache_dir=str(tmp_path), replica_memory_bytes=2**30)
    registry = ModelRegistry(settings, store=StateStore(str(tmp_path / "s.json")), placer=Placer())
    spec = ModelSpec(storage_uri="/k8s/m.joblib", framework="sklearn")
    await registry.register("owned", spec, Source.KUBERNETES)
    with pytest.raises(Conflict, match="TrainedModel") as refused:
        await registry.register("owned", ModelSpec(storage_uri="/api/m.joblib", framework="sklearn"), Source.API)
    assert refused.value.status_code == 409
    with pytest.raises(Conflict):
        await registry.unregister("owned")
    assert registry.get("owned").storage_uri == "/k8s/m.joblib"
    await registry.register("owned", ModelSpec(storage_uri="/api/m.joblib", framework="sklearn"), Source.API,
                            force=True)
    assert registry.get("owned").source is Source.API
    await registry.register("k8s-too", spec, Source.KUBERNETES)
    await registry.unregister("k8s-too", force=True)
    await registry.unregister("owned")  # the API's own now


async def test_every_way_in_checks_storage(tmp_path):
    settings = Settings(cache_dir=str(tmp_path), trust_loopback=False, allow_storage=["s3://models/"])
    registry = ModelRegistry(settings, store=StateStore(str(tmp_path / "s.json")), placer=Placer())
    for source in Source:
        with pytest.raises(Forbidden, match="not allowed"):
            await registry.register("m", ModelSpec(storage_uri="/etc/x.joblib", framework="sklearn"), source)
    # a state file edited to point elsewhere is not restored either
    StateStore(str(tmp_path / "s.json")).write([{"modelName": "evil", "source": "api", "version": 1,
                                                 "modelSpec": {"storageUri": "/etc/x.joblib", "framework": "sklearn"}}])
    assert await registry.restore() == 0
    assert registry.list() == []
