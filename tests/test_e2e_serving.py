"""End to end over real HTTP: real Ray, real Serve, real models loaded through the repository API."""

from __future__ import annotations

import numpy as np
import pytest

from tests.model_factory import make_data, make_lightgbm, make_sklearn, make_xgboost
from tests.support import v2_body



@pytest.fixture(scope="module")
def models(rayms_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made = {
        "e2e-sk": ("sklearn", *make_sklearn(root / "e2e-sk")),
        "e2e-xgb": ("xgboost", *make_xgboost(root / "e2e-xgb")),
        "e2e-lgb": ("lightgbm", *make_lightgbm(root / "e2e-lgb")),
    }
    for name, (framework, path, _) in made.items():
        response = rayms_server.load(name, str(path), framework)
        assert response.status_code == 200, response.text
    return made


def test_v1_and_v2_give_the_in_process_predictions(rayms_server, models):
    rows = make_data(n=5, seed=3)[0]
    for name, (_, _, expected) in models.items():
        want = np.asarray(expected(rows))
        v1 = rayms_server.post(f"/v1/models/{name}:predict", json={"instances": rows.tolist()})
        assert v1.status_code == 200, v1.text
        assert np.allclose(np.asarray(v1.json()["predictions"]), want)
        v2 = rayms_server.post(f"/v2/models/{name}/infer", json=v2_body(rows) | {"id": "req-1"})
        assert v2.status_code == 200, v2.text
        body = v2.json()
        assert body["id"] == "req-1" and body["model_name"] == name
        assert np.allclose(np.asarray(body["outputs"][0]["data"]).reshape(want.shape), want)


def test_model_listing_readiness_and_metadata(rayms_server, models):
    assert set(models) <= set(rayms_server.get("/v1/models").json()["models"])
    assert rayms_server.get("/v1/models/e2e-sk").json() == {"name": "e2e-sk", "ready": True}
    assert rayms_server.get("/v2/models/e2e-sk/ready").status_code == 200
    meta = rayms_server.get("/v2/models/e2e-sk").json()
    assert meta["name"] == "e2e-sk" and meta["versions"] == ["1"] and meta["inputs"]
    assert rayms_server.get("/v2/models/e2e-sk/versions/1").status_code == 200
    assert rayms_server.get("/v2/health/live").json() == {"live": True}
    server_meta = rayms_server.get("/v2").json()
    assert server_meta["name"] == "rayms" and "model_repository" in server_meta["extensions"]
    index = {row["name"]: row for row in rayms_server.post("/v2/repository/index").json()}
    assert index["e2e-sk"]["state"] == "READY" and index["e2e-sk"]["measuredMemory"] > 0


def test_unload_gives_404_and_leaves_every_replica(rayms_server, tmp_path):
    path, _ = make_sklearn(tmp_path / "gone")
    assert rayms_server.load("e2e-gone", str(path), "sklearn").status_code == 200
    assert rayms_server.post("/v2/models/e2e-gone/infer", json=v2_body(make_data(n=2)[0])).status_code == 200
    response = rayms_server.post("/v2/repository/models/e2e-gone/unload")
    assert response.status_code == 200, response.text
    missing = rayms_server.post("/v2/models/e2e-gone/infer", json=v2_body(make_data(n=2)[0]))
    assert missing.status_code == 404 and "e2e-gone" in missing.json()["error"]
    assert all("e2e-gone" not in r["models"] for r in rayms_server.replicas())
    assert rayms_server.post("/v2/repository/models/e2e-gone/unload").status_code == 404


def test_a_model_that_asks_for_batching_answers_concurrent_clients_from_shared_calls(rayms_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path, predict = make_sklearn(tmp_path / "batched")
    body = {"storageUri": str(path), "framework": "sklearn",
            "parameters": {"max_batch_size": 8, "max_batch_latency_ms": 300}}
    assert rayms_server.post("/v2/repository/models/e2e-batched/load", json=body).status_code == 200
    try:
        requests_rows = [make_data(n=1 + i % 3, seed=i)[0] for i in range(16)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(
                lambda rows: rayms_server.post("/v2/models/e2e-batched/infer", json=v2_body(rows)), requests_rows))
        for rows, answer in zip(requests_rows, answers):
            assert answer.status_code == 200, answer.text
            assert np.allclose(np.asarray(answer.json()["outputs"][0]["data"]), predict(rows))
        stats = [r["models"]["e2e-batched"] for r in rayms_server.replicas() if "e2e-batched" in r["models"]]
        assert sum(s["batched_requests"] for s in stats) >= 2, stats

        bad = {"storageUri": str(path), "framework": "sklearn", "parameters": {"max_batch_size": 0}}
        refused = rayms_server.post("/v2/repository/models/e2e-badbatch/load", json=bad)
        assert refused.status_code == 400 and "max_batch_size" in refused.json()["error"]  # a FAILED load, with why
    finally:
        for name in ("e2e-batched", "e2e-badbatch"):
            rayms_server.post(f"/v2/repository/models/{name}/unload")
