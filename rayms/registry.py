"""The registry: the one source of truth for which models should exist and what state each is in.

Every way of adding a model (repository API, models file, Kubernetes, Python) ends in
:meth:`ModelRegistry.register`; every way of removing one ends in :meth:`ModelRegistry.unregister`.
The registry persists the desired set (see :mod:`rayms.statestore`), drives each model through its
lifecycle by asking a replica to load it, and pushes every change to subscribers through
:meth:`ModelRegistry.watch` (a long poll), so the router and the replicas keep a local view and never
ask per request.

This module is plain asyncio. Ray appears only behind the :class:`Placer` seam (how a load reaches a
replica) and in :mod:`rayms.app`, which wraps the registry in a Serve deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import MemoryUnavailable, ModelNotFound, RaymsError
from rayms.statestore import StateStore

logger = logging.getLogger("rayms.registry")


class ModelState(str, Enum):
    """Lifecycle of one model. FAILED keeps its reason until the model is registered again."""

    PENDING = "PENDING"
    DOWNLOADING = "DOWNLOADING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


class Placer(Protocol):
    """How the registry reaches replicas. The Ray implementation lives in :mod:`rayms.app`."""

    async def load(self, name: str, spec: ModelSpec, version: int) -> dict[str, Any]:
        """Load ``name`` on a replica; return ``{"measured_bytes", "load_time_s", "replica", "metadata"}``."""

    async def unload(self, name: str, spec: ModelSpec) -> None:
        """Drop ``name`` from every replica and its artifact from every node's cache."""


@dataclass
class ModelRecord:
    name: str
    spec: ModelSpec | None  # None: a model that could not become a spec (see register_failed)
    source: str
    version: int = 1
    state: ModelState = ModelState.PENDING
    reason: str = ""
    updated_at: float = field(default_factory=time.time)
    measured_bytes: int = 0
    load_time_s: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    replicas: set[str] = field(default_factory=set)
    change: int = 0

    def status(self) -> dict[str, Any]:
        """The record as subscribers and the repository index see it (JSON-ready)."""
        return {
            "name": self.name,
            "version": str(self.version),
            "state": self.state.value,
            "reason": self.reason,
            "source": self.source,
            "framework": self.spec.framework if self.spec else "",
            "storageUri": self.spec.storage_uri if self.spec else "",
            "spec": self.spec.to_wire() if self.spec else {},
            "declaredMemory": self.spec.memory_bytes if self.spec else 0,
            "measuredMemory": self.measured_bytes,
            "loadTimeS": self.load_time_s,
            "replicas": sorted(self.replicas),
            "metadata": self.metadata,
            "updatedAt": self.updated_at,
        }


class ModelRegistry:
    """Desired set of models, their lifecycle, and change notification."""

    def __init__(self, settings: Settings, *, store: StateStore, placer: Placer) -> None:
        self._settings = settings
        self._store = store
        self._placer = placer
        self._records: dict[str, ModelRecord] = {}
        self._tombstones: dict[str, int] = {}
        self._change = 0
        self._epoch = uuid.uuid4().hex
        self._changed = asyncio.Condition()
        self._load_slots = asyncio.Semaphore(settings.max_concurrent_loads)
        self._tasks: dict[str, asyncio.Task] = {}
        self._settle_waiters: dict[str, set[asyncio.Future]] = {}
        self._flush_lock = asyncio.Lock()
        self._dirty = 0
        self._flushed = 0

    # ---------------------------------------------------------------- start-up
    async def restore(self) -> int:
        """Re-register every model of the persisted desired set; return how many."""
        entries = await asyncio.to_thread(self._store.read)
        for entry in entries:
            try:
                spec = ModelSpec.parse(entry["modelSpec"], name=entry["modelName"])
                self._put(entry["modelName"], spec, entry.get("source", "repository"),
                          version=int(entry.get("version", 1)))
            except (RaymsError, KeyError, TypeError, ValueError) as exc:
                logger.error("model %s: cannot restore from %s: %s", entry.get("modelName"), self._store.uri, exc)
        await self._notify()
        logger.info("restored %d models from %s", len(entries), self._store.uri)
        return len(entries)

    # ---------------------------------------------------------------- desired state
    async def register(self, name: str, spec: ModelSpec | dict, source: str = "repository") -> dict[str, Any]:
        """Add a model or change its spec. Returns its status at once; loading goes on in the background.

        Registering the same spec again is a no-op unless the model FAILED (then it retries).
        """
        validate_model_name(name)
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec, name=name)
        budget = self._settings.replica_memory_bytes
        if spec.memory_bytes > budget:
            raise MemoryUnavailable(
                f"model {name}: declared memory {spec.memory} ({spec.memory_bytes} bytes) exceeds the "
                f"model-memory budget of one replica ({budget} bytes)"
            )
        current = self._records.get(name)
        if current and current.spec == spec and current.source == source and current.state != ModelState.FAILED:
            return current.status()
        record = self._put(name, spec, source)
        await self._notify()
        await self._persist()
        return record.status()

    async def register_failed(self, name: str, reason: str, source: str) -> dict[str, Any]:
        """Show a model that cannot even be described (a repository folder without a model file, an unknown
        MLServer runtime) as FAILED with ``reason``. Never loaded nor persisted: the next scan finds it
        again. A model registered under that name is left alone."""
        validate_model_name(name)
        if name in self._records:
            return self._records[name].status()
        record = ModelRecord(name=name, spec=None, source=source, state=ModelState.FAILED, reason=reason)
        self._records[name] = record
        self._tombstones.pop(name, None)
        self._touch(record)
        await self._notify()
        return record.status()

    def _put(self, name: str, spec: ModelSpec, source: str, version: int = 1) -> ModelRecord:
        current = self._records.get(name)
        if current is None:
            record = ModelRecord(name=name, spec=spec, source=source, version=version)
            self._records[name] = record
            self._tombstones.pop(name, None)
        elif current.spec != spec:
            # A new version: the old one keeps serving (state stays READY) until the new one has loaded.
            record = current
            record.spec, record.source, record.version = spec, source, current.version + 1
            if record.state != ModelState.READY:
                record.state, record.reason = ModelState.PENDING, ""
        else:
            record = current
            record.source = source
            record.state, record.reason = ModelState.PENDING, ""
        self._touch(record)
        self._start_load(record)
        return record

    async def unregister(self, name: str, source: str | None = None) -> None:
        """Remove a model: from the desired set, from every replica, and from the artifact caches."""
        record = self._records.get(name)
        if record is None or (source is not None and record.source != source):
            raise ModelNotFound(name)
        task = self._tasks.pop(name, None)
        if task:
            task.cancel()
        record.state, record.reason = ModelState.UNLOADING, ""
        self._touch(record)
        await self._notify()
        # Forget it first so a restart during the unload does not bring it back.
        del self._records[name]
        self._tombstones[name] = self._next_change()
        self._wake_waiters(name)  # a load waiting on it learns that it is gone
        await self._persist()
        try:
            if record.spec is not None:
                await self._placer.unload(name, record.spec)
        except Exception as exc:  # the model is gone from the desired set whatever a replica says
            logger.warning("model %s: unload on replicas reported: %s", name, exc)
        await self._notify()
        logger.info("model %s: unloaded", name)

    # ---------------------------------------------------------------- lifecycle
    def _start_load(self, record: ModelRecord) -> None:
        previous = self._tasks.pop(record.name, None)
        if previous:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._load(record.name, record.version))
        self._tasks[record.name] = task
        task.add_done_callback(lambda t, n=record.name: self._tasks.pop(n, None) if self._tasks.get(n) is t else None)

    async def _load(self, name: str, version: int) -> None:
        async with self._load_slots:
            record = self._records.get(name)
            if record is None or record.version != version:
                return
            if record.state != ModelState.READY:
                record.state = ModelState.DOWNLOADING
                self._touch(record)
                await self._notify()
            started = time.monotonic()
            try:
                # Bounded: a load that never answers (a stuck replica) ends FAILED instead of hanging forever.
                result = await asyncio.wait_for(self._placer.load(name, record.spec, version),
                                                timeout=self._settings.load_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    exc = TimeoutError(f"model {name}: no replica finished loading it within "
                                       f"{self._settings.load_timeout_s:.0f}s")
                if self._records.get(name) is record and record.version == version:
                    # Not retried here: a failed model waits for the next register (no hot loop).
                    record.state, record.reason = ModelState.FAILED, _reason(exc)
                    self._touch(record)
                    await self._notify()
                    logger.error("model %s: version %d failed: %s", name, version, record.reason)
                return
            if self._records.get(name) is not record or record.version != version:
                return
            # Settled: leave the task table before notifying, or a waiter woken by this READY still sees
            # the load running and sleeps until some unrelated change (or its timeout) wakes it again.
            if self._tasks.get(name) is asyncio.current_task():
                del self._tasks[name]
            record.state, record.reason = ModelState.READY, ""
            record.measured_bytes = int(result.get("measured_bytes") or 0)
            record.load_time_s = round(time.monotonic() - started, 4)
            record.metadata = result.get("metadata") or {}
            if result.get("replica"):
                record.replicas.add(result["replica"])
            self._touch(record)
            await self._notify()
            logger.info("model %s: version %d READY in %.3fs", name, version, record.load_time_s)

    async def report(self, name: str, version: int, state: str, reason: str = "") -> None:
        """A replica tells how a load it runs is going (e.g. LOADING once the artifact is local)."""
        record = self._records.get(name)
        if record is None or record.version != version or record.state == ModelState.READY:
            return
        if record.state in (ModelState.FAILED, ModelState.UNLOADING):
            return
        record.state, record.reason = ModelState(state), reason
        self._touch(record)
        await self._notify()

    async def report_residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        """A replica tells which models it now holds in memory (for the index)."""
        touched = False
        for name in loaded:
            if (record := self._records.get(name)) and replica not in record.replicas:
                record.replicas.add(replica)
                self._touch(record)
                touched = True
        for name in evicted:
            if (record := self._records.get(name)) and replica in record.replicas:
                record.replicas.discard(replica)
                self._touch(record)
                touched = True
        if touched:
            await self._notify()

    async def keep_replicas(self, alive: set[str]) -> None:
        """Replicas not in ``alive`` went away: they hold nothing any more."""
        touched = False
        for record in self._records.values():
            if record.replicas - alive:
                record.replicas &= alive
                self._touch(record)
                touched = True
        if touched:
            await self._notify()

    # ---------------------------------------------------------------- reading
    def get(self, name: str) -> dict[str, Any]:
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        return record.status()

    def list(self, source: str | None = None) -> list[dict[str, Any]]:
        return [r.status() for r in self._records.values() if source is None or r.source == source]

    async def wait_settled(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Wait until ``name`` is READY or FAILED at its current version (or gone), then return its status.

        Each waiter waits on its own model: a thousand loads in flight are not all woken by every change."""
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        if not self._settled(record):
            waiter = asyncio.get_running_loop().create_future()
            self._settle_waiters.setdefault(name, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter, timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._settle_waiters.get(name)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._settle_waiters[name]
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        return record.status()

    def _settled(self, record: ModelRecord) -> bool:
        return record.state == ModelState.FAILED or (
            record.state == ModelState.READY and record.name not in self._tasks)

    def _wake_waiters(self, name: str) -> None:
        for waiter in self._settle_waiters.get(name, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Long poll: return what changed after change number ``since``, waiting up to ``timeout_s``.

        A subscriber from another registry lifetime (``epoch`` differs) gets the full set with
        ``reset: True`` and must replace its view.
        """
        reset = epoch != self._epoch
        if not reset and since >= self._change:
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._change > since), timeout=timeout_s)
                except asyncio.TimeoutError:
                    pass
        if reset:
            models = [r.status() for r in self._records.values()]
            deleted: list[str] = []
        else:
            models = [r.status() for r in self._records.values() if r.change > since]
            deleted = [n for n, c in self._tombstones.items() if c > since]
        return {"epoch": self._epoch, "change": self._change, "reset": reset, "models": models, "deleted": deleted}

    # ---------------------------------------------------------------- internals
    def _next_change(self) -> int:
        self._change += 1
        return self._change

    def _touch(self, record: ModelRecord) -> None:
        record.updated_at = time.time()
        record.change = self._next_change()
        if record.name in self._settle_waiters and self._settled(record):
            self._wake_waiters(record.name)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _persist(self) -> None:
        """Write the desired set; concurrent callers share one write (group commit)."""
        self._dirty += 1
        target = self._dirty
        async with self._flush_lock:
            if self._flushed >= target:
                return
            snapshot_at = self._dirty
            # The version is persisted too: replicas that outlive a registry restart hold models by version,
            # and a restored model restarting at 1 would look older than what they hold.
            entries = [
                {"modelName": r.name, "modelSpec": r.spec.to_wire(), "source": r.source, "version": r.version}
                for r in self._records.values() if r.spec is not None
            ]
            await asyncio.to_thread(self._store.write, entries)
            self._flushed = snapshot_at

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()


def _reason(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    # Ray wraps remote errors; keep the original message, which names the model and the problem.
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RaymsError):
        text = str(cause)
    return text

