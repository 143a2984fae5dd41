"""The registry's lifecycle, persistence and change feed, without Ray (a fake placer stands in)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rayms.config import ModelSpec, Settings
from rayms.errors import (
    InvalidSpec, LoadTimedOut, MemoryUnavailable, ModelLoadError, ModelLoadFailed, ModelNotFound, Overloaded, StorageError,
    UnsupportedFramework,
)
from rayms.registry import ModelRegistry
from rayms.status import LoadReport, ModelState, ReplicaReport, ResidentModel, Source
from rayms.statestore import StateStore


class FakePlacer:
    """Loads succeed unless the URI contains 'broken'; a gate lets a test hold loads open."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int]] = []
        self.unloads: list[str] = []
        self.gate: asyncio.Event | None = None

    async def load(self, name, spec, version):
        self.loads.append((name, version))
        if self.gate is not None:
            await self.gate.wait()
        if "broken" in spec.storage_uri:
            raise ModelLoadError(f"model {name}: cannot unpickle {spec.storage_uri}")
        return LoadReport(replica="r1", measured_bytes=1234, load_time_s=0.01, metadata={"inputs": []})

    async def unload(self, name, spec):
        self.unloads.append(name)


def spec(uri="file:///m/a", memory=None):
    return ModelSpec(storage_uri=uri, framework="sklearn", memory=memory)


@pytest.fixture
def make_registry(tmp_path):
    def make(**overrides):
        settings = Settings(cache_dir=str(tmp_path), replica_memory_bytes=2**30, **overrides)
        placer = FakePlacer()
        store = StateStore(str(tmp_path / "models.json"))
        return ModelRegistry(settings, store=store, placer=placer), placer, store
    return make


async def settle(registry, name):
    return await registry.wait_settled(name, timeout_s=5)


async def test_register_moves_to_ready_and_records_measurements(make_registry):
    registry, placer, _ = make_registry()
    placer.gate = asyncio.Event()
    status = await registry.register("m1", spec(), "repository")
    assert status.state in ("PENDING", "DOWNLOADING")  # registered before loading: visible at once
    placer.gate.set()
    status = await settle(registry, "m1")
    assert status.state == "READY"
    assert status.measured_bytes == 1234
    assert status.replicas == ("r1",)
    assert status.load_time_s is not None
    assert placer.loads == [("m1", 1)]


async def test_failed_load_is_failed_with_reason_and_not_retried(make_registry):
    registry, placer, _ = make_registry()
    await registry.register("bad", spec("file:///broken"), "repository")
    status = await settle(registry, "bad")
    assert status.state == "FAILED"
    assert "cannot unpickle file:///broken" in status.reason
    await asyncio.sleep(0)  # give a hot loop the chance to show itself
    assert placer.loads == [("bad", 1)]
    # registering again retries once
    await registry.register("bad", spec("file:///broken"), "repository")
    await settle(registry, "bad")
    assert placer.loads == [("bad", 1), ("bad", 1)]


async def test_same_spec_is_idempotent_new_spec_is_new_version(make_registry):
    registry, placer, _ = make_registry()
    await registry.register("m", spec(), "repository")
    await settle(registry, "m")
    await registry.register("m", spec(), "repository")
    assert placer.loads == [("m", 1)]
    await registry.register("m", spec("file:///m/b"), "repository")
    status = await settle(registry, "m")
    assert status.version == 2 and status.storage_uri == "file:///m/b"


async def test_new_version_keeps_old_ready_while_loading(make_registry):
    registry, placer, _ = make_registry()
    await registry.register("m", spec(), "repository")
    await settle(registry, "m")
    placer.gate = asyncio.Event()
    await registry.register("m", spec("file:///m/b"), "repository")
    await asyncio.sleep(0)
    assert registry.get("m").state == "READY"  # old version still serving
    placer.gate.set()
    assert (await settle(registry, "m")).version == 2


async def test_memory_admission_refuses_oversized_model(make_registry):
    registry, placer, _ = make_registry()
    with pytest.raises(MemoryUnavailable, match="exceeds the model-memory budget"):
        await registry.register("huge", spec(memory="2Gi"), "kubernetes")
    assert placer.loads == []
    with pytest.raises(ModelNotFound):
        registry.get("huge")


async def test_invalid_names_and_specs_are_refused(make_registry):
    registry, _, _ = make_registry()
    for name in ("a/b", "..", "../etc", "", "x y"):
        with pytest.raises(InvalidSpec):
            await registry.register(name, spec(), "repository")
    with pytest.raises(UnsupportedFramework, match="framework"):
        ModelSpec.parse({"storageUri": "/x", "framework": "tensorflow"}, name="m")


async def test_unregister_persists_and_unloads(make_registry):
    registry, placer, store = make_registry()
    await registry.register("a", spec(), "repository")
    await registry.register("b", spec("file:///b"), "kubernetes")
    assert sorted(e["modelName"] for e in store.read()) == ["a", "b"]
    await registry.unregister("a")
    assert placer.unloads == ["a"]
    assert [e["modelName"] for e in store.read()] == ["b"]
    with pytest.raises(ModelNotFound):
        await registry.unregister("a")
    with pytest.raises(ModelNotFound):  # source must match when given
        await registry.unregister("b", source="repository")


async def test_restore_brings_back_exactly_the_registered_set(make_registry, tmp_path):
    registry, placer, store = make_registry()
    await registry.register("a", spec(), "repository")
    await registry.register("b", spec("file:///b0"), "kubernetes")
    await registry.register("b", spec("file:///b", memory="64Mi"), "kubernetes")
    await registry.unregister("a")
    await settle(registry, "b")
    await registry.register("c", spec("file:///c"), "repository")
    await settle(registry, "c")
    placer.gate = asyncio.Event()  # d never finishes loading before the restart
    await registry.register("d", spec("file:///d"), "repository")
    data = {e["modelName"]: e for e in json.loads((tmp_path / "models.json").read_text())}
    assert data["b"] == {"modelName": "b", "modelSpec": {"framework": "sklearn", "memory": "64Mi",
                                                         "storageUri": "file:///b"}, "source": "kubernetes",
                         "version": 2, "ready": True, "measuredBytes": 1234}
    assert sorted(data) == ["b", "c", "d"] and "ready" not in data["d"]
    again, placer, _ = make_registry()
    assert await again.restore() == 3
    status = again.get("b")
    # READY before the restart: READY at once, at its version, without loading it again
    assert status.state == "READY" and status.source == "kubernetes" and status.version == 2
    assert (await settle(again, "d")).state == "READY"
    assert placer.loads == [("d", 1)], "only the model that had not loaded is loaded"


async def test_watch_pushes_changes_and_deletions(make_registry):
    registry, _, _ = make_registry()
    first = await registry.watch(None, 0, timeout_s=0)
    assert first.reset and first.models == []
    waiter = asyncio.create_task(registry.watch(first.epoch, first.change, timeout_s=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await registry.register("a", spec(), "repository")
    answer = await waiter
    assert not answer.reset and [m.name for m in answer.models] == ["a"]
    await settle(registry, "a")
    await registry.unregister("a")
    later = await registry.watch(first.epoch, answer.change, timeout_s=0)
    assert "a" in later.deleted
    # a subscriber from another registry lifetime gets a full reset
    other = await registry.watch("stale-epoch", 999, timeout_s=0)
    assert other.reset


async def test_thousand_registrations_share_few_state_writes(make_registry, monkeypatch):
    registry, placer, store = make_registry()
    writes = []
    original = store.write
    monkeypatch.setattr(store, "write", lambda entries: (writes.append(len(entries)), original(entries)))
    await asyncio.gather(*(registry.register(f"m{i}", spec(f"file:///m{i}"), "repository") for i in range(1000)))
    assert len(store.read()) == 1000
    assert len(writes) < 1000  # group commit
    statuses = await asyncio.gather(*(settle(registry, f"m{i}") for i in range(1000)))
    assert {s.state for s in statuses} == {"READY"}


async def test_the_index_says_who_holds_what_by_the_replicas_own_reports(make_registry):
    registry, _, _ = make_registry()
    await registry.register("a", spec(), "repository")
    await registry.register("b", spec("file:///b"), "repository")
    await settle(registry, "a"), await settle(registry, "b")
    await registry.report_residency("r2", loaded=["a"], evicted=[])
    assert registry.get("a").replicas == ("r1", "r2")

    def report(replica, **versions):
        return ReplicaReport(replica=replica, node="n", used_bytes=0, budget_bytes=1, evictions=0,
                             models={n: ResidentModel(version=v, charged_bytes=1, measured_bytes=1)
                                     for n, v in versions.items()})

    # r1 died; r2 still holds a; r3 holds b, and an old version of a, which does not count
    await registry.reconcile([report("r2", a=1), report("r3", b=1)])
    assert registry.get("a").replicas == ("r2",) and registry.get("b").replicas == ("r3",)
    await registry.reconcile([report("r3", a=0, b=1)])
    assert registry.get("a").replicas == ()


async def test_a_load_that_never_answers_ends_failed(make_registry):
    registry, placer, _ = make_registry(load_timeout_s=0.2)
    placer.gate = asyncio.Event()  # never set: the replica never answers
    await registry.register("stuck", spec(), "repository")
    status = await settle(registry, "stuck")
    assert status.state == "FAILED" and "no replica finished loading it" in status.reason


async def test_a_wait_that_times_out_is_an_error_not_a_status(make_registry):
    registry, placer, _ = make_registry()
    placer.gate = asyncio.Event()  # the load is still running when the wait gives up
    await registry.register("slow", spec(), Source.API)
    with pytest.raises(LoadTimedOut, match="not READY within"):
        await registry.wait_settled("slow", timeout_s=0.05)
    placer.gate.set()
    assert (await settle(registry, "slow")).state is ModelState.READY


async def test_repository_load_waits_at_most_load_timeout_s(make_registry):
    registry, placer, _ = make_registry(load_timeout_s=0.2, load_attempts=1)
    placer.gate = asyncio.Event()  # never answers
    status = await registry.load("stuck", spec(), Source.API)
    # The load's own bound fails the model; the wait returns that, within the same timeout.
    assert status.state is ModelState.FAILED and "no replica finished loading it within 0.2s" in status.reason
    retrying, placer, _ = make_registry(load_timeout_s=0.2, load_attempts=3, load_backoff_s=5)
    placer.gate = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(LoadTimedOut):  # still retrying when the wait's bound is reached: an error, not a 200
        await retrying.load("stuck", spec(), Source.API)
    assert time.monotonic() - started < 0.2 + 1.0 + 0.5


async def test_a_model_a_source_cannot_declare_is_failed_with_its_reason(make_registry):
    registry, placer, store = make_registry()
    status = await registry.register_failed("broken-folder", "no model file in /repo/broken-folder",
                                            Source.REPOSITORY_FOLDER)
    assert status.state is ModelState.FAILED and status.spec is None
    assert registry.get("broken-folder").reason == "no model file in /repo/broken-folder"
    assert placer.loads == [] and store.read() == []  # never loaded, never persisted
    await registry.register("broken-folder", spec(), Source.API)  # a real spec replaces it
    assert (await settle(registry, "broken-folder")).state is ModelState.READY


async def test_every_start_serves_what_the_repository_declares_now(make_registry):
    registry, _, _ = make_registry()
    await registry.restore()
    await registry.seed([("a", spec("file:///repo-a/a"), Source.REPOSITORY_FOLDER)])
    await registry.register("mine", spec("file:///mine"), Source.API)
    # the next start serves another repository with the same state file
    again, placer, _ = make_registry()
    await again.restore()
    await again.seed([("b", spec("file:///repo-b/b"), Source.REPOSITORY_FOLDER),
                      ("mine", spec("file:///repo-b/mine"), Source.REPOSITORY_FOLDER)])
    assert {m.name: m.source for m in again.list()} == {"b": Source.REPOSITORY_FOLDER, "mine": Source.API}
    assert again.get("mine").storage_uri == "file:///mine", "a model loaded by hand is not replaced by a seed"


async def test_a_declared_model_a_user_unloaded_stays_unloaded_until_loaded_again(make_registry):
    registry, _, _ = make_registry()
    await registry.restore()
    seeds = [("a", spec("file:///a"), Source.REPOSITORY_FOLDER), ("b", spec("file:///b"), Source.MODELS_FILE)]
    await registry.seed(seeds)
    await registry.unregister("a")
    again, _, _ = make_registry()
    await again.restore()
    await again.seed(seeds)
    assert [m.name for m in again.list()] == ["b"]
    await again.register("a", spec("file:///a"), Source.API)  # loaded again by hand
    third, _, _ = make_registry()
    await third.restore()
    await third.seed(seeds)
    assert sorted(m.name for m in third.list()) == ["a", "b"]


async def test_folders_rayms_cannot_read_are_failed_and_the_rest_serve(make_registry):
    registry, _, _ = make_registry()
    await registry.restore()
    await registry.seed([("good", spec(), Source.REPOSITORY_FOLDER),
                         ("empty", "no model file in /repo/empty", Source.REPOSITORY_FOLDER),
                         ("toobig", spec(memory="4Gi"), Source.REPOSITORY_FOLDER),
                         ("bad name!", "whatever", Source.REPOSITORY_FOLDER)])
    assert (await settle(registry, "good")).state is ModelState.READY
    assert registry.get("empty").state is ModelState.FAILED and "no model file" in registry.get("empty").reason
    assert "exceeds the model-memory budget" in registry.get("toobig").reason
    assert sorted(m.name for m in registry.list()) == ["empty", "good", "toobig"]


def test_instances_on_other_ports_or_repositories_keep_state_apart(tmp_path):
    base = Settings(cache_dir=str(tmp_path), model_repository=str(tmp_path / "a"))
    uris = {base.resolved_state_uri(),
            Settings(cache_dir=str(tmp_path), model_repository=str(tmp_path / "b")).resolved_state_uri(),
            Settings(cache_dir=str(tmp_path), model_repository=str(tmp_path / "a"), port=8001).resolved_state_uri(),
            Settings(cache_dir=str(tmp_path), models_file=str(tmp_path / "m.json")).resolved_state_uri()}
    assert len(uris) == 4
    assert base.resolved_state_uri() == Settings(cache_dir=str(tmp_path),
                                                 model_repository=str(tmp_path / "a")).resolved_state_uri()
    assert Settings(state_uri="s3://b/state.json").resolved_state_uri() == "s3://b/state.json"


async def test_a_new_version_that_fails_leaves_the_old_one_serving(make_registry):
    registry, placer, store = make_registry()
    await registry.register("m", spec("file:///m/good"), Source.API)
    await settle(registry, "m")
    with pytest.raises(ModelLoadFailed, match="version 2 failed to load.*cannot unpickle file:///broken"):
        await registry.load("m", spec("file:///broken"), Source.API)
    status = registry.get("m")
    assert (status.state, status.version, status.storage_uri) == (ModelState.READY, 1, "file:///m/good")
    assert "version 1 is still serving" in status.reason
    [entry] = store.read()
    assert entry["modelSpec"]["storageUri"] == "file:///m/good" and entry["version"] == 1


async def test_transient_load_failures_are_retried_and_permanent_ones_are_not(make_registry):
    registry, placer, _ = make_registry(load_backoff_s=0.01)
    original = placer.load
    died = []

    async def dies_once(name, spec, version):
        if name == "flaky" and not died:
            died.append(name)
            raise Overloaded("a rayms replica is restarting; retry shortly")
        return await original(name, spec, version)

    placer.load = dies_once
    await registry.register("flaky", spec("file:///flaky"), Source.API)
    assert (await settle(registry, "flaky")).state is ModelState.READY
    assert placer.loads == [("flaky", 1)] and died == ["flaky"]
    await registry.register("bad", spec("file:///broken"), Source.API)
    assert (await settle(registry, "bad")).state is ModelState.FAILED
    assert placer.loads.count(("bad", 1)) == 1


async def test_a_state_write_that_fails_changes_nothing(make_registry, monkeypatch):
    registry, placer, store = make_registry()
    await registry.register("kept", spec("file:///kept"), Source.API)
    await settle(registry, "kept")

    def broken(entries):
        raise StorageError("cannot write model state: disk full")

    monkeypatch.setattr(store, "write", broken)
    with pytest.raises(StorageError, match="disk full"):
        await registry.register("new", spec("file:///new"), Source.API)
    with pytest.raises(ModelNotFound):
        registry.get("new")
    with pytest.raises(StorageError):
        await registry.register("kept", spec("file:///kept-v2"), Source.API)
    assert (registry.get("kept").version, registry.get("kept").storage_uri) == (1, "file:///kept")
    with pytest.raises(StorageError):
        await registry.unregister("kept")
    assert registry.get("kept").state is ModelState.READY and placer.unloads == []
