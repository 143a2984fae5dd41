"""The Kubernetes workflow end to end: TrainedModels in an API server drive a real rayms app.

The API server is the in-repo fake (``tests/fake_apiserver``) serving the repo's own CRD; the app is a real
rayms application with ``kubernetes=True`` on the session's Ray and Serve, so the bridge runs as its Serve
deployment, reaches the API server through a kubeconfig, and models are fetched, loaded and served by real
replicas. Clients call each model at the ``status.url`` the bridge wrote, over real HTTP.

The app lives at route prefix ``/k8s`` next to the session app at ``/``, with its own ``app_name`` (hence its
own registry, state file, cache and node agents). Its ``inferenceService`` is ``rayms``, the name of the
RayService object created in the API server, which owns every TrainedModel the bridge adopts. The tests share
one fleet of models and run in file order; the last one deletes the RayService. The app's node agents reach
the GCS and Azure emulators through ``storage_env``, so the example TrainedModels of ``kuberay/examples/``
are applied as they are and fetched from ``gs://``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from kubernetes import client

from tests.conftest import Server, free_port, wait_for
from tests.fake_apiserver import FakeApiServer
from tests.model_factory import make_data, make_lightgbm, make_onnx, make_sklearn, make_xgboost
from tests.support import prediction, v2_body

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "kuberay" / "trainedmodel-crd.yaml"
GROUP, VERSION, PLURAL, NS = "serving.rayms.io", "v1alpha1", "trainedmodels", "default"
APP, PREFIX, SERVICE = "rayms-k8s", "/k8s", "rayms"
ROWS = make_data(n=4, seed=11)[0]
BUILDERS = {"sklearn": make_sklearn, "xgboost": make_xgboost, "lightgbm": make_lightgbm, "onnx": make_onnx}
FLEET_SIZE = 20
UNTOUCHED = [f"tm-{i:02d}" for i in range(8, FLEET_SIZE)]  # no test changes these; they show nobody else broke


# ------------------------------------------------------------------------------------------ helpers
def trained_model(name: str, uri: str, framework: str, memory: str = "32Mi") -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainedModel", "metadata": {"name": name, "namespace": NS},
            "spec": {"inferenceService": SERVICE, "model": {"storageUri": uri, "framework": framework,
                                                             "memory": memory}}}


class Cluster:
    """The API server side: TrainedModels and the RayService, through the real ``kubernetes`` client."""

    def __init__(self, apiserver: FakeApiServer) -> None:
        self.apiserver = apiserver
        self.objects = client.CustomObjectsApi(apiserver.api_client())

    def apply(self, body: dict) -> dict:
        return self.objects.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    def patch(self, name: str, patch: dict) -> dict:
        return self.objects.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch)

    def delete(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)

    def get(self, name: str) -> dict | None:
        return self.apiserver.get_object(PLURAL, name, NS, group=GROUP)

    def names(self) -> set[str]:
        return {o["metadata"]["name"] for o in self.apiserver.objects(PLURAL, NS, group=GROUP)}

    def condition(self, name: str, kind: str) -> dict:
        status = (self.get(name) or {}).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == kind), {})

    def ready(self, name: str) -> bool:
        return self.condition(name, "Ready").get("status") == "True"

    def url(self, name: str) -> str:
        return self.get(name)["status"]["url"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    apiserver = FakeApiServer([CRD], bookmark_interval=0.5)
    apiserver.start()
    yield Cluster(apiserver)
    apiserver.stop()


@pytest.fixture(scope="module")
def rayservice(cluster: Cluster) -> dict:
    return cluster.objects.create_namespaced_custom_object(
        "ray.io", "v1", NS, "rayservices",
        {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": SERVICE}, "spec": {}})


@pytest.fixture(scope="module")
def k8s_app(rayms_server: Server, cluster: Cluster, rayservice: dict, emulators,
            tmp_path_factory) -> Iterator[Server]:
    """A rayms app with the bridge on, next to the session app; ``status.url`` points at its route prefix."""
    from ray import serve

    from rayms.app import build_app
    from rayms.config import Settings
    from rayms.local import kill_agents

    tmp = tmp_path_factory.mktemp("k8s-app")
    kubeconfig = cluster.apiserver.write_kubeconfig(tmp / "kubeconfig")
    settings = Settings(  # 4 GiB of declared memory: the fleet (32 Mi each) and the examples (256 Mi each)
        app_name=APP, num_replicas=1, max_models_per_replica=40, replica_memory_bytes=2**32,
        cache_dir=str(tmp / "cache"), state_uri=str(tmp / "state" / "models.json"), download_backoff_s=0.05,
        kubernetes=True, kubeconfig=str(kubeconfig), namespace=NS, inference_service=SERVICE,
        external_url=rayms_server.url + PREFIX, storage_env=emulators.env(),
    )
    serve.run(build_app(settings), name=APP, route_prefix=PREFIX)
    server = Server(url=rayms_server.url + PREFIX, settings=settings, tmp=tmp)
    wait_for(lambda: server.get("/v2/health/ready").status_code == 200, timeout_s=180, what="k8s app ready")
    yield server
    serve.delete(APP)
    kill_agents(APP)


@pytest.fixture(scope="module")
def fleet(k8s_app: Server, cluster: Cluster, tmp_path_factory) -> dict[str, tuple[str, Callable]]:
    """Twenty TrainedModels over four frameworks, applied at once; returns ``name -> (framework, expected)``."""
    root = tmp_path_factory.mktemp("fleet")
    frameworks = list(BUILDERS)
    made: dict[str, tuple[str, Path, Callable]] = {}
    for i in range(FLEET_SIZE):
        name, framework = f"tm-{i:02d}", frameworks[i % len(frameworks)]
        path, expected = BUILDERS[framework](root / name)
        made[name] = (framework, path, expected)
    with ThreadPoolExecutor(max_workers=FLEET_SIZE) as pool:
        list(pool.map(lambda item: cluster.apply(trained_model(item[0], str(item[1][1]), item[1][0])),
                      made.items()))
    wait_for(lambda: all(cluster.ready(name) for name in made), timeout_s=300, interval_s=0.2,
             what=f"{FLEET_SIZE} TrainedModels Ready")
    return {name: (framework, expected) for name, (framework, _, expected) in made.items()}


def answers_correctly(cluster: Cluster, name: str, expected: Callable) -> None:
    response = requests.post(cluster.url(name), json=v2_body(ROWS), timeout=120)
    assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"
    assert np.allclose(prediction(response), expected(ROWS)), name


def index(server: Server) -> dict[str, dict]:
    return {row["name"]: row for row in server.post("/v2/repository/index").json()}


def resident(server: Server) -> set[str]:
    return {name for replica in server.replicas() for name in replica["models"]}


# ------------------------------------------------------------------------------------------ tests
def test_twenty_trained_models_become_ready_and_serve_at_their_status_url(k8s_app, cluster, rayservice, fleet):
    for name, (framework, expected) in fleet.items():
        obj = cluster.get(name)
        status = obj["status"]
        assert status["state"] == "READY" and status["observedGeneration"] == 1, name
        assert status["url"] == f"{k8s_app.url}/v2/models/{name}/infer"
        assert status["address"]["url"].endswith(f"{SERVICE}-serve-svc.{NS}.svc.cluster.local:8000"
                                                  f"/v2/models/{name}/infer")
        assert all(c["status"] == "True" for c in status["conditions"]), status["conditions"]
        owners = obj["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [
            ("RayService", SERVICE, rayservice["metadata"]["uid"])]
        answers_correctly(cluster, name, expected)
    rows = index(k8s_app)
    assert {n: (r["state"], r["source"], r["framework"]) for n, r in rows.items()} == {
        n: ("READY", "kubernetes", framework) for n, (framework, _) in fleet.items()}
    # the session app at "/" never heard of these models
    assert k8s_app.get("/v2/models/tm-00").status_code == 200
    assert requests.get(f"{k8s_app.url.removesuffix(PREFIX)}/v2/models/tm-00", timeout=60).status_code == 404


def test_deleting_a_trained_model_unloads_it(k8s_app, cluster, fleet):
    name = "tm-00"
    url = cluster.url(name)
    answers_correctly(cluster, name, fleet[name][1])
    assert name in resident(k8s_app)
    cluster.delete(name)
    wait_for(lambda: requests.post(url, json=v2_body(ROWS), timeout=60).status_code == 404, timeout_s=120,
             what=f"{name} answers 404")
    missing = requests.post(url, json=v2_body(ROWS), timeout=60)
    assert name in missing.json()["error"]
    wait_for(lambda: name not in resident(k8s_app), timeout_s=60, what=f"{name} left every replica")
    assert name not in index(k8s_app)
    assert cluster.get(name) is None
    for other in UNTOUCHED[:3]:
        answers_correctly(cluster, other, fleet[other][1])


class Traffic:
    """Threads that keep calling one URL; every answer must be 200 with one of the accepted predictions."""

    def __init__(self, url: str, accepted: dict[str, np.ndarray], threads: int = 3) -> None:
        self._url, self._accepted = url, accepted
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[str] = []     # which accepted prediction each answer matched
        self.problems: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(self._url, json=v2_body(ROWS), timeout=120)
            except requests.RequestException as exc:
                with self._lock:
                    self.problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                outcome, problem = None, f"{response.status_code}: {response.text[:200]}"
            else:
                got = prediction(response)
                outcome = next((k for k, v in self._accepted.items() if v.shape == got.shape and np.allclose(got, v)),
                               None)
                problem = None if outcome else f"unexpected prediction {got.tolist()}"
            with self._lock:
                if outcome:
                    self.answers.append(outcome)
                if problem:
                    self.problems.append(problem)

    def count(self, outcome: str) -> int:
        with self._lock:
            return self.answers.count(outcome)

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


def test_changing_storage_uri_serves_the_new_version_without_failing_a_request(k8s_app, cluster, fleet, tmp_path):
    name = "tm-04"  # a scikit-learn classifier; its new version is a regressor, so answers tell them apart
    assert fleet[name][0] == "sklearn"
    new_path, new_expected = make_sklearn(tmp_path / "v2", kind="linreg")
    url = cluster.url(name)
    with Traffic(url, {"old": np.asarray(fleet[name][1](ROWS), dtype=np.float64),
                       "new": np.asarray(new_expected(ROWS), dtype=np.float64)}) as traffic:
        wait_for(lambda: traffic.count("old") >= 5, timeout_s=120, what="old version answering")
        cluster.patch(name, {"spec": {"model": {"storageUri": str(new_path)}}})
        wait_for(lambda: (index(k8s_app).get(name) or {}).get("version") == "2", timeout_s=120, what="version 2")
        wait_for(lambda: traffic.count("new") >= 20, timeout_s=180, what="new version answering")
    assert not traffic.problems, traffic.problems[:5]
    assert traffic.answers[-10:] == ["new"] * 10  # once the new version answers, the old one never does again
    wait_for(lambda: (cluster.get(name)["status"] or {}).get("observedGeneration") == 2, timeout_s=60,
             what="observedGeneration 2")
    assert cluster.ready(name) and cluster.url(name) == url
    row = index(k8s_app)[name]
    assert (row["state"], row["version"], row["storageUri"]) == ("READY", "2", str(new_path))


def test_bad_trained_models_report_why_and_leave_the_others_alone(k8s_app, cluster, fleet, tmp_path):
    good_path, good_expected = make_lightgbm(tmp_path / "neighbour")
    unreachable = f"http://127.0.0.1:{free_port()}/models/model.joblib"
    bad = {
        "bad-framework": trained_model("bad-framework", str(good_path), "tensorflow"),
        "bad-storage": trained_model("bad-storage", unreachable, "sklearn"),
        "bad-memory": trained_model("bad-memory", str(good_path), "lightgbm", memory="64Gi"),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(cluster.apply, [*bad.values(), trained_model("neighbour", str(good_path), "lightgbm")]))

    def failed(name: str, kind: str, reason: str) -> dict:
        condition = cluster.condition(name, kind)
        return condition if (condition.get("status"), condition.get("reason")) == ("False", reason) else {}

    framework = wait_for(lambda: failed("bad-framework", "FrameworkSupported", "FrameworkNotSupported"),
                         timeout_s=120, what="bad-framework")
    assert "tensorflow" in framework["message"]
    memory = wait_for(lambda: failed("bad-memory", "MemoryResourceAvailable", "MemoryResourceNotAvailable"),
                      timeout_s=120, what="bad-memory")
    assert "exceeds the model-memory budget" in memory["message"]
    storage = wait_for(lambda: failed("bad-storage", "ModelLoaded", "ModelLoadFailed"), timeout_s=180,
                       what="bad-storage")
    assert unreachable in storage["message"]
    assert cluster.get("bad-storage")["status"]["state"] == "FAILED"
    for name in bad:
        ready = cluster.condition(name, "Ready")
        assert ready["status"] == "False" and ready["message"], (name, ready)

    # what the serving side makes of them: refused specs are not models, a failed load is a model not ready
    rows = index(k8s_app)
    assert "bad-framework" not in rows and "bad-memory" not in rows
    failed_row = wait_for(lambda: (r := index(k8s_app)["bad-storage"])["state"] == "FAILED" and r, timeout_s=60,
                          what="bad-storage FAILED in the index")
    assert unreachable in failed_row["reason"]
    assert requests.post(cluster.url("bad-framework"), json=v2_body(ROWS), timeout=60).status_code == 404
    assert requests.post(cluster.url("bad-memory"), json=v2_body(ROWS), timeout=60).status_code == 404
    not_ready = requests.post(cluster.url("bad-storage"), json=v2_body(ROWS), timeout=60)
    assert not_ready.status_code == 503 and "bad-storage" in not_ready.json()["error"]

    wait_for(lambda: cluster.ready("neighbour"), timeout_s=180, what="neighbour Ready")
    answers_correctly(cluster, "neighbour", good_expected)
    for name in UNTOUCHED:
        assert cluster.ready(name), name
        answers_correctly(cluster, name, fleet[name][1])
    # A failed load is not retried behind the user's back: writing its status must not re-apply the spec.
    assert index(k8s_app)["bad-storage"]["updatedAt"] == failed_row["updatedAt"]
    status_writes = [r for r in cluster.apiserver.requests
                     if r.method == "PATCH" and r.path.endswith(f"/{PLURAL}/bad-storage/status")]
    assert len(status_writes) <= 4, status_writes


# What KServe's bucket holds under each example's storageUri: one model file, named as KServe names it.
STAND_INS: dict[str, Callable[[Path], tuple[Path, Callable]]] = {
    "sklearn": make_sklearn,                                      # model.joblib
    "xgboost": lambda folder: make_xgboost(folder, ext=".bst"),   # model.bst
    "lightgbm": lambda folder: make_lightgbm(folder, ext=".bst"),  # model.bst
    "onnx": make_onnx,                                            # model.onnx
}


def test_the_kuberay_examples_serve_from_their_storage_uris(k8s_app, cluster, fleet, gcs, tmp_path):
    """The example manifests point at KServe's public bucket. The GCS emulator holds stand-in models (small
    ones of the same framework) under that bucket and those keys; the manifests are applied unchanged, except
    the KServe original, which gets rayms's apiVersion, as its comment says is all it needs."""
    applied: dict[str, tuple[dict, Callable]] = {}
    for path in sorted((ROOT / "kuberay" / "examples").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        model = manifest["spec"]["model"]
        scheme, _, location = model["storageUri"].partition("://")
        assert scheme == "gs", f"{path.name}: the test serves the examples from the GCS emulator"
        bucket, _, prefix = location.partition("/")
        artifact, expected = STAND_INS[model["framework"]](tmp_path / path.stem)
        gcs.bucket(bucket, {f"{prefix}/{artifact.name}": artifact.read_bytes()})
        manifest = {**manifest, "apiVersion": f"{GROUP}/{VERSION}",
                    "metadata": {**manifest["metadata"], "namespace": NS}}
        applied[manifest["metadata"]["name"]] = (manifest, expected)
    assert len(applied) == len(STAND_INS) + 1, sorted(applied)  # one per framework and the KServe original
    for manifest, _ in applied.values():
        cluster.apply(manifest)
    wait_for(lambda: all(cluster.ready(name) for name in applied), timeout_s=180, interval_s=0.2,
             what="the example TrainedModels Ready")
    rows = index(k8s_app)
    for name, (manifest, expected) in applied.items():
        model = manifest["spec"]["model"]
        assert (rows[name]["storageUri"], rows[name]["framework"]) == (model["storageUri"], model["framework"])
        answers_correctly(cluster, name, expected)
    # Left in place: deleting the RayService (the next test) collects them with the rest.


def test_deleting_the_rayservice_collects_and_unloads_every_trained_model(k8s_app, cluster, fleet):
    """Runs last: it removes the RayService that owns every TrainedModel of this module."""
    names = cluster.names()
    assert set(UNTOUCHED) <= names and "bad-framework" in names
    owned = {n for n in names
             if any(o["name"] == SERVICE for o in cluster.get(n)["metadata"].get("ownerReferences", []))}
    assert owned == names  # even a TrainedModel whose spec was refused belongs to its service
    urls = {name: cluster.url(name) for name in names}
    served = set(index(k8s_app))
    assert served and served <= names
    cluster.objects.delete_namespaced_custom_object("ray.io", "v1", NS, "rayservices", SERVICE)
    wait_for(lambda: not cluster.names(), timeout_s=120, what="TrainedModels garbage-collected")
    wait_for(lambda: not index(k8s_app), timeout_s=120, what="every model unregistered")
    wait_for(lambda: not resident(k8s_app), timeout_s=120, what="every replica empty")
    for name, url in urls.items():
        response = requests.post(url, json=v2_body(ROWS), timeout=60)
        assert response.status_code == 404 and name in response.json()["error"], (name, response.text)
