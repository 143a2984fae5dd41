"""rayms's Prometheus metrics reach Ray's metrics endpoint, tagged by model."""

from __future__ import annotations

import ray
import requests

from tests.conftest import wait_for
from tests.model_factory import make_data, make_sklearn


def scrape() -> str:
    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            texts.append(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    return "\n".join(texts)


def test_requests_loads_and_downloads_are_exported_per_model(rayms_server, tmp_path):
    path, _ = make_sklearn(tmp_path / "metered")
    assert rayms_server.load("metrics-m", str(path), "sklearn").status_code == 200
    rows = make_data(n=2)[0].tolist()
    for _ in range(3):
        assert rayms_server.post("/v1/models/metrics-m:predict", json={"instances": rows}).status_code == 200

    def total(text: str, metric: str) -> float:
        # one series per process that served the model: add them up
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(metric) and 'model="metrics-m"' in line)

    def exported() -> bool:
        text = scrape()
        return (total(text, "ray_rayms_model_requests_total") >= 3
                and total(text, "ray_rayms_model_loads_total") >= 1
                and total(text, "ray_rayms_model_latency_seconds_count") >= 3)

    wait_for(exported, timeout_s=90, interval_s=1.0, what="rayms metrics on Ray's endpoint")
