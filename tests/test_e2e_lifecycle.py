"""The model lifecycle end to end: load, unload, evict, reload, change a spec, fetch from real sources.

Everything runs on real Ray and Serve over real HTTP. Tests that need the session server's settings use
``rayms_server`` (two replicas, 40 models each). Tests that need other settings (one replica, a small
count limit, a memory budget, storage credentials) use a second rayms application on the same Serve
instance: Serve routes by longest route prefix and strips it before FastAPI sees the path, so an app
deployed at ``/lifecycle`` answers ``/lifecycle/v2/...`` while the session app keeps ``/``. Each app has
its own ``app_name``, hence its own registry, state file, cache folder and node agents.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import Server, wait_for
from tests.model_factory import make_data
from tests.servers import FileServer, MotoS3, credentials
from tests.support import prediction, v2_body

ROWS = make_data(n=3, seed=7)[0]
Predict = Callable[[np.ndarray], np.ndarray]
Check = Callable[[str, requests.Response], str | None]


# ------------------------------------------------------------------------------------------ helpers
def make_offset_model(folder: Path, offset: float) -> tuple[Path, Predict]:
    """A linear regression fitted to ``make_data``'s target plus ``offset``: each offset answers differently."""
    import joblib
    from sklearn.linear_model import LinearRegression

    x, _, target = make_data()
    model = LinearRegression().fit(x, target + offset)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.joblib"
    joblib.dump(model, path)
    return path, model.predict


def infer(server: Server, name: str) -> requests.Response:
    return server.post(f"/v2/models/{name}/infer", json=v2_body(ROWS))


def answers_like(server: Server, name: str, predict: Predict) -> None:
    response = infer(server, name)
    assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"
    assert np.allclose(prediction(response), predict(ROWS)), name


def node_agents(app_name: str) -> list[str]:
    """The artifact agent actors of one application, on any node."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "rayms" and a["name"].startswith(f"{app_name}-agent-")]


def expect(predict: Predict, also: tuple[int, ...] = ()) -> Check:
    """A traffic check: 200 with ``predict``'s answer, or one of the statuses in ``also``."""
    def check(name: str, response: requests.Response) -> str | None:
        if response.status_code in also:
            return None
        if response.status_code != 200:
            return f"{name}: {response.status_code} {response.text[:200]}"
        return None if np.allclose(prediction(response), predict(ROWS)) else f"{name}: wrong answer"
    return check


def index(server: Server) -> dict[str, dict]:
    return {row["name"]: row for row in server.post("/v2/repository/index").json()}


def resident(server: Server) -> set[str]:
    return {name for replica in server.replicas() for name in replica["models"]}


def unload_all(server: Server, names: list[str]) -> None:
    for name in names:
        server.post(f"/v2/repository/models/{name}/unload")


@dataclass(frozen=True)
class Failure:
    """An answer a check rejected, with when its request was sent and answered (``time.monotonic()``)."""

    problem: str
    status: int
    sent_at: float
    answered_at: float


class Traffic:
    """Threads that keep sending V2 requests round-robin to ``checks``' models until the block ends.

    Every answer goes through its model's check; what the checks reject is kept in ``problems``.
    """

    def __init__(self, server: Server, checks: dict[str, Check], threads: int = 3) -> None:
        self._server, self._checks = server, checks
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.problems: list[Failure] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    @property
    def sent(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def _run(self, offset: int) -> None:
        names = list(self._checks)
        session = requests.Session()
        turn = offset
        while not self._stop.is_set():
            name = names[turn % len(names)]
            turn += 1
            sent_at = time.monotonic()
            try:
                response = session.post(f"{self._server.url}/v2/models/{name}/infer", json=v2_body(ROWS), timeout=60)
                problem, status = self._checks[name](name, response), response.status_code
            except requests.RequestException as exc:
                problem, status = f"{name}: {type(exc).__name__}: {exc}", -1
            with self._lock:
                self.statuses[status] += 1
                if problem:
                    self.problems.append(Failure(problem, status, sent_at, time.monotonic()))

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.sent >= len(self._threads), timeout_s=120, what="traffic flowing")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def keep_going(self, count: int) -> None:
        """Block until ``count`` more requests have been answered."""
        target = self.sent + count
        wait_for(lambda: self.sent >= target, timeout_s=180, what=f"{count} more requests")


def deploy(settings, route_prefix: str, base_url: str) -> Server:
    """Run a rayms app from ``settings`` next to the session app, and wait until it answers."""
    from ray import serve

    from rayms.app import build_app

    serve.run(build_app(settings), name=settings.app_name, route_prefix=route_prefix)
    server = Server(url=base_url + route_prefix, settings=settings, tmp=Path(settings.cache_dir).parent)
    wait_for(lambda: server.get("/v2/health/ready").status_code == 200, timeout_s=180, what="app ready")
    return server


def remove(app_name: str) -> None:
    from ray import serve

    from rayms.local import kill_agents

    serve.delete(app_name)
    kill_agents(app_name)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def file_server() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_app(rayms_server, moto, emulators, tmp_path_factory) -> Iterator[Server]:
    """One replica holding at most 4 models in a 350 MiB budget; its agents reach the moto S3 server and the
    GCS and Azure emulators (those installed here) through ``storage_env``, as a deployment's would."""
    from rayms.config import Settings

    tmp = tmp_path_factory.mktemp("lifecycle")
    settings = Settings(
        app_name="lifecycle", num_replicas=1, max_models_per_replica=4, replica_memory_bytes=350 * 2**20,
        cache_dir=str(tmp / "cache"), state_uri=str(tmp / "models.json"), download_backoff_s=0.05,
        storage_env=credentials() | {"AWS_ENDPOINT_URL_S3": moto.endpoint} | emulators.env(),
    )
    server = deploy(settings, "/lifecycle", rayms_server.url)
    yield server
    remove(settings.app_name)


# ------------------------------------------------------------------------------------------ 1. load, unload
def test_hundred_models_then_fifty_unloaded_under_traffic(rayms_server, tmp_path):
    models = {f"life-{i:03d}": make_offset_model(tmp_path / f"m{i}", offset=10.0 * i) for i in range(100)}
    names = list(models)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            loads = list(pool.map(lambda n: rayms_server.load(n, str(models[n][0]), "sklearn"), names))
        assert [r.status_code for r in loads] == [200] * 100, [r.text for r in loads if r.status_code != 200][:3]
        for name in names:
            answers_like(rayms_server, name, models[name][1])

        gone, kept = names[:50], names[50:]
        with Traffic(rayms_server, {n: expect(models[n][1]) for n in kept}) as traffic:
            with ThreadPoolExecutor(max_workers=4) as pool:
                unloads = list(pool.map(lambda n: rayms_server.post(f"/v2/repository/models/{n}/unload"), gone))
            traffic.keep_going(50)
        assert [r.status_code for r in unloads] == [200] * 50
        assert traffic.problems == [], traffic.problems[:5]
        assert traffic.statuses.keys() == {200}, traffic.statuses

        for name in gone:
            response = infer(rayms_server, name)
            assert response.status_code == 404 and name in response.json()["error"]
        assert not set(gone) & resident(rayms_server)
        assert not set(gone) & set(index(rayms_server))
        for name in kept:
            answers_like(rayms_server, name, models[name][1])
    finally:
        unload_all(rayms_server, names)


# ------------------------------------------------------------------------------------------ 2. LRU by count
def test_more_models_than_a_replica_holds_are_evicted_lru_and_reload(small_app, tmp_path):
    models = {f"lru-{i}": make_offset_model(tmp_path / f"m{i}", offset=float(i)) for i in range(7)}
    names = list(models)
    try:
        for name in names:
            assert small_app.load(name, str(models[name][0]), "sklearn").status_code == 200
        [replica] = small_app.replicas()
        assert list(replica["models"]) == names[3:], "the four most recently loaded stay"
        evictions = replica["evictions"]
        assert node_agents("lifecycle") == [], "local files are read in place: no agent process is started"

        for name in names:  # every request succeeds; each miss reloads one model and evicts the LRU one
            answers_like(small_app, name, models[name][1])
        [replica] = small_app.replicas()
        assert list(replica["models"]) == names[3:] and replica["evictions"] == evictions + 7

        answers_like(small_app, "lru-3", models["lru-3"][1])  # recently used now: lru-4 is the oldest
        answers_like(small_app, "lru-0", models["lru-0"][1])
        [replica] = small_app.replicas()
        assert set(replica["models"]) == {"lru-5", "lru-6", "lru-3", "lru-0"}

        rows = index(small_app)
        assert all(rows[n]["state"] == "READY" for n in names), "evicted models stay READY"
        wait_for(lambda: index(small_app)["lru-4"]["replicas"] == [], what="index shows lru-4 evicted")
    finally:
        unload_all(small_app, names)


# ------------------------------------------------------------------------------------------ 3. LRU by memory
def test_memory_budget_evicts_lru_and_refuses_models_larger_than_it(small_app, tmp_path):
    models = {f"mem-{i}": make_offset_model(tmp_path / f"m{i}", offset=float(i)) for i in range(4)}
    names = list(models)
    try:
        for name in names[:3]:
            assert small_app.load(name, str(models[name][0]), "sklearn", memory="100Mi").status_code == 200
        [replica] = small_app.replicas()
        assert set(replica["models"]) == set(names[:3]) and replica["used_bytes"] == 300 * 2**20
        evictions = replica["evictions"]

        assert small_app.load("mem-3", str(models["mem-3"][0]), "sklearn", memory="100Mi").status_code == 200
        [replica] = small_app.replicas()
        # Three resident models are under the count limit of 4: the memory budget evicted mem-0.
        assert set(replica["models"]) == {"mem-1", "mem-2", "mem-3"}
        assert replica["evictions"] == evictions + 1 and replica["used_bytes"] <= replica["budget_bytes"]
        assert index(small_app)["mem-0"]["state"] == "READY"
        assert index(small_app)["mem-0"]["declaredMemory"] == 100 * 2**20
        answers_like(small_app, "mem-0", models["mem-0"][1])
        assert set(small_app.replicas()[0]["models"]) == {"mem-2", "mem-3", "mem-0"}

        too_big = small_app.load("mem-huge", str(models["mem-0"][0]), "sklearn", memory="1Gi")
        assert too_big.status_code == 400
        assert "exceeds the model-memory budget" in too_big.json()["error"]
        assert "mem-huge" not in index(small_app)
    finally:
        unload_all(small_app, names)


# ------------------------------------------------------------------------------------------ 4. sources
def test_flaky_http_source_is_retried_until_ready(small_app, file_server, tmp_path):
    path, predict = make_offset_model(tmp_path / "flaky", offset=3.0)
    uri = file_server.add("flaky/model.joblib", path.read_bytes())
    file_server.fail("flaky/model.joblib", 503, times=2)
    try:
        response = small_app.load("src-flaky", uri, "sklearn")
        assert response.status_code == 200, response.text
        assert file_server.requests["/flaky/model.joblib"] == 3, "two 503s, then the download"
        assert index(small_app)["src-flaky"]["state"] == "READY"
        answers_like(small_app, "src-flaky", predict)
        assert len(node_agents("lifecycle")) == 1, "a download starts the node's agent"
    finally:
        unload_all(small_app, ["src-flaky"])


def test_missing_http_source_fails_at_once_with_its_uri(small_app, file_server):
    uri = file_server.url("missing/model.joblib")
    try:
        response = small_app.load("src-missing", uri, "sklearn")
        assert response.status_code == 400 and uri in response.json()["error"], response.text
        assert file_server.requests["/missing/model.joblib"] == 1, "a 404 is not retried"
        row = index(small_app)["src-missing"]
        assert row["state"] == "FAILED" and uri in row["reason"] and "404" in row["reason"]
        refused = infer(small_app, "src-missing")
        assert refused.status_code == 503 and uri in refused.json()["error"]
    finally:
        unload_all(small_app, ["src-missing"])


@pytest.mark.parametrize("store", ["moto", "gcs", "azure"], ids=["s3", "gs", "az"])
def test_object_store_source_reaches_the_agent_through_storage_env(small_app, store, request, tmp_path):
    server = request.getfixturevalue(store)  # the GCS and Azure emulators skip, saying why, if not installed
    path, predict = make_offset_model(tmp_path / store, offset=5.0)
    bucket = server.bucket("lifecycle-models", {"team/model/model.joblib": path.read_bytes()})
    name = f"src-{bucket.partition(':')[0]}"
    try:
        response = small_app.load(name, f"{bucket}/team/model", "sklearn")
        assert response.status_code == 200, response.text
        assert index(small_app)[name]["storageUri"] == f"{bucket}/team/model"
        answers_like(small_app, name, predict)
    finally:
        unload_all(small_app, [name])


# ------------------------------------------------------------------------------------------ 5. new spec
def test_spec_change_under_traffic_fails_nothing_and_serves_version_2(rayms_server, file_server, tmp_path):
    old_path, old = make_offset_model(tmp_path / "v1", offset=0.0)
    new_path, new = make_offset_model(tmp_path / "v2", offset=1000.0)
    new_uri = file_server.add("spec-v2/model.joblib", new_path.read_bytes())
    versions: Counter[str] = Counter()

    def consistent(name: str, response: requests.Response) -> str | None:
        """Each answer comes from one of the two models, and says which."""
        if response.status_code != 200:
            return f"{response.status_code} {response.text[:200]}"
        version, got = response.json()["model_version"], prediction(response)
        versions[version] += 1
        if np.allclose(got, old(ROWS)) and version == "1" or np.allclose(got, new(ROWS)) and version == "2":
            return None
        return f"version {version} answered {got.tolist()}"

    try:
        assert rayms_server.load("life-spec", str(old_path), "sklearn").json()["version"] == "1"
        with Traffic(rayms_server, {"life-spec": consistent}) as traffic, ThreadPoolExecutor(1) as pool:
            file_server.hold()  # version 2's download waits while traffic goes on
            change = pool.submit(rayms_server.load, "life-spec", new_uri, "sklearn")
            wait_for(lambda: file_server.in_flight == 1, what="version 2 downloading")
            traffic.keep_going(20)
            file_server.release()
            changed = change.result()
            assert changed.status_code == 200 and changed.json()["version"] == "2", changed.text
            # A replica still holding version 1 swaps it for version 2 on its next request.
            wait_for(lambda: all(r["models"].get("life-spec", {"version": 2})["version"] == 2
                                 for r in rayms_server.replicas()), timeout_s=120, what="no replica on version 1")
            traffic.keep_going(20)
        assert traffic.problems == [], traffic.problems[:5]
        assert versions["1"] >= 20 and versions["2"] > 0, versions
        for _ in range(10):
            response = infer(rayms_server, "life-spec")
            assert response.json()["model_version"] == "2" and np.allclose(prediction(response), new(ROWS))
    finally:
        file_server.release()
        unload_all(rayms_server, ["life-spec"])
