"""A replica's LRU: count and memory limits, per-model locks, version swaps. No Ray."""

from __future__ import annotations

import asyncio

import pytest

from rayms.config import ModelSpec
from rayms.errors import MemoryUnavailable, ModelLoadError
from rayms.model_cache import ModelCache

MI = 2**20


def spec(name, memory=None, uri=None):
    return ModelSpec(storage_uri=uri or f"/models/{name}", framework="sklearn", memory=memory)


class Loads:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.changes: list[tuple[list[str], list[str]]] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def load(self, name, spec, version):
        self.calls.append((name, version))
        if name in self.gates:
            await self.gates[name].wait()
        if "broken" in spec.storage_uri:
            raise ModelLoadError(f"model {name}: corrupt")
        return (f"runtime-{name}-v{version}", 10 * MI)

    def changed(self, loaded, evicted):
        self.changes.append((loaded, evicted))


def make(max_models=10, budget=100 * MI):
    loads = Loads()
    return ModelCache(max_models=max_models, budget_bytes=budget, load_fn=loads.load, on_change=loads.changed), loads


async def test_count_limit_evicts_least_recently_used():
    cache, loads = make(max_models=2)
    await cache.get("a", spec("a"), 1)
    await cache.get("b", spec("b"), 1)
    await cache.get("a", spec("a"), 1)  # a is now most recent
    await cache.get("c", spec("c"), 1)
    assert set(cache.resident()) == {"a", "c"}
    assert cache.evictions == 1
    # b leaves only once c has loaded: one change reports both
    assert loads.changes[-1] == (["c"], ["b"])


async def test_memory_budget_evicts_until_declared_memory_fits():
    cache, _ = make(budget=300 * MI)
    for name in ("a", "b", "c"):
        await cache.get(name, spec(name, memory="100Mi"), 1)
    await cache.get("a", spec("a", memory="100Mi"), 1)
    await cache.get("d", spec("d", memory="100Mi"), 1)
    assert set(cache.resident()) == {"a", "c", "d"}  # b was least recently used
    assert cache.used_bytes == 300 * MI
    await cache.get("e", spec("e", memory="250Mi"), 1)
    assert set(cache.resident()) == {"e"}


async def test_model_larger_than_budget_is_refused_without_evicting():
    cache, loads = make(budget=300 * MI)
    await cache.get("a", spec("a", memory="100Mi"), 1)
    with pytest.raises(MemoryUnavailable, match="exceeds this replica's model-memory budget"):
        await cache.get("huge", spec("huge", memory="1Gi"), 1)
    assert set(cache.resident()) == {"a"}
    assert ("huge", 1) not in loads.calls


async def test_undeclared_memory_is_charged_its_measured_size():
    cache, _ = make(budget=25 * MI)
    await cache.get("a", spec("a"), 1)
    await cache.get("b", spec("b"), 1)
    await cache.get("c", spec("c"), 1)  # 10Mi each measured: only two fit
    assert set(cache.resident()) == {"b", "c"}


async def test_concurrent_gets_of_one_model_load_it_once_and_others_do_not_wait():
    cache, loads = make()
    loads.gates["slow"] = asyncio.Event()
    slow = [asyncio.create_task(cache.get("slow", spec("slow"), 1)) for _ in range(5)]
    await asyncio.sleep(0)
    fast = await asyncio.wait_for(cache.get("fast", spec("fast"), 1), timeout=2)  # per-model lock
    assert fast.runtime == "runtime-fast-v1"
    loads.gates["slow"].set()
    results = await asyncio.gather(*slow)
    assert {r.runtime for r in results} == {"runtime-slow-v1"}
    assert loads.calls.count(("slow", 1)) == 1


async def test_failed_load_leaves_cache_unchanged_and_is_retried_next_time():
    cache, loads = make()
    await cache.get("a", spec("a"), 1)
    with pytest.raises(ModelLoadError):
        await cache.get("bad", spec("bad", uri="/broken"), 1)
    assert set(cache.resident()) == {"a"}
    with pytest.raises(ModelLoadError):
        await cache.get("bad", spec("bad", uri="/broken"), 1)
    assert loads.calls.count(("bad", 1)) == 2


@pytest.mark.parametrize("limit", ["count", "memory"])
async def test_a_failed_load_evicts_nothing_even_at_the_limit(limit):
    cache, loads = make(max_models=1) if limit == "count" else make(budget=100 * MI)
    memory = None if limit == "count" else "60Mi"
    await cache.get("a", spec("a", memory=memory), 1)
    with pytest.raises(ModelLoadError):
        await cache.get("bad", spec("bad", memory=memory, uri="/broken"), 1)
    assert set(cache.resident()) == {"a"} and cache.evictions == 0
    assert all(not evicted for _, evicted in loads.changes)


async def test_new_version_loads_in_background_while_old_serves():
    cache, loads = make()
    await cache.get("m", spec("m"), 1)
    loads.gates["m"] = asyncio.Event()
    served = await cache.get("m", spec("m", uri="/models/m2"), 2)
    assert served.version == 1  # no request waits or fails during the swap
    loads.gates["m"].set()
    for _ in range(100):
        await asyncio.sleep(0)
        if cache.peek("m").version == 2:
            break
    assert cache.peek("m").runtime == "runtime-m-v2"


async def test_unload_reports_and_frees():
    cache, loads = make()
    await cache.get("a", spec("a"), 1)
    assert cache.unload("a") is True
    assert cache.unload("a") is False
    assert cache.resident() == {} and cache.used_bytes == 0
    assert loads.changes[-1] == ([], ["a"])


async def test_hit_serves_only_a_current_resident_model_and_marks_it_recent():
    cache, _ = make(max_models=2)
    await cache.get("a", spec("a"), 1)
    await cache.get("b", spec("b"), 1)
    assert cache.hit("a", 1).runtime == "runtime-a-v1"  # a is now most recent
    assert cache.hit("a", 2) is None and cache.hit("zzz", 1) is None
    await cache.get("c", spec("c"), 1)
    assert set(cache.resident()) == {"a", "c"}


async def test_without_a_count_limit_memory_alone_decides_and_the_larger_of_declared_and_measured_is_charged():
    cache, _ = make(max_models=None, budget=35 * MI)  # each model measures 10 MiB when loaded
    for name in ("a", "b", "c"):
        await cache.get(name, spec(name), 1)
    assert set(cache.resident()) == {"a", "b", "c"}
    await cache.get("d", spec("d", memory="1Mi"), 1)  # declares 1 MiB, measures 10: charged 10
    assert cache.resident()["d"].charged_bytes == 10 * MI
    assert set(cache.resident()) == {"b", "c", "d"}
    await cache.get("e", spec("e", memory="20Mi"), 1)  # declares more than it measures: charged 20
    assert cache.resident()["e"].charged_bytes == 20 * MI and set(cache.resident()) == {"d", "e"}
