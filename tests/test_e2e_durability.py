"""Durability end to end: the registry dies, a model replica dies, the whole application restarts.

The tests run a rayms app of their own (``durable``, two replicas, at route prefix ``/durable`` on the
session's Serve instance, see ``test_e2e_lifecycle``) because they kill its actors and delete it. Models
come from the real local HTTP file server, whose request counts show what was downloaded. The tests run
in file order on one module-scoped app: registry death, replica death, then a full restart.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import ray
from ray import serve

from tests.conftest import Server, wait_for
from tests.servers import FileServer
from tests.test_e2e_lifecycle import (
    ROWS, Predict, Traffic, answers_like, deploy, expect, index, infer, make_offset_model, prediction, remove,
)

APP = "durable"


@dataclass
class Durable:
    server: Server
    settings: object
    models: dict[str, Predict]  # what should answer, and how
    dropped: list[str]  # unloaded before anything died: must never come back


def replica_actors(deployment: str) -> set[str]:
    """Names of the live Serve replica actors of ``deployment`` in the durable app."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["name"].startswith(prefix)}


def kill(actor_name: str) -> None:
    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def healthy(deployment: str, replicas: int, killed: str) -> bool:
    status = serve.status().applications[APP].deployments[deployment]
    names = replica_actors(deployment)
    return status.status == "HEALTHY" and len(names) == replicas and killed not in names


def all_ready_since(server: Server, models: dict[str, Predict], since: float) -> bool:
    """Every model READY in a registry state written after ``since`` (so not a view from before a death)."""
    rows = index(server)
    return all(n in rows and rows[n]["state"] == "READY" and rows[n]["updatedAt"] > since for n in models)


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture(scope="module")
def durable(rayms_server, files, tmp_path_factory) -> Iterator[Durable]:
    from rayms.config import Settings

    tmp = tmp_path_factory.mktemp("durable")
    settings = Settings(app_name=APP, num_replicas=2, max_models_per_replica=20, cache_dir=str(tmp / "cache"),
                        state_uri=str(tmp / "state" / "models.json"), download_backoff_s=0.05)
    server = deploy(settings, f"/{APP}", rayms_server.url)

    def publish(name: str, offset: float) -> tuple[str, Predict]:
        path, predict = make_offset_model(tmp / "made" / f"{name}-{offset}", offset=offset)
        return files.add(f"{name}/{offset}/model.joblib", path.read_bytes()), predict

    models: dict[str, Predict] = {}
    try:
        for i in range(6):
            uri, models[f"dur-{i}"] = publish(f"dur-{i}", offset=100.0 * i)
            assert server.load(f"dur-{i}", uri, "sklearn").status_code == 200
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
        yield Durable(server=server, settings=settings, models=models, dropped=dropped)
    finally:
        remove(APP)


def test_registry_death_under_traffic(durable):
    server, models = durable.server, durable.models
    [registry] = replica_actors("Registry")
    with Traffic(server, {n: expect(p, also=(503,)) for n, p in models.items()}) as traffic:
        killed_at = time.time()
        kill(registry)
        wait_for(lambda: healthy("Registry", 1, killed=registry), timeout_s=180, what="a new registry")
        # The new registry restores the desired set from its state file and re-drives every model.
        wait_for(lambda: all_ready_since(server, models, killed_at), timeout_s=180, what="models READY again")
        traffic.keep_going(30)
    assert traffic.problems == [], traffic.problems[:5]
    assert set(traffic.statuses) <= {200, 503} and traffic.statuses[200] > 0, traffic.statuses
    for name, predict in models.items():
        answers_like(server, name, predict)
    rows = index(server)
    assert rows["dur-updated"]["version"] == "2", "a restored model keeps its version"
    assert not set(durable.dropped) & set(rows)


def test_model_replica_death_under_traffic(durable):
    server, models = durable.server, durable.models
    victim = sorted(replica_actors("ModelReplica"))[0]
    with Traffic(server, {n: expect(p, also=(503,)) for n, p in models.items()}) as traffic:
        kill(victim)
        wait_for(lambda: healthy("ModelReplica", 2, killed=victim), timeout_s=180, what="replica replaced")
        traffic.keep_going(30)
    assert traffic.problems == [], traffic.problems[:5]
    assert set(traffic.statuses) <= {200, 503} and traffic.statuses[200] > 0, traffic.statuses
    for name, predict in models.items():  # the new replica loads on demand what the dead one held
        answers_like(server, name, predict)
    assert all(victim.rsplit("#", 1)[1] not in r["replica"] for r in server.replicas())


def test_app_restart_restores_models_without_downloading_again(durable, files):
    server, models = durable.server, durable.models
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
