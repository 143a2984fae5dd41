"""The TrainedModel bridge against the in-repo fake API server, through the real ``kubernetes`` client.

The registry here is the real :class:`~rayms.registry.ModelRegistry` with a placer that loads nothing, so
these tests pin the bridge's behaviour (selection, validation, status, deletion, garbage collection,
relists, restarts) quickly; ``tests/test_e2e_kubernetes.py`` runs the same flow through the real app.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from rayms.config import ModelSpec, Settings
from rayms.errors import ModelLoadError
from rayms.k8s import TrainedModelBridge
from rayms.registry import ModelRegistry
from rayms.statestore import StateStore
from rayms.status import LoadReport, Source
from tests.fake_apiserver import FakeApiServer
from tests.support import DirectRegistry

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "kuberay" / "trainedmodel-crd.yaml"
GROUP, VERSION, PLURAL, NS = "serving.rayms.io", "v1alpha1", "trainedmodels", "default"


class Placer:
    """Loads succeed unless the URI says 'unreachable'; records every load."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int]] = []
        self.unloads: list[str] = []

    async def load(self, name, spec, version):
        self.loads.append((name, version))
        if "unreachable" in spec.storage_uri:
            raise ModelLoadError(f"model {name}: cannot fetch {spec.storage_uri}: connection refused")
        return LoadReport(replica="r0", measured_bytes=100, load_time_s=0.01, metadata={})

    async def unload(self, name, spec):
        self.unloads.append(name)


def kserve_crd() -> dict:
    """KServe's own TrainedModel CRD: the shared reference copy when present, else ours under KServe's group."""
    reference = ROOT.parent / "shared" / "reference" / "kserve-trainedmodel-crd.yaml"
    if reference.exists():
        return yaml.safe_load(reference.read_text())
    crd = copy.deepcopy(yaml.safe_load(CRD.read_text()))
    crd["spec"]["group"] = "serving.kserve.io"
    crd["metadata"]["name"] = "trainedmodels.serving.kserve.io"
    return crd


@pytest.fixture
def apiserver():
    server = FakeApiServer([CRD], crds=[kserve_crd()], bookmark_interval=0.2)
    server.start()
    yield server
    server.stop()


def tm(name: str, uri: str = "s3://models/m.joblib", framework: str = "sklearn", memory: str = "64Mi",
       service: str = "my-rayms", api_version: str = f"{GROUP}/{VERSION}") -> dict:
    return {"apiVersion": api_version, "kind": "TrainedModel", "metadata": {"name": name, "namespace": NS},
            "spec": {"inferenceService": service,
                     "model": {"storageUri": uri, "framework": framework, "memory": memory}}}


class Harness:
    def __init__(self, apiserver: FakeApiServer, tmp_path: Path, *, kserve_compat: bool = False) -> None:
        self.apiserver = apiserver
        self.api = apiserver.api_client()
        self.objects = client.CustomObjectsApi(self.api)
        self.settings = Settings(cache_dir=str(tmp_path), replica_memory_bytes=2**30, inference_service="my-rayms",
                                 namespace=NS, kserve_compat=kserve_compat, external_url="http://rayms.example")
        self.placer = Placer()
        self.registry = ModelRegistry(self.settings, store=StateStore(str(tmp_path / "models.json")),
                                      placer=self.placer)
        self.bridge: TrainedModelBridge | None = None
        self.group = "serving.kserve.io" if kserve_compat else GROUP

    async def start_bridge(self) -> TrainedModelBridge:
        self.bridge = TrainedModelBridge(self.settings, registry=DirectRegistry(self.registry), api=self.api,
                                         namespace=NS)
        await self.bridge.start()
        await asyncio.wait_for(self.bridge.synced.wait(), timeout=10)
        return self.bridge

    async def create(self, body: dict) -> None:
        await asyncio.to_thread(self.objects.create_namespaced_custom_object, self.group, VERSION, NS, PLURAL, body)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.objects.delete_namespaced_custom_object, self.group, VERSION, NS, PLURAL, name)

    def get(self, name: str) -> dict | None:
        return self.apiserver.get_object(PLURAL, name, NS, group=self.group)

    def condition(self, name: str, kind: str) -> dict:
        obj = self.get(name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})

    async def until(self, predicate, timeout_s: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what or predicate}")

    def registered(self) -> set[str]:
        return {m.name for m in self.registry.list()}


async def test_two_hundred_trained_models_become_ready_without_storming_the_api(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    apiserver.reset_request_log()
    await asyncio.gather(*(h.create(tm(f"m{i:03d}")) for i in range(200)))
    await h.until(lambda: all(h.condition(f"m{i:03d}", "Ready").get("status") == "True" for i in range(200)),
                  timeout_s=60, what="200 TrainedModels Ready")
    status = h.get("m007")["status"]
    assert status["state"] == "READY"
    assert status["url"] == "http://rayms.example/v2/models/m007/infer"
    assert status["address"]["url"].endswith("my-rayms-serve-svc.default.svc.cluster.local:8000/v2/models/m007/infer")
    assert status["observedGeneration"] == 1
    # 200 creates + a few status writes per object (coalesced), not one write per registry change
    assert apiserver.write_count <= 200 + 3 * 200
    await h.bridge.stop()


async def test_selects_only_its_inference_service_and_reports_bad_specs(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    await h.create(tm("other", service="someone-else"))
    await h.create(tm("badfw", framework="tensorflow"))
    await h.create(tm("toobig", memory="64Gi"))
    await h.create(tm("unreachable", uri="http://127.0.0.1:1/unreachable/model.joblib"))
    await h.create(tm("good"))
    await h.until(lambda: h.condition("good", "Ready").get("status") == "True", what="good ready")
    await h.until(lambda: h.condition("badfw", "FrameworkSupported").get("status") == "False", what="badfw")
    assert "tensorflow" in h.condition("badfw", "FrameworkSupported")["message"]
    assert h.condition("badfw", "Ready")["status"] == "False"
    await h.until(lambda: h.condition("toobig", "MemoryResourceAvailable").get("status") == "False", what="toobig")
    assert "exceeds the model-memory budget" in h.condition("toobig", "MemoryResourceAvailable")["message"]
    await h.until(lambda: h.condition("unreachable", "ModelLoaded").get("status") == "False", what="unreachable")
    assert "connection refused" in h.condition("unreachable", "ModelLoaded")["message"]
    assert h.get("unreachable")["status"]["state"] == "FAILED"
    assert not (h.get("other") or {}).get("status")  # another service's TrainedModel is left untouched
    assert h.registered() == {"good", "unreachable"}
    await h.bridge.stop()


async def test_delete_unloads_and_deleting_the_rayservice_collects_its_models(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    rayservices = client.CustomObjectsApi(h.api)
    service = await asyncio.to_thread(
        rayservices.create_namespaced_custom_object, "ray.io", "v1", NS, "rayservices",
        {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "my-rayms"}, "spec": {}})
    await h.start_bridge()
    for name in ("a", "b", "c"):
        await h.create(tm(name))
    await h.until(lambda: h.registered() == {"a", "b", "c"}, what="registered")
    await h.until(lambda: all((h.get(n) or {}).get("metadata", {}).get("ownerReferences") for n in "abc"),
                  what="owner references")
    assert h.get("a")["metadata"]["ownerReferences"][0]["uid"] == service["metadata"]["uid"]
    assert not h.get("a")["metadata"].get("finalizers")
    await h.delete("a")
    await h.until(lambda: h.registered() == {"b", "c"} and "a" in h.placer.unloads, what="a unloaded")
    await asyncio.to_thread(rayservices.delete_namespaced_custom_object, "ray.io", "v1", NS, "rayservices",
                            "my-rayms")
    await h.until(lambda: h.get("b") is None and h.get("c") is None, what="garbage collection")
    await h.until(lambda: h.registered() == set(), what="collected models unloaded")
    await h.bridge.stop()


async def test_changing_storage_uri_loads_a_new_version(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    await h.create(tm("m"))
    await h.until(lambda: h.condition("m", "Ready").get("status") == "True", what="ready")
    await asyncio.to_thread(h.objects.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "m",
                            {"spec": {"model": {"storageUri": "s3://models/m-v2.joblib"}}})
    await h.until(lambda: h.registry.get("m").version == 2 and h.registry.get("m").state == "READY",
                  what="version 2")
    await h.until(lambda: (h.get("m")["status"] or {}).get("observedGeneration") == 2, what="observed generation")
    assert h.registry.get("m").storage_uri == "s3://models/m-v2.joblib"
    await h.bridge.stop()


async def test_410_and_dropped_streams_mid_burst_end_exactly_like_the_api_server(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    for i in range(40):
        await h.create(tm(f"w{i:02d}"))
        if i == 10:
            apiserver.drop_watches(abrupt=True)
        if i == 20:
            apiserver.compact()
            apiserver.drop_watches()
        if i % 7 == 0 and i:
            await h.delete(f"w{i - 3:02d}")
    apiserver.compact()
    apiserver.drop_watches()
    expected = {o["metadata"]["name"] for o in apiserver.objects(PLURAL, NS, group=GROUP)}
    await h.until(lambda: h.registered() == expected, timeout_s=30, what="registry == API server")
    assert h.bridge.stats()["relists"] >= 2
    await h.bridge.stop()


async def test_restart_reconciles_without_loading_anything_twice(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    for name in ("keep", "gone"):
        await h.create(tm(name))
    await h.until(lambda: h.registered() == {"keep", "gone"}, what="registered")
    await h.until(lambda: h.condition("keep", "Ready").get("status") == "True", what="keep ready")
    await h.bridge.stop()
    # while the bridge is away: one deleted, one created
    await h.delete("gone")
    await h.create(tm("new"))
    await h.start_bridge()
    await h.until(lambda: h.registered() == {"keep", "new"}, what="reconciled")
    await h.until(lambda: h.condition("new", "Ready").get("status") == "True", what="new ready")
    assert h.placer.loads.count(("keep", 1)) == 1  # the same spec is not loaded again
    # a model registered from another source is left alone by reconciliation
    await h.registry.register("by-hand", ModelSpec(storage_uri="/x.joblib", framework="sklearn"), Source.API)
    await h.bridge.stop()
    await h.start_bridge()
    assert "by-hand" in h.registered()
    await h.bridge.stop()


async def test_kserve_manifests_work_by_apiversion_or_in_compat_mode(apiserver, tmp_path):
    h = Harness(apiserver, tmp_path)
    await h.start_bridge()
    kserve_manifest = tm("from-kserve", api_version="serving.kserve.io/v1alpha1")
    rayms_manifest = {**kserve_manifest, "apiVersion": f"{GROUP}/{VERSION}"}
    await h.create(rayms_manifest)
    await h.until(lambda: h.condition("from-kserve", "Ready").get("status") == "True", what="rayms group")
    await h.bridge.stop()

    compat = Harness(apiserver, tmp_path / "compat", kserve_compat=True)
    await compat.start_bridge()
    await compat.create(tm("unchanged", api_version="serving.kserve.io/v1alpha1"))
    await compat.until(lambda: compat.registered() == {"unchanged"}, what="compat registered")
    await compat.bridge.stop()
