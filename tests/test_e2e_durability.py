"""Durability end to end: the registry dies, a model replica dies, the whole application restarts.

The tests run rayms apps of their own, at their own route prefixes on the session's Serve instance (see
``test_e2e_lifecycle``), because they kill actors and delete apps: ``durable`` with the default ingress
(model replicas answer HTTP themselves) and ``durable-router`` with the router in front. Each app's models
come from its own real local HTTP file server, whose request counts show what was downloaded. The tests
run in file order on module-scoped apps: registry death, replica deaths, then a full restart.
"""

from __future__ import annotations

from datetime import datetime

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import serve

from tests.conftest import Server, wait_for
from tests.servers import FileServer
from tests.test_e2e_lifecycle import (
    ROWS, Failure, Predict, Traffic, answers_like, deploy, expect, index, infer, make_offset_model, prediction,
    remove,
)

APP = "durable"


@dataclass
class Durable:
    server: Server
    settings: object
    files: FileServer  # where its models come from; its request counts are the downloads
    models: dict[str, Predict]  # what should answer, and how
    dropped: list[str]  # unloaded before anything died: must never come back


def replica_actors(app: str, deployment: str) -> set[str]:
    """Names of the live Serve replica actors of ``deployment`` in ``app``."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["name"].startswith(prefix)}


def kill(actor_name: str) -> None:
    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def healthy(app: str, deployment: str, replicas: int, killed: str) -> bool:
    status = serve.status().applications[app].deployments[deployment]
    names = replica_actors(app, deployment)
    return status.status == "HEALTHY" and len(names) == replicas and killed not in names


def all_ready_since(server: Server, models: dict[str, Predict], since: float) -> bool:
    """Every model READY in a registry state written after ``since`` (so not a view from before a death)."""
    rows = index(server)
    return all(n in rows and rows[n]["state"] == "READY"
               and datetime.fromisoformat(rows[n]["updatedAt"]).timestamp() > since for n in models)


@contextmanager
def durable_app(app: str, ingress: str, base_url: str, tmp: Path) -> Iterator[Durable]:
    """An app of two replicas serving six models from a file server, one at version 2, two unloaded."""
    from rayms.config import Settings

    settings = Settings(app_name=app, ingress=ingress, num_replicas=2, max_models_per_replica=20,
                        cache_dir=str(tmp / "cache"), state_uri=str(tmp / "state" / "models.json"),
                        download_backoff_s=0.05)
    with FileServer() as files:
        server = deploy(settings, f"/{app}", base_url)

        def publish(name: str, offset: float) -> tuple[str, Predict]:
            path, predict = make_offset_model(tmp / "made" / f"{name}-{offset}", offset=offset)
            return files.add(f"{name}/{offset}/model.joblib", path.read_bytes()), predict

        models: dict[str, Predict] = {}
        try:
            for i in range(5):
                uri, models[f"dur-{i}"] = publish(f"dur-{i}", offset=100.0 * i)
                loaded = server.load(f"dur-{i}", uri, "sklearn")
                assert loaded.status_code == 200, loaded.text
            for offset in (7.0, 700.0):  # a second spec: version 2
                uri, models["dur-updated"] = publish("dur-updated", offset=offset)
                assert server.load("dur-updated", uri, "sklearn").status_code == 200
            assert index(server)["dur-updated"]["version"] == "2"
            dropped = ["dur-dropped-0", "dur-dropped-1"]
            for name in dropped:
                uri, _ = publish(name, offset=-1.0)
                assert server.load(name, uri, "sklearn").status_code == 200
                assert server.post(f"/v2/repository/models/{name}/unload").status_code == 200
            assert all(count == 1 for count in files.requests.values()), files.requests
            yield Durable(server=server, settings=settings, files=files, models=models, dropped=dropped)
        finally:
            remove(app)


@pytest.fixture(scope="module")
def durable(rayms_server, tmp_path_factory) -> Iterator[Durable]:
    """The default ingress: model replicas answer HTTP themselves."""
    with durable_app(APP, "replica", rayms_server.url, tmp_path_factory.mktemp(APP)) as app:
        yield app


@pytest.fixture(scope="module")
def durable_router(rayms_server, tmp_path_factory) -> Iterator[Durable]:
    """The two-hop ingress: a router in front of the model replicas."""
    with durable_app(f"{APP}-router", "router", rayms_server.url, tmp_path_factory.mktemp("router")) as app:
        yield app


def kill_a_model_replica_under_traffic(durable: Durable) -> tuple[Traffic, float, float]:
    """Kill one model replica while traffic flows; return the traffic and when the replica was killed and
    seen dead (``time.monotonic()``), once Serve has replaced it and 30 more requests were answered."""
    app, server, models = durable.settings.app_name, durable.server, durable.models
    victim = sorted(replica_actors(app, "ModelReplica"))[0]
    with Traffic(server, {n: expect(p, also=(503,)) for n, p in models.items()}) as traffic:
        killed_at = time.monotonic()
        kill(victim)
        wait_for(lambda: victim not in replica_actors(app, "ModelReplica"), interval_s=0.01, what="victim gone")
        dead_at = time.monotonic()
        wait_for(lambda: healthy(app, "ModelReplica", 2, killed=victim), timeout_s=180, what="replica replaced")
        traffic.keep_going(30)
    assert traffic.statuses[200] > 0, traffic.statuses
    for name, predict in models.items():  # the new replica loads on demand what the dead one held
        answers_like(server, name, predict)
    assert all(victim.rsplit("#", 1)[1] not in r["replica"] for r in server.replicas())
    return traffic, killed_at, dead_at


def test_registry_death_under_traffic(durable):
    server, models = durable.server, durable.models
    [registry] = replica_actors(APP, "Registry")
    with Traffic(server, {n: expect(p, also=(503,)) for n, p in models.items()}) as traffic:
        killed_at = time.time()
        kill(registry)
        wait_for(lambda: healthy(APP, "Registry", 1, killed=registry), timeout_s=180, what="a new registry")
        # The new registry restores the desired set from its state file: the models that were READY are
        # READY at once, without a reload, while the replicas never stopped serving them.
        wait_for(lambda: all_ready_since(server, models, killed_at), timeout_s=180, what="models READY again")
        traffic.keep_going(30)
    assert traffic.problems == [], traffic.problems[:5]
    assert set(traffic.statuses) == {200}, traffic.statuses
    for name, predict in models.items():
        answers_like(server, name, predict)
    rows = index(server)
    assert rows["dur-updated"]["version"] == "2", "a restored model keeps its version"
    assert not set(durable.dropped) & set(rows)


def test_model_replica_death_behind_the_router_gives_only_200_or_503(durable_router):
    traffic, _, _ = kill_a_model_replica_under_traffic(durable_router)
    assert traffic.problems == [], traffic.problems[:5]  # the router answers 503 for the dead replica
    assert set(traffic.statuses) <= {200, 503}, traffic.statuses


def test_model_replica_death_with_replicas_as_ingress(durable):
    """Here the killed process is also where HTTP requests are answered. A request it was answering when
    it died gets what Serve's proxy makes of that: a plain ``500 Internal Server Error`` or a closed
    connection (nothing in rayms runs any more to say 503). Every other request gets 200 or 503."""
    traffic, killed_at, dead_at = kill_a_model_replica_under_traffic(durable)

    def cut_off_by_the_kill(failure: Failure) -> bool:
        proxy_error = failure.status == 500 and "Internal Server Error" in failure.problem
        dropped = failure.status == -1 and "ConnectionError" in failure.problem
        return (proxy_error or dropped) and failure.sent_at <= dead_at and failure.answered_at >= killed_at

    in_flight = [f for f in traffic.problems if cut_off_by_the_kill(f)]
    assert [f for f in traffic.problems if f not in in_flight] == [], traffic.problems[:5]
    assert len(in_flight) <= 3, "at most one request in flight per traffic thread"


def test_app_restart_restores_models_without_downloading_again(durable):
    server, models, files = durable.server, durable.models, durable.files
    downloads = Counter(files.requests)
    remove(APP)  # the app and its node agents: only the state file and the cache folder remain
    restarted_at = time.time()
    server = deploy(durable.settings, f"/{APP}", server.url.removesuffix(f"/{APP}"))
    wait_for(lambda: all_ready_since(server, models, restarted_at), timeout_s=180, what="models restored")
    assert set(index(server)) == set(models), "unloaded models do not come back"
    for name, predict in models.items():
        answers_like(server, name, predict)
    assert files.requests == downloads, "restored models load from the node cache, not from the source"
    for name in durable.dropped:
        assert infer(server, name).status_code == 404
    updated = infer(server, "dur-updated")
    assert updated.json()["model_version"] == "2" and np.allclose(prediction(updated), models["dur-updated"](ROWS))
