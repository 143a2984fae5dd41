"""One replica's set of loaded models: an LRU bounded by a model count and a memory budget.

Ray Serve's own multiplexing counts models and takes one lock per replica, so one slow load stalls every
other load and a failed load still evicts a model. This cache locks per model, charges each model its
declared memory or what it measured on load, whichever is larger, and evicts least-recently-used models only once
a load has succeeded: a load that fails evicts nothing. The price is that, while a model loads, the replica
may hold up to that one model beyond its budget. It keeps serving the old version of a model while a new
version loads.

Plain asyncio; the model host (:mod:`rayms.host`) owns one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rayms.config import ModelSpec
from rayms.errors import MemoryUnavailable
from rayms.status import ResidentModel

logger = logging.getLogger("rayms.replica")


@dataclass
class LoadedModel:
    name: str
    version: int
    spec: ModelSpec
    runtime: Any
    charged_bytes: int
    measured_bytes: int
    load_time_s: float
    batcher: Any = None  # the replica's Batcher for this model once decided; False when it does not batch


LoadFn = Callable[[str, ModelSpec, int], Awaitable[tuple[Any, int]]]
ChangeFn = Callable[[list[str], list[str]], None]


class ModelCache:
    """LRU of :class:`LoadedModel` with per-model load locks.

    ``load_fn(name, spec, version)`` returns ``(runtime, measured_bytes)``; ``on_change(loaded, evicted)``
    is told whenever the resident set changes (the replica reports it for routing and the index).
    """

    def __init__(self, *, max_models: int | None, budget_bytes: int, load_fn: LoadFn, on_change: ChangeFn) -> None:
        self.max_models = max_models
        self.budget_bytes = budget_bytes
        self._load_fn = load_fn
        self._on_change = on_change
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: set[str] = set()
        self._background: set[asyncio.Task] = set()
        self.evictions = 0

    # ---------------------------------------------------------------- reading
    def peek(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def resident(self) -> dict[str, ResidentModel]:
        return {
            n: ResidentModel(version=m.version, charged_bytes=m.charged_bytes, measured_bytes=m.measured_bytes,
                             batches=m.batcher.batches if m.batcher else 0,
                             batched_requests=m.batcher.batched_requests if m.batcher else 0)
            for n, m in self._models.items()
        }

    def names_loaded_or_loading(self) -> list[str]:
        return list(self._models.keys() | self._loading)

    @property
    def used_bytes(self) -> int:
        return sum(m.charged_bytes for m in self._models.values())

    # ---------------------------------------------------------------- getting
    def hit(self, name: str, version: int) -> LoadedModel | None:
        """The resident model if it is at ``version`` or newer (marked most recently used), else None."""
        model = self._models.get(name)
        if model is None or model.version < version:
            return None
        self._models.move_to_end(name)
        return model

    async def get(self, name: str, spec: ModelSpec, version: int) -> LoadedModel:
        """Return the loaded model, loading it on a miss.

        An older version that is still resident keeps answering while the newer one loads in the
        background, so a spec change never fails a request.
        """
        model = self._models.get(name)
        if model is not None:
            self._models.move_to_end(name)
            if model.version >= version:
                return model
            self.refresh_in_background(name, spec, version)
            return model
        return await self.load(name, spec, version)

    async def load(self, name: str, spec: ModelSpec, version: int) -> LoadedModel:
        """Load ``name`` at ``version`` unless that version (or a newer one) is already resident."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._loading.add(name)
        try:
            async with lock:
                model = self._models.get(name)
                if model is not None and model.version >= version:
                    self._models.move_to_end(name)
                    return model
                declared = spec.memory_bytes
                if declared > self.budget_bytes:
                    raise MemoryUnavailable(
                        f"model {name}: declared memory {declared} bytes exceeds this replica's "
                        f"model-memory budget of {self.budget_bytes} bytes")
                started = time.monotonic()
                runtime, measured = await self._load_fn(name, spec, version)
                charged = max(declared, measured)
                loaded = LoadedModel(
                    name=name, version=version, spec=spec, runtime=runtime, charged_bytes=charged,
                    measured_bytes=measured, load_time_s=time.monotonic() - started)
                # Load the new version before dropping the old one: the swap is one dict assignment. Only now,
                # with the load a success, make room for it.
                self._models[name] = loaded
                self._models.move_to_end(name)
                evicted = self._evict_for(keep=name)
                self._on_change([name], evicted)
                return loaded
        finally:
            if not lock.locked():
                self._loading.discard(name)
                if not lock._waiters:  # noqa: SLF001 - drop idle locks so the dict does not grow forever
                    self._locks.pop(name, None)

    def refresh_in_background(self, name: str, spec: ModelSpec, version: int) -> None:
        """Start loading ``version`` of a resident model; the resident version answers until it is in."""
        if name in self._loading:
            return

        async def refresh() -> None:
            try:
                await self.load(name, spec, version)
            except Exception as exc:  # the old version keeps serving; the registry reports the failure
                logger.warning("model %s: background reload to version %d failed: %s", name, version, exc)

        task = asyncio.get_running_loop().create_task(refresh())
        self._background.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- dropping
    def _evict_for(self, *, keep: str) -> list[str]:
        """Drop least-recently-used models other than ``keep`` until count and memory are within limits."""
        evicted: list[str] = []
        while self._models and (self._over_count() or self.used_bytes > self.budget_bytes):
            victim = next((n for n in self._models if n != keep), None)
            if victim is None:
                break
            self._drop(victim)
            evicted.append(victim)
            self.evictions += 1
            logger.info("model %s: evicted (least recently used)", victim)
        return evicted

    def _over_count(self) -> bool:
        return self.max_models is not None and len(self._models) > self.max_models

    def _drop(self, name: str) -> None:
        model = self._models.pop(name)
        close = getattr(model.runtime, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:
                logger.warning("model %s: close failed: %s", name, exc)

    def unload(self, name: str) -> bool:
        """Drop ``name`` from memory; True when it was resident."""
        if name not in self._models:
            return False
        self._drop(name)
        self._on_change([], [name])
        return True
