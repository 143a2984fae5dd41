"""Shared fixtures: one real Ray instance and one real rayms application per test session.

Starting Ray and Serve costs tens of seconds on a 2-core machine, so the end-to-end tests share one
application and use distinct model names. Everything binds to 127.0.0.1 on free ports, and everything
started here is stopped here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from rayms.ports import free_port  # noqa: F401  (tests import it from here)
from rayms.ray_env import LOCAL_RAY_ENV

# The tests run Ray as `rayms serve` does (set before anything imports Ray: Serve reads them at import).
for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "0.2")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach Ray's endpoint within a second
# Cloud SDKs looking for credentials ask a metadata server off this machine; these keep google-auth and
# botocore from it in every process the tests start (a closed loopback port where an address is needed).
for _key, _value in {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)


# ------------------------------------------------------------------------------------------ unit vs e2e
# A test that needs Ray asks for the `ray_instance` fixture (directly or through `rayms_server`) or carries the
# `e2e` marker; every other test is a unit test and must not start Ray. `pytest -m "not e2e"` runs the units.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_instance" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _unit_tests_do_not_start_ray(request, monkeypatch):
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    import ray

    was_running = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started Ray: ask for the ray_instance fixture or mark it e2e")

    from ray import serve

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(serve, "start", refuse)
    monkeypatch.setattr(serve, "run", refuse)
    yield
    assert was_running or not ray.is_initialized(), "a unit test left Ray running"


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, interval_s: float = 0.05, what: str = "") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # keep polling through transient errors
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}; last error: {last_error}")


@dataclass
class Server:
    url: str
    settings: object
    tmp: Path

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kwargs)

    def load(self, name: str, storage_uri: str, framework: str, memory: str | None = None) -> requests.Response:
        body = {"storageUri": storage_uri, "framework": framework}
        if memory:
            body["memory"] = memory
        return self.post(f"/v2/repository/models/{name}/load", json=body)

    def replicas(self) -> list[dict]:
        response = self.get("/v2/repository/replicas")
        response.raise_for_status()
        return response.json()

    def status(self, name: str) -> dict | None:
        rows = self.post("/v2/repository/index").json()
        return next((r for r in rows if r["name"] == name), None)


@pytest.fixture(scope="session")
def emulators() -> Iterator[object]:
    """The GCS and Azure Blob emulators (``tests.servers.Emulators``), each started once, on first use."""
    from tests.servers import Emulators

    started = Emulators()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def gcs(emulators):
    """The GCS emulator; tests that need it skip, saying why, where it is not installed."""
    return emulators.get("gcs") or pytest.skip(emulators.missing["gcs"])


@pytest.fixture(scope="session")
def azure(emulators):
    """Azurite's Blob service; tests that need it skip, saying why, where it is not installed."""
    return emulators.get("azure") or pytest.skip(emulators.missing["azure"])


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    import ray

    # address="local": a fresh instance of our own, never another Ray running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
             namespace="rayms-tests")
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def rayms_server(ray_instance, tmp_path_factory) -> Iterator[Server]:
    """A rayms app with two model replicas, small per-replica limits, on a free port."""
    from ray import serve

    from rayms.app import build_app
    from rayms.config import Settings
    from rayms.local import kill_agents

    tmp = tmp_path_factory.mktemp("rayms")
    port = free_port()
    settings = Settings(
        app_name="rayms", port=port, num_replicas=2, max_models_per_replica=40,
        replica_memory_bytes=2**30, cache_dir=str(tmp / "cache"), state_uri=str(tmp / "state" / "models.json"),
        download_backoff_s=0.05,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=settings.app_name, route_prefix="/")
    server = Server(url=f"http://127.0.0.1:{port}", settings=settings, tmp=tmp)
    wait_for(lambda: server.get("/v2/health/ready").status_code == 200, what="server ready")
    yield server
    serve.delete(settings.app_name)
    kill_agents(settings.app_name)
