"""The model host without Ray: loading, serving, evicting, swapping versions, failures.

A registry feed stands in for the registry's long poll, a fake agent for the node's artifact agent and a
recorder for the registry reporter; the models are tiny real scikit-learn models trained into ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from rayms.codecs import InferRequest, Tensor
from rayms.config import ModelSpec, Settings
from rayms.errors import ModelLoadError, ModelNotFound, ModelNotReady
from rayms.host import ModelHost
from rayms.status import Changes, ModelState, ModelStatus, Source
from rayms.view import RegistryView
from tests import model_factory as mf


class Feed:
    """The registry's change feed: statuses put here reach the host's view through its long poll."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[ModelStatus, int]] = {}
        self.deleted: dict[str, int] = {}
        self.change = 0
        self.changed = asyncio.Condition()

    async def put(self, status: ModelStatus) -> None:
        async with self.changed:
            self.change += 1
            self.models[status.name] = (status, self.change)
            self.changed.notify_all()

    async def delete(self, name: str) -> None:
        async with self.changed:
            self.change += 1
            del self.models[name]
            self.deleted[name] = self.change
            self.changed.notify_all()

    async def watch(self, epoch, since, timeout_s=30.0) -> Changes:
        if epoch != "e":
            return Changes("e", self.change, True, [s for s, _ in self.models.values()], [])
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.change > since), timeout_s)
            except asyncio.TimeoutError:
                pass
        return Changes("e", self.change, False, [s for s, c in self.models.values() if c > since],
                       [n for n, c in self.deleted.items() if c > since])


class Agent:
    """Stands in for the node's agent: ``remote://<file>`` artifacts are 'downloaded' from a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched: list[str] = []
        self.evicted: list[str] = []
        self.released: list[str] = []

    async def fetch(self, name, spec):
        self.fetched.append(name)
        return str(self.root / spec.storage_uri.removeprefix("remote://"))

    async def evict(self, name, spec):
        self.evicted.append(name)

    def release(self, name, spec):
        self.released.append(name)


class Reporter:
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.loaded: list[str] = []
        self.evicted: list[str] = []

    def loading(self, name, version):
        self.started.append((name, version))

    def residency(self, replica, loaded, evicted):
        self.loaded += loaded
        self.evicted += evicted


def status(name, uri, version=1, state=ModelState.READY) -> ModelStatus:
    return ModelStatus(name=name, version=version, state=state, source=Source.API,
                       spec=ModelSpec(storage_uri=uri, framework="sklearn"))


def request(rows) -> InferRequest:
    return InferRequest(inputs=[Tensor.from_numpy("input-0", np.asarray(rows, dtype=np.float64))])


@pytest.fixture
def models(tmp_path):
    """Two classifiers and a linear regression, each in its own folder; plus what each predicts."""
    made = {kind: mf.make_sklearn(tmp_path / kind, kind=kind) for kind in ("logreg", "rf", "linreg")}
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.joblib").write_bytes(b"not a pickle")
    return tmp_path, made


async def make_host(tmp_path, feed, **settings):
    reporter = Reporter()
    agent = Agent(tmp_path)
    host = ModelHost(Settings(cache_dir=str(tmp_path / "cache"), **settings), view=RegistryView(feed.watch),
                     artifacts=agent, reporter=reporter, replica_id="r1", announce=lambda names: None)
    await asyncio.wait_for(host.start(), 5)
    return host, agent, reporter


X = mf.make_data(n=5, seed=3)[0]


async def test_serves_a_ready_model_loading_it_on_first_request(models):
    root, made = models
    feed = Feed()
    await feed.put(status("a", str(root / "logreg")))
    host, agent, reporter = await make_host(root, feed)
    result = await host.infer("a", request(X))
    np.testing.assert_array_equal(result.outputs[0].data, made["logreg"][1](X))
    assert result.model_version == "1"
    assert agent.fetched == [], "a local folder is read in place, without the agent"
    assert reporter.loaded == ["a"] and host.report().models["a"].version == 1
    await host.stop()


async def test_remote_artifacts_come_through_the_agent_and_loading_is_reported(models):
    root, made = models
    feed = Feed()
    host, agent, reporter = await make_host(root, feed)
    spec = ModelSpec(storage_uri="remote://rf/model.joblib", framework="sklearn")
    report = await host.load_model("b", spec, 3)
    assert agent.fetched == ["b"] and reporter.started == [("b", 3)]
    assert agent.released == ["b"], "a load releases the artifact it fetched, so the cache may remove it"
    with pytest.raises(ModelLoadError):
        await host.load_model("c", ModelSpec(storage_uri="remote://corrupt/model.joblib", framework="sklearn"), 1)
    assert agent.released == ["b", "c"], "a failed load releases it too"
    assert report.replica == "r1" and report.measured_bytes > 0
    assert [t["name"] for t in report.metadata["outputs"]]
    await host.stop()


async def test_the_least_recently_used_model_is_evicted_and_reloads_on_demand(models):
    root, made = models
    feed = Feed()
    for name, kind in (("a", "logreg"), ("b", "rf")):
        await feed.put(status(name, str(root / kind)))
    host, _, reporter = await make_host(root, feed, max_models_per_replica=1)
    await host.infer("a", request(X))
    await host.infer("b", request(X))
    assert set(host.report().models) == {"b"} and reporter.evicted == ["a"]
    again = await host.infer("a", request(X))  # evicted, still READY: loads again
    np.testing.assert_array_equal(again.outputs[0].data, made["logreg"][1](X))
    assert host.report().evictions == 2
    await host.stop()


async def test_a_new_version_replaces_the_old_one_which_serves_meanwhile(models):
    root, made = models
    feed = Feed()
    await feed.put(status("m", str(root / "logreg")))
    host, _, _ = await make_host(root, feed)
    await host.infer("m", request(X))
    await feed.put(status("m", str(root / "linreg"), version=2))
    # The host loads version 2 when the registry says so, not at the next request.
    for _ in range(200):
        if host.report().models.get("m") and host.report().models["m"].version == 2:
            break
        await asyncio.sleep(0.01)
    result = await host.infer("m", request(X))
    assert result.model_version == "2"
    np.testing.assert_allclose(result.outputs[0].data, made["linreg"][1](X))
    await host.stop()


async def test_failures_leave_everything_else_serving(models):
    root, made = models
    feed = Feed()
    await feed.put(status("good", str(root / "logreg")))
    await feed.put(status("bad", str(root / "corrupt")))
    await feed.put(status("going", str(root / "rf"), state=ModelState.UNLOADING))
    host, _, _ = await make_host(root, feed, max_models_per_replica=1)
    await host.infer("good", request(X))
    with pytest.raises(ModelLoadError):
        await host.infer("bad", request(X))
    assert set(host.report().models) == {"good"}, "a failed load evicts nothing"
    with pytest.raises(ModelNotFound):
        await host.infer("nope", request(X))
    with pytest.raises(ModelNotReady):
        await host.infer("going", request(X))
    assert (await host.infer("good", request(X))).outputs[0].data.shape == (5,)
    await host.stop()


async def test_a_model_the_registry_removed_is_dropped_and_its_artifact_evicted(models):
    root, _ = models
    feed = Feed()
    await feed.put(status("a", str(root / "logreg")))
    host, agent, _ = await make_host(root, feed)
    await host.infer("a", request(X))
    await feed.delete("a")
    for _ in range(200):
        if "a" not in host.report().models:
            break
        await asyncio.sleep(0.01)
    assert "a" not in host.report().models
    assert await host.unload_model("a", ModelSpec(storage_uri="remote://x", framework="sklearn")) is False
    assert agent.evicted == ["a"]
    await host.stop()


class Hanging:
    """A runtime whose predict blocks until released (a model stuck in native code)."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def predict(self, inputs, parameters, requested=None, input_names=None):
        self.release.wait(30)
        return {"predict": np.zeros(len(inputs[0]))}

    def input_metadata(self):
        return []

    def output_metadata(self):
        return []

    def size_bytes(self):
        return 1


async def test_a_hanging_model_times_out_is_quarantined_and_others_keep_serving(models, monkeypatch):
    from rayms import frameworks
    from rayms.errors import PredictTimedOut

    root, made = models
    hanging = Hanging()
    real = frameworks.load_runtime
    monkeypatch.setattr(frameworks, "load_runtime", lambda fw, path, params=None, **kw: hanging
                        if "rf" in str(path) else real(fw, path, params, **kw))
    feed = Feed()
    await feed.put(status("stuck", str(root / "rf")))
    await feed.put(status("fine", str(root / "logreg")))
    host, _, reporter = await make_host(root, feed, predict_timeout_s=0.3, predict_threads=4, quarantine_after=2)
    failures = []
    host._reporter.failed = lambda name, version, reason: failures.append((name, version, reason))
    try:
        stuck = asyncio.create_task(host.infer("stuck", request(X)))
        # while one predict hangs, the event loop and the other models are free
        np.testing.assert_array_equal((await host.infer("fine", request(X))).outputs[0].data, made["logreg"][1](X))
        with pytest.raises(PredictTimedOut, match="within 0.3s"):
            await stuck
        with pytest.raises(PredictTimedOut):
            await host.infer("stuck", request(X))
        assert failures == [("stuck", 1, failures[0][2])] and "quarantined" in failures[0][2]
        with pytest.raises(ModelNotReady, match="quarantined"):
            await host.infer("stuck", request(X))
        assert "stuck" not in host.report().models
        np.testing.assert_array_equal((await host.infer("fine", request(X))).outputs[0].data, made["logreg"][1](X))
    finally:
        hanging.release.set()
        await host.stop()


async def test_a_model_is_charged_what_it_occupies_once_loaded_not_its_compressed_file(tmp_path):
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    x, labels, _ = mf.make_data(n=2000, seed=5)
    forest = RandomForestClassifier(n_estimators=300, random_state=0).fit(x, labels)
    (tmp_path / "forest").mkdir()
    joblib.dump(forest, tmp_path / "forest" / "model.joblib", compress=9)
    size = (tmp_path / "forest" / "model.joblib").stat().st_size
    feed = Feed()
    host, _, _ = await make_host(tmp_path, feed)
    report = await host.load_model("forest", ModelSpec(storage_uri=str(tmp_path / "forest"), framework="sklearn"), 1)
    assert report.measured_bytes > 2 * size, (report.measured_bytes, size)
    assert host.report().models["forest"].charged_bytes == report.measured_bytes
    await host.stop()


def test_the_default_budget_is_a_share_of_what_the_machine_really_has(tmp_path):
    from rayms.memory import machine_memory_bytes, replica_budget_bytes

    meminfo, limit = tmp_path / "meminfo", tmp_path / "memory.max"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    limit.write_text("4294967296\n")
    assert machine_memory_bytes(meminfo=meminfo, cgroups=(limit,)) == 4 * 2**30  # the container's limit wins
    limit.write_text("max\n")
    assert machine_memory_bytes(meminfo=meminfo, cgroups=(limit,)) == 16384000 * 1024
    assert replica_budget_bytes(fraction=0.5, replicas_on_node=2, machine_bytes=8 * 2**30) == 2 * 2**30
    assert Settings(replica_memory_bytes=123 * 2**20).model_budget_bytes() == 123 * 2**20
    assert Settings(num_replicas=2).model_budget_bytes() == replica_budget_bytes(fraction=0.5, replicas_on_node=2)
